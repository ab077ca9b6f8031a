"""Soft prompt + linear head on a frozen encoder (all-MiniLM-L6-v2) on SST-2, against the head alone.

    PYTHONPATH=src python benchmarks/bench_encoder.py [--threads 1] [--train-size 5000] [--runs probe,prompt]

Same data protocol as ``bench_quality.py sst2``: a seeded sample of at most 5,000 GLUE SST-2
training sentences (sst2/alps_train.tsv), the best state chosen on the first 200 sentences
of sst2/alps_dev.tsv, scored on the 872 GLUE dev sentences (sst2/alps_test.tsv).

Runs (both train a 2-class linear head on the mean-pooled last hidden state; the encoder
stays frozen):

* ``probe``: the head alone (a linear probe).  Its encoder features do not depend on
  anything trainable, so they are computed once and the head gets many cheap epochs.
* ``prompt``: ``--tokens`` soft tokens after [CLS], trained together with the head.

Prints one table row per run; --json writes every number.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from softprompt import TrainConfig, load_model, load_task
from softprompt.families.encoder import EncoderBank, classify
from softprompt.training.encoder_head import train_encoder_prompt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--runs", default="probe,prompt", help="comma-separated: probe, prompt")
    p.add_argument("--train-size", type=int, default=5000)
    p.add_argument("--valid-size", type=int, default=200)
    p.add_argument("--test-limit", type=int)
    p.add_argument("--tokens", type=int, default=20, help="soft tokens of the prompt run")
    p.add_argument("--init", default="text", help="soft-token init (text: the task's instruction)")
    p.add_argument("--epochs", type=int, default=2, help="epochs of the prompt run")
    p.add_argument("--probe-epochs", type=int, default=30, help="epochs of the head-only run (cached features)")
    p.add_argument("--batch-size", type=int, default=16)
    # 0.003: best validation accuracy of 0.3 / 0.03 / 0.003 on an 800-sentence, 1-epoch run
    p.add_argument("--lr", type=float, default=0.003, help="soft tokens' peak learning rate")
    p.add_argument("--head-lr", type=float, default=1e-2)
    p.add_argument("--eval-every", type=int, default=100, help="validation interval (steps) of the prompt run")
    p.add_argument("--pooling", default="mean", choices=["mean", "cls"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, help="save each run's artifact here")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    data = load_task("sst2")
    task = data.task
    train = random.Random(args.seed).sample(data["train"], min(args.train_size, len(data["train"])))
    valid = data["validation"][: args.valid_size]
    test = data["test"][: args.test_limit] if args.test_limit else data["test"]
    model, tok = load_model(args.model)
    print(f"{args.model}: {type(model).__name__}, hidden {model.config.hidden_size}; train {len(train)}, "
          f"valid {len(valid)}, test {len(test)}", flush=True)

    rows = []
    for run in args.runs.split(","):
        if run not in ("probe", "prompt"):
            raise SystemExit(f"unknown run {run!r}; use probe and/or prompt")
        n = args.tokens if run == "prompt" else 0
        epochs = args.epochs if run == "prompt" else args.probe_epochs
        steps_per_epoch = -(-len(train) // args.batch_size)
        cfg = TrainConfig(init=args.init, epochs=epochs, batch_size=args.batch_size, lr=args.lr, warmup_steps=20,
                          eval_every=args.eval_every if run == "prompt" else steps_per_epoch, seed=args.seed)
        res = train_encoder_prompt(model, tok, task, train, valid, cfg, n_tokens=n, pooling=args.pooling,
                                   head_lr=args.head_lr, out_dir=(args.out / run) if args.out else None)
        bank = EncoderBank(model, tok)
        entry = bank.add_prompt(res.prompt, run)
        t = time.perf_counter()
        m = classify(bank, entry, test, batch_size=32, progress=f"scoring {run}").metrics
        eval_s = time.perf_counter() - t
        best_valid = max((h["valid"]["accuracy"] for h in res.history if "valid" in h), default=None)
        rows.append({
            "run": "head only (linear probe)" if run == "probe" else f"{n} soft tokens + head",
            "soft_tokens": n, "params": res.prompt.n_params, "epochs": epochs, "steps": res.steps,
            "best_step": res.best_step, "train_s": round(res.wall_time_s, 1), "valid_accuracy": best_valid,
            "accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "confusion": m["confusion"],
            "ms_per_example": 1000 * eval_s / len(test),
        })
        print(f"{run}: acc {m['accuracy']:.4f} macro-F1 {m['macro_f1']:.4f} (train {res.wall_time_s:.0f}s, "
              f"best step {res.best_step}/{res.steps})", flush=True)

    print(f"\nsst2 on {args.model}: {len(train)} train, {len(valid)} valid, {len(test)} test sentences; "
          f"{args.threads} thread(s)")
    print(f"| {'run':26s} | {'params':>7s} | {'epochs':>6s} | {'train s':>7s} | {'valid acc':>9s} | "
          f"{'accuracy':>8s} | {'macro-F1':>8s} | {'ms/ex':>6s} |")
    print("|" + "|".join("-" * (w + 2) for w in (26, 7, 6, 7, 9, 8, 8, 6)) + "|")
    for r in rows:
        print(f"| {r['run']:26s} | {r['params']:7d} | {r['epochs']:6d} | {r['train_s']:7.0f} | "
              f"{r['valid_accuracy'] or 0:9.4f} | {r['accuracy']:8.4f} | {r['macro_f1']:8.4f} | "
              f"{r['ms_per_example']:6.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
