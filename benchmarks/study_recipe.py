"""The soft-prompt training recipe study (issue 22): which optimizer, learning rate, init and
schedule train a prompt reliably on 64 training / 32 validation examples?

Each (task, recipe, seed) run samples its own 64 training and 32 validation examples from the
task's training pool with the seed, trains a soft prompt with the recipe, keeps the step with the
best validation score, and scores the kept prompt on the task's first ``--test`` test examples.
The recipe is chosen by mean VALIDATION macro-F1 (the column the default is picked on); test
numbers are reported beside it and never used to choose.

    python benchmarks/study_recipe.py --tasks demo sst2 --recipes base adamw_lr0.03 --seeds 0 1 2 \\
        --out runs/study_recipe.jsonl

Runs already in ``--out`` (JSON lines) are skipped, so a killed study resumes; ``--table`` only
prints the table of what is there.  A fractional design: recipes change one factor at a time
around the base recipe (see RECIPES).
"""
from __future__ import annotations

import argparse
import random
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
from runlog import append_row, load_rows

from softprompt import PromptBank, classify, load_model, load_task
from softprompt.training.prompt import train_prompt
from softprompt.training.recipe import DEFAULT_RECIPE, Recipe
from softprompt.training.selection import kept_validation

# one factor at a time around the base recipe (AdamW, a step relative to the embedding scale)
RECIPES: dict[str, Recipe] = {
    "base": DEFAULT_RECIPE,
    "adamw_abs0.3": replace(DEFAULT_RECIPE, optimizer="adamw", lr=0.3, lr_unit="absolute"),  # before issue 22
    "adamw_abs0.03": replace(DEFAULT_RECIPE, optimizer="adamw", lr=0.03, lr_unit="absolute"),
    "adamw_rel0.03": replace(DEFAULT_RECIPE, lr=0.03),
    "adamw_rel0.1": replace(DEFAULT_RECIPE, lr=0.1),
    "adamw_rel0.3": replace(DEFAULT_RECIPE, lr=0.3),
    "adamw_rel1": replace(DEFAULT_RECIPE, lr=1.0),
    "adamw_rel2.2": replace(DEFAULT_RECIPE, lr=2.2),
    "adafactor_rel0.3": replace(DEFAULT_RECIPE, optimizer="adafactor-relative", lr=0.3, lr_unit="absolute"),
    "init_text": replace(DEFAULT_RECIPE, init="text"),
    "init_vocab": replace(DEFAULT_RECIPE, init="vocab"),
    "short": replace(DEFAULT_RECIPE, max_steps=80),
    "long": replace(DEFAULT_RECIPE, max_steps=320),
}
# recipes that train through a network (overrides of the TrainConfig the recipe makes; lr absolute)
OVERRIDES: dict[str, dict] = {
    # residual reparameterisation (Razdaibiedina et al. 2023): prompt = init + MLP(embedding), the MLP's last
    # layer zero at step 0, dropped after training (the saved prompt is plain vectors).  The MLP's last layer
    # amplifies a step about 15x (core/reparam.py), so 0.003 absolute ~ the base recipe's 0.041 per entry.
    "reparam_mlp": dict(method="ptuning", encoder="mlp", lr=0.003),
}
RECIPES.update({name: DEFAULT_RECIPE for name in OVERRIDES})
TASKS = ("demo", "sst2", "agnews", "twitter_complaints", "cb", "rte")


def sample_split(data, seed: int, n_train: int, n_valid: int, protocol: str = "few-shot"):
    if protocol == "demo":  # exactly as `softprompt demo`: 32 training messages held out, stratified
        from softprompt.cli.train import DEMO_VALID
        from softprompt.data.splits import holdout_split

        train = list(data["train"])
        return holdout_split(train, data.task.labels, DEMO_VALID / len(train), DEMO_VALID, seed)
    pool = list(data["train"]) + (list(data.splits["validation"]) if "validation" in data.splits else [])
    rng = random.Random(seed)
    picked = rng.sample(pool, min(len(pool), n_train + n_valid))
    return picked[:n_train], picked[n_train:]


def run_one(model, tok, data, name: str, seed: int, n_train: int, n_valid: int, n_test: int,
            max_steps: int | None = None, protocol: str = "few-shot") -> dict:
    task, recipe = data.task, RECIPES[name]
    train, valid = sample_split(data, seed, n_train, n_valid, protocol)
    test = list(data["test"])[:n_test]
    cfg = recipe.config(model, seed=seed, **({"max_steps": max_steps} if max_steps else {}),
                        **({"warmup_steps": 5} if protocol == "demo" else {}), **OVERRIDES.get(name, {}))
    t0 = time.perf_counter()
    res = train_prompt(model, tok, task, train, valid, cfg, progress=False)
    seconds = time.perf_counter() - t0
    bank = PromptBank(model, tok)
    e = bank.add_prompt(res.prompt, "p")
    m = classify(bank, e, test, batch_size=32).metrics
    best = kept_validation(res) or {}
    return {"valid_macro_f1": best.get("macro_f1"), "valid_accuracy": best.get("accuracy"),
            "test_accuracy": m["accuracy"], "test_macro_f1": m["macro_f1"], "steps": res.steps,
            "best_step": res.best_step, "train_s": round(seconds, 1), "lr": cfg.lr,
            "stop_reason": res.stop_reason, "final_loss": res.history[-1]["loss"] if res.history else None}


def table(rows: list[dict]) -> str:
    out = ["| task | recipe | n | valid macro-F1 mean | test acc mean ± std (min) | test macro-F1 mean ± std (min) | steps | s/run |",
           "|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["task"], r["recipe"]) for r in rows})
    for task, recipe in keys:
        rs = [r for r in rows if r["task"] == task and r["recipe"] == recipe]
        def stat(k):
            v = [100 * r[k] for r in rs]
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            return f"{statistics.mean(v):.1f} ± {sd:.1f} ({min(v):.1f})"
        vf = statistics.mean(100 * (r["valid_macro_f1"] or 0) for r in rs)
        out.append(f"| {task} | {recipe} | {len(rs)} | {vf:.1f} | {stat('test_accuracy')} | {stat('test_macro_f1')} | "
                   f"{statistics.mean(r['steps'] for r in rs):.0f} | {statistics.mean(r['train_s'] for r in rs):.0f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=list(TASKS))
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--train", type=int, default=64)
    ap.add_argument("--valid", type=int, default=32)
    ap.add_argument("--test", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-steps", type=int, default=None, help="cap every recipe's max_steps (a cheaper study)")
    ap.add_argument("--protocol", choices=("few-shot", "demo"), default="few-shot",
                    help="few-shot: --train/--valid examples sampled per seed; demo: `softprompt demo`'s split "
                         "(its 200 training messages less 32 held out, stratified) and warmup")
    ap.add_argument("--out", type=Path, default=Path("runs/study_recipe.jsonl"))
    ap.add_argument("--table", action="store_true", help="only print the table of --out")
    args = ap.parse_args()
    rows = load_rows(args.out)
    if not args.table:
        torch.set_num_threads(args.threads)
        model, tok = load_model()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        done = {(r["task"], r["recipe"], r["seed"]) for r in rows}  # one protocol per --out file
        for name in args.tasks:
            data = load_task(name)
            for recipe in args.recipes:
                for seed in args.seeds:
                    if (name, recipe, seed) in done:
                        continue
                    r = {"task": name, "recipe": recipe, "seed": seed, "max_steps": args.max_steps,
                         "protocol": args.protocol,
                         **run_one(model, tok, data, recipe, seed, args.train, args.valid, args.test,
                                   args.max_steps, args.protocol)}
                    append_row(args.out, r)
                    rows.append(r)
    print(table(rows))


if __name__ == "__main__":
    main()
