"""Accuracy of trained soft prompts on real data, against the zero-shot hard template.

    python benchmarks/bench_quality.py raft  [--seeds 0,1,2] [--method prompt|ptuning|prefix] [...]
    python benchmarks/bench_quality.py sst2  [--seeds 0] [--train-size 5000]

raft: trained on the 50 RAFT twitter_complaints training tweets only, scored on all 3,399
labelled test tweets.  sst2: trained on a seeded sample of at most 5,000 GLUE SST-2
training sentences (sst2/alps_train.tsv), best prompt chosen on 200 held-out training-set
sentences (alps_dev.tsv), scored on the 872 GLUE dev sentences (alps_test.tsv).
--test-sample N scores a seeded subset instead (random.Random(0).sample of the test split),
the 300-tweet subset used while exploring recipes.  --method ptuning trains the same soft
tokens through a prompt encoder (--encoder lstm|mlp); --reparam mlp does the same for
prefix tuning's key/values.  Both default to lr 1e-3: an Adam step on an encoder moves its
output several times lr (see softprompt/core/reparam.py).
--template and --verbalizer LABEL=WORDS override the built-in task's (a "\n" typed in the shell
is a line break), e.g. to put the question in the model's chat format; the words get a leading
space after a template that ends in text, as `softprompt train --verbalizer` gives them.
Prints one row per seed and the mean +/- std; --json writes every number.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from softprompt import PromptBank, TrainConfig, classify, load_model, load_task
from softprompt.training.restarts import train_with_restarts
from softprompt.core.templates import Template, continue_with

RECIPES = {
    # hybrid template (instruction + 20 soft tokens), class-label init, AdamW, rank loss
    "raft": dict(task="twitter_complaints", epochs=15, lr=0.03, batch_size=8, warmup_steps=10),
    "sst2": dict(task="sst2", epochs=1, lr=0.03, batch_size=16, warmup_steps=20, eval_every=50),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("which", choices=sorted(RECIPES))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--restarts", type=int, default=1,
                   help="train each seed this many times (seeds s, s+1000, ...) and keep the prompt that fits the "
                        "training examples best (softprompt.training.restarts); only the kept prompt is scored")
    p.add_argument("--method", default="prompt", choices=["prompt", "ptuning", "prefix"])
    p.add_argument("--prefix-tokens", type=int, default=10)
    p.add_argument("--encoder", default="lstm", choices=["lstm", "mlp"], help="prompt encoder of --method ptuning")
    p.add_argument("--encoder-hidden", type=int, default=128)
    p.add_argument("--reparam", default="none", choices=["none", "mlp"], help="--method prefix: key/values via an MLP")
    p.add_argument("--template", help="override the built-in template")
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--train-size", type=int, default=5000)
    p.add_argument("--test-limit", type=int, help="score the first N test examples")
    p.add_argument("--test-sample", type=int, help="score a seeded sample of N test examples (random.Random(0))")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-zero-shot", action="store_true", help="skip the zero-shot baseline row")
    p.add_argument("--out", type=Path, help="save each seed's prompt here")
    p.add_argument("--json", type=Path)
    p.add_argument("--verbalizer", action="append", metavar="LABEL=WORDS",
                   help="override a label's words (repeatable), e.g. 'complaint=yes'")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where the model runs")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    recipe = dict(RECIPES[args.which])
    data = load_task(recipe.pop("task"))
    task = data.task
    if args.template:
        task.template = args.template.replace("\\n", "\n")  # a shell-friendly "\n" is a line break
    for pair in args.verbalizer or []:
        label, _, words = pair.partition("=")
        if label not in task.verbalizer:
            p.error(f"--verbalizer: unknown label {label!r}; labels: {', '.join(task.verbalizer)}")
        task.verbalizer[label] = continue_with(task.template, words)  # spaced as the CLI spaces it
    if args.method == "prefix" and not args.template:
        task.template = Template(task.template).without_soft().text
    recipe["epochs"] = args.epochs or recipe["epochs"]
    through_encoder = args.method == "ptuning" or args.reparam != "none"
    recipe["lr"] = args.lr or (1e-3 if through_encoder else recipe["lr"])
    test = data["test"][: args.test_limit] if args.test_limit else data["test"]
    if args.test_sample:
        test = random.Random(0).sample(test, min(args.test_sample, len(test)))
    model, tok = load_model(device=args.device)
    bank = PromptBank(model, tok)
    rows = []
    if not args.no_zero_shot:
        t0 = time.perf_counter()
        hard = bank.add("zero-shot", Template(task.instruction + "\n" + Template(task.template).without_soft().text),
                        verbalizer=task.verbalizer)
        zs = classify(bank, hard, test, batch_size=32, progress="zero-shot").metrics
        rows.append({"run": "zero-shot instruction", "accuracy": zs["accuracy"], "macro_f1": zs["macro_f1"],
                     "eval_s": time.perf_counter() - t0})
        print(f"zero-shot: acc {zs['accuracy']:.4f} macro-F1 {zs['macro_f1']:.4f}", flush=True)
    for seed in [int(s) for s in args.seeds.split(",")]:
        train, valid = data["train"], None
        if args.which == "sst2":
            train = random.Random(seed).sample(train, min(args.train_size, len(train)))
            valid = data["validation"][:200]
        cfg = TrainConfig(seed=seed, init="labels", method=args.method, prefix_tokens=args.prefix_tokens,
                          encoder=args.encoder, encoder_hidden=args.encoder_hidden, reparam=args.reparam, **recipe)
        res = train_with_restarts(model, tok, task, train, valid, cfg, args.restarts,
                                  out_dir=(args.out / f"seed{seed}") if args.out else None)
        picked = res.prompt.training.get("restarts")
        if picked:
            print(f"seed {seed}: {args.restarts} restarts, " + ", ".join(
                f"seed {r['seed']} fit acc {r['accuracy']:.3f} loss {r['loss']:.3f}{' (chosen)' if r['chosen'] else ''}"
                for r in picked), flush=True)
        name = f"seed{seed}"
        bank.add(name, task.template, res.prompt.embeddings, verbalizer=task.verbalizer, kv=res.prompt.kv)
        t = time.perf_counter()
        m = classify(bank, name, test, batch_size=32, progress=f"scoring seed {seed}").metrics
        rows.append({"run": f"soft prompt seed {seed}", "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
                     "confusion": m["confusion"], "train_s": res.wall_time_s, "train_tokens_per_s": res.tokens_per_s,
                     "steps": res.steps, "best_step": res.best_step, "eval_s": time.perf_counter() - t,
                     "params": res.prompt.n_params, "bytes": res.prompt.nbytes, "restarts": picked})
        print(f"seed {seed}: acc {m['accuracy']:.4f} macro-F1 {m['macro_f1']:.4f} confusion {m['confusion']} "
              f"train {res.wall_time_s:.0f}s ({res.tokens_per_s:.0f} tok/s)", flush=True)
    soft = [r for r in rows if r["run"].startswith("soft")]
    acc = [r["accuracy"] for r in soft]
    f1 = [r["macro_f1"] for r in soft]
    sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0  # noqa: E731
    how = {"ptuning": f" ({args.encoder} encoder)", "prefix": f" (reparam {args.reparam})"}.get(args.method, "")
    print(f"\n{args.which}: {len(test)} test examples, method {args.method}{how}, lr {recipe['lr']}, "
          f"template {task.template!r}")
    print(f"{'run':28s} {'accuracy':>9s} {'macro-F1':>9s}")
    for r in rows:
        print(f"{r['run']:28s} {r['accuracy']:9.4f} {r['macro_f1']:9.4f}")
    print(f"{'soft prompt mean +/- std':28s} {statistics.mean(acc):.4f}+/-{sd(acc):.4f} "
          f"{statistics.mean(f1):.4f}+/-{sd(f1):.4f}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
