"""Memory and time of one many-label classify request on the embedded model (issue 12).

One request: ``--inputs`` texts of ``--words`` words each, for a task whose verbalizer has
``--labels`` multi-token label words, served by the engine as the server would.  Reports
the peak resident-set growth during the request (the kernel's VmHWM, reset just before, and
a 2 ms sampler) and its wall time.  The sampler stops the process once growth passes
``--abort-gb``, so the old per-label-copy scorer can be measured without the kernel's OOM
killer taking the machine down: it then reports ``aborted`` and the growth it had reached.

    PYTHONPATH=src python benchmarks/bench_label_memory.py [--max-batch-tokens 8192]
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import threading
import time

import psutil
import torch

from softprompt import load_model
from softprompt.serve.engine import Engine
from softprompt.serve.testing import random_prompt

WORDS = ("delayed flight refund baggage service support order parcel crushed arrived nobody answers emails "
         "weather sports politics science music movies travel finance health cooking gardening history art "
         "technology education business culture fashion gaming law medicine nature religion space").split()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--labels", type=int, default=50)
    ap.add_argument("--inputs", type=int, default=32)
    ap.add_argument("--words", type=int, default=120)
    ap.add_argument("--max-batch-tokens", type=int, default=None, help="engine budget (default: the engine's)")
    ap.add_argument("--abort-gb", type=float, default=4.0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model()
    verb = {f"l{j}": f" {WORDS[j % len(WORDS)]} {WORDS[(3 * j + 1) % len(WORDS)]} news" for j in range(args.labels)}
    prompt = random_prompt(model, "{soft:20} Message: {text}\nTopic:", verbalizer=verb, seed=1, scale=0.1)
    kw = {}
    if args.max_batch_tokens is not None:
        kw["max_batch_tokens"] = args.max_batch_tokens
    params = inspect.signature(Engine).parameters  # (older engines had no label limit; newer take an EngineConfig)
    if "max_labels" in params or "config" in params:
        kw["max_labels"] = max(args.labels, 100)
    eng = Engine(model, tok, max_input_tokens=512, max_batch_size=32, max_wait_ms=100, **kw)
    eng.register("many", prompt)
    eng.start()
    eng.classify("many", ["hello"], timeout=600)
    g = torch.Generator().manual_seed(0)
    inputs = [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (args.words,), generator=g))
              for _ in range(args.inputs)]
    n_tokens = [len(tok(t, add_special_tokens=False).input_ids) for t in inputs]
    label_tokens = [len(tok(w, add_special_tokens=False).input_ids) for w in verb.values()]
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()
    t0 = time.perf_counter()

    def sample():
        while not done.is_set():
            rss = proc.memory_info().rss
            peak[0] = max(peak[0], rss)
            if rss - base > args.abort_gb * 2**30:
                print(json.dumps({"aborted": True, "growth_mb": round((rss - base) / 2**20),
                                  "after_s": round(time.perf_counter() - t0, 1)}), flush=True)
                os._exit(3)
            time.sleep(0.002)

    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    res = eng.classify("many", inputs, timeout=3600)
    seconds = time.perf_counter() - t0
    done.set()
    th.join()
    hwm = next(int(ln.split()[1]) * 1024 for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))
    print(json.dumps({
        "aborted": False, "growth_mb": round((max(peak[0], hwm) - base) / 2**20), "seconds": round(seconds, 1),
        "answers": len(res), "input_tokens": [min(n_tokens), max(n_tokens)],
        "label_tokens": [min(label_tokens), max(label_tokens)], "engine": kw,
    }), flush=True)
    eng.stop()


if __name__ == "__main__":
    main()
