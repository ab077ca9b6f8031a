"""Rank-classification wall time on a busy machine: the minimum over repeats of scoring the first 96
RAFT test tweets with one 20-token prompt (random soft tokens), one torch thread.  The minimum of a few
repeats is robust to other jobs' load, so two code versions can be compared by running this from each
tree one after the other (docs/benchmarks.md, issue 13), and the scoring contexts of ``classify``
(cached, full, packed; eager) against each other in one run (issue 16).

    PYTHONPATH=src python benchmarks/bench_score_min.py 3 [--contexts cached full packed] [--limit 96]

Prints one row per context: min seconds, examples/s, and the largest score difference to the first.
"""
import argparse
import time

import torch

from softprompt import PromptBank, classify, load_model, load_task
from softprompt.core.conditioning import CONTEXT_MODES


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("repeats", type=int, nargs="?", default=3)
    p.add_argument("--contexts", nargs="+", default=["auto"], choices=CONTEXT_MODES)
    p.add_argument("--limit", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model()
    data = load_task("twitter_complaints")
    t = data.task
    bank = PromptBank(model, tok)
    soft = torch.randn(20, model.config.hidden_size, generator=torch.Generator().manual_seed(0)) * 0.01
    bank.add("p", t.template, soft, verbalizer=t.verbalizer)
    exs = data["test"][: args.limit]
    times: dict[str, list[float]] = {c: [] for c in args.contexts}
    scores = {}
    for _ in range(args.repeats):  # contexts interleaved: a burst of load hits them alike
        for c in args.contexts:
            s = time.perf_counter()
            scores[c] = classify(bank, "p", exs, batch_size=args.batch_size, context=c, compile="off").scores
            times[c].append(time.perf_counter() - s)
    ref = args.contexts[0]
    print(f"{len(exs)} RAFT test tweets, batch {args.batch_size}, {args.threads} thread(s), eager, min of {args.repeats}")
    print(f"{'context':10s} {'min s':>8s} {'ex/s':>8s} {'max |diff| to ' + ref:>20s}  all s")
    for c, ts in times.items():
        diff = float((scores[c] - scores[ref]).abs().max())
        print(f"{c:10s} {min(ts):8.3f} {len(exs) / min(ts):8.1f} {diff:20.2e}  {[round(x, 2) for x in ts]}")


if __name__ == "__main__":
    main()
