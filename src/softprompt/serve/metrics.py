"""A tiny, thread-safe Prometheus text-format registry (counters, gauges, histograms).

Written by hand so the server needs no extra dependency; the exposition format is the
plain text one (``text/plain; version=0.0.4``) every Prometheus scraper reads.
"""
from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

LabelKey = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt_labels(labels: LabelKey, extra: tuple[tuple[str, str], ...] = ()) -> str:
    items = labels + extra
    if not items:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in items) + "}"


def _fmt_value(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if float(v).is_integer():
        return str(int(v))
    return repr(float(v))


class _Metric:
    def __init__(self, name: str, help: str, kind: str):
        self.name, self.help, self.kind = name, help, kind
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    def __init__(self, name: str, help: str):
        super().__init__(name, help, "counter")
        self._values: dict[LabelKey, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return self.header() + [f"{self.name}{_fmt_labels(k)} {_fmt_value(v)}" for k, v in items]


class Gauge(_Metric):
    """A gauge read from a callback at scrape time (or set explicitly)."""

    def __init__(self, name: str, help: str, fn: Callable[[], float] | None = None):
        super().__init__(name, help, "gauge")
        self._fn = fn
        self._value = 0.0

    def set(self, v: float) -> None:
        self._value = float(v)

    def render(self) -> list[str]:
        v = self._fn() if self._fn is not None else self._value
        return self.header() + [f"{self.name} {_fmt_value(float(v))}"]


class Histogram(_Metric):
    def __init__(self, name: str, help: str, buckets=LATENCY_BUCKETS):
        super().__init__(name, help, "histogram")
        self.buckets = tuple(float(b) for b in buckets)
        self._data: dict[LabelKey, list] = {}  # key -> [bucket counts..., sum, count]

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        i = bisect.bisect_left(self.buckets, value)
        with self._lock:
            d = self._data.get(key)
            if d is None:
                d = self._data[key] = [0] * len(self.buckets) + [0.0, 0]
            if i < len(self.buckets):
                d[i] += 1
            d[-2] += value
            d[-1] += 1

    def count(self, **labels: str) -> int:
        d = self._data.get(tuple(sorted(labels.items())))
        return int(d[-1]) if d else 0

    def sum(self, **labels: str) -> float:
        d = self._data.get(tuple(sorted(labels.items())))
        return float(d[-2]) if d else 0.0

    def render(self) -> list[str]:
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._data.items())
        out = self.header()
        for key, d in items:
            acc = 0
            for b, c in zip(self.buckets, d):
                acc += c
                out.append(f"{self.name}_bucket{_fmt_labels(key, (('le', _fmt_value(b)),))} {acc}")
            out.append(f"{self.name}_bucket{_fmt_labels(key, (('le', '+Inf'),))} {int(d[-1])}")
            out.append(f"{self.name}_sum{_fmt_labels(key)} {_fmt_value(d[-2])}")
            out.append(f"{self.name}_count{_fmt_labels(key)} {int(d[-1])}")
        return out


class Metrics:
    """The metrics of one engine (and the HTTP layer on top of it)."""

    def __init__(self):
        self._metrics: list[_Metric] = []
        self.requests = self.add(Counter(
            "softprompt_requests_total", "Answered examples per task, kind and outcome (engine level)."))
        self.http_requests = self.add(Counter(
            "softprompt_http_requests_total", "HTTP requests per route and status code."))
        self.rejected = self.add(Counter(
            "softprompt_rejected_total", "Requests refused before queueing, by reason."))
        self.batches = self.add(Counter("softprompt_batches_total", "Batches run by the engine."))
        self.batch_size = self.add(Histogram(
            "softprompt_batch_size_rows", "Rows (examples x ensemble members) per batch.", SIZE_BUCKETS))
        self.batch_tasks = self.add(Histogram(
            "softprompt_batch_tasks", "Distinct tasks per batch.", SIZE_BUCKETS))
        self.batch_seconds = self.add(Histogram(
            "softprompt_batch_seconds", "Model time per batch (seconds)."))
        self.queue_wait = self.add(Histogram(
            "softprompt_queue_wait_seconds", "Time from submission to the start of the batch (seconds)."))
        self.latency = self.add(Histogram(
            "softprompt_request_latency_seconds", "Engine latency per example, submission to answer (seconds)."))
        self.http_latency = self.add(Histogram(
            "softprompt_http_request_latency_seconds", "HTTP request latency per route (seconds)."))

    def add(self, metric):
        self._metrics.append(metric)
        return metric

    def render(self) -> str:
        lines: list[str] = []
        for m in self._metrics:
            lines.extend(m.render())
        return "\n".join(lines) + "\n"
