"""Speed and memory of softprompt vs HF PEFT prompt tuning, measured in one run.

Same base model (the embedded SmolLM2-135M-Instruct), same data (RAFT twitter_complaints),
same prompt length, batch size and precision (fp32) for both sides:

* training tokens/s: N optimizer steps on the 50 training tweets.  PEFT runs the usual
  causal-LM recipe (virtual tokens + template + label words, loss masked to the label
  tokens, full logits); softprompt runs its own training step.  Tokens counted are the
  same for both: the hard template tokens of each example plus its gold label tokens.
* rank-classification throughput over RAFT test tweets: PEFT scores each (example, label)
  sequence in full; softprompt runs each context once on the cached prompt key/values
  and scores the labels from the cache.
* peak memory of that evaluation: each side runs in its own fresh process; the peak
  resident set (VmHWM, reset through /proc/self/clear_refs just before scoring) minus the
  resident set before scoring, i.e. the memory the evaluation itself adds to the loaded model.

    python benchmarks/bench_speed.py [--eval-limit 640] [--train-steps 12] [--threads 2]
        [--compile-compare] [--pack-compare] [--profile] [--dtype bf16] [--device cuda]

Prints a table (and --json writes the numbers).  The test examples scored are the first
``--eval-limit`` of the 3,399 labelled test tweets.  ``--compile-compare`` adds the full step
eager vs compiled (compiled.py): tokens/s, compile time (the compiled side's 2 warm-up steps minus
the eager side's; each child starts with an empty inductor cache, so it is a cold compile) and
break-even steps.  ``--profile`` adds, per side, torch.profiler counts of one training step after
warm-up and of one scoring call on one batch: on CUDA the kernel launches (CPU-side launch calls,
a CUDA-graph replay counted once) and the GPU kernels run, on a CPU the aten operators at every
depth (``count_events``).  bench_speed_grid.py runs the compile comparison over precisions x batch
sizes as one table; gpu_issue16.sh runs that grid on a lent GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from softprompt.core.conditioning import CONTEXT_MODES

DEVICE = "cpu"  # set by child() from --device
TEMPLATE_HARD = "Tweet: {text}\nIs this tweet a complaint? Answer:"


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def hwm_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def on_gpu(device: str) -> bool:
    return device.startswith("cuda")


def sync(device: str) -> None:
    """GPU work is asynchronous: wait for it before reading a clock."""
    if on_gpu(device):
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- profiling
# CPU-side calls that launch work on the GPU (CUDA runtime and driver API: eager aten kernels go
# through cudaLaunchKernel, inductor's Triton kernels through cuLaunchKernel(Ex)); a CUDA-graph
# replay (cudaGraphLaunch) launches all its kernels at once and counts as one launch.
LAUNCH_CALLS = frozenset({"cudaLaunchKernel", "cudaLaunchKernelExC", "cudaLaunchCooperativeKernel",
                          "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch"})


def count_events(events) -> dict:
    """Counts over profiler events given as (name, on_gpu) pairs:

    * ``aten_ops``: CPU events named ``aten::*`` at every depth, as the profiler lists them
      (``aten::linear`` and the ``aten::mm`` inside it count 2; forward, backward and optimizer);
      inductor's fused kernels are not aten ops and do not count;
    * ``launches``: CPU-side launch calls (LAUNCH_CALLS), a CUDA-graph replay counted once;
    * ``graph_launches``: of those, the CUDA-graph replays;
    * ``gpu_kernels``: events on the GPU other than memory copies/sets and synchronisations
      (each kernel of a replayed graph counts here)."""
    counts = dict.fromkeys(("aten_ops", "launches", "graph_launches", "gpu_kernels"), 0)
    for name, on_gpu_ in events:
        if on_gpu_:
            counts["gpu_kernels"] += not (name.startswith(("Memcpy", "Memset")) or "Sync" in name)
        elif name.startswith("aten::"):
            counts["aten_ops"] += 1
        elif name in LAUNCH_CALLS:
            counts["launches"] += 1
            counts["graph_launches"] += name == "cudaGraphLaunch"
    return counts


def profile_counts(fn) -> dict:
    """``count_events`` over one call of ``fn`` under torch.profiler (GPU activity too on CUDA)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu(DEVICE) else [])
    with profile(activities=activities) as prof:
        fn()
        sync(DEVICE)
    return count_events((e.name, e.device_type != DeviceType.CPU) for e in prof.events())


def timed_steps(step, steps: int, timings: dict | None = None, profile: dict | None = None) -> float:
    """Tokens/s of ``step(i)`` (one optimizer step on batch i, returning its token count) over
    ``steps`` steps after 2 warm-up steps.  ``timings`` gets the warm-up seconds (where a compiled
    step compiles) and the seconds per timed step; ``profile`` gets ``count_events`` of one more
    step on batch 2 (shapes already seen, so nothing compiles inside the profile)."""
    start = time.perf_counter()
    for i in range(2):
        step(i)
    sync(DEVICE)
    t0 = time.perf_counter()
    tokens = sum(step(i) for i in range(2, steps + 2))
    sync(DEVICE)
    wall = time.perf_counter() - t0
    if timings is not None:
        timings |= {"warmup_s": t0 - start, "step_s": wall / steps}
    if profile is not None:
        profile |= profile_counts(lambda: step(2))
    return tokens / wall


def setup(threads: int, device: str = "cpu", dtype: str = "fp32"):
    from softprompt import load_model, load_task

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, tok = load_model(dtype=DTYPES[dtype], device=device)
    data = load_task("twitter_complaints")
    return model, tok, data


def example_ids(tok, ex, verbalizer):
    """Template ids (PEFT's BOS is its first virtual token) and gold label ids.

    Both sides count the same tokens per example: these plus one for the BOS."""
    text = TEMPLATE_HARD.format(text=ex.fields["text"].strip())
    return tok(text, add_special_tokens=False).input_ids, tok(verbalizer[ex.label], add_special_tokens=False).input_ids


# ----------------------------------------------------------------------------- PEFT side
def start_prompt(model, tok, n_tokens: int) -> torch.Tensor:
    """The same initial soft tokens for both sides (sampled vocabulary, seed 0)."""
    from softprompt.core.prompts import init_embeddings

    weight = model.get_input_embeddings().weight
    return init_embeddings(model, tok, n_tokens, "vocab", seed=0).to(weight.device, weight.dtype)


def peft_model(model, tok, n_tokens: int):
    """PEFT prompt tuning whose virtual tokens are [BOS embedding, our initial soft tokens],
    so its sequences are token for token the ones softprompt runs: BOS, soft, template."""
    from peft import PromptTuningConfig, TaskType, get_peft_model

    cfg = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=n_tokens + 1)
    pm = get_peft_model(model, cfg)
    bos = model.get_input_embeddings().weight[tok.bos_token_id].detach()
    with torch.no_grad():
        pm.prompt_encoder.default.embedding.weight.copy_(torch.cat([bos[None], start_prompt(model, tok, n_tokens)]))
    return pm


def peft_batch(tok, seqs, label_lens):
    width = max(len(s) for s in seqs)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(seqs), width), pad)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100)
    for i, (s, n) in enumerate(zip(seqs, label_lens)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        labels[i, len(s) - n : len(s)] = torch.tensor(s[len(s) - n :])
    return ids.to(DEVICE), mask.to(DEVICE), labels.to(DEVICE)


def batch_at(examples, step: int, batch_size: int) -> list:
    return [examples[(step * batch_size + i) % len(examples)] for i in range(batch_size)]


def peft_train(model, tok, task, examples, steps, batch_size, n_tokens, lr, timings=None, profile=None):
    pm = peft_model(model, tok, n_tokens)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr)

    def step(i: int) -> int:
        seqs, lens, tokens = [], [], 0
        for ex in batch_at(examples, i, batch_size):
            ids, lab = example_ids(tok, ex, task.verbalizer)
            seqs.append(ids + lab)
            lens.append(len(lab))
            tokens += 1 + len(ids) + len(lab)
        ids, mask, labels = peft_batch(tok, seqs, lens)
        loss = pm(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        return tokens

    return timed_steps(step, steps, timings, profile)


def peft_eval(model, tok, task, examples, batch_size, n_tokens):
    pm = peft_model(model, tok, n_tokens)
    pm.eval()
    labels = list(task.verbalizer)
    lab_ids = [tok(task.verbalizer[l], add_special_tokens=False).input_ids for l in labels]
    preds = []
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            seqs, lens = [], []
            for ex in chunk:
                ids, _ = example_ids(tok, ex, task.verbalizer)
                for lab in lab_ids:
                    seqs.append(ids + lab)
                    lens.append(len(lab))
            ids, mask, _ = peft_batch(tok, seqs, lens)
            logp = pm(input_ids=ids, attention_mask=mask).logits.log_softmax(-1)
            logp = logp[:, n_tokens + 1 :]  # PEFT prepends the virtual tokens to the outputs too
            scores = []
            for r, (s, n) in enumerate(zip(seqs, lens)):
                pos = torch.arange(len(s) - n - 1, len(s) - 1, device=logp.device)
                scores.append(logp[r, pos, torch.tensor(s[len(s) - n :], device=logp.device)].sum())
            scores = torch.stack(scores).view(len(chunk), len(labels))
            preds += [labels[j] for j in scores.argmax(-1).tolist()]
    return preds


# ----------------------------------------------------------------------------- our side
def our_task(task, n_tokens):
    from softprompt import Task

    return Task(name=task.name, kind="classification", template=f"{{soft:{n_tokens}}} " + TEMPLATE_HARD,
                verbalizer=task.verbalizer)


def ours_train(model, tok, task, examples, steps, batch_size, n_tokens, lr, context="auto", compile=False,
               timings=None, pack_tokens=None, profile=None):
    """Training tokens/s of our step (``timed_steps`` says what ``timings`` and ``profile`` get)."""
    from softprompt.core.bank import PromptBank
    from softprompt.training.prompt import batch_loss, resolve_context

    context = resolve_context(context, model)  # as train_prompt does: cached on a CPU, full on a GPU

    t = our_task(task, n_tokens)
    param = torch.nn.Parameter(start_prompt(model, tok, n_tokens).float())
    bank = PromptBank(model, tok)
    entry = bank.add(t.name, t.template, param, verbalizer=t.verbalizer)
    opt = torch.optim.AdamW([param], lr=lr)

    def step(i: int) -> int:
        batch = batch_at(examples, i, batch_size)
        tokens = sum(1 + len(ids) + len(lab) for ids, lab in (example_ids(tok, ex, task.verbalizer) for ex in batch))
        loss, _ = batch_loss(bank, entry, batch, "lm", context=context, compile=compile, pack_tokens=pack_tokens)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return tokens

    return timed_steps(step, steps, timings, profile)


def ours_eval(model, tok, task, examples, batch_size, n_tokens, compile="off"):
    from softprompt.core.bank import PromptBank
    from softprompt.core.scoring import classify

    t = our_task(task, n_tokens)
    bank = PromptBank(model, tok)
    bank.add(t.name, t.template, start_prompt(model, tok, n_tokens), verbalizer=t.verbalizer)
    return classify(bank, t.name, examples, batch_size=batch_size, compile=compile).predictions


# ----------------------------------------------------------------------------- driver
def child(args) -> dict:
    """One side's eval (throughput + peak memory) or training, in this fresh process."""
    global DEVICE
    DEVICE = args.device
    # "fp32" means fp32 on both sides: no bf16 autocast of our full step on CUDA (compiled.py)
    os.environ["SOFTPROMPT_AUTOCAST"] = "bf16" if args.dtype == "bf16" else "off"
    model, tok, data = setup(args.threads, args.device, args.dtype)
    task = data.task
    from softprompt.core import compiled

    compiled.DEFAULT_BUCKET = args.bucket
    side = args.child.rsplit("-", 1)[0]  # ours | peft | eager-full | compiled | packed
    profile = {} if args.profile else None
    if args.child.endswith("train"):
        timings: dict = {}
        extra = {"timings": timings, "profile": profile}
        if side != "peft":
            extra |= {"context": args.context, "pack_tokens": args.pack_tokens}
        if side in ("eager-full", "compiled"):
            extra |= {"context": "full", "compile": side == "compiled"}
        if side == "packed":
            extra |= {"context": "packed", "compile": False}
        fn = peft_train if side == "peft" else ours_train
        tps = fn(model, tok, task, data["train"], args.train_steps, args.batch_size, args.n_tokens, 0.03, **extra)
        return {"train_tokens_per_s": tps, **timings} | ({"profile": profile} if args.profile else {})
    fn = peft_eval if side == "peft" else ours_eval
    if side == "compiled":
        fn = lambda *a: ours_eval(*a, compile="on")  # noqa: E731
    t_warm = time.perf_counter()
    examples = data["test"][: args.eval_limit]
    fn(model, tok, task, examples[: args.batch_size], args.batch_size, args.n_tokens)  # warm-up
    warmup_s = time.perf_counter() - t_warm
    if on_gpu(args.device):  # GPU memory the evaluation allocates above the loaded model
        sync(args.device)
        torch.cuda.reset_peak_memory_stats()
        before, peak = torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated
    else:  # peak resident set above the loaded model
        before, peak = rss_kib() * 1024, lambda: hwm_kib() * 1024
        reset_peak()
    t0 = time.perf_counter()
    preds = fn(model, tok, task, examples, args.batch_size, args.n_tokens)
    sync(args.device)
    wall = time.perf_counter() - t0
    out = {
        "examples_per_s": len(examples) / wall, "eval_s": wall,
        "peak_eval_mib": (peak() - before) / 2**20, "preds": preds, "warmup_s": warmup_s,
    }
    if args.profile:  # one scoring call on one batch, its set-up (prompt bank / PEFT wrapper) included
        out["profile"] = profile_counts(lambda: fn(model, tok, task, examples[: args.batch_size], args.batch_size,
                                                   args.n_tokens))
    return out


# the options a child reads (run_child passes these on)
CHILD_OPTIONS = ("eval_limit", "train_steps", "batch_size", "eval_batch_size", "n_tokens", "threads", "device",
                 "context", "pack_tokens", "dtype", "bucket", "profile")


def run_child(part: str, opts: dict, timeout: float | None = None) -> dict:
    """Run one side (``part``, e.g. "compiled-train") in a fresh process with ``opts`` (CHILD_OPTIONS)
    and return what it measured.  Each child gets an empty inductor cache (TORCHINDUCTOR_CACHE_DIR),
    so compile times are cold ones.  A failed child raises RuntimeError with the end of its stderr."""
    cmd = [sys.executable, __file__, "--child", part]
    for k in CHILD_OPTIONS:
        v = opts.get(k)
        if v is not None and v is not False:
            cmd.append(f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}"))
    with tempfile.TemporaryDirectory(prefix="inductor-", ignore_cleanup_errors=True) as cache:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env=os.environ | {"TORCHINDUCTOR_CACHE_DIR": cache})
    if proc.returncode:
        raise RuntimeError(f"{part} exited with {proc.returncode}:\n" + "\n".join(proc.stderr.splitlines()[-20:]))
    return json.loads(proc.stdout.strip().splitlines()[-1])


def break_even(compile_s: float, eager_step_s: float, compiled_step_s: float) -> float | None:
    """Steps after which compiling has paid for itself; None when the compiled step is not faster."""
    gain = eager_step_s - compiled_step_s
    return max(compile_s, 0.0) / gain if gain > 0 else None


def compile_seconds(res: dict) -> float:
    """Compilation time of the compiled full step: 2 warm-up steps each; the difference is compilation."""
    return res["compiled-train"]["warmup_s"] - res["eager-full-train"]["warmup_s"]


def profile_rows(what: str, parts: list, device: str) -> list[tuple[str, list]]:
    """(label, one count per part) rows for the profiled ``what`` ("training step" | "scoring call"):
    on CUDA kernel launches (CPU-side launch calls, a CUDA-graph replay counted once) and GPU kernels
    run; on a CPU aten operators at every depth (count_events).  A part without a profile gives None."""
    keys = ([("launches", f"kernel launches / {what} (CUDA graph = 1)"), ("gpu_kernels", f"GPU kernels run / {what}")]
            if on_gpu(device) else [("aten_ops", f"aten ops / {what} (every depth)")])
    return [(label, [(p or {}).get("profile", {}).get(k) for p in parts]) for k, label in keys]


def cells(values, width: int = 12, fmt: str = ",.0f") -> str:
    return " ".join(f"{v:{width}{fmt}}" if v is not None else f"{'-':>{width}s}" for v in values)


def compile_report(res: dict, device: str) -> None:
    eager, comp, peft = res["eager-full-train"], res["compiled-train"], res["peft-train"]
    ce, oe, pe = res["compiled-eval"], res["ours-eval"], res["peft-eval"]
    compile_s = compile_seconds(res)
    steps = break_even(compile_s, eager["step_s"], comp["step_s"])
    print(f"{'full step (context=full)':56s} {'eager':>12s} {'compiled':>12s} {'HF PEFT':>12s}")
    print(f"{'  training tokens/s':56s} {eager['train_tokens_per_s']:12.1f} {comp['train_tokens_per_s']:12.1f} "
          f"{peft['train_tokens_per_s']:12.1f}")
    print(f"{'  rank-classification examples/s (eager = cached context)':56s} {oe['examples_per_s']:12.1f} "
          f"{ce['examples_per_s']:12.1f} {pe['examples_per_s']:12.1f}")
    print(f"{'  training warm-up s (2 steps; compiled: + compilation)':56s} {eager['warmup_s']:12.1f} "
          f"{comp['warmup_s']:12.1f}")
    print(f"{'  scoring warm-up s (1 batch; compiled: + compilation)':56s} {oe['warmup_s']:12.1f} {ce['warmup_s']:12.1f}")
    for label, values in (profile_rows("training step", [eager, comp, peft], device)
                          + profile_rows("scoring call", [oe, ce, pe], device)):
        if any(v is not None for v in values):
            print(f"  {label:54s} {cells(values)}")
    print(f"  compile time ~{compile_s:.1f} s; break-even: "
          + (f"{steps:.0f} training steps" if steps is not None else "never (the compiled step is not faster)"))


def add_common_options(p: argparse.ArgumentParser) -> None:
    """Options shared with bench_speed_grid.py."""
    p.add_argument("--eval-limit", type=int, default=640)
    p.add_argument("--train-steps", type=int, default=12)
    p.add_argument("--n-tokens", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bucket", type=int, default=32, help="compiled step: sequence lengths padded to a multiple of this")
    p.add_argument("--profile", action="store_true",
                   help="also count, with torch.profiler, kernel launches (CUDA) or aten ops (CPU) of one training "
                        "step after warm-up and of one scoring call on one batch")
    p.add_argument("--json", type=Path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_options(p)
    p.add_argument("--batch-size", type=int, default=8, help="training batch size")
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--context", default="auto", choices=CONTEXT_MODES,
                   help="our training step (TrainConfig.context): auto = cached on a CPU, full on a GPU")
    p.add_argument("--pack-tokens", type=int, help="context packed: the most tokens per row (default: 256, or the longest example)")
    p.add_argument("--pack-compare", action="store_true",
                   help="also run the full step unpacked and packed (eager; core/packing.py): training tokens/s")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="precision of the frozen model (both sides)")
    p.add_argument("--compile-compare", action="store_true",
                   help="also run the full step eager and compiled (compiled.py): tokens/s, compile time, break-even")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        if not args.child.endswith("train"):
            args.batch_size = args.eval_batch_size
        print(json.dumps(child(args)))
        return

    parts = ["ours-train", "peft-train", "ours-eval", "peft-eval"]
    if args.compile_compare:
        parts += ["eager-full-train", "compiled-train", "compiled-eval"]
    if args.pack_compare:
        parts += [p for p in ("eager-full-train", "packed-train") if p not in parts]
    res = {part: run_child(part, vars(args)) for part in parts}
    agree = sum(a == b for a, b in zip(res["ours-eval"]["preds"], res["peft-eval"]["preds"])) / args.eval_limit
    rows = [
        ("training tokens/s", res["ours-train"]["train_tokens_per_s"], res["peft-train"]["train_tokens_per_s"]),
        ("rank-classification examples/s", res["ours-eval"]["examples_per_s"], res["peft-eval"]["examples_per_s"]),
        ("peak eval memory above model (MiB)", res["ours-eval"]["peak_eval_mib"], res["peft-eval"]["peak_eval_mib"]),
    ]
    where = torch.cuda.get_device_name(0) if on_gpu(args.device) else f"{os.cpu_count()} cores, threads {args.threads}"
    memory = "GPU memory allocated" if on_gpu(args.device) else "resident set"
    rows[2] = (f"peak eval memory above model (MiB, {memory})",) + rows[2][1:]
    for what, side in (("training step", "train"), ("scoring call", "eval")):
        rows += [(label, *values) for label, values in
                 profile_rows(what, [res[f"ours-{side}"], res[f"peft-{side}"]], args.device) if None not in values]
    print(f"machine: {platform.machine()} {where}, torch {torch.__version__}; "
          f"{args.n_tokens} soft tokens, train batch {args.batch_size}, eval batch {args.eval_batch_size}, {args.dtype}")
    print(f"{'metric':56s} {'softprompt':>12s} {'HF PEFT':>12s} {'ratio':>8s}")
    for name, ours, peft in rows:
        fmt = ",d" if isinstance(ours, int) else ".1f"  # counts / measurements
        print(f"{name:56s} {ours:12{fmt}} {peft:12{fmt}} {ours / peft if peft else float('nan'):8.2f}x")
    if args.compile_compare:
        compile_report(res, args.device)
    if args.pack_compare:
        full, packed = res["eager-full-train"]["train_tokens_per_s"], res["packed-train"]["train_tokens_per_s"]
        print(f"{'full step training tokens/s: unpacked -> packed (eager)':56s} {full:12.1f} {packed:12.1f} "
              f"{packed / full:8.2f}x")
        for label, values in profile_rows("training step", [res["eager-full-train"], res["packed-train"]], args.device):
            if None not in values:
                print(f"{'  ' + label:56s} {cells(values)}")
    print(f"eval: first {args.eval_limit} RAFT test tweets; the two sides' predictions agree on {agree:.1%} "
          "(the same prompt on both sides: a check that both score the same thing)")
    if args.json:
        for part in res.values():
            part.pop("preds", None)
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": res}, indent=1))


if __name__ == "__main__":
    main()
