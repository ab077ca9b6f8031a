"""The engine's scheduler: one FIFO queue of examples, batch forming, control steps, and
the one worker thread that owns the model.

Submitted items wait in the queue; the worker takes the oldest and waits at most
``max_wait_ms`` from its submission for the batch to fill up to ``max_batch_size`` rows
(with ``batching="per_task"`` a batch holds one task only).  Control operations (task
swaps) run on the worker between two batches.  Items whose client went away are skipped
when a batch is formed, and a failing batch is retried item by item.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from .config import EngineConfig
from .metrics import Metrics
from .spec import CancelledByClientError, InvalidInputError, Item, OverloadedError, ShuttingDownError

logger = logging.getLogger(__name__)


def fail(it: Item, exc: BaseException, metrics: Metrics) -> None:
    """Answer ``it`` with ``exc`` (once), counted by the error's code."""
    if it.future.done():
        return
    if not it.future.running():
        it.future.set_running_or_notify_cancel()
        if it.future.cancelled():
            return
    status = getattr(exc, "code", None) or "error"
    metrics.requests.inc(task=it.task, kind=it.op, status=status)
    it.future.set_exception(exc)


def finish(it: Item, result: Any, metrics: Metrics) -> None:
    """Answer ``it`` with ``result``, unless its client went away (then: a cancellation); an
    exception as ``result`` fails ``it`` alone (its batch-mates keep their answers)."""
    if isinstance(result, BaseException):
        fail(it, result, metrics)
        return
    if it.future.done():
        return
    if it.abandoned:  # nobody is waiting: not an answer ("ok"), a cancellation
        fail(it, CancelledByClientError("the client went away"), metrics)
        return
    metrics.requests.inc(task=it.task, kind=it.op, status="ok")
    metrics.latency.observe(time.perf_counter() - it.t_submit)
    it.future.set_result(result)


class Scheduler:
    """Queue, batch forming and the worker thread; ``execute(items)`` runs one formed batch."""

    def __init__(self, config: EngineConfig, metrics: Metrics, execute: Callable[[list[Item]], None]):
        self.max_batch_size = int(config.max_batch_size)
        self.max_wait = float(config.max_wait_ms) / 1000.0
        self.max_queue = int(config.max_queue)
        self.batching = config.batching
        self.metrics = metrics
        self.execute = execute
        self._cond = threading.Condition()
        self._queue: collections.deque[Item] = collections.deque()
        self._queued_rows = 0
        self._controls: collections.deque[tuple[Callable[[], Any], cf.Future]] = collections.deque()
        self._thread: threading.Thread | None = None
        self._worker_exited = True
        self._running = False
        self._stopping = False
        self.busy_rows = 0
        self._rate = 0.0  # EWMA of rows per second, for Retry-After estimates
        self.batch_hook: Callable[[list[Item]], None] | None = None  # tests: called on the worker before a batch runs

    def fail(self, it: Item, exc: BaseException) -> None:
        fail(it, exc, self.metrics)

    def finish(self, it: Item, result: Any) -> None:
        finish(it, result, self.metrics)

    @property
    def queue_length(self) -> int:
        return len(self._queue)

    @property
    def worker_running(self) -> bool:
        """A worker thread exists and has not exited (control steps then run on it)."""
        return self._thread is not None and not self._worker_exited

    def on_worker(self) -> bool:
        return threading.current_thread() is self._thread

    def start(self) -> "Scheduler":
        with self._cond:
            if self._running:
                return self
            if self._thread is not None and self._thread.is_alive():
                raise RuntimeError("the previous worker thread has not finished yet")
            self._running, self._stopping = True, False
            self._worker_exited = False
            self._thread = threading.Thread(target=self._loop, name="softprompt-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, *, drain: bool = True, timeout: float | None = 30.0) -> None:
        """Stop the worker: finish (``drain``) or fail the queued requests first."""
        with self._cond:
            if not self._running:
                return
            self._stopping = True
            if not drain:
                while self._queue:
                    it = self._queue.popleft()
                    self._queued_rows -= it.rows
                    self.fail(it, ShuttingDownError("the server is shutting down"))
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cond:
            self._running = False

    @property
    def alive(self) -> bool:
        return self._running and not self._stopping and self._thread is not None and self._thread.is_alive()

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    def control(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the worker thread between two batches (inline when no worker runs)."""
        if threading.current_thread() is self._thread:
            return fn()
        fut: cf.Future = cf.Future()
        with self._cond:
            # inline only when no worker can be running a batch (not started, or exited)
            inline = self._thread is None or self._worker_exited
            if not inline:
                self._controls.append((fn, fut))
                self._cond.notify_all()
        if inline:
            with torch.no_grad():
                return fn()
        return fut.result()


    def retry_after(self) -> float:
        rate = self._rate if self._rate > 0 else 1.0
        return float(min(60, max(1, math.ceil(self._queued_rows / rate))))

    def enqueue(self, items: list[Item]) -> None:
        rows = sum(it.rows for it in items)
        if rows > self.max_queue:
            raise InvalidInputError(
                f"this request needs {rows} rows; the server queues at most {self.max_queue}; send fewer inputs")
        with self._cond:
            if not self._running or self._stopping:
                raise ShuttingDownError("the engine is not running")
            if self._queued_rows + rows > self.max_queue:
                self.metrics.rejected.inc(reason="queue_full")
                raise OverloadedError(
                    f"the server is overloaded ({self._queued_rows} rows queued, limit {self.max_queue}); retry later",
                    retry_after=self.retry_after())
            now = time.perf_counter()
            for it in items:
                it.t_submit = now
                self._queue.append(it)
            self._queued_rows += rows
            self._cond.notify_all()


    def _loop(self) -> None:
        try:
            self._serve_forever()
        finally:  # whatever ends the worker, nobody is left waiting on it
            with self._cond:
                self._worker_exited = True
                controls, items = list(self._controls), list(self._queue)
                self._controls.clear()
                self._queue.clear()
                self._queued_rows = 0
            for _, fut in controls:
                if fut.set_running_or_notify_cancel():
                    fut.set_exception(ShuttingDownError("the engine stopped"))
            for it in items:
                self.fail(it, ShuttingDownError("the engine stopped"))

    def _serve_forever(self) -> None:
        torch.set_grad_enabled(False)  # thread-local: the worker never builds graphs
        while True:
            op = batch = None
            with self._cond:
                while not self._controls and not self._queue and not self._stopping:
                    self._cond.wait()
                if self._controls:
                    op = self._controls.popleft()
                elif self._queue:
                    batch = self._form_batch()
                else:
                    self._worker_exited = True  # stopping and nothing left
                    return
            if op is not None:
                fn, fut = op
                try:
                    fut.set_result(fn())
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    fut.set_exception(e)
            elif batch:
                self._run_batch(batch)

    def _ready_rows(self, head: Item) -> int:
        if self.batching == "mixed":
            return self._queued_rows
        return sum(it.rows for it in self._queue if it.task == head.task)

    def _form_batch(self) -> list[Item]:
        """Called with the lock held and a non-empty queue: wait for the batch to fill, take it."""
        head = self._queue[0]
        deadline = head.t_submit + self.max_wait
        while self._queue and not self._controls and not self._stopping:
            head = self._queue[0]
            if self._ready_rows(head) >= self.max_batch_size:
                break
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            self._cond.wait(remaining)
        if not self._queue:
            return []
        head = self._queue[0]
        taken: list[Item] = []
        rows = 0
        if self.batching == "mixed":
            while self._queue and (rows == 0 or rows + self._queue[0].rows <= self.max_batch_size):
                it = self._queue.popleft()
                self._queued_rows -= it.rows
                if it.future.set_running_or_notify_cancel():
                    taken.append(it)
                    rows += it.rows
        else:
            keep: collections.deque[Item] = collections.deque()
            while self._queue:
                it = self._queue.popleft()
                if it.task == head.task and (rows == 0 or rows + it.rows <= self.max_batch_size):
                    self._queued_rows -= it.rows
                    if it.future.set_running_or_notify_cancel():
                        taken.append(it)
                        rows += it.rows
                else:
                    keep.append(it)
            self._queue = keep
        return taken

    def _run_batch(self, items: list[Item]) -> None:
        t0 = time.perf_counter()
        rows = sum(it.rows for it in items)
        self.busy_rows = rows
        for it in items:
            self.metrics.queue_wait.observe(t0 - it.t_submit)
        # recorded before any answer is delivered, so a caller that has its answers sees its batches counted
        self.metrics.batches.inc()
        self.metrics.batch_size.observe(rows)
        self.metrics.batch_tasks.observe(len({it.task for it in items}))
        try:
            if self.batch_hook is not None:
                self.batch_hook(items)
            self.execute(items)
        except Exception as e:  # noqa: BLE001 - isolate the culprit, keep serving
            if len(items) > 1:
                logger.warning("a batch of %d failed (%s); retrying its examples one by one", len(items), e)
                for it in items:
                    if not it.future.done():
                        try:
                            self.execute([it])
                        except Exception as e1:  # noqa: BLE001
                            logger.exception("request for task %r failed", it.task)
                            self.fail(it, e1)
            else:
                logger.exception("request for task %r failed", items[0].task)
                self.fail(items[0], e)
        finally:
            for it in items:  # never leave a future hanging
                if not it.future.done():
                    self.fail(it, RuntimeError("the engine produced no answer for this request"))
            dt = time.perf_counter() - t0
            self.busy_rows = 0
            self.metrics.batch_seconds.observe(dt)
            if dt > 0:
                self._rate = 0.8 * self._rate + 0.2 * (rows / dt) if self._rate else rows / dt

