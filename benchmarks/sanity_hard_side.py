"""Sanity runs of the hard side on the embedded model (issue 14), each one command:

    PYTHONPATH=src python benchmarks/sanity_hard_side.py search   # instruction search, SST-2: 64 train, 200 dev
    PYTHONPATH=src python benchmarks/sanity_hard_side.py knn      # kNN vs balanced k=4 few-shot, SST-2
    PYTHONPATH=src python benchmarks/sanity_hard_side.py cot      # two-stage CoT, 50 RAFT complaint tweets

Samples are seeded (random.Random(0)); test/dev examples are only ever scored, never searched on.
"""
from __future__ import annotations

import json
import random
import sys
import time

from softprompt.hard import baselines as B
from softprompt.core.bank import PromptBank
from softprompt.core.calibration import batch_calibration
from softprompt.core.calibrate import fit_calibration
from softprompt.hard.demo_selection import knn_few_shot_classify
from softprompt.hard.instruction_search import search_instructions
from softprompt.families.loading import load_model
from softprompt.core.scoring import classification_metrics, classify
from softprompt.data import load_task


def metrics(gold, labels, scores) -> tuple[float, float]:
    m = classification_metrics(gold, [labels[j] for j in scores.argmax(-1).tolist()], labels)
    return round(m["accuracy"], 3), round(m["macro_f1"], 3)


def batch(raw):
    return batch_calibration(raw).apply(raw)


def main(which: str) -> None:
    model, tok = load_model("smollm2-135m")
    if which in ("search", "knn"):
        data = load_task("sst2")
        train = random.Random(0).sample(data["train"], 64)
        test = random.Random(0).sample(data["test"], 200)
    else:
        data = load_task("twitter_complaints")
        test = random.Random(0).sample(data["test"], 50)
    gold = [e.label for e in test]
    bank = PromptBank(model, tok)
    t0 = time.perf_counter()
    if which == "search":
        res = search_instructions(model, tok, data.task, train, calibration="contextual", induce=3, batch_size=16)
        print(json.dumps(res.to_dict(), indent=1))
        bank.add("best", res.template, verbalizer=data.task.verbalizer)
        r = classify(bank, "best", test, calibration=res.fitted, batch_size=16)
        print("searched instruction on the 200 dev sentences:", r.metrics["accuracy"], r.metrics["macro_f1"])
    elif which == "knn":
        r = knn_few_shot_classify(bank, data.task, test, train, 4, calibration="pmi", batch_size=16)
        print("knn k=4: none", metrics(gold, r.labels, r.raw_scores), "batch", metrics(gold, r.labels, batch(r.raw_scores)),
              "pmi", metrics(gold, r.labels, r.scores), f"{time.perf_counter() - t0:.0f}s")
        bank.add("fs", B.few_shot_template(data.task, B.sample_demos(train, 4, seed=0, labels=data.task.labels)),
                 verbalizer=data.task.verbalizer)
        raw = classify(bank, "fs", test, batch_size=16).raw_scores
        print("balanced k=4 seed0: none", metrics(gold, r.labels, raw), "batch", metrics(gold, r.labels, batch(raw)),
              *[f"{m} {metrics(gold, r.labels, fit_calibration(bank, 'fs', m).apply(raw))}" for m in ("contextual", "pmi")])
    else:
        r = B.cot_two_stage(bank, data.task, test, max_new_tokens=48, batch_size=16)
        print("two-stage CoT:", {k: r.metrics[k] for k in ("accuracy", "macro_f1", "parse_accuracy", "n_unparseable")},
              "labelled", sum(p in r.labels for p in r.predictions), "/", len(test),
              "batch-calibrated", metrics(gold, r.labels, batch(r.raw_scores)),
              "majority", max(gold.count(lab) for lab in set(gold)) / len(gold), f"{time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "search")
