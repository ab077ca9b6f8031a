"""Serving benchmark (issue 5): one frozen model, 8 tasks, dynamic batching across tasks.

Drives :class:`softprompt.serve.Engine` directly (and, with ``--http``, the real HTTP
server) with the embedded model and 8 classification tasks whose prompts are randomly
initialised 20-token soft prompts behind realistic instructions and verbalizers.  Inputs
are real tweets (twitter_complaints) and movie-review sentences (sst2) from the shared
data folder.  Every configuration is a real code path of the engine, selected by a flag,
and all of them are measured in ONE run, interleaved round by round so that drift in the
machine's load hits them alike:

  mixed            8-task traffic, mixed batches, prompt key/values reused  (the server)
  single           1-task traffic, same engine settings
  per_task         8-task traffic, one task per batch (batching="per_task")
  per_task+recomp  one task per batch AND the prompt recomputed per request: what serving
                   HF PEFT prompt-tuning models amounts to (one active adapter per forward,
                   virtual tokens prepended to every input)
  recompute        8-task traffic, mixed batches, prompt recomputed per request
                   (prefix_cache=False): the baseline for KV-prefix reuse

Throughput is measured closed-loop (``--concurrency`` clients, each sending its next
request when the previous one is answered).  Latency is then measured open-loop
(Poisson arrivals) at a few request rates, set as fractions of the measured mixed
throughput.  Finally the per-row cost of one-task batches of 1..16 rows shows how much
batching itself buys on the machine, which bounds the mixed / one-task-per-batch ratio.

The engine runs with its defaults (on a CPU ``split_padding=0.25``: a formed batch runs as
a few forward passes of similar length, because padded tokens cost real compute there);
torch uses ``--threads`` intra-op threads (1 by default: on a shared 2-core machine two
OpenMP threads stall each other whenever another process holds a core).

    PYTHONPATH=src .venv/bin/python benchmarks/bench_serve.py               # full size, ~4-5 min on 2 busy cores
    PYTHONPATH=src .venv/bin/python benchmarks/bench_serve.py --requests 48 --latency-requests 16  # quick
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import threading
import time
from pathlib import Path

import torch

from softprompt.models import DEFAULT_MODEL, load_model
from softprompt.serve import Engine
from softprompt.serve.testing import random_prompt
from softprompt.tasks import load_task

# name, template, verbalizer (every label word is one token for SmolLM2's tokenizer)
TASKS = [
    ("complaint", "{soft:20} Is this message a complaint about a product or a service?\nMessage: {text}\nAnswer:",
     {"complaint": " yes", "no_complaint": " no"}),
    ("sentiment", "{soft:20} What is the sentiment of the following text?\nText: {text}\nSentiment:",
     {"negative": " negative", "positive": " positive"}),
    ("topic", "{soft:20} Which topic is this text about: world, sports, business or technology?\nText: {text}\nTopic:",
     {"World": " World", "Sports": " Sports", "Business": " Business", "Sci/Tech": " Technology"}),
    ("emotion", "{soft:20} Which emotion does the writer of this text express most?\nText: {text}\nEmotion:",
     {"joy": " joy", "anger": " anger", "sadness": " sadness", "fear": " fear", "surprise": " surprise"}),
    ("urgency", "{soft:20} How urgently does this message need a reply from customer support?\nMessage: {text}\nUrgency:",
     {"high": " high", "medium": " medium", "low": " low"}),
    ("spam", "{soft:20} Is this message spam or a genuine message from a person?\nMessage: {text}\nLabel:",
     {"spam": " spam", "genuine": " genuine"}),
    ("formality", "{soft:20} Is this text written in a formal or an informal style?\nText: {text}\nStyle:",
     {"formal": " formal", "informal": " informal"}),
    ("intent", "{soft:20} Is the writer asking a question, making a request or making a statement?\nText: {text}\nIntent:",
     {"question": " question", "request": " request", "statement": " statement"}),
]
SINGLE_TASK = "sentiment"

CONFIGS = {  # name: (traffic, batching, prefix_cache)
    "mixed": ("mixed", "mixed", True),
    "single": ("single", "mixed", True),
    "per_task": ("mixed", "per_task", True),
    "per_task+recomp": ("mixed", "per_task", False),
    "recompute": ("mixed", "mixed", False),
}


def texts(n: int, seed: int) -> list[str]:
    """Real short texts: twitter_complaints and sst2 test inputs, shuffled."""
    per = max(n, 200)
    tweets = [ex.fields["text"] for ex in load_task("twitter_complaints", limit_per_split=per)["test"]]
    sents = [ex.fields["sentence"] for ex in load_task("sst2", limit_per_split=per)["test"]]
    pool = tweets + sents
    random.Random(seed).shuffle(pool)
    return [pool[i % len(pool)] for i in range(n)]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def closed_loop(engine: Engine, traffic: list[tuple[str, str]], concurrency: int) -> tuple[float, list[float]]:
    """Keep ``concurrency`` requests in flight until all are answered; (seconds, latencies)."""
    sem = threading.Semaphore(concurrency)
    lock = threading.Lock()
    lat: list[float] = []
    errors: list[BaseException] = []
    left = [len(traffic)]
    done = threading.Event()
    t0 = time.perf_counter()
    for task, text in traffic:
        sem.acquire()
        ts = time.perf_counter()
        fut = engine.submit_classify(task, [text])[0]

        def cb(f, ts=ts):
            lat.append(time.perf_counter() - ts)
            if f.exception() is not None:
                errors.append(f.exception())
            sem.release()
            with lock:
                left[0] -= 1
                if left[0] == 0:
                    done.set()
        fut.add_done_callback(cb)
    done.wait()
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]!r}")
    return time.perf_counter() - t0, lat


def open_loop(engine: Engine, traffic: list[tuple[str, str]], rate: float, seed: int) -> list[float]:
    """Poisson arrivals at ``rate`` requests/s; latency from the scheduled arrival."""
    rng = random.Random(seed)
    lat: list[float] = []
    left = [len(traffic)]
    lock = threading.Lock()
    done = threading.Event()
    t0 = time.perf_counter()
    at = 0.0
    for task, text in traffic:
        at += rng.expovariate(rate)
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        sched = t0 + at
        fut = engine.submit_classify(task, [text])[0]

        def cb(f, sched=sched):
            f.result()
            lat.append(time.perf_counter() - sched)
            with lock:
                left[0] -= 1
                if left[0] == 0:
                    done.set()
        fut.add_done_callback(cb)
    done.wait()
    return lat


def http_closed_loop(engine: Engine, traffic, concurrency: int) -> tuple[float, list[float]]:
    """The same closed loop through the real HTTP server (uvicorn + httpx, 127.0.0.1)."""
    import asyncio

    import httpx

    from softprompt.serve import create_app
    from softprompt.serve.testing import ServerThread

    app = create_app(engine, manage_engine=False, max_inputs=64)

    async def run(url):
        todo = list(enumerate(traffic))
        lat: list[float] = []

        async def client():
            async with httpx.AsyncClient(base_url=url, timeout=600) as c:
                while todo:
                    _, (task, text) = todo.pop()
                    ts = time.perf_counter()
                    r = await c.post("/v1/classify", json={"task": task, "inputs": [text]})
                    r.raise_for_status()
                    lat.append(time.perf_counter() - ts)
        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return time.perf_counter() - t0, lat

    with ServerThread(app) as srv:
        return asyncio.run(run(srv.url))


def soft_sweep(engine: Engine, model, text_pool: list[str], sizes=(20, 50, 100), batch=16, reps=2) -> list[tuple]:
    """Time one batch of ``batch`` rows with prefix reuse vs recompute for several prompt lengths."""
    rows = []
    for n in sizes:
        name = f"sweep{n}"
        engine.register(name, random_prompt(model, TASKS[1][1].replace("{soft:20}", f"{{soft:{n}}}"), verbalizer=TASKS[1][2], seed=n))
        res = {}
        for cache in (True, False, True, False)[: 2 * reps]:
            engine.prefix_cache = cache
            t0 = time.perf_counter()
            engine.classify(name, text_pool[:batch])
            res.setdefault(cache, []).append(time.perf_counter() - t0)
        rows.append((n, min(res[True]), min(res[False])))
        engine.unregister(name)
    engine.prefix_cache = True
    return rows


def batch_curve(engine: Engine, text_pool: list[str], sizes=(1, 2, 4, 8, 16), reps=2) -> list[tuple[int, float]]:
    """Seconds per row of one batch of B rows of one task (best of ``reps``): how much
    batching itself buys on this hardware, which bounds the mixed / per-task ratio."""
    out = []
    for b in sizes:
        if b > engine.max_batch_size:
            continue
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            engine.classify(SINGLE_TASK, text_pool[:b])
            best = min(best, time.perf_counter() - t0)
        out.append((b, best / b))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--requests", type=int, default=128, help="requests per configuration (split over the rounds)")
    ap.add_argument("--rounds", type=int, default=4, help="interleaved rounds (each runs every configuration once)")
    ap.add_argument("--concurrency", type=int, default=16, help="closed-loop clients")
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--rates", default="0.25,0.5,0.75", help="open-loop request rates as fractions of mixed throughput")
    ap.add_argument("--latency-requests", type=int, default=32, help="requests per open-loop rate")
    ap.add_argument("--no-batch-curve", action="store_true", help="skip timing single-task batches of 1..16 rows")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"subset of {','.join(CONFIGS)}")
    ap.add_argument("--split-padding", default="auto",
                    help="engine split_padding: 'auto' (CPU: 0.25), 'none', or a fraction")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (see docs/benchmarks.md)")
    ap.add_argument("--http", action="store_true", help="also run the mixed closed loop through the HTTP server")
    ap.add_argument("--soft-sweep", action="store_true", help="also time prefix reuse vs recompute at 20/50/100 soft tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write the raw numbers here")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    configs = [c for c in args.configs.split(",") if c]
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        ap.error(f"unknown configs {sorted(unknown)}")
    t_start = time.perf_counter()
    load0 = os.getloadavg()
    model, tok = load_model(args.model)
    split = {"auto": "auto", "none": None}.get(args.split_padding.lower(), None)
    if args.split_padding.lower() not in ("auto", "none"):
        split = float(args.split_padding)
    engine = Engine(model, tok, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                    max_queue=1_000_000, base_name=args.model, split_padding=split)
    for k, (name, template, verbalizer) in enumerate(TASKS):
        engine.register(name, random_prompt(model, template, verbalizer=verbalizer, seed=k, task=name))
    engine.start()

    pool = texts(args.requests * 2, args.seed)
    rng = random.Random(args.seed)
    mixed_traffic = [(rng.choice(TASKS)[0], t) for t in pool[: args.requests]]
    single_traffic = [(SINGLE_TASK, t) for _, t in mixed_traffic]
    traffic = {"mixed": mixed_traffic, "single": single_traffic}
    info = engine.task(SINGLE_TASK).info()
    print(f"# {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params), torch {torch.__version__}, "
          f"{args.threads} thread(s), {os.cpu_count()} CPUs, load average {load0[0]:.2f} at start", flush=True)
    print(f"# 8 tasks, 20 soft tokens each (prefix {info['prefix_tokens'][0]} tokens incl. BOS and instruction); "
          f"{args.requests} requests per configuration in {args.rounds} interleaved rounds; "
          f"concurrency {args.concurrency}, max batch {args.max_batch_size}, max wait {args.max_wait_ms} ms, "
          f"split_padding {engine.split_padding}", flush=True)

    # warm-up: one batch per configuration path
    for tr, batching, cache in CONFIGS.values():
        engine.batching, engine.prefix_cache = batching, cache
        closed_loop(engine, traffic[tr][: min(8, len(traffic[tr]))], args.concurrency)

    elapsed = {c: 0.0 for c in configs}
    lats: dict[str, list[float]] = {c: [] for c in configs}
    rows = {c: 0 for c in configs}
    batches = {c: [0, 0] for c in configs}  # batches, rows (from the engine's metrics)
    per_round = [(r * args.requests // args.rounds, (r + 1) * args.requests // args.rounds) for r in range(args.rounds)]
    for r, (lo, hi) in enumerate(per_round):
        order = configs[r % len(configs):] + configs[: r % len(configs)]
        for c in order:
            tr, batching, cache = CONFIGS[c]
            engine.batching, engine.prefix_cache = batching, cache
            b0, s0 = engine.metrics.batch_size.count(), engine.metrics.batch_size.sum()
            dt, lat = closed_loop(engine, traffic[tr][lo:hi], args.concurrency)
            elapsed[c] += dt
            lats[c] += lat
            rows[c] += hi - lo
            batches[c][0] += engine.metrics.batch_size.count() - b0
            batches[c][1] += engine.metrics.batch_size.sum() - s0
            print(f"  round {r + 1}/{args.rounds} {c:<16} {(hi - lo) / dt:6.2f} req/s", flush=True)
    engine.batching, engine.prefix_cache = "mixed", True
    thr = {c: rows[c] / elapsed[c] for c in configs}

    print()
    print("| configuration | traffic | batching | prompt KV | req/s | mean batch | p50 ms | p99 ms |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    for c in configs:
        tr, batching, cache = CONFIGS[c]
        mb = batches[c][1] / max(batches[c][0], 1)
        print(f"| {c} | {tr} | {batching} | {'reused' if cache else 'recomputed'} | {thr[c]:.2f} | {mb:.1f} | "
              f"{percentile(lats[c], 0.5) * 1e3:.0f} | {percentile(lats[c], 0.99) * 1e3:.0f} |")
    ratios = []
    if {"mixed", "single"} <= set(configs):
        ratios.append(("mixed 8-task / single-task throughput", thr["mixed"] / thr["single"], ">= 0.9"))
    if {"mixed", "per_task"} <= set(configs):
        ratios.append(("mixed batches / one task per batch", thr["mixed"] / thr["per_task"], ">= 3 (target)"))
    if {"mixed", "per_task+recomp"} <= set(configs):
        ratios.append(("mixed batches + KV reuse / one task per batch + recompute (PEFT-style)",
                       thr["mixed"] / thr["per_task+recomp"], ">= 3 (target)"))
    if {"mixed", "recompute"} <= set(configs):
        ratios.append(("KV-prefix reuse / recompute the prompt per request (20 soft tokens)",
                       thr["mixed"] / thr["recompute"], "> 1"))
    print()
    print("| ratio (same run) | value | target |")
    print("|---|---:|---|")
    for name, v, target in ratios:
        print(f"| {name} | {v:.2f}x | {target} |")

    latency_rows = []
    if "mixed" in configs and args.latency_requests > 0:
        print()
        print(f"Open-loop latency, mixed 8-task traffic, Poisson arrivals, {args.latency_requests} requests per rate:")
        print()
        print("| rate (req/s) | fraction of capacity | p50 ms | p99 ms | mean batch |")
        print("|---:|---:|---:|---:|---:|")
        lat_pool = [(rng.choice(TASKS)[0], t) for t in pool[args.requests: args.requests + args.latency_requests]]
        for f in (float(x) for x in args.rates.split(",") if x):
            rate = f * thr["mixed"]
            b0, s0 = engine.metrics.batch_size.count(), engine.metrics.batch_size.sum()
            lat = open_loop(engine, lat_pool, rate, args.seed)
            nb = engine.metrics.batch_size.count() - b0
            mb = (engine.metrics.batch_size.sum() - s0) / max(nb, 1)
            latency_rows.append((rate, f, percentile(lat, 0.5), percentile(lat, 0.99), mb))
            print(f"| {rate:.2f} | {f:.2f} | {percentile(lat, 0.5) * 1e3:.0f} | {percentile(lat, 0.99) * 1e3:.0f} | {mb:.1f} |", flush=True)

    http = None
    if args.http:
        n = min(args.requests, len(mixed_traffic))
        dt, lat = http_closed_loop(engine, mixed_traffic[:n], args.concurrency)
        http = (n / dt, percentile(lat, 0.5), percentile(lat, 0.99))
        print(f"\nHTTP (uvicorn + httpx on 127.0.0.1), mixed traffic, {n} requests: {http[0]:.2f} req/s, "
              f"p50 {http[1] * 1e3:.0f} ms, p99 {http[2] * 1e3:.0f} ms")

    curve = None
    if not args.no_batch_curve:
        curve = batch_curve(engine, pool)
        print("\nBatching efficiency on this machine (one task, prompt KV reused):\n")
        print("| batch rows | ms per row | vs 1 row |")
        print("|---:|---:|---:|")
        for b, per in curve:
            print(f"| {b} | {per * 1e3:.0f} | {curve[0][1] / per:.2f}x |")

    sweep = None
    if args.soft_sweep:
        sweep = soft_sweep(engine, model, pool)
        print("\n| soft tokens | batch of 16, prompt KV reused (s) | recomputed (s) | speedup |")
        print("|---:|---:|---:|---:|")
        for n, a, b in sweep:
            print(f"| {n} | {a:.2f} | {b:.2f} | {b / a:.2f}x |")

    engine.stop()
    print(f"\n# total {time.perf_counter() - t_start:.0f} s; load average {os.getloadavg()[0]:.2f} at the end; "
          f"{platform.processor() or platform.machine()}")
    if args.json:
        args.json.write_text(json.dumps({
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "throughput": thr, "ratios": {n: v for n, v, _ in ratios},
            "latency": {c: {"p50": percentile(lats[c], 0.5), "p99": percentile(lats[c], 0.99)} for c in configs},
            "open_loop": latency_rows, "http": http, "soft_sweep": sweep, "batch_curve": curve,
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
