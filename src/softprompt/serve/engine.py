"""The serving engine: many tasks' soft prompts, one frozen model, dynamic mixed batches.

Independent of HTTP.  Callers submit examples and get ``concurrent.futures.Future`` s
back; ONE worker thread owns the model and the :class:`~softprompt.bank.PromptBank` and
does all model work, so an asyncio server never blocks on it.

Batching
    Submitted examples wait in one FIFO queue.  The worker takes the oldest example and
    waits at most ``max_wait_ms`` from its submission for the batch to fill up to
    ``max_batch_size`` rows, then runs them as one batch.  Rows of different tasks mix
    freely (``batching="mixed"``): each row carries the bank index of its prompt, and the
    bank gathers each row's prefix key/values (``conditioning.run_context``).  With
    ``batching="per_task"`` a batch holds one task only, which is what an adapter library
    that activates one prompt per forward pass (HF PEFT) allows; it is kept as a real code
    path so the two can be measured against each other.  On a CPU, where padded tokens
    cost as much as real ones, a formed batch is run as a few forward passes of similar
    length (``split_padding``: the padded fraction a pass may have; off on GPUs); the
    generation rows of all its passes are then decoded as one batch, because a decode step
    costs nearly the same for one row as for many (it reads all the weights either way).

Prefix reuse
    A template's example-independent head (BOS, soft tokens, instruction text) has
    key/values that do not depend on the input, so they are computed once when a prompt is
    registered and gathered for every request.  ``prefix_cache=False`` instead runs the
    whole prompt + input sequence for every request (the baseline; the answers agree to
    float rounding).  The default, ``"auto"``, reuses on a CPU and recomputes on a GPU:
    on 2 CPU cores reuse served 1.3-2.4x more requests, while on an H100 recomputing a
    20-100-token prompt inside a launch-bound pass was cheaper than gathering 30 layers of
    cached key/values (reuse 0.80-0.88x; docs/benchmarks.md, "On a GPU").

Ensembles
    A task may be served by several prompts (members).  One example of such a task is
    one row per member, and all rows of an example always land in the same batch; the
    members then vote (mean probability, or majority with mean-probability tie-break; for
    generation the most common answer).

Swapping prompts while serving
    Registering, replacing and removing tasks are *control operations* that run on the
    worker thread between two batches, so the bank never changes under a running batch:
    every batch sees one consistent set of entries and prefix key/values.  A replacement
    adds the new prompts under fresh bank names (``task@version/k``), switches the task
    table, then removes the old entries, all in one control step; a failure on the way
    removes what it added and leaves the old version serving.  A new prompt's prefix
    key/values (the long part for a long template) are computed beforehand in the
    registering thread, off the inference path; the control step only installs them.  Each request is resolved
    to the task's current version when its batch is formed, so it is answered wholly by
    the old or wholly by the new version (the answer names the version), never a mixture.
    Requests still queued for a task that is removed are answered with UnknownTaskError.

Memory
    A forward pass holds at most ``max_batch_tokens`` tokens, counted as rows x (prompt
    head + input [+ new tokens]): formed batches are split into passes that fit, label
    words are scored in packed passes of the same size without copying a row's context per
    label (``conditioning.continuation_logprobs``), and generation rows are decoded in
    batches that fit.  What a prompt asks of every request is bounded when it is registered
    (``max_labels``, ``max_label_tokens``, ``max_template_tokens``; refused with
    :class:`PromptRejectedError` otherwise), and an input by ``max_input_tokens``, so peak
    memory is a few times ``max_batch_tokens`` tokens' key/values whatever a client sends.

Overload
    The queue is bounded (``max_queue`` rows); beyond that ``submit`` raises
    :class:`OverloadedError` with a retry-after estimate instead of queueing without bound.
    A failing batch is retried example by example so one bad request cannot fail its
    batch-mates, and the worker thread survives every exception.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import itertools
import logging
import math
import threading
import time
from collections import Counter as _Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..bank import PromptBank
from ..conditioning import (
    DEFAULT_MAX_BATCH_TOKENS, Context, cache_layers, concat_contexts, decode_step, full_context, label_logprobs,
    lm_logits, make_cache, newline_ids, run_context, take_token,
)
from ..prompts import ModelIdentity, PromptMismatchError, SoftPrompt
from ..templates import Template, TemplateError, encode_text
from .metrics import Gauge, Metrics

logger = logging.getLogger(__name__)

BATCHING_MODES = ("mixed", "per_task")
VOTES = ("mean", "majority")


# ----------------------------------------------------------------------------- errors
class ServeError(Exception):
    """An error with an HTTP-ish status and a stable machine-readable code."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, code: str | None = None, **extra: Any):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.extra = extra


class UnknownTaskError(ServeError):
    status, code = 404, "unknown_task"


class InvalidInputError(ServeError):
    status, code = 422, "invalid_input"


class InputTooLongError(InvalidInputError):
    code = "input_too_long"


class WrongKindError(InvalidInputError):
    code = "wrong_task_kind"


class OverloadedError(ServeError):
    status, code = 503, "overloaded"

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message, retry_after=retry_after)
        self.retry_after = retry_after


class CancelledByClientError(ServeError):
    """The client went away (or cancelled the future); its work was dropped."""

    status, code = 499, "cancelled"


class ShuttingDownError(ServeError):
    status, code = 503, "shutting_down"


class PromptRejectedError(ServeError):
    status, code = 422, "prompt_rejected"


class ModelMismatchError(PromptRejectedError):
    code = "model_mismatch"


# ----------------------------------------------------------------------------- tasks
@dataclass(frozen=True, eq=False)
class TaskSpec:
    """One servable task: one prompt, or several (an ensemble) that vote."""

    name: str
    kind: str  # "classification" | "generation"
    version: int
    members: tuple[str, ...]  # bank entry names, one per member prompt
    member_names: tuple[str, ...]  # human names of the members (file stems)
    templates: tuple[Template, ...]
    member_labels: tuple[tuple[str, ...], ...]  # each member's labels in its verbalizer order
    labels: tuple[str, ...]  # the task's labels (first member's order)
    fields: tuple[str, ...]  # input fields, shared by every member
    prefix_lens: tuple[int, ...]
    vote: str = "mean"
    source: str | None = None
    prompts: tuple[SoftPrompt, ...] = field(default=(), repr=False)

    @property
    def ensemble(self) -> bool:
        return len(self.members) > 1

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "version": self.version,
            "labels": list(self.labels),
            "fields": list(self.fields),
            "members": list(self.member_names),
            "ensemble": self.ensemble,
            "vote": self.vote if self.ensemble else None,
            "templates": [t.text for t in self.templates],
            "soft_tokens": [t.n_soft for t in self.templates],
            "prefix_tokens": list(self.prefix_lens),
            "method": self.prompts[0].method if self.prompts else None,
        }


@dataclass
class ClassifyResult:
    task: str
    version: int
    label: str
    probabilities: dict[str, float]
    scores: dict[str, float] | None = None  # summed label log-probs (single prompt only)
    votes: dict[str, int] | None = None  # ensembles: members voting for each label
    members: list[dict[str, Any]] | None = None  # ensembles: each member's label and probabilities


@dataclass
class GenerateResult:
    task: str
    version: int
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    members: list[dict[str, Any]] | None = None


# ----------------------------------------------------------------------------- items
class _ItemFuture(cf.Future):
    """A future whose ``cancel()`` also stops work that is already running: a queued item
    is skipped when a batch is formed (plain future cancellation), a running one is marked
    abandoned and its generation rows leave the decode loop at the next step.  asyncio's
    ``wrap_future`` calls ``cancel()`` here when the awaiting task is cancelled.  It holds
    the flag, not the item, so item and future form no reference cycle (an item pins its
    task version until it is collected)."""

    def __init__(self, task: str, op: str):
        super().__init__()
        self.task, self.op = task, op
        self.abandoned = False

    def cancel(self) -> bool:
        self.abandoned = True
        return super().cancel()


class _Item:
    """One example waiting for (or being run in) a batch: one row per ensemble member."""

    __slots__ = (
        "op", "task", "fields", "spec", "suffixes", "rows", "future", "t_submit", "vote",
        "max_new_tokens", "stop_at_newline", "stop_strings", "on_token",
    )

    def __init__(self, op: str, task: str, fields: dict[str, str], spec: TaskSpec, suffixes: list[list[int]]):
        self.op = op
        self.task = task
        self.fields = fields
        self.spec = spec
        self.suffixes = suffixes
        self.rows = len(suffixes)
        self.future: _ItemFuture = _ItemFuture(task, op)
        self.t_submit = time.perf_counter()
        self.vote: str | None = None
        self.max_new_tokens = 0
        self.stop_at_newline = True
        self.stop_strings: tuple[str, ...] = ()
        self.on_token: Callable[[list[int]], None] | None = None

    @property
    def abandoned(self) -> bool:
        """The client went away (its future was cancelled): drop the work, answer nobody."""
        return self.future.abandoned

    @abandoned.setter
    def abandoned(self, value: bool) -> None:
        self.future.abandoned = value


# ----------------------------------------------------------------------------- engine
class Engine:
    """Dynamic cross-task batching over one frozen model.  See the module docstring."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        max_queue: int = 1024,
        max_input_tokens: int = 512,
        max_input_chars: int = 20_000,
        max_new_tokens_limit: int = 256,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        max_labels: int = 100,
        max_label_tokens: int = 16,
        max_template_tokens: int = 1024,
        batching: str = "mixed",
        prefix_cache: bool | str = "auto",
        split_padding: float | None | str = "auto",
        base_name: str | None = None,
        metrics: Metrics | None = None,
    ):
        if batching not in BATCHING_MODES:
            raise ValueError(f"batching must be one of {BATCHING_MODES}, got {batching!r}")
        if max_batch_size < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1 and max_wait_ms >= 0")
        if min(max_batch_tokens, max_labels, max_label_tokens, max_template_tokens) < 1:
            raise ValueError("max_batch_tokens, max_labels, max_label_tokens and max_template_tokens must be >= 1")
        self.model = model
        self.tokenizer = tokenizer
        self.bank = PromptBank(model, tokenizer)
        self.bank.family.require("serve")  # decoder-only: batches share prompts' cached contexts (UnsupportedError)
        self.identity: ModelIdentity = self.bank.identity
        self.base_name = base_name or self.identity.name
        self.max_batch_size = int(max_batch_size)
        self.max_wait = float(max_wait_ms) / 1000.0
        self.max_queue = int(max_queue)
        self.max_input_tokens = int(max_input_tokens)
        self.max_input_chars = int(max_input_chars)
        self.max_new_tokens_limit = int(max_new_tokens_limit)
        # memory: tokens per forward pass (rows x (prompt + input [+ new tokens])), and what one
        # prompt may ask of every request (labels, tokens per label word, template head tokens)
        self.max_batch_tokens = int(max_batch_tokens)
        self.max_labels = int(max_labels)
        self.max_label_tokens = int(max_label_tokens)
        self.max_template_tokens = int(max_template_tokens)
        self.batching = batching
        if prefix_cache == "auto":  # measured: reuse pays on a CPU, not on a GPU (module docstring)
            prefix_cache = self.bank._device().type == "cpu"
        if not isinstance(prefix_cache, bool):
            raise ValueError(f"prefix_cache must be True, False or 'auto', got {prefix_cache!r}")
        self.prefix_cache = prefix_cache
        if split_padding == "auto":  # padding is real work on a CPU, nearly free on a GPU
            split_padding = 0.25 if self.bank._device().type == "cpu" else None
        if split_padding is not None and not 0 <= float(split_padding) < 1:
            raise ValueError(f"split_padding must be in [0, 1) or None, got {split_padding!r}")
        self.split_padding = None if split_padding is None else float(split_padding)
        cfg = model.config
        self.max_positions = int(getattr(cfg, "max_position_embeddings", 0) or getattr(cfg, "n_positions", 0) or 1 << 30)

        self.tokenizer_lock = threading.RLock()
        self._specs: dict[str, TaskSpec] = {}  # replaced as a whole (copy on write), read lock-free
        self._versions = itertools.count(1)
        self._cond = threading.Condition()
        self._queue: collections.deque[_Item] = collections.deque()
        self._queued_rows = 0
        self._controls: collections.deque[tuple[Callable[[], Any], cf.Future]] = collections.deque()
        self._thread: threading.Thread | None = None
        self._worker_exited = True
        self._running = False
        self._stopping = False
        self._busy_rows = 0
        self._rate = 0.0  # EWMA of rows per second, for Retry-After estimates
        self.batch_hook: Callable[[list[_Item]], None] | None = None  # tests: called on the worker before a batch runs
        self._gen_parts: list[tuple[Context, list[tuple[_Item, int]]]] = []  # worker only: prefilled rows to decode

        newline = newline_ids(tokenizer)
        eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        self._stops_newline = frozenset(newline | eos)
        self._stops_eos = frozenset(eos)
        self._newlines = frozenset(newline - eos)  # skipped before an answer starts (conditioning.take_token)

        self.metrics = metrics or Metrics()
        self.metrics.add(Gauge("softprompt_queue_depth_rows", "Rows waiting in the queue.", lambda: self._queued_rows))
        self.metrics.add(Gauge("softprompt_queue_depth_requests", "Examples waiting in the queue.", lambda: len(self._queue)))
        self.metrics.add(Gauge("softprompt_running_rows", "Rows in the batch being run.", lambda: self._busy_rows))
        self.metrics.add(Gauge("softprompt_tasks", "Tasks being served.", lambda: len(self._specs)))
        self.metrics.add(Gauge("softprompt_bank_entries", "Prompts in the bank.", lambda: len(self.bank)))
        self.metrics.add(Gauge("softprompt_max_batch_size", "Configured max batch size (rows).", lambda: self.max_batch_size))

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "Engine":
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
                    self._fail(it, ShuttingDownError("the server is shutting down"))
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cond:
            self._running = False

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def alive(self) -> bool:
        return self._running and not self._stopping and self._thread is not None and self._thread.is_alive()

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    # ------------------------------------------------------------------ tasks
    def tasks(self) -> dict[str, TaskSpec]:
        """A consistent snapshot of the task table."""
        return dict(self._specs)

    def task(self, name: str) -> TaskSpec:
        spec = self._specs.get(name)
        if spec is None:
            raise UnknownTaskError(f"unknown task {name!r}; this server has {sorted(self._specs) or 'no tasks'}", task=name)
        return spec

    def register(
        self,
        name: str,
        prompts: SoftPrompt | Sequence[SoftPrompt],
        *,
        member_names: Sequence[str] | None = None,
        vote: str = "mean",
        source: str | None = None,
    ) -> TaskSpec:
        """Add or replace task ``name`` (one prompt, or an ensemble); returns its new spec.

        Everything that can be checked without the model is checked first, in the calling
        thread; the bank is then changed in one control step on the worker.  On any error
        the previous version (if any) keeps serving and :class:`PromptRejectedError` is raised.
        """
        prompts = [prompts] if isinstance(prompts, SoftPrompt) else list(prompts)
        member_names = list(member_names) if member_names is not None else (
            [name] if len(prompts) == 1 else [f"{name}-{k}" for k in range(len(prompts))])
        plan = self._check_prompts(name, prompts, member_names, vote)
        prefix_kv = self._prefix_kv_off_worker(name, prompts)

        def op() -> TaskSpec:
            version = next(self._versions)
            entry_names = tuple(f"{name}@{version}/{k}" for k in range(len(prompts)))
            added: list[str] = []
            try:
                for p, en in zip(prompts, entry_names):
                    with self.tokenizer_lock:
                        self.bank.add_prompt(p, en)
                    added.append(en)
                    if prefix_kv is not None:
                        self.bank.set_prefix_kv(self.bank.index(en), prefix_kv[len(added) - 1])
                if prefix_kv is None:  # the engine runs inline: compute them here, once for every request
                    self.bank.prefix_kv(torch.tensor([self.bank.index(en) for en in entry_names]))
            except Exception as e:
                for en in added:
                    self.bank.remove(en)
                raise PromptRejectedError(f"prompt for task {name!r} rejected: {e}") from e
            spec = TaskSpec(name=name, version=version, members=entry_names, source=source,
                            prompts=tuple(prompts), vote=vote, **plan)
            old = self._specs.get(name)
            self._specs = {**self._specs, name: spec}
            if old is not None:
                for en in old.members:
                    self.bank.remove(en)
            logger.info("task %r %s (version %d, %d prompt(s))", name, "replaced" if old else "added",
                        version, len(prompts))
            return spec

        return self._control(op)

    def _prefix_kv_off_worker(self, name: str, prompts: list[SoftPrompt]) -> list | None:
        """The prompts' prefix key/values, computed in the calling thread on a scratch bank, so
        that a long template never holds up the worker (and every other task's requests):
        the control step that swaps the task in only installs them.  None when the worker is
        not running (the control step then runs inline and computes them itself)."""
        if self._thread is None or self._worker_exited or threading.current_thread() is self._thread:
            return None
        scratch = PromptBank(self.model, self.tokenizer)
        try:
            with self.tokenizer_lock:
                idx = [scratch.add_prompt(p, f"{name}/{k}") for k, p in enumerate(prompts)]
            with torch.no_grad():
                return scratch.compute_prefix_kv(idx)
        except Exception as e:
            raise PromptRejectedError(f"prompt for task {name!r} rejected: {e}") from e

    def unregister(self, name: str) -> TaskSpec:
        """Remove task ``name``; queued requests for it are answered with UnknownTaskError."""

        def op() -> TaskSpec:
            spec = self.task(name)
            self._specs = {k: v for k, v in self._specs.items() if k != name}
            for en in spec.members:
                self.bank.remove(en)
            logger.info("task %r removed", name)
            return spec

        return self._control(op)

    def _check_prompts(self, name: str, prompts: list[SoftPrompt], member_names: list[str], vote: str) -> dict:
        if not prompts:
            raise PromptRejectedError(f"task {name!r}: no prompts given")
        if len(member_names) != len(prompts):
            raise PromptRejectedError(f"task {name!r}: {len(member_names)} member names for {len(prompts)} prompts")
        if vote not in VOTES:
            raise PromptRejectedError(f"task {name!r}: vote must be one of {VOTES}, got {vote!r}")
        kinds = {p.kind for p in prompts}
        if len(kinds) != 1 or next(iter(kinds)) not in ("classification", "generation"):
            raise PromptRejectedError(
                f"task {name!r}: prompts must share one kind (classification or generation), got {sorted(map(str, kinds))}")
        kind = next(iter(kinds))
        templates, member_labels, prefix_lens, fields = [], [], [], None
        for p, mname in zip(prompts, member_names):
            what = f"task {name!r} prompt {mname!r}"
            try:
                p.identity.check(self.identity, what=what)
            except PromptMismatchError as e:
                raise ModelMismatchError(str(e)) from None
            if isinstance(p.template, str) and len(p.template) > 64 * self.max_template_tokens:
                raise PromptRejectedError(  # refused before tokenizing megabytes (a token is rarely over 64 chars)
                    f"{what}: its template has {len(p.template)} characters; the limit is "
                    f"{self.max_template_tokens} tokens (max_template_tokens)", code="template_too_long")
            if kind == "classification" and p.verbalizer and len(p.verbalizer) > self.max_labels:
                raise PromptRejectedError(
                    f"{what}: {len(p.verbalizer)} labels; the limit is {self.max_labels} (max_labels)",
                    code="too_many_labels")
            try:
                t = Template(p.template)
            except TemplateError as e:
                raise PromptRejectedError(f"{what}: bad template: {e}") from None
            emb = p.embeddings
            if emb.ndim != 2 or emb.shape[0] != t.n_soft or emb.shape[1] != self.identity.hidden_size:
                raise PromptRejectedError(
                    f"{what}: embeddings of shape {tuple(emb.shape)} do not fit template {t.text!r} "
                    f"({t.n_soft} soft tokens) and hidden size {self.identity.hidden_size}")
            if not bool(torch.isfinite(emb).all()):
                raise PromptRejectedError(f"{what}: embeddings contain NaN or infinite values")
            if not t.fields:
                raise PromptRejectedError(f"{what}: template {t.text!r} has no input field such as {{text}}")
            if fields is None:
                fields = t.fields
            elif set(t.fields) != set(fields):
                raise PromptRejectedError(f"{what}: input fields {list(t.fields)} differ from the other members' {list(fields)}")
            with self.tokenizer_lock:
                plen = len(t.prefix_ids(self.tokenizer))
                if kind == "classification":
                    if not p.verbalizer:
                        raise PromptRejectedError(f"{what}: a classification prompt needs a verbalizer")
                    for lab, word in p.verbalizer.items():
                        if isinstance(word, str) and len(word) > 64 * self.max_label_tokens:
                            raise PromptRejectedError(
                                f"{what}: verbalizer word for label {lab!r} has {len(word)} characters; the limit "
                                f"is {self.max_label_tokens} tokens (max_label_tokens)", code="label_too_long")
                        n_word = len(encode_text(self.tokenizer, word)) if isinstance(word, str) else 0
                        if not n_word:
                            raise PromptRejectedError(f"{what}: verbalizer word for label {lab!r} has no tokens")
                        if n_word > self.max_label_tokens:
                            raise PromptRejectedError(
                                f"{what}: verbalizer word for label {lab!r} is {n_word} tokens; the limit is "
                                f"{self.max_label_tokens} (max_label_tokens)", code="label_too_long")
            head = plen + p.n_prefix
            if head > self.max_template_tokens:
                raise PromptRejectedError(
                    f"{what}: its fixed prefix (template head{' and learned prefix' if p.n_prefix else ''}) is "
                    f"{head} tokens; the limit is {self.max_template_tokens} (max_template_tokens)",
                    code="template_too_long")
            if plen >= self.max_positions:
                raise PromptRejectedError(
                    f"{what}: its prefix ({plen} tokens) does not fit the model's {self.max_positions} positions")
            templates.append(t)
            prefix_lens.append(plen)
            member_labels.append(tuple(p.labels))
        if kind == "classification" and len({frozenset(m) for m in member_labels}) != 1:
            raise PromptRejectedError(
                f"task {name!r}: ensemble members have different label sets {[list(m) for m in member_labels]}")
        return dict(
            kind=kind, member_names=tuple(member_names), templates=tuple(templates),
            member_labels=tuple(member_labels), labels=member_labels[0], fields=tuple(fields or ()),
            prefix_lens=tuple(prefix_lens),
        )

    def _control(self, fn: Callable[[], Any]) -> Any:
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

    # ------------------------------------------------------------------ submission
    def _fields(self, spec: TaskSpec, value: str | Mapping[str, str]) -> dict[str, str]:
        if isinstance(value, str):
            if len(spec.fields) != 1:
                raise InvalidInputError(
                    f"task {spec.name!r} takes the fields {list(spec.fields)}; send an object with each of them, not a string")
            fields = {spec.fields[0]: value}
        elif isinstance(value, Mapping):
            fields = dict(value)
            missing = [f for f in spec.fields if f not in fields]
            extra = [f for f in fields if f not in spec.fields]
            if missing or extra:
                raise InvalidInputError(
                    f"task {spec.name!r} takes the fields {list(spec.fields)}"
                    + (f"; missing {missing}" if missing else "") + (f"; unknown {extra}" if extra else ""))
        else:
            raise InvalidInputError(f"an input must be a string or an object of strings, got {type(value).__name__}")
        for k, v in fields.items():
            if not isinstance(v, str):
                raise InvalidInputError(f"field {k!r} must be a string, got {type(v).__name__}")
            if not v.strip():
                raise InvalidInputError(f"field {k!r} is empty")
            if len(v) > self.max_input_chars:
                raise InputTooLongError(f"field {k!r} has {len(v)} characters; the limit is {self.max_input_chars}")
        return fields

    def _suffixes(self, spec: TaskSpec, fields: dict[str, str], extra_tokens: int = 0) -> list[list[int]]:
        with self.tokenizer_lock:
            suffixes = [t.suffix_ids(self.tokenizer, fields) for t in spec.templates]
        n = max(len(s) for s in suffixes)
        if n > self.max_input_tokens:
            raise InputTooLongError(f"the input is {n} tokens long after the template; the limit is {self.max_input_tokens}")
        total = max(p + len(s) for p, s in zip(spec.prefix_lens, suffixes)) + extra_tokens
        if total > self.max_positions:
            raise InputTooLongError(
                f"prompt + input + new tokens = {total} positions; the model has {self.max_positions}")
        return suffixes

    def _make_item(self, op: str, spec: TaskSpec, value, extra_tokens: int = 0) -> _Item:
        fields = self._fields(spec, value)
        it = _Item(op, spec.name, fields, spec, self._suffixes(spec, fields, extra_tokens))
        it.future.add_done_callback(self._count_cancelled)
        return it

    def _count_cancelled(self, fut: cf.Future) -> None:
        """Queued work cancelled before it ran (running work is counted by ``_fail``)."""
        if fut.cancelled():
            self.metrics.requests.inc(task=fut.task, kind=fut.op, status="cancelled")  # type: ignore[attr-defined]

    def submit_classify(
        self, task: str, inputs: Sequence[str | Mapping[str, str]], *, vote: str | None = None
    ) -> list[cf.Future]:
        """Queue examples of a classification task; one future per input -> ClassifyResult."""
        spec = self.task(task)
        if spec.kind != "classification":
            raise WrongKindError(f"task {task!r} is a {spec.kind} task; use generate (or /v1/generate)")
        if vote is not None and vote not in VOTES:
            raise InvalidInputError(f"vote must be one of {VOTES}, got {vote!r}")
        if not inputs:
            raise InvalidInputError("no inputs given")
        items = []
        for i, value in enumerate(inputs):
            try:
                it = self._make_item("classify", spec, value)
            except ServeError as e:
                if len(inputs) > 1:
                    e.message = f"inputs[{i}]: {e.message}"
                    e.args = (e.message,)
                raise
            it.vote = vote
            items.append(it)
        self._enqueue(items)
        return [it.future for it in items]

    def submit_generate(
        self,
        task: str,
        value: str | Mapping[str, str],
        *,
        max_new_tokens: int = 32,
        stop_at_newline: bool = True,
        stop: Sequence[str] = (),
        on_token: Callable[[list[int]], None] | None = None,
    ) -> cf.Future:
        """Queue one example of a generation task -> GenerateResult.

        ``on_token(ids_so_far)`` is called on the worker thread after every new token
        (single-prompt tasks; keep it cheap and thread-safe)."""
        spec = self.task(task)
        if spec.kind != "generation":
            raise WrongKindError(f"task {task!r} is a {spec.kind} task; use classify (or /v1/classify)")
        if not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= self.max_new_tokens_limit:
            raise InvalidInputError(f"max_new_tokens must be between 1 and {self.max_new_tokens_limit}, got {max_new_tokens!r}")
        stop = tuple(s for s in stop if s)
        it = self._make_item("generate", spec, value, extra_tokens=max_new_tokens)
        it.max_new_tokens, it.stop_at_newline, it.stop_strings, it.on_token = max_new_tokens, stop_at_newline, stop, on_token
        self._enqueue([it])
        return it.future

    def classify(self, task: str, inputs: Sequence[str | Mapping[str, str]], *, vote: str | None = None,
                 timeout: float | None = None) -> list[ClassifyResult]:
        """Blocking convenience wrapper around :meth:`submit_classify`."""
        return [f.result(timeout) for f in self.submit_classify(task, inputs, vote=vote)]

    def generate(self, task: str, value, *, timeout: float | None = None, **kw) -> GenerateResult:
        return self.submit_generate(task, value, **kw).result(timeout)

    def _retry_after(self) -> float:
        rate = self._rate if self._rate > 0 else 1.0
        return float(min(60, max(1, math.ceil(self._queued_rows / rate))))

    def _enqueue(self, items: list[_Item]) -> None:
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
                    retry_after=self._retry_after())
            now = time.perf_counter()
            for it in items:
                it.t_submit = now
                self._queue.append(it)
            self._queued_rows += rows
            self._cond.notify_all()

    # ------------------------------------------------------------------ worker
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
                self._fail(it, ShuttingDownError("the engine stopped"))

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

    def _ready_rows(self, head: _Item) -> int:
        if self.batching == "mixed":
            return self._queued_rows
        return sum(it.rows for it in self._queue if it.task == head.task)

    def _form_batch(self) -> list[_Item]:
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
        taken: list[_Item] = []
        rows = 0
        if self.batching == "mixed":
            while self._queue and (rows == 0 or rows + self._queue[0].rows <= self.max_batch_size):
                it = self._queue.popleft()
                self._queued_rows -= it.rows
                if it.future.set_running_or_notify_cancel():
                    taken.append(it)
                    rows += it.rows
        else:
            keep: collections.deque[_Item] = collections.deque()
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

    def _fail(self, it: _Item, exc: BaseException) -> None:
        if it.future.done():
            return
        if not it.future.running():
            it.future.set_running_or_notify_cancel()
            if it.future.cancelled():
                return
        status = getattr(exc, "code", None) or "error"
        self.metrics.requests.inc(task=it.task, kind=it.op, status=status)
        it.future.set_exception(exc)

    def _finish(self, it: _Item, result: Any) -> None:
        if it.future.done():
            return
        if it.abandoned:  # nobody is waiting: not an answer ("ok"), a cancellation
            self._fail(it, CancelledByClientError("the client went away"))
            return
        self.metrics.requests.inc(task=it.task, kind=it.op, status="ok")
        self.metrics.latency.observe(time.perf_counter() - it.t_submit)
        it.future.set_result(result)

    def _run_batch(self, items: list[_Item]) -> None:
        t0 = time.perf_counter()
        rows = sum(it.rows for it in items)
        self._busy_rows = rows
        for it in items:
            self.metrics.queue_wait.observe(t0 - it.t_submit)
        # recorded before any answer is delivered, so a caller that has its answers sees its batches counted
        self.metrics.batches.inc()
        self.metrics.batch_size.observe(rows)
        self.metrics.batch_tasks.observe(len({it.task for it in items}))
        try:
            if self.batch_hook is not None:
                self.batch_hook(items)
            self._execute(items)
        except Exception as e:  # noqa: BLE001 - isolate the culprit, keep serving
            if len(items) > 1:
                logger.warning("a batch of %d failed (%s); retrying its examples one by one", len(items), e)
                for it in items:
                    if not it.future.done():
                        try:
                            self._execute([it])
                        except Exception as e1:  # noqa: BLE001
                            logger.exception("request for task %r failed", it.task)
                            self._fail(it, e1)
            else:
                logger.exception("request for task %r failed", items[0].task)
                self._fail(items[0], e)
        finally:
            for it in items:  # never leave a future hanging
                if not it.future.done():
                    self._fail(it, RuntimeError("the engine produced no answer for this request"))
            dt = time.perf_counter() - t0
            self._busy_rows = 0
            self.metrics.batch_seconds.observe(dt)
            if dt > 0:
                self._rate = 0.8 * self._rate + 0.2 * (rows / dt) if self._rate else rows / dt

    def _execute(self, items: list[_Item]) -> None:
        live: list[_Item] = []
        for it in items:
            if it.future.done():
                continue
            if it.abandoned:
                self._fail(it, CancelledByClientError("the client went away"))
                continue
            spec = self._specs.get(it.task)
            if spec is None:
                self._fail(it, UnknownTaskError(f"task {it.task!r} was removed before this request ran", task=it.task))
                continue
            if spec is not it.spec:  # replaced since submission: render for the version that runs it
                want = "classification" if it.op == "classify" else "generation"
                try:
                    if spec.kind != want:
                        raise WrongKindError(f"task {it.task!r} was replaced by a {spec.kind} task")
                    fields = self._fields(spec, it.fields)
                    it.suffixes = self._suffixes(spec, fields, it.max_new_tokens)
                except ServeError as e:
                    self._fail(it, e)
                    continue
                it.spec = spec
            live.append(it)
        # generation rows of every pass are decoded together: a decode step reads all the
        # weights for a single token per row, so it is the step that batching pays for most
        self._gen_parts = []
        try:
            for group in self._padding_groups(live):
                self._run_group(group)
            for parts in self._decode_groups(self._gen_parts):
                self._decode(concat_contexts([c for c, _ in parts]), [o for _, owners in parts for o in owners])
        finally:
            self._gen_parts = []

    def _padding_groups(self, items: list[_Item]) -> list[list[_Item]]:
        """Split a batch into forward passes that fit ``max_batch_tokens`` and, when padding
        costs compute, of similar length.

        A pass holds at most ``max_batch_tokens`` tokens, counted as rows x (longest prompt
        head + longest input + most new tokens): the context key/values it makes, and the
        decoding that follows.  With ``split_padding``, items are sorted by length (longest
        first) and a new pass also starts whenever the padded tokens would exceed
        ``split_padding`` of the pass (``None``: padding is nearly free, as on GPUs).  An
        example's rows (ensemble members) always stay in one pass."""
        if len(items) < 2:
            return [items] if items else []

        def length(it: _Item) -> int:
            extra = 0 if self.prefix_cache else max(it.spec.prefix_lens)
            return max(len(s) for s in it.suffixes) + extra

        groups: list[list[_Item]] = []
        cur: list[_Item] = []
        real = rows = top = 0
        head = tail = new = 0  # the current pass's longest prompt head, input, and generation
        order = items if self.split_padding is None else sorted(items, key=length, reverse=True)
        for it in order:
            n = length(it)
            h = max(p + k.n_prefix for p, k in zip(it.spec.prefix_lens, it.spec.prompts)) if it.spec.prompts \
                else max(it.spec.prefix_lens)
            t = max(len(s) for s in it.suffixes)
            too_many = (rows + it.rows) * (max(head, h) + max(tail, t) + max(new, it.max_new_tokens)) > self.max_batch_tokens
            padded = self.split_padding is not None and (real + n * it.rows) < (1 - self.split_padding) * top * (rows + it.rows)
            if cur and (too_many or padded):
                groups.append(cur)
                cur, real, rows, head, tail, new = [], 0, 0, 0, 0, 0
            if not cur:
                top = n
            cur.append(it)
            real += n * it.rows
            rows += it.rows
            head, tail, new = max(head, h), max(tail, t), max(new, it.max_new_tokens)
        groups.append(cur)
        return groups

    def _decode_groups(self, parts: list[tuple[Context, list[tuple[_Item, int]]]]) -> list[list]:
        """The passes' generation rows in decode batches of at most ``max_batch_tokens``
        (rows x (context + most new tokens)); a pass's rows stay together (it fits alone)."""
        groups: list[list] = []
        rows = width = new = 0
        for part in parts:
            ctx, owners = part
            w, m = ctx.mask.shape[1], max(it.max_new_tokens for it, _ in owners)
            if groups and (rows + len(owners)) * (max(width, w) + max(new, m)) > self.max_batch_tokens:
                groups.append([])
                rows = width = new = 0
            if not groups:
                groups.append([])
            groups[-1].append(part)
            rows, width, new = rows + len(owners), max(width, w), max(new, m)
        return groups

    def _run_group(self, items: list[_Item]) -> None:
        """One forward pass (plus label scoring / decoding) over the rows of ``items``."""
        bank = self.bank
        row_entry: list[int] = []
        row_suffix: list[list[int]] = []
        row_owner: list[tuple[_Item, int]] = []
        for it in items:
            for k, (en, suf) in enumerate(zip(it.spec.members, it.suffixes)):
                row_entry.append(bank.index(en))
                row_suffix.append(suf)
                row_owner.append((it, k))
        if not row_entry:
            return
        entry_idx = torch.tensor(row_entry)
        ctx = run_context(bank, entry_idx, row_suffix) if self.prefix_cache else full_context(bank, entry_idx, row_suffix)
        cls_rows = [r for r, (it, _) in enumerate(row_owner) if it.op == "classify"]
        gen_rows = [r for r, (it, _) in enumerate(row_owner) if it.op == "generate"]
        if cls_rows:
            sub = ctx if len(cls_rows) == len(row_owner) else ctx.select(torch.tensor(cls_rows, device=ctx.mask.device))
            scores = label_logprobs(bank, sub, max_batch_tokens=self.max_batch_tokens)
            per_item: dict[int, list[torch.Tensor]] = {}
            order: list[_Item] = []
            for r, s in zip(cls_rows, scores):
                it, _ = row_owner[r]
                if id(it) not in per_item:
                    per_item[id(it)] = []
                    order.append(it)
                per_item[id(it)].append(s.float().cpu())
            for it in order:
                self._finish(it, self._vote_classify(it, per_item[id(it)]))
        if gen_rows:  # decoded by _execute, together with the other passes' generation rows
            sub = ctx if len(gen_rows) == len(row_owner) else ctx.select(torch.tensor(gen_rows, device=ctx.mask.device))
            self._gen_parts.append((sub, [row_owner[r] for r in gen_rows]))

    # ------------------------------------------------------------------ answers
    def _vote_classify(self, it: _Item, member_scores: list[torch.Tensor]) -> ClassifyResult:
        spec = it.spec
        labels = list(spec.labels)
        raw = member_scores
        # each member's stored calibration (calibration.py), before its probabilities and the vote
        member_scores = [s if p.calibration is None else p.calibration.apply(s) for p, s in zip(spec.prompts, raw)] \
            if spec.prompts else raw
        probs_m, preds = [], []
        for labs, s in zip(spec.member_labels, member_scores):
            p = s.softmax(-1)
            probs_m.append({lab: float(v) for lab, v in zip(labs, p.tolist())})
            preds.append(labs[int(s.argmax())])
        if not spec.ensemble:
            s = raw[0]  # summed label log-probs, before calibration
            return ClassifyResult(task=spec.name, version=spec.version, label=preds[0], probabilities=probs_m[0],
                                  scores={lab: float(v) for lab, v in zip(spec.member_labels[0], s.tolist())})
        mean = {lab: sum(pm[lab] for pm in probs_m) / len(probs_m) for lab in labels}
        votes = {lab: 0 for lab in labels}
        for p in preds:
            votes[p] += 1
        vote = it.vote or spec.vote
        if vote == "majority":
            label = max(labels, key=lambda lab: (votes[lab], mean[lab]))
        else:
            label = max(labels, key=lambda lab: mean[lab])
        members = [{"name": n, "label": p, "probabilities": pm} for n, p, pm in zip(spec.member_names, preds, probs_m)]
        return ClassifyResult(task=spec.name, version=spec.version, label=label, probabilities=mean,
                              votes=votes, members=members)

    def decode(self, ids: list[int]) -> str:
        with self.tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    @staticmethod
    def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
        return (text[:cut], True) if cut >= 0 else (text, False)

    def _decode(self, ctx: Context, owners: list[tuple[_Item, int]]) -> None:
        """Greedy decoding of every generation row at once (the same steps as
        ``conditioning.greedy_generate``) with per-row limits, stops and streaming; an
        example is answered as soon as all its rows are finished.  Finished rows leave the
        batch once they are a quarter of it (a row costs compute on every step it stays)."""
        model = self.model
        n = len(owners)
        stops = [self._stops_newline if it.stop_at_newline else self._stops_eos for it, _ in owners]
        outs: list[list[int]] = [[] for _ in range(n)]
        used = [0] * n  # decode steps each row has taken (skipped leading line breaks count)
        finish: list[str | None] = [None] * n
        left: dict[int, int] = _Counter(id(it) for it, _ in owners)
        live = list(range(n))  # the owner row of each batch row
        cache = make_cache(ctx.layers)
        mask = ctx.mask
        pos = ctx.next_pos.clone()
        logits = lm_logits(model, ctx.last_hidden)
        steps = max(it.max_new_tokens for it, _ in owners)
        for _ in range(steps):
            nxt = logits.argmax(-1)
            nxt_list = nxt.tolist()
            for j, i in enumerate(live):
                if finish[i] is not None:
                    continue
                it = owners[i][0]
                if it.abandoned:
                    finish[i] = "abandoned"
                else:
                    used[i] += 1
                    before = len(outs[i])
                    if take_token(nxt_list[j], outs[i], stops[i], self._newlines if it.stop_at_newline else frozenset()):
                        finish[i] = "stop"
                    elif len(outs[i]) == before:  # a leading line break, skipped as in scoring.generate
                        if used[i] >= it.max_new_tokens:
                            finish[i] = "length"
                    else:
                        if it.stop_strings and self.cut_at_stop(self.decode(outs[i]), it.stop_strings)[1]:
                            finish[i] = "stop"
                        elif used[i] >= it.max_new_tokens:
                            finish[i] = "length"
                        if it.on_token is not None and not it.spec.ensemble:
                            try:
                                it.on_token(list(outs[i]))
                            except Exception:  # noqa: BLE001 - a broken stream must not stop the batch
                                it.abandoned = True
                if finish[i] is not None:
                    left[id(it)] -= 1
                    if left[id(it)] == 0:
                        rows = [r for r, (o, _) in enumerate(owners) if o is it]
                        self._finish(it, self._vote_generate(it, [outs[r] for r in rows], [finish[r] for r in rows]))
            keep = [j for j, i in enumerate(live) if finish[i] is None]
            if not keep:
                break
            if 4 * (len(live) - len(keep)) >= len(live):
                sel = torch.tensor(keep, device=mask.device)
                cache = make_cache([(k.index_select(0, sel), v.index_select(0, sel)) for k, v in cache_layers(cache)])
                mask, pos, nxt = mask.index_select(0, sel), pos.index_select(0, sel), nxt.index_select(0, sel)
                live = [live[j] for j in keep]
            logits, cache, mask, pos = decode_step(model, nxt, cache, mask, pos)

    def _vote_generate(self, it: _Item, outs: list[list[int]], finishes: list[str | None]) -> GenerateResult:
        spec = it.spec
        texts = []
        for ids in outs:
            text = self.decode(ids)
            if it.stop_strings:
                text = self.cut_at_stop(text, it.stop_strings)[0]
            texts.append(text.strip())
        prompt_tokens = spec.prefix_lens[0] + len(it.suffixes[0])
        if not spec.ensemble:
            return GenerateResult(task=spec.name, version=spec.version, text=texts[0], token_ids=outs[0],
                                  finish_reason=finishes[0] or "length", prompt_tokens=prompt_tokens)
        winner_text = _Counter(texts).most_common(1)[0][0]
        w = texts.index(winner_text)
        members = [{"name": nm, "text": t} for nm, t in zip(spec.member_names, texts)]
        return GenerateResult(task=spec.name, version=spec.version, text=winner_text, token_ids=outs[w],
                              finish_reason=finishes[w] or "length", prompt_tokens=prompt_tokens, members=members)
