"""Data-parallel training throughput: the same run on 1 and on N processes (issue 15).

Runs `softprompt train` (the CLI, as a user would) once per process count with the same
seed and global batch, reads the training tokens/s it reports (training seconds only:
not the model load or the launch), and compares the saved prompts, which must agree to float
rounding.  On a CPU host each process gets ``--threads`` torch threads; the 1-process run
is also measured with ``procs x threads`` threads, the fair baseline on the same cores.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_train_dp.py --model smollm2-135m --processes 2 \\
        --max-steps 12 --batch-size 8 --json dp.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(args: list[str], out: Path, processes: int, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "softprompt", "train", *args, "--out", str(out)]
    if processes > 1:
        cmd += ["--processes", str(processes)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    m = re.search(r"(\d+) steps in (\d+)s, (\d+) training tokens/s", proc.stdout.replace("\n", " "))
    if not m:
        raise SystemExit(f"no throughput line in:\n{proc.stdout[-2000:]}")
    return {"processes": processes, "threads_per_process": threads, "steps": int(m[1]), "train_s": int(m[2]),
            "tokens_per_s": int(m[3]), "command_wall_s": round(wall, 1)}


def first_step(model, tok, data, cfg, init, shards: int) -> dict:
    """The first global batch's loss and gradient, whole and as the sum of ``shards`` weighted
    shard losses (what the processes of a data-parallel run add up), in one process."""
    import torch

    from softprompt.core.bank import PromptBank
    from softprompt.training.prompt import batch_loss, loss_weight
    from softprompt.training.loop import batch_plan

    p = torch.nn.Parameter(init.clone())
    bank = PromptBank(model, tok)
    bank.add(data.task.name, data.task.template, p, verbalizer=data.task.verbalizer, kind=data.task.kind)
    entry = bank.index(data.task.name)
    train = data.splits["train"]
    batch = [train[i] for i in batch_plan(len(train), cfg.batch_size, 1, cfg.seed)[0][1]]
    loss, _ = batch_loss(bank, entry, batch)
    loss.backward()
    whole, p.grad = p.grad.clone(), None
    summed, parts = torch.zeros_like(p), 0.0
    for r in range(shards):
        shard = batch[r::shards]
        part = batch_loss(bank, entry, shard)[0] * (loss_weight(data.task, shard) / loss_weight(data.task, batch))
        part.backward()
        summed, p.grad, parts = summed + p.grad, None, parts + float(part.detach())
    return {"first_step_loss_abs_diff": abs(float(loss.detach()) - parts),
            "first_step_grad_rel_diff": float((summed - whole).norm() / whole.norm())}


def sensitivity(a) -> dict:
    """How far two 1-process runs drift apart when the initial prompt differs by ~1e-6: the scale
    of difference that rounding alone produces, against which the N-process run is compared."""
    import torch

    from softprompt import load_model, load_task
    from softprompt.training.prompt import TrainConfig, initial_prompt, train_prompt

    torch.set_num_threads(a.threads)
    model, tok = load_model(a.model)
    data = load_task(a.task)
    cfg = TrainConfig(seed=0, max_steps=a.max_steps, epochs=100, batch_size=a.batch_size, warmup_steps=2, lr=0.3)
    init = initial_prompt(model, tok, data.task, cfg).float()
    noise = torch.randn(init.shape, generator=torch.Generator().manual_seed(1)) * 1e-6
    runs = [train_prompt(model, tok, data.task, data.splits["train"], None, cfg, init=x, progress=False)
            for x in (init, init + noise)]
    la, lb = ([h["loss"] for h in r.history] for r in runs)
    return {**first_step(model, tok, data, cfg, init, a.processes), "init_perturbation_maxabs": float(noise.abs().max()),
            "final_prompt_maxabs_diff": float((runs[0].prompt.embeddings - runs[1].prompt.embeddings).abs().max()),
            "max_rel_loss_diff": max(abs(x - y) / abs(x) for x, y in zip(la, lb))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="demo")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--max-steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--no-thread-baseline", action="store_true",
                    help="skip the 1-process run with procs x threads threads")
    ap.add_argument("--sensitivity", action="store_true",
                    help="instead: two 1-process runs whose initial prompts differ by ~1e-6 (rounding's scale)")
    a = ap.parse_args()
    if a.sensitivity:
        print(json.dumps(sensitivity(a)))
        return

    import torch

    from softprompt.core.prompts import SoftPrompt

    args = ["--task", a.task, "--model", a.model, "--max-steps", str(a.max_steps), "--batch-size", str(a.batch_size),
            "--epochs", "100", "--test-split", "none", "--valid-split", "none", "--warmup-steps", "2", "--seed", "0"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        plan = [(1, a.threads)] + ([] if a.no_thread_baseline else [(1, a.threads * a.processes)]) + [
            (a.processes, a.threads)]
        for procs, threads in dict.fromkeys(plan):
            out = root / f"p{procs}t{threads}"
            rows.append(run(args, out, procs, threads))
            rows[-1]["prompt"] = SoftPrompt.load(out / "prompt.safetensors").embeddings
            rows[-1]["losses"] = [h["loss"] for h in json.loads((out / "history.json").read_text())]
    base, ref, ref_losses = rows[0], rows[0]["prompt"], rows[0]["losses"]
    for r in rows:
        # Adam steps a coordinate by ~lr * sign(gradient) whatever its size, so a coordinate whose
        # gradient is ~0 can move differently on rounding alone; the losses show whether the runs agree
        r["max_rel_loss_diff_vs_1_process"] = max(abs(x - y) / abs(y) for x, y in zip(r.pop("losses"), ref_losses))
        r["speedup_vs_1_process_1_thread"] = round(r["tokens_per_s"] / base["tokens_per_s"], 2)
        r["max_abs_prompt_diff_vs_1_process"] = float((r.pop("prompt") - ref).abs().max())
        print(json.dumps(r))
    if a.json:
        a.json.write_text(json.dumps({"args": vars(a) | {"json": str(a.json)}, "torch": torch.__version__, "rows": rows,
                                      "load_average": os.getloadavg()}, indent=1))


if __name__ == "__main__":
    main()
