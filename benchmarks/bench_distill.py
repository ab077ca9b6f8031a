"""Distillation benchmark (issue 26): a balanced k-shot prompt with its best calibration (the
teacher) taught to 20 soft tokens (the student) on training inputs whose labels are withheld.

Per task: k demonstrations (balanced, seeded) and 32 labelled validation examples come from the
training split; the teacher's calibration is chosen on those 32 (none / contextual / batch, by
macro-F1: labels the hard side already uses); the next ``--inputs`` training inputs, labels
dropped, are the student's data (a fifth held back for agreement); both prompts are scored on the
first ``--test`` test examples.

    PYTHONPATH=src python benchmarks/bench_distill.py --tasks sst2 agnews --inputs 1000 --test 300 \\
        --out runs/distill_bench.jsonl

Runs already in ``--out`` are skipped; ``--table`` prints what is there.
"""
from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
from runlog import append_row, load_rows

from softprompt import PromptBank, load_model, load_task
from softprompt.apps.distill import Teacher, compare_to_teacher, distil, unlabelled
from softprompt.core.calibrate import fit_calibration
from softprompt.core.scoring import classify
from softprompt.hard.baselines import few_shot_template, sample_demos


def choose_teacher(model, tok, task, demos, valid, inputs) -> tuple[Teacher, dict]:
    template = few_shot_template(task, demos)
    bank = PromptBank(model, tok)
    e = bank.add("teacher", template, verbalizer=task.verbalizer)
    scores = {}
    for method in ("none", "contextual", "batch"):
        cal = fit_calibration(bank, e, method, inputs=unlabelled(inputs[:256]))
        scores[method] = (classify(bank, e, valid, calibration=cal).metrics["macro_f1"], cal)
    best = max(scores, key=lambda m: scores[m][0])
    teacher = Teacher(template, task.verbalizer, scores[best][1], f"{len(demos)}-shot, {best} calibration")
    return teacher, {m: round(v[0], 4) for m, v in scores.items()}


def run(model, tok, name: str, args) -> dict:
    data = load_task(name)
    task = data.task
    pool = list(data["train"])
    rng = random.Random(args.seed)
    rng.shuffle(pool)
    demos = sample_demos(pool[:200], args.k, seed=args.seed, labels=task.labels)
    used = {id(d) for d in demos}
    rest = [ex for ex in pool if id(ex) not in used]
    valid, inputs = rest[:32], rest[32:32 + args.inputs]
    test = list(data["test"])[: args.test]
    t0 = time.perf_counter()
    teacher, cal_scores = choose_teacher(model, tok, task, demos, valid, inputs)
    choose_s = time.perf_counter() - t0
    d = distil(model, tok, task, teacher, unlabelled(inputs), n_tokens=args.tokens, seed=args.seed,
               out_dir=Path(args.work) / f"{name}-seed{args.seed}", search=not args.no_search, progress=True,
               **({"max_steps": args.max_steps} if args.max_steps else {}))
    cmp = compare_to_teacher(model, tok, task, d, test)
    acc = cmp["difference"]["accuracy"]
    return {"task": name, "seed": args.seed, "k": args.k, "n_inputs": len(inputs), "n_test": len(test),
            "teacher": teacher.description, "calibration_valid_macro_f1": cal_scores,
            "agreement_valid": d.agreement_valid, "agreement_test": cmp["agreement"],
            "teacher_accuracy": cmp["teacher"]["accuracy"], "student_accuracy": cmp["student"]["accuracy"],
            "teacher_macro_f1": cmp["teacher"]["macro_f1"], "student_macro_f1": cmp["student"]["macro_f1"],
            "difference": acc["difference"], "low": acc["low"], "high": acc["high"],
            "teacher_tokens": cmp["teacher_tokens_per_query"], "student_tokens": cmp["student_tokens_per_query"],
            "teacher_ms_b1": cmp["teacher_ms_batch1"], "student_ms_b1": cmp["student_ms_batch1"],
            "teacher_ms_batched": cmp["teacher_ms_batched"], "student_ms_batched": cmp["student_ms_batched"],
            "student_bytes": cmp["student_artifact_bytes"], "teacher_bytes": cmp["teacher_artifact_bytes"],
            "teacher_s": d.teacher_seconds, "train_s": round(d.result.wall_time_s, 1),
            "choose_teacher_s": round(choose_s, 1), "steps": d.result.steps, "stop": d.result.stop_reason}


def table(rows: list[dict]) -> str:
    out = ["| task | teacher | inputs | agreement test (valid) | teacher acc | student acc | student - teacher [95%] | "
           "tokens/query T / S | ms/query batch 1 T / S | student bytes | cost s (teacher + training) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(
            f"| {r['task']} | {r['teacher']} | {r['n_inputs']} | {100 * r['agreement_test']:.1f} "
            f"({100 * (r['agreement_valid'] or 0):.1f}) | {100 * r['teacher_accuracy']:.1f} | "
            f"{100 * r['student_accuracy']:.1f} | {100 * r['difference']:+.1f} [{100 * r['low']:+.1f}, "
            f"{100 * r['high']:+.1f}] | {r['teacher_tokens']:.0f} / {r['student_tokens']:.0f} | "
            f"{r['teacher_ms_b1']:.0f} / {r['student_ms_b1']:.0f} | {r['student_bytes']:,} | "
            f"{r['teacher_s']:.0f} + {r['train_s']:.0f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["sst2", "agnews"])
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--inputs", type=int, default=1000)
    ap.add_argument("--test", type=int, default=300)
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-steps", type=int, default=None, help="cap the recipe's steps (a smoke run)")
    ap.add_argument("--no-search", action="store_true", help="one run at the recipe's rate (no successive halving)")
    ap.add_argument("--work", default="runs/distill_bench")
    ap.add_argument("--out", type=Path, default=Path("runs/distill_bench.jsonl"))
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args()
    rows = load_rows(args.out)
    if not args.table:
        torch.set_num_threads(args.threads)
        model, tok = load_model()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        done = {(r["task"], r["seed"]) for r in rows}
        for name in args.tasks:
            if (name, args.seed) in done:
                continue
            r = run(model, tok, name, args)
            append_row(args.out, r)
            rows.append(r)
    print(table(rows))


if __name__ == "__main__":
    main()
