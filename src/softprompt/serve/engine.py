"""The serving engine: many tasks' soft prompts, one frozen model, dynamic mixed batches.

A facade over ``config.py`` (:class:`EngineConfig`, the knobs), ``scheduler.py`` (queue,
batch forming, the worker thread), ``runner.py`` (forward passes, decoding, the vote),
``validation.py`` (prompt and input checks) and ``spec.py`` (errors, task specs, answers).

Independent of HTTP.  Callers submit examples and get ``concurrent.futures.Future`` s
back; ONE worker thread owns the model and the :class:`~softprompt.core.bank.PromptBank` and
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
    members then vote (``"mean"`` probability, or ``"vote"``: majority with mean-probability
    tie-break, the names of :mod:`softprompt.apps.ensemble`; ``"majority"`` is accepted as an
    alias of ``"vote"`` so old manifests and clients keep working; for generation the most
    common answer).

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
    What the tasks hold between requests is bounded too: at most ``max_tasks`` tasks, whose
    cached template-head key/values (members x head tokens x one token's key/values over all
    layers, see :meth:`Engine.head_bytes`) total at most ``max_prefix_cache_bytes``; a task
    beyond either is refused (``too_many_tasks``, ``prefix_memory_full``), and a replacement
    counts instead of its old version, not on top of it.

Overload
    The queue is bounded (``max_queue`` rows); beyond that ``submit`` raises
    :class:`OverloadedError` with a retry-after estimate instead of queueing without bound.
    A failing batch is retried example by example so one bad request cannot fail its
    batch-mates, and the worker thread survives every exception.
"""
from __future__ import annotations

import concurrent.futures as cf
import itertools
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..core.bank import PromptBank, model_shape
from ..data.task import TaskKind
from ..core.prompts import ModelIdentity, SoftPrompt
from .validation import check_prompts, check_response_size, input_fields, suffixes
from .config import BATCHING_MODES, EngineConfig
from .metrics import Gauge, Metrics
from .runner import Runner, vote_classify, vote_generate
from .scheduler import Scheduler, fail, finish
from .spec import (
    VOTES, CancelledByClientError, ClassifyResult, GenerateResult, InputTooLongError, InvalidInputError, Item,
    ModelMismatchError, OverloadedError, PromptRejectedError, ServeError, ShuttingDownError, TaskSpec,
    UnknownTaskError, WrongKindError,
)

logger = logging.getLogger(__name__)


def _part(part: str, name: str, doc: str) -> property:
    """An attribute of the scheduler or runner, readable and settable on the engine (benchmarks
    switch ``batching`` and ``prefix_cache`` on a running engine)."""
    return property(lambda self: getattr(getattr(self, part), name),
                    lambda self, value: setattr(getattr(self, part), name, value), doc=doc)


class Engine:
    """Dynamic cross-task batching over one frozen model.  See the module docstring.

    ``Engine(model, tokenizer, config)``; keyword arguments named as :class:`EngineConfig`'s
    fields override the config's (``Engine(model, tok, max_batch_size=8)``)."""

    def __init__(self, model, tokenizer, config: EngineConfig | None = None, *, base_name: str | None = None,
                 metrics: Metrics | None = None, **knobs):
        config = (config or EngineConfig()).replace(**knobs)
        self.model = model
        self.tokenizer = tokenizer
        self.bank = PromptBank(model, tokenizer)
        self.bank.family.require("serve")  # decoder-only: batches share prompts' cached contexts (UnsupportedError)
        self.identity: ModelIdentity = self.bank.identity
        self.base_name = base_name or self.identity.name
        self.config = config = config.resolve(self.bank.device.type)
        for k, v in config.limits().items():  # the request and prompt limits every backend enforces (config.py)
            setattr(self, k, v)
        self.max_prefix_cache_bytes = config.max_prefix_cache_bytes  # memory: all tasks' cached head key/values
        shape = model_shape(model)  # one cached head token: k and v of every layer
        self.kv_bytes_per_token = (2 * shape["layers"] * shape["kv_heads"] * shape["head_dim"]
                                   * model.get_input_embeddings().weight.element_size())
        self.input_embeddings = model.get_input_embeddings().weight  # the scale prompt values are checked against
        cfg = model.config
        self.max_positions = int(getattr(cfg, "max_position_embeddings", 0) or getattr(cfg, "n_positions", 0) or 1 << 30)

        self.tokenizer_lock = threading.RLock()
        self._specs: dict[str, TaskSpec] = {}  # replaced as a whole (copy on write), read lock-free
        self._versions = itertools.count(1)
        self.metrics = metrics or Metrics()
        self.scheduler = Scheduler(config, self.metrics, self._execute)
        self.runner = Runner(model, tokenizer, self.bank, config, self.tokenizer_lock, self.scheduler.finish)
        sched = self.scheduler
        self.metrics.add(Gauge("softprompt_queue_depth_rows", "Rows waiting in the queue.", lambda: sched.queued_rows))
        self.metrics.add(Gauge("softprompt_queue_depth_requests", "Examples waiting in the queue.",
                               lambda: sched.queue_length))
        self.metrics.add(Gauge("softprompt_running_rows", "Rows in the batch being run.", lambda: sched.busy_rows))
        self.metrics.add(Gauge("softprompt_tasks", "Tasks being served.", lambda: len(self._specs)))
        self.metrics.add(Gauge("softprompt_bank_entries", "Prompts in the bank.", lambda: len(self.bank)))
        self.metrics.add(Gauge("softprompt_prefix_cache_bytes", "Cached template-head key/values of all tasks.",
                               lambda: sum(self.head_bytes(s.prompts, s.prefix_lens) for s in self._specs.values())))
        self.metrics.add(Gauge("softprompt_max_batch_size", "Configured max batch size (rows).", lambda: self.max_batch_size))

    max_batch_size = _part("scheduler", "max_batch_size", "Rows per batch at most.")
    batching = _part("scheduler", "batching", '"mixed" or "per_task" batches.')
    max_batch_tokens = _part("runner", "max_batch_tokens", "Tokens per forward pass at most.")
    prefix_cache = _part("runner", "prefix_cache", "Reuse the prompts' prefix key/values (else recompute).")
    split_padding = _part("runner", "split_padding", "Padded fraction a forward pass may have (None: no split).")

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "Engine":
        self.scheduler.start()
        return self

    def stop(self, *, drain: bool = True, timeout: float | None = 30.0) -> None:
        """Stop the worker: finish (``drain``) or fail the queued requests first."""
        self.scheduler.stop(drain=drain, timeout=timeout)

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def alive(self) -> bool:
        return self.scheduler.alive

    @property
    def queued_rows(self) -> int:
        return self.scheduler.queued_rows

    @property
    def batch_hook(self) -> Callable[[list[Item]], None] | None:
        """Tests: called on the worker with each formed batch before it runs."""
        return self.scheduler.batch_hook

    @batch_hook.setter
    def batch_hook(self, hook: Callable[[list[Item]], None] | None) -> None:
        self.scheduler.batch_hook = hook

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
            self._check_room(name, prompts, plan["prefix_lens"])  # again: another task may have come meanwhile
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

        return self.scheduler.control(op)

    def _prefix_kv_off_worker(self, name: str, prompts: list[SoftPrompt]) -> list | None:
        """The prompts' prefix key/values, computed in the calling thread on a scratch bank, so
        that a long template never holds up the worker (and every other task's requests):
        the control step that swaps the task in only installs them.  None when the worker is
        not running (the control step then runs inline and computes them itself)."""
        if not self.scheduler.worker_running or self.scheduler.on_worker():
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

        return self.scheduler.control(op)
    # ------------------------------------------------------------------ checks (validation.py)
    def _check_prompts(self, name: str, prompts: list[SoftPrompt], member_names: list[str], vote: str) -> dict:
        plan = check_prompts(self, name, prompts, member_names, vote)
        self._check_room(name, prompts, plan["prefix_lens"])  # before computing any key/values
        return plan

    # the vLLM backend (no __init__ of ours) keeps no key/value cache: no memory bound to check
    max_prefix_cache_bytes: int | None = None
    kv_bytes_per_token: int = 0

    def head_bytes(self, prompts: Sequence[SoftPrompt], prefix_lens: Sequence[int]) -> int:
        """Bytes of cached prefix key/values a task's members hold: their head tokens (template
        head + learned prefix) x one token's key/values over all layers."""
        return sum(n + p.n_prefix for n, p in zip(prefix_lens, prompts)) * self.kv_bytes_per_token

    def _check_room(self, name: str, prompts: Sequence[SoftPrompt], prefix_lens: Sequence[int]) -> None:
        """Refuse a task past ``max_tasks`` or ``max_prefix_cache_bytes``; task ``name``'s current
        version does not count, as the new one replaces it."""
        others = [s for n, s in self._specs.items() if n != name]
        if len(others) >= self.max_tasks:
            raise PromptRejectedError(
                f"cannot add task {name!r}: this server already serves {len(others)} tasks, the limit "
                "(max_tasks, softprompt serve --max-tasks); delete a task first", code="too_many_tasks")
        if self.max_prefix_cache_bytes is None:
            return
        need = self.head_bytes(prompts, prefix_lens)
        held = sum(self.head_bytes(s.prompts, s.prefix_lens) for s in others)
        if held + need > self.max_prefix_cache_bytes:
            mib = 1 << 20
            raise PromptRejectedError(
                f"cannot add task {name!r}: its cached prefix key/values take {need / mib:.1f} MiB and the other "
                f"tasks hold {held / mib:.1f} MiB of the {self.max_prefix_cache_bytes / mib:.1f} MiB limit "
                "(max_prefix_cache_bytes, softprompt serve --max-prefix-cache-mb); delete a task or shorten "
                "the template", code="prefix_memory_full")

    def _fields(self, spec: TaskSpec, value: str | Mapping[str, str]) -> dict[str, str]:
        return input_fields(self, spec, value)

    def _suffixes(self, spec: TaskSpec, fields: dict[str, str], extra_tokens: int = 0) -> list[list[int]]:
        return suffixes(self, spec, fields, extra_tokens)

    # ------------------------------------------------------------------ submission
    def _make_item(self, op: str, spec: TaskSpec, value, extra_tokens: int = 0) -> Item:
        fields = self._fields(spec, value)
        it = Item(op, spec.name, fields, spec, self._suffixes(spec, fields, extra_tokens))
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
        if spec.kind != TaskKind.CLASSIFICATION:
            raise WrongKindError(f"task {task!r} is a {spec.kind} task; use generate (or /v1/generate)")
        if vote is not None and vote not in VOTES:
            raise InvalidInputError(f"vote must be one of {VOTES}, got {vote!r}")
        if not inputs:
            raise InvalidInputError("no inputs given")
        check_response_size(self, spec, len(inputs))
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
        if spec.kind != TaskKind.GENERATION:
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

    def _enqueue(self, items: list[Item]) -> None:
        self.scheduler.enqueue(items)

    # ------------------------------------------------------------------ answers
    def _fail(self, it: Item, exc: BaseException) -> None:
        fail(it, exc, self.metrics)

    def _finish(self, it: Item, result: Any) -> None:
        finish(it, result, self.metrics)

    def _vote_classify(self, it: Item, member_scores: list[torch.Tensor]) -> ClassifyResult:
        return vote_classify(it, member_scores)

    def _vote_generate(self, it: Item, outs: list[list[int]], finishes: list[str | None]) -> GenerateResult:
        return vote_generate(it, outs, finishes, self.decode)

    def decode(self, ids: list[int]) -> str:
        with self.tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _execute(self, items: list[Item]) -> None:
        """Run a formed batch: each item resolved to its task's current version (re-rendered if
        the task was replaced since submission), then the runner's passes."""
        live: list[Item] = []
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
                want = TaskKind.CLASSIFICATION if it.op == "classify" else TaskKind.GENERATION
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
        self.runner.run(live)


__all__ = [
    "BATCHING_MODES", "VOTES", "CancelledByClientError", "ClassifyResult", "Engine", "EngineConfig", "GenerateResult", "Item",
    "InputTooLongError", "InvalidInputError", "ModelMismatchError", "OverloadedError", "PromptRejectedError",
    "ServeError", "ShuttingDownError", "TaskSpec", "UnknownTaskError", "WrongKindError",
]
