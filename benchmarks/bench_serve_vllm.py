"""The vLLM backend against the in-process engine, same traffic, same run (issue 15).

The 8 classification and 8 generation tasks of ``bench_serve.py`` (20 random soft tokens
behind realistic instructions, real tweets and movie-review sentences), served twice in
ONE process: by :class:`softprompt.serve.Engine` and by the vLLM backend with vLLM's async
engine in this process (``softprompt serve --backend vllm``).  Mixed 8-task traffic,
closed loop (``--concurrency`` clients), interleaved round by round so that the machine's
load drifts over both alike; throughput and p50/p99 latency per backend and the
vLLM / engine ratio.  The answers are compared too (labels, greedy tokens).

Needs vLLM, so it runs from the vLLM environment (``make setup-vllm``):

    PYTHONPATH=src .venv-vllm/bin/python benchmarks/bench_serve_vllm.py --requests 64 --rounds 2
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import GEN_TASKS, TASKS, Kind, closed_loop, percentile, texts  # noqa: E402

from softprompt.families.loading import DEFAULT_MODEL, load_model  # noqa: E402
from softprompt.serve import Engine  # noqa: E402
from softprompt.serve.backends.vllm import make_vllm_backend  # noqa: E402
from softprompt.serve.testing import random_prompt  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--traffic", default="classify,generate")
    ap.add_argument("--requests", type=int, default=64, help="requests per backend and traffic kind (split over rounds)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="the in-process engine's torch threads")
    ap.add_argument("--vllm-eager", action="store_true", help="vLLM without torch.compile")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    kinds_wanted = [k for k in args.traffic.split(",") if k]

    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    engine = Engine(model, tok, max_batch_size=16, max_queue=1_000_000, base_name=args.model,
                    max_new_tokens_limit=max(256, args.max_new_tokens))
    backend = make_vllm_backend(args.model, enforce_eager=args.vllm_eager, max_model_len=2048, max_queue=1_000_000,
                                max_new_tokens_limit=max(256, args.max_new_tokens))
    prompts = {}
    for k, (name, template, verbalizer) in enumerate(TASKS):
        prompts[name] = random_prompt(model, template, verbalizer=verbalizer, seed=k, task=name)
    for k, (name, template) in enumerate(GEN_TASKS):
        prompts[name] = random_prompt(model, template, kind="generation", seed=100 + k, task=name)
    for name, p in prompts.items():
        engine.register(name, p)
        backend.register(name, p)
    engine.start()
    t_v = time.perf_counter()
    backend.start()
    t_v = time.perf_counter() - t_v
    targets = {"engine": engine, "vllm": backend}
    kinds = {(b, k): Kind(k, t, args.max_new_tokens, False) for b, t in targets.items() for k in kinds_wanted}

    pool = texts(args.requests, args.seed)
    rng = random.Random(args.seed)
    traffic = {k: [(rng.choice(kinds["engine", k].tasks), t) for t in pool] for k in kinds_wanted}
    load0 = os.getloadavg()
    print(f"# {args.model}, torch {torch.__version__}, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
          f"load average {load0[0]:.2f}; engine {args.threads} thread(s); vLLM in-process "
          f"({'eager' if args.vllm_eager else 'torch.compile'}), started in {t_v:.0f} s; {args.requests} requests per "
          f"backend and kind in {args.rounds} interleaved rounds, concurrency {args.concurrency}; generation greedy, "
          f"{args.max_new_tokens} new tokens, stop at EOS", flush=True)
    for (b, k), kind in kinds.items():  # warm-up
        closed_loop(kind, traffic[k][:8], args.concurrency)

    res = {key: {"s": 0.0, "lat": [], "tok": 0, "answers": {}} for key in kinds}
    per = max(1, args.requests // args.rounds)
    for r in range(args.rounds):
        for k in kinds_wanted:
            chunk = traffic[k][r * per:(r + 1) * per]
            order = ["engine", "vllm"] if r % 2 == 0 else ["vllm", "engine"]
            for b in order:
                s, lat, ntok = closed_loop(kinds[b, k], chunk, args.concurrency, answers=res[b, k]["answers"])
                res[b, k]["s"] += s
                res[b, k]["lat"] += lat
                res[b, k]["tok"] += ntok

    out = {"machine": f"{os.cpu_count()} CPUs", "date": time.strftime("%Y-%m-%d"), "args": vars(args) | {"json": None},
           "results": {}}
    print("| traffic | backend | req/s | new tok/s | p50 ms | p99 ms | req/s vs engine | same answers |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for k in kinds_wanted:
        e = res["engine", k]
        for b in ("engine", "vllm"):
            x = res[b, k]
            n = len(x["lat"])
            rps, tps = n / x["s"], x["tok"] / x["s"]
            same = sum(
                (a.token_ids == e["answers"][key].token_ids) if k == "generate" else (a.label == e["answers"][key].label)
                for key, a in x["answers"].items()) / max(1, len(x["answers"]))
            ratio = rps / (len(e["lat"]) / e["s"])
            p50, p99 = 1000 * percentile(x["lat"], 0.5), 1000 * percentile(x["lat"], 0.99)
            print(f"| {k} | {b} | {rps:.2f} | {tps:.1f} | {p50:.0f} | {p99:.0f} | {ratio:.2f}x | {same:.0%} |", flush=True)
            out["results"][f"{k}/{b}"] = {"requests": n, "req_per_s": rps, "tok_per_s": tps, "p50_ms": p50,
                                          "p99_ms": p99, "ratio_vs_engine": ratio, "same_answers": same}
    print(f"# total {time.perf_counter() - t0:.0f} s; load average at end {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    backend.stop()
    engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
