"""Latency per query as a comparison reports it, and the one-line summary of a finished run.

Apart from the runner so that every run kind (the runner's and ``hard_runs``') times its
prompt the same way: a warm-up (which caches the prompt's prefix key/values, as when
serving), then each example alone and all of them in one batch.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ...data import Example

__all__ = ["latency", "stats_line"]


def latency(fn: Callable[[list[Example], int], Any], examples: list[Example], n: int) -> dict:
    """ms per query at batch 1 (median) and with all ``n`` examples in one batch (best of two),
    after a warm-up; ``fn(examples, batch_size)`` scores."""
    n = min(n, len(examples))
    if n <= 0:
        return {"batch1_ms": None, "batched_ms": None, "batch_size": 0}
    exs = examples[:n]
    fn(exs[:2], 2)  # warm-up: caches the prompt's prefix key/values
    single = []
    for ex in exs:
        t = time.perf_counter()
        fn([ex], 1)
        single.append((time.perf_counter() - t) * 1000)
    batched = []
    for _ in range(2):
        t = time.perf_counter()
        fn(exs, n)
        batched.append((time.perf_counter() - t) * 1000 / n)
    single.sort()
    return {"batch1_ms": single[len(single) // 2], "batched_ms": min(batched), "batch_size": n,
            "batch1_mean_ms": sum(single) / n}


def stats_line(m: dict) -> str:
    """The metrics of a finished run in one line (progress output)."""
    if "exact_match" in m:
        return f"EM {m['exact_match']:.3f}  F1 {m['f1']:.3f}"
    s = f"acc {m['accuracy']:.3f}  macro-F1 {m['macro_f1']:.3f}"
    if "n_unparseable" in m:
        s += f"  unparseable {m['n_unparseable']}/{m['n']}"
    return s
