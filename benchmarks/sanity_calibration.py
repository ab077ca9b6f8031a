"""Sanity check of calibrated zero-shot rank classification on the embedded model (issue 14):
a seeded sample of a built-in task's test split, the task's own instruction, every calibration.

    PYTHONPATH=src python benchmarks/sanity_calibration.py --task sst2 --n 200 --seed 0
"""
from __future__ import annotations

import argparse
import json
import random
import time

import torch

from softprompt.hard import baselines as B
from softprompt.core.bank import PromptBank
from softprompt.core.calibration import CALIBRATIONS
from softprompt.core.calibrate import fit_calibration
from softprompt.families.loading import load_model
from softprompt.core.scoring import classify
from softprompt.data import load_task


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--split", default="test")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    data = load_task(args.task)
    pool = data[args.split]
    examples = random.Random(args.seed).sample(pool, min(args.n, len(pool)))
    model, tok = load_model(args.model)
    bank = PromptBank(model, tok)
    tpl = B.zero_shot_template(data.task)
    bank.add("zs", tpl, verbalizer=data.task.verbalizer)
    out = {"task": args.task, "split": args.split, "n": len(examples), "seed": args.seed, "template": tpl,
           "threads": torch.get_num_threads(), "results": {}}
    raw = None
    for method in CALIBRATIONS:
        t = time.perf_counter()
        inputs = [type(ex)(ex.fields) for ex in examples]  # labels dropped: calibration never reads them
        cal = fit_calibration(bank, "zs", method, inputs=inputs, batch_size=args.batch_size)
        if raw is None:
            raw = classify(bank, "zs", examples, batch_size=args.batch_size)
        # calibrating the stored raw scores equals classify(..., calibration=cal): one scoring pass
        scores = cal.apply(raw.raw_scores)
        preds = [raw.labels[j] for j in scores.argmax(-1).tolist()]
        from softprompt.core.scoring import classification_metrics

        m = classification_metrics([ex.label for ex in examples], preds, raw.labels)
        out["results"][method] = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
                                  "prior": [round(float(torch.tensor(v).exp()), 4) for v in (cal.log_prior or [])],
                                  "seconds": round(time.perf_counter() - t, 1)}
        print(method, json.dumps(out["results"][method]), flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
