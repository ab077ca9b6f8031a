"""Wall time of the slow hand-written methods (issue 24): nearest-neighbour demonstrations and
two-stage chain-of-thought, old code against new, on the embedded model and SST-2.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/bench_hard_methods.py --old-src /tmp/knn-old/src

Each side runs in a subprocess of its own (``--old-src``: the source tree of the code to compare
against, e.g. a ``git worktree add /tmp/knn-old 60211c4``; the new side is this checkout's ``src``),
one after the other, one thread each.  Rows (ms per query):

* ``knn eval``: the comparison's kNN scoring of the test slice (uncalibrated, contextual, batch);
* ``knn batch 1``: each of the first ``--latency`` queries alone, as the comparison times latency
  (after the eval, so the new side's pool cache is warm as in a comparison);
* ``cot eval``: two-stage CoT on the first ``--cot-n`` test examples, generation batch ``--batch-size // 2``
  as the comparison runs it; ``cot batch 1``: the same examples one at a time.

The table also says whether both sides predicted the same (every calibration for kNN; reasoning texts
and labels for CoT).  Samples are seeded: a 64-example demonstration pool from train, the test slice
from test.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def worker(args) -> dict:
    """Measure one side (the ``softprompt`` on ``sys.path``); returns timings and predictions."""
    import torch

    torch.set_num_threads(args.threads)
    from softprompt.core.bank import PromptBank
    from softprompt.core.calibration import Calibration, log_prior_from_scores
    from softprompt.data import load_task
    from softprompt.families.loading import load_model
    from softprompt.hard import baselines as B
    from softprompt.hard import demo_selection as D

    model, tok = load_model("smollm2-135m")
    data = load_task("sst2")
    pool = random.Random(0).sample(data["train"], args.pool)
    test = random.Random(1).sample(data["test"], args.n)
    bank = PromptBank(model, tok)
    task, bs, k = data.task, args.batch_size, args.k
    new = hasattr(D, "PoolEmbeddings")
    cache = D.PoolEmbeddings() if new else None

    def knn(exs, b, full: bool):
        if new:
            cals = ("none", "contextual", "batch") if full else ()
            r = D.knn_few_shot_classify(bank, task, exs, pool, k, calibrations=cals, batch_size=b, pool_cache=cache)
            return r.by_calibration
        r = D.knn_few_shot_classify(bank, task, exs, pool, k, calibration="contextual" if full else "none",
                                    batch_size=b)
        out = {"none": r.raw_scores}
        if full:
            out["contextual"] = r.scores
            out["batch"] = Calibration("batch", log_prior_from_scores(r.raw_scores)).apply(r.raw_scores)  # old code: no batch_calibration
        return out

    out: dict = {"ms": {}, "pred": {}}
    knn(test[:2], 2, False)  # warm-up, as measure.latency does
    t = time.perf_counter()
    scores = knn(test, bs, True)
    out["ms"]["knn eval"] = (time.perf_counter() - t) * 1000 / len(test)
    out["pred"]["knn eval"] = {c: s.argmax(-1).tolist() for c, s in scores.items()}
    single, preds = [], []
    for ex in test[: args.latency]:
        t = time.perf_counter()
        s = knn([ex], 1, False)
        single.append((time.perf_counter() - t) * 1000)
        preds.append(s["none"].argmax(-1).tolist())
    out["ms"]["knn batch 1"] = sum(single) / len(single)
    out["pred"]["knn batch 1"] = preds

    cot = test[: args.cot_n]
    B.cot_two_stage(bank, task, cot[:1], max_new_tokens=args.max_new_tokens, batch_size=1)  # warm-up
    t = time.perf_counter()
    r = B.cot_two_stage(bank, task, cot, max_new_tokens=args.max_new_tokens, batch_size=max(bs // 2, 1))
    out["ms"]["cot eval"] = (time.perf_counter() - t) * 1000 / len(cot)
    out["pred"]["cot eval"] = [r.texts, r.predictions]
    single, texts, labels = [], [], []
    for ex in cot:
        t = time.perf_counter()
        r = B.cot_two_stage(bank, task, [ex], max_new_tokens=args.max_new_tokens, batch_size=1)
        single.append((time.perf_counter() - t) * 1000)
        texts += r.texts
        labels += r.predictions
    out["ms"]["cot batch 1"] = sum(single) / len(single)
    out["pred"]["cot batch 1"] = [texts, labels]
    return out


def run_side(src: str, args) -> dict:
    """Run ``worker`` in a subprocess importing softprompt from ``src``."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "out.json"
        env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": str(args.threads)}
        cmd = [sys.executable, str(HERE), "--worker", str(path), "--n", str(args.n), "--pool", str(args.pool),
               "--k", str(args.k), "--latency", str(args.latency), "--cot-n", str(args.cot_n),
               "--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(args.batch_size),
               "--threads", str(args.threads)]
        subprocess.run(cmd, env=env, check=True)
        return json.loads(path.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old-src", help="source tree of the code to compare against (its 'src' folder)")
    p.add_argument("--n", type=int, default=60, help="test examples for the kNN eval")
    p.add_argument("--pool", type=int, default=64, help="demonstration pool (from train)")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--latency", type=int, default=4, help="kNN queries timed one at a time")
    p.add_argument("--cot-n", type=int, default=24, help="test examples for chain-of-thought")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=32, help="the comparison's eval batch size")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        Path(args.worker).write_text(json.dumps(worker(args)))
        return
    sides = {"new": run_side(str(HERE.parent.parent / "src"), args)}
    if args.old_src:
        sides["old"] = run_side(args.old_src, args)
    print(f"SST-2, SmolLM2-135M, {args.threads} thread(s); kNN: pool {args.pool}, k={args.k}, eval on {args.n} test "
          f"examples, batch 1 on {args.latency}; CoT: {args.cot_n} examples, {args.max_new_tokens} new tokens")
    print("| method | ms/query before | ms/query after | ratio | same predictions |")
    print("|---|---:|---:|---:|---|")
    for row, ms in sides["new"]["ms"].items():
        if "old" in sides:
            before = sides["old"]["ms"][row]
            same = "yes" if sides["old"]["pred"][row] == sides["new"]["pred"][row] else "NO"
            print(f"| {row} | {before:,.1f} | {ms:,.1f} | {before / ms:.1f}x | {same} |")
        else:
            print(f"| {row} | – | {ms:,.1f} | – | – |")


if __name__ == "__main__":
    main()
