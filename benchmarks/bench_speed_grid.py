"""Eager vs compiled full step vs HF PEFT over precisions x batch sizes, as ONE table (issue 16).

For each precision (``--dtypes``) and each training batch size (``--batch-sizes``, paired with
``--eval-batch-sizes``) this runs bench_speed.py's children, each in its own fresh process:
the full step eager and compiled, PEFT's step, and rank classification by the cached context
(eager), the compiled full pass and PEFT.  Columns: training tokens/s (eager, compiled, PEFT,
compiled/PEFT), scoring examples/s (cached, compiled, PEFT, and ours/PEFT for both of ours),
with ``--profile`` the kernel launches of one training step (CUDA: launch calls, a CUDA-graph replay
counted once, and in brackets the GPU kernels run; CPU: aten ops at every depth), the compile time
(the compiled side's 2 warm-up steps minus the eager side's) and the break-even number of steps.

    python benchmarks/bench_speed_grid.py --batch-sizes 8 32 --eval-batch-sizes 32 64 --profile \\
        [--dtypes fp32 bf16] [--budget-s 400] [--json grid.json] [--markdown grid.md]

Compiled scoring compiles one graph per (rows, padded width): keep every scoring batch full
(``--eval-limit`` a multiple of each eval batch size; eval batch x (longest input + prompt) within
classify's 8,192-token batch budget, so <= 64 here) and ``--bucket`` above the longest sequence
(train <= 85, first 1,024 test tweets <= 102 tokens with BOS and 20 soft tokens: 112), so that each
side compiles once.  Both sides run in ``--dtype``: bench_speed.py turns our full step's bf16
autocast on CUDA (compiled.py) off for fp32 (``SOFTPROMPT_AUTOCAST=off``).
``--budget-s`` skips the combinations that would not finish in time (the table says which); the
table and JSON are rewritten after each combination, so a run cut short keeps what finished.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

import bench_speed as B

TRAIN = ("eager-full-train", "compiled-train", "peft-train")
EVAL = ("ours-eval", "compiled-eval", "peft-eval")


def measure(opts: dict, deadline: float | None) -> dict:
    """All six children for one (precision, batch); a failed or timed-out child is recorded as an error."""
    res = {}
    for part in TRAIN + EVAL:
        left = None if deadline is None else max(deadline - time.monotonic(), 1.0)
        t0 = time.monotonic()
        try:
            res[part] = B.run_child(part, opts, timeout=left)
        except Exception as e:  # noqa: BLE001 - one side failing must not lose the others
            res[part] = {"error": str(e)}
            print(f"  {part}: FAILED {e}", file=sys.stderr, flush=True)
        print(f"  {part}: {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    return res


def ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def num(v, fmt: str | None = None) -> str:
    if v is None:
        return "-"
    return f"{v:{fmt or (',.0f' if abs(v) >= 100 else '.1f')}}"


def launches(part: dict, device: str) -> str:
    prof = part.get("profile")
    if not prof:
        return "-"
    if B.on_gpu(device):
        return f"{prof['launches']:,} ({prof['gpu_kernels']:,})"
    return f"{prof['aten_ops']:,}"


def row(dtype: str, batch: int, eval_batch: int, res: dict, device: str) -> list[str]:
    get = lambda part, key: res.get(part, {}).get(key)  # noqa: E731
    eager, comp, peft = (get(p, "train_tokens_per_s") for p in TRAIN)
    cached, comp_s, peft_s = (get(p, "examples_per_s") for p in EVAL)
    compile_s = steps = None
    if None not in (get("compiled-train", "warmup_s"), get("eager-full-train", "warmup_s")):
        compile_s = B.compile_seconds(res)
        steps = B.break_even(compile_s, get("eager-full-train", "step_s"), get("compiled-train", "step_s"))
    even = "-" if compile_s is None else ("never" if steps is None else f"{steps:,.0f}")
    return [dtype, f"{batch} / {eval_batch}", num(eager), num(comp), num(peft), ratio(comp, peft),
            num(cached), num(comp_s), num(peft_s), f"{ratio(cached, peft_s)}, {ratio(comp_s, peft_s)}",
            *(launches(res.get(p, {}), device) for p in TRAIN), num(compile_s, ".1f"), even]


def table(rows: list[list[str]], device: str) -> str:
    what = "kernel launches (GPU kernels)" if B.on_gpu(device) else "aten ops"
    head = ["precision", "batch train / eval", "eager tok/s", "compiled tok/s", "PEFT tok/s", "compiled / PEFT",
            "scoring cached ex/s", "scoring compiled ex/s", "scoring PEFT ex/s", "scoring (cached, compiled) / PEFT",
            f"{what} / step eager", "compiled", "PEFT", "compile s", "break-even steps"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    B.add_common_options(p)
    p.set_defaults(eval_limit=1024, train_steps=20, bucket=112)
    gpu = torch.cuda.is_available()
    p.add_argument("--dtypes", nargs="+", choices=sorted(B.DTYPES), default=["fp32", "bf16"] if gpu else ["fp32"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 32], help="training batch sizes")
    p.add_argument("--eval-batch-sizes", nargs="+", type=int, default=[32, 64], help="one per training batch size")
    p.add_argument("--budget-s", type=float, help="skip combinations that the time left would not cover")
    p.add_argument("--markdown", type=Path, help="also write the table (with its header line) here")
    args = p.parse_args()
    if len(args.eval_batch_sizes) != len(args.batch_sizes):
        p.error("give one --eval-batch-sizes per --batch-sizes")
    combos = [(d, b, e) for b, e in zip(args.batch_sizes, args.eval_batch_sizes) for d in args.dtypes]
    where = torch.cuda.get_device_name(0) if B.on_gpu(args.device) else f"{os.cpu_count()} cores, threads {args.threads}"
    header = (f"machine: {platform.machine()} {where}, torch {torch.__version__}; {args.n_tokens} soft tokens; "
              f"{args.train_steps} timed training steps after 2 warm-up; first {args.eval_limit} RAFT test tweets; "
              f"bucket {args.bucket}; torch.compile mode {os.environ.get('SOFTPROMPT_COMPILE_MODE') or 'default'}")
    start, last = time.monotonic(), 0.0
    deadline = start + args.budget_s if args.budget_s else None
    rows, results, skipped = [], {}, []
    for dtype, batch, eval_batch in combos:
        if deadline is not None and time.monotonic() + last > deadline:  # the last combination's time as estimate
            skipped.append(f"{dtype} batch {batch}")
        else:
            print(f"== {dtype}, batch {batch} / {eval_batch}", file=sys.stderr, flush=True)
            t0 = time.monotonic()
            res = measure(vars(args) | {"dtype": dtype, "batch_size": batch, "eval_batch_size": eval_batch}, deadline)
            last = time.monotonic() - t0
            rows.append(row(dtype, batch, eval_batch, res, args.device))
            preds = [res.get(p, {}).pop("preds", None) for p in EVAL]
            agree = sum(a == b for a, b in zip(preds[0], preds[2])) / len(preds[0]) if preds[0] and preds[2] else None
            results[f"{dtype}-b{batch}"] = res | {"agree_cached_peft": agree, "seconds": last}
        text = "\n\n".join([header, table(rows, args.device)] + ([f"skipped (time budget): {', '.join(skipped)}"]
                                                                 if skipped else []))
        if args.markdown:  # rewritten after each combination: a run cut short keeps what finished
            args.markdown.write_text(text + "\n")
        if args.json:
            args.json.write_text(json.dumps({"args": vars(args), "header": header, "results": results},
                                            indent=1, default=str))
    print(text)
    for key, res in results.items():
        agree = res["agree_cached_peft"]
        print(f"{key}: the cached scorer's and PEFT's predictions agree on "
              + ("-" if agree is None else f"{agree:.1%}") + f"; {res['seconds']:.0f} s")
    print(f"total {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main()
