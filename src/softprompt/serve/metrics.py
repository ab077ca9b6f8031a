"""The server's Prometheus metrics, on ``prometheus_client``.

Each :class:`Metrics` owns its own ``CollectorRegistry`` (never the process-wide default:
one process may hold many engines and apps, e.g. in tests).  The small wrappers below fix
each metric's label names up front, sorted, so the exposition lists labels in a stable
order, and read values back for tests and benchmarks (``value``, ``count``, ``sum``).
"""
from __future__ import annotations

import re
from collections.abc import Callable, Collection, Sequence

import prometheus_client as prom

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Counter:
    """A counter with fixed label names; ``name`` is the exposed sample name (``..._total``)."""

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()):
        self.name, self.help, self.labelnames = name, help, tuple(sorted(labelnames))
        self._registry: prom.CollectorRegistry | None = None
        self._metric = None
        # label -> a function onto a closed set of values (every value makes a series: a
        # label a client can choose must never pass through unchecked)
        self.domains: dict[str, Callable[[str], str]] = {}

    def register(self, registry: prom.CollectorRegistry) -> None:
        self._registry = registry
        self._metric = prom.Counter(self.name.removesuffix("_total"), self.help, self.labelnames, registry=registry)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        for k, close in self.domains.items():
            if k in labels:
                labels[k] = close(labels[k])
        (self._metric.labels(**labels) if self.labelnames else self._metric).inc(amount)

    def value(self, **labels: str) -> float:
        return self._registry.get_sample_value(self.name, labels or None) or 0.0


class Histogram:
    def __init__(self, name: str, help: str, buckets: Sequence[float] = LATENCY_BUCKETS, labelnames: Sequence[str] = ()):
        self.name, self.help, self.labelnames = name, help, tuple(sorted(labelnames))
        self.buckets = tuple(float(b) for b in buckets)
        self._registry: prom.CollectorRegistry | None = None
        self._metric = None

    def register(self, registry: prom.CollectorRegistry) -> None:
        self._registry = registry
        self._metric = prom.Histogram(self.name, self.help, self.labelnames, buckets=self.buckets, registry=registry)

    def observe(self, value: float, **labels: str) -> None:
        (self._metric.labels(**labels) if self.labelnames else self._metric).observe(value)

    def count(self, **labels: str) -> int:
        return int(self._registry.get_sample_value(self.name + "_count", labels or None) or 0)

    def sum(self, **labels: str) -> float:
        return float(self._registry.get_sample_value(self.name + "_sum", labels or None) or 0.0)


class Gauge:
    """A gauge read from a callback at scrape time (or set explicitly)."""

    def __init__(self, name: str, help: str, fn: Callable[[], float] | None = None):
        self.name, self.help, self._fn = name, help, fn
        self._metric = None

    def register(self, registry: prom.CollectorRegistry) -> None:
        self._metric = prom.Gauge(self.name, self.help, registry=registry)
        if self._fn is not None:
            self._metric.set_function(lambda: float(self._fn()))

    def set(self, v: float) -> None:
        self._metric.set(float(v))


# whole-number bucket bounds as the hand-written exposition had them (le="1", not le="1.0")
_WHOLE_LE = re.compile(r'le="(\d+)\.0"')


class Metrics:
    """The metrics of one engine (and the HTTP layer on top of it), in their own registry."""

    def __init__(self):
        self.registry = prom.CollectorRegistry(auto_describe=True)
        # the names of the tasks being served (set by the app): any other task is counted as "other"
        self.served: Callable[[], Collection[str]] | None = None
        self.requests = self.add(Counter(
            "softprompt_requests_total", "Answered examples per task, kind and outcome (engine level).",
            ("task", "kind", "status")))
        self.requests.domains["task"] = self.task_label
        self.http_requests = self.add(Counter(
            "softprompt_http_requests_total", "HTTP requests per route and status code.", ("route", "method", "status")))
        self.rejected = self.add(Counter(
            "softprompt_rejected_total", "Requests refused before queueing, by reason.", ("reason",)))
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
            "softprompt_http_request_latency_seconds", "HTTP request latency per route (seconds).",
            labelnames=("route",)))

    def task_label(self, task: str) -> str:
        served = self.served
        return task if served is None or task in served() else "other"

    def add(self, metric):
        metric.register(self.registry)
        return metric

    def render(self) -> str:
        return _WHOLE_LE.sub(r'le="\1"', prom.generate_latest(self.registry).decode())
