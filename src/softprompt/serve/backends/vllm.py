"""Serve soft prompts through vLLM: a soft prompt is rows prepended to (or placed among) the
token embeddings, which vLLM's V1 engine takes as ``prompt_embeds``.

What stays ours: registry, identity checks, hot swap, validation, limits, calibration and
votes (the in-process :class:`~softprompt.serve.engine.Engine`'s code, so both answer alike).
What goes to vLLM: every forward pass, on one [T, hidden] tensor of input embeddings per
example and member (BOS, soft rows, text, the input), built here from the model's
embedding matrix (the only weights this process loads).

Classification
    A label scores the summed log-prob of its verbalizer tokens, as in the engine.  The label
    words form a trie; each node with children is one vLLM request (``max_tokens=1``,
    ``logprob_token_ids`` = the children: raw log-probs over the vocabulary) on the context
    plus the node's tokens: one request per example when first tokens differ, one more per
    shared prefix otherwise, scored exactly.
    The prompt's stored calibration and the ensemble vote then run as in the engine.

Generation
    vLLM decodes (greedy, or sampling with ``temperature`` / ``top_p`` / ``seed``) until EOS, a
    line break when asked (``stop_token_ids``) or a stop string; a line break before any answer
    token is skipped, as in the engine (``decoding.take_token``).

Refused at registration
    Prefix-tuned prompts (per-layer key/values) and encoder prompts (heads) are not input embeddings.
"""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import itertools
import json
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...core.conditioning import newline_ids
from ...core.prompts import ModelIdentity, SoftPrompt, embedding_fingerprint
from ...core.templates import encode_text
from ...data.task import TaskKind
from ..engine import (
    Engine, InvalidInputError, OverloadedError, PromptRejectedError, ServeError, ShuttingDownError, TaskSpec,
    WrongKindError, Item as _Item,
)
from ..config import EngineConfig
from ..metrics import Gauge, Metrics
from .vllm_transport import ClientGoneError, InProcessTransport, RemoteTransport, VllmUnavailableError

logger = logging.getLogger(__name__)


class BackendUnavailableError(ServeError):
    status, code = 503, "backend_unavailable"


# ----------------------------------------------------------------------------- the model's embeddings
@dataclass
class FrontModel:
    """What the front end needs of the base model: tokenizer, input embedding matrix,
    identity (for the prompts' model checks), its folder (for an in-process vLLM) and its
    number of positions.  The rest of the weights stay with vLLM."""

    tokenizer: Any
    embeddings: torch.Tensor  # [vocab, hidden] float32
    identity: ModelIdentity
    path: str
    max_positions: int


def _input_embedding_key(config) -> str:
    """The state-dict key of the input embedding matrix, found on a weightless copy of the model."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    emb = skeleton.get_input_embeddings()
    for name, mod in skeleton.named_modules():
        if mod is emb:
            return f"{name}.weight"
    raise ValueError("cannot find the input embedding module")  # pragma: no cover


def load_front_model(name_or_path: str) -> FrontModel:
    """Tokenizer + input embeddings of ``name_or_path`` (an embedded alias or a local
    transformers folder), read from its safetensors files without loading the model."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    from ...families.loading import EMBEDDED_MODELS, convert_embedded

    name_or_path = str(name_or_path)
    if name_or_path in EMBEDDED_MODELS:
        folder, name = Path(convert_embedded(name_or_path)), EMBEDDED_MODELS[name_or_path].display_name
    else:
        folder = Path(name_or_path).expanduser()
        if not folder.is_dir():
            raise ValueError(f"--backend vllm needs an embedded model alias or a local model folder; "
                             f"{name_or_path!r} is neither")
        name = folder.resolve().name
    config = AutoConfig.from_pretrained(folder)
    from ...families import family_for

    family_for(config).require("vllm")  # before reading weights: vLLM serves decoder-only models here
    key = _input_embedding_key(config)
    index = folder / "model.safetensors.index.json"
    files = [folder / json.loads(index.read_text())["weight_map"][key]] if index.exists() else sorted(folder.glob("*.safetensors"))
    weight = None
    for f in files:
        with safe_open(str(f), "pt") as st:
            names = set(st.keys())
            hit = key if key in names else next((k for k in names if k.endswith(key.split(".", 1)[-1])), None)
            if hit is not None:
                weight = st.get_tensor(hit).to(torch.float32)
                break
    if weight is None:
        raise ValueError(f"no input embedding matrix ({key}) in {folder}")
    if getattr(config, "scale_embedding", False) or getattr(config, "embedding_multiplier", None) not in (None, 1, 1.0):
        raise ValueError(f"{name}: the model scales its input embeddings; the vLLM backend does not support it yet")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    cfg = getattr(config, "get_text_config", lambda: config)()
    ident = ModelIdentity(name=name, hidden_size=int(weight.shape[1]), vocab_size=int(weight.shape[0]),
                          embedding_fingerprint=embedding_fingerprint(weight))
    max_pos = int(getattr(cfg, "max_position_embeddings", 0) or getattr(cfg, "n_positions", 0) or 1 << 30)
    return FrontModel(tokenizer, weight, ident, str(folder), max_pos)


# ----------------------------------------------------------------------------- per-member data
@dataclass(frozen=True)
class _Member:
    prefix_ids: tuple[int, ...]  # template head, soft rows as negative ids
    soft: torch.Tensor  # [n_soft, hidden]
    label_ids: tuple[tuple[int, ...], ...]  # verbalizer words as token ids, in label order
    trie: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]  # (token prefix, next tokens to score)


def label_trie(label_ids: Sequence[Sequence[int]]) -> tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]:
    """Every proper token prefix of the label words with the tokens that follow it there:
    one vLLM request each (one in all when the labels differ in their first token)."""
    nodes: dict[tuple[int, ...], list[int]] = {}
    for ids in label_ids:
        for j in range(len(ids)):
            nxt = nodes.setdefault(tuple(ids[:j]), [])
            if ids[j] not in nxt:
                nxt.append(ids[j])
    return tuple((p, tuple(n)) for p, n in nodes.items())


def trie_scores(label_ids: Sequence[Sequence[int]], node_logprobs: Mapping[tuple[int, ...], Mapping[int, float]]
                ) -> torch.Tensor:
    """Summed log-prob of each label word from the per-node next-token log-probs."""
    return torch.tensor([sum(node_logprobs[tuple(ids[:j])][ids[j]] for j in range(len(ids))) for ids in label_ids],
                        dtype=torch.float32)


# ----------------------------------------------------------------------------- the backend
class VllmBackend(Engine):
    """The Engine's interface with vLLM doing the model work.  ``transport`` is an
    :class:`InProcessTransport` or a :class:`RemoteTransport` (see ``vllm_transport.py``)."""

    supports_sampling = True

    def __init__(
        self,
        front: FrontModel,
        transport,
        *,
        base_name: str | None = None,
        metrics: Metrics | None = None,
        start_timeout_s: float = 600.0,
        **limits,
    ):  # noqa: D107 - Engine.__init__ is not called: there is no model or bank here
        # the request and prompt limits (EngineConfig.limits()): declared and checked in config.py only
        for k, v in EngineConfig().replace(**limits).limits().items():
            setattr(self, k, v)
        self.front = front
        self.transport = transport
        self.tokenizer = front.tokenizer
        self.identity = front.identity
        self.base_name = base_name or front.identity.name
        self.max_positions, self.input_embeddings = front.max_positions, front.embeddings  # values checked vs these
        self.start_timeout_s = float(start_timeout_s)
        self.tokenizer_lock = threading.RLock()
        self._specs: dict[str, TaskSpec] = {}
        # each version's members, kept while anything (the task table, a request) holds its spec
        self._members: weakref.WeakKeyDictionary[TaskSpec, tuple[_Member, ...]] = weakref.WeakKeyDictionary()
        self._versions = itertools.count(1)
        self._swap = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._running = False
        self._inflight_rows = 0
        self._inflight: dict[_Item, cf.Future] = {}  # each request's task on the event loop
        self._count_lock = threading.Lock()
        self._rate = 0.0
        newline = newline_ids(self.tokenizer)
        eos = {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
        self._stops_newline = frozenset(newline | eos)
        self._stops_eos = frozenset(eos)
        self._newlines = frozenset(newline - eos)
        self.metrics = metrics or Metrics()
        self.metrics.add(Gauge("softprompt_queue_depth_rows", "Rows sent to vLLM and not answered yet.",
                               lambda: self._inflight_rows))
        self.metrics.add(Gauge("softprompt_tasks", "Tasks being served.", lambda: len(self._specs)))
        if isinstance(transport, RemoteTransport):
            self.metrics.add(Gauge("softprompt_vllm_replicas_healthy", "vLLM replicas passing their health probe.",
                                   lambda: sum(r.healthy for r in transport.replicas)))

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "VllmBackend":
        """Start the event loop thread and the transport (an in-process vLLM loads the model here)."""
        if self._running:
            return self
        ready: cf.Future = cf.Future()

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            try:
                kw = {"wait_s": 30.0} if isinstance(self.transport, RemoteTransport) else {}
                loop.run_until_complete(self.transport.start(**kw))
            except BaseException as e:  # noqa: BLE001
                ready.set_exception(e)
                loop.close()
                return
            ready.set_result(None)
            loop.run_forever()
            loop.run_until_complete(self.transport.close())
            loop.close()

        self._thread = threading.Thread(target=run, name="softprompt-vllm", daemon=True)
        self._thread.start()
        ready.result(self.start_timeout_s)
        self._running = True
        return self

    def stop(self, *, drain: bool = True, timeout: float | None = 30.0) -> None:
        if not self._running:
            return
        self._running = False
        deadline = time.monotonic() + (timeout or 0)
        while drain and self._inflight_rows and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._count_lock:
            pending = list(self._inflight.items())
        for it, task in pending:  # whatever is left is answered, not left waiting
            self._fail(it, ShuttingDownError("the server is shutting down"))
            task.cancel()  # (aborts its vLLM requests)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout)

    def _retry_after(self) -> float:
        rate = self._rate if self._rate > 0 else 1.0
        return float(min(60, max(1, math.ceil(self._inflight_rows / rate))))

    @property
    def alive(self) -> bool:
        return self._running and self._thread is not None and self._thread.is_alive() and self.transport.alive

    @property
    def queued_rows(self) -> int:
        return self._inflight_rows

    def describe(self) -> dict:
        return {"backend": "vllm", **self.transport.describe()}

    # ------------------------------------------------------------------ tasks
    def register(self, name: str, prompts: SoftPrompt | Sequence[SoftPrompt], *,
                 member_names: Sequence[str] | None = None, vote: str = "mean", source: str | None = None) -> TaskSpec:
        """Add or replace task ``name``: checked as by the engine, plus what vLLM cannot take."""
        prompts = [prompts] if isinstance(prompts, SoftPrompt) else list(prompts)
        member_names = list(member_names) if member_names is not None else (
            [name] if len(prompts) == 1 else [f"{name}-{k}" for k in range(len(prompts))])
        for p, mname in zip(prompts, member_names):
            if p.kv is not None:
                raise PromptRejectedError(
                    f"task {name!r} prompt {mname!r} is prefix-tuned (per-layer key/values, method "
                    f"{p.method!r}): the vLLM backend sends input embeddings only and cannot serve it; serve it "
                    "with the in-process engine (softprompt serve --backend engine)", code="unsupported_by_backend")
            if p.head is not None:
                raise PromptRejectedError(f"task {name!r} prompt {mname!r} is an encoder prompt with a "
                                          "classification head; the vLLM backend serves decoder-only prompts",
                                          code="unsupported_by_backend")
        plan = self._check_prompts(name, prompts, member_names, vote)
        members = []
        with self.tokenizer_lock:
            for p, t in zip(prompts, plan["templates"]):
                label_ids = tuple(tuple(encode_text(self.tokenizer, w)) for w in (p.verbalizer or {}).values()) \
                    if plan["kind"] == TaskKind.CLASSIFICATION else ()
                members.append(_Member(tuple(t.prefix_ids(self.tokenizer)), p.embeddings.detach().float().cpu(),
                                       label_ids, label_trie(label_ids)))
        with self._swap:
            version = next(self._versions)
            entry_names = tuple(f"{name}@{version}/{k}" for k in range(len(prompts)))
            spec = TaskSpec(name=name, version=version, members=entry_names, source=source, prompts=tuple(prompts),
                            vote=vote, **plan)
            old = self._specs.get(name)
            self._members[spec] = tuple(members)
            self._specs = {**self._specs, name: spec}  # requests already submitted keep the old spec
        logger.info("task %r %s (version %d, %d prompt(s), vLLM backend)", name, "replaced" if old else "added",
                    version, len(prompts))
        return spec

    def unregister(self, name: str) -> TaskSpec:
        with self._swap:
            spec = self.task(name)
            self._specs = {k: v for k, v in self._specs.items() if k != name}
        logger.info("task %r removed", name)
        return spec

    # ------------------------------------------------------------------ embeddings
    def embed(self, ids: Sequence[int], soft: torch.Tensor) -> torch.Tensor:
        """[T, hidden] input embeddings of a rendered id list (negative id -k-1 = soft row k)."""
        t = torch.tensor(list(ids), dtype=torch.long)
        out = self.front.embeddings[t.clamp(min=0)]
        neg = t < 0
        if bool(neg.any()):
            out[neg] = soft[(-t[neg] - 1)].to(out.dtype)
        return out

    # ------------------------------------------------------------------ submission
    def _enqueue(self, items: list[_Item]) -> None:
        rows = sum(it.rows for it in items)
        if rows > self.max_queue:
            raise InvalidInputError(
                f"this request needs {rows} rows; the server queues at most {self.max_queue}; send fewer inputs")
        if not self._running or self._loop is None:
            raise ShuttingDownError("the vLLM backend is not running")
        if not self.transport.alive:
            raise BackendUnavailableError("vLLM is not available: " + json.dumps(self.transport.describe())[:400])
        with self._count_lock:
            if self._inflight_rows + rows > self.max_queue:
                self.metrics.rejected.inc(reason="queue_full")
                raise OverloadedError(f"the server is overloaded ({self._inflight_rows} rows in flight, limit "
                                      f"{self.max_queue}); retry later", retry_after=self._retry_after())
            self._inflight_rows += rows
        now = time.perf_counter()
        for it in items:
            it.t_submit = now
            members = list(self._members[it.spec])
            with self._count_lock:  # (the task's own clean-up takes it too: it cannot end before this)
                task = asyncio.run_coroutine_threadsafe(self._run_item(it, members), self._loop)
                self._inflight[it] = task
            it.future.add_done_callback(lambda f, task=task: task.cancel() if f.cancelled() else None)

    async def _run_item(self, it: _Item, members: list[_Member]) -> None:
        """Answered wholly by the version ``it`` was resolved to at submission, even if the
        task is replaced or removed meanwhile."""
        t0 = time.perf_counter()
        try:
            rows = [self.embed(list(m.prefix_ids) + list(suf), m.soft) for m, suf in zip(members, it.suffixes)]
            if it.op == "classify":
                scores = await asyncio.gather(*(self._label_scores(e, m) for e, m in zip(rows, members)))
                self._finish(it, self._vote_classify(it, list(scores)))
            else:
                outs = await asyncio.gather(*(self._generate(it, e, single=len(rows) == 1) for e in rows))
                self._finish(it, self._vote_generate(it, [o[0] for o in outs], [o[1] for o in outs]))
        except asyncio.CancelledError:
            self._fail(it, ShuttingDownError("the request was cancelled"))
        except ServeError as e:
            self._fail(it, e)
        except VllmUnavailableError as e:
            self._fail(it, BackendUnavailableError(str(e)))
        except Exception as e:  # noqa: BLE001 - one bad request must not take the loop down
            logger.exception("vLLM backend: request failed")
            self._fail(it, e)
        finally:
            with self._count_lock:
                self._inflight_rows -= it.rows
                self._inflight.pop(it, None)
            dt = max(time.perf_counter() - t0, 1e-6)
            self._rate = 0.9 * self._rate + 0.1 * (it.rows / dt) if self._rate else it.rows / dt

    async def _label_scores(self, embeds: torch.Tensor, m: _Member) -> torch.Tensor:
        async def node(prefix: tuple[int, ...], nxt: tuple[int, ...]):
            e = embeds if not prefix else torch.cat([embeds, self.front.embeddings[list(prefix)]])
            return prefix, await self.transport.next_logprobs(e, list(nxt))

        got = dict(await asyncio.gather(*(node(p, n) for p, n in m.trie)))
        return trie_scores(m.label_ids, got)

    async def _generate(self, it: _Item, embeds: torch.Tensor, *, single: bool) -> tuple[list[int], str]:
        """One member's answer, as ``Runner.decode`` (serve/runner.py) would give it: stop tokens left out, a
        line break before the answer skipped (and counted against ``max_new_tokens``)."""
        stops = self._stops_newline if it.stop_at_newline else self._stops_eos
        leading = self._newlines if it.stop_at_newline else frozenset()
        sampling = getattr(it, "sampling", None) or {}
        used, skipped, seen = 0, [], []
        while True:
            on_ids = None
            if it.on_token is not None and single:
                def on_ids(ids, _cb=it.on_token):
                    ans = [t for t in ids if t not in stops]
                    if ans:
                        seen[:] = ans
                        try:
                            _cb(ans)
                        except Exception as e:  # noqa: BLE001 - the client went away: stop this request
                            raise ClientGoneError(str(e)) from e
            params = dict(max_tokens=it.max_new_tokens - used, stop_token_ids=sorted(stops - self._stops_eos),
                          stop=list(it.stop_strings) or None, temperature=sampling.get("temperature", 0.0),
                          top_p=sampling.get("top_p", 1.0), seed=sampling.get("seed"))
            try:
                ids, finish = await self.transport.generate(
                    embeds if not skipped else torch.cat([embeds, self.front.embeddings[skipped]]), params, on_ids)
            except ClientGoneError:  # as the engine does: the answer so far, marked abandoned
                return list(seen), "abandoned"
            if not ids and finish == "length":
                return [], "length"
            lead = 0
            while lead < len(ids) and ids[lead] in leading:
                lead += 1
            if lead == len(ids) and lead:  # only line breaks so far (then stopped): continue past them
                skipped += ids
                used += len(ids)
                if used >= it.max_new_tokens:
                    return [], "length"
                continue
            out = ids[lead:]
            if out and out[-1] in stops:
                out = out[:-1]
                finish = "stop"
            if finish == "abort":
                finish = "abandoned"
            if out and it.on_token is not None and single:
                try:
                    it.on_token(list(out))
                except Exception:  # noqa: BLE001 - the client went away
                    pass
            return out, finish

    def _make_item(self, op: str, spec: TaskSpec, value, extra_tokens: int = 0) -> _Item:
        fields = self._fields(spec, value)
        it = _SampledItem(op, spec.name, fields, spec, self._suffixes(spec, fields, extra_tokens))
        it.sampling = {}
        return it

    def submit_generate(self, task: str, value: str | Mapping[str, str], *, max_new_tokens: int = 32,
                        stop_at_newline: bool = True, stop: Sequence[str] = (),
                        on_token: Callable[[list[int]], None] | None = None, temperature: float | None = None,
                        top_p: float | None = None, seed: int | None = None) -> cf.Future:
        """As :meth:`Engine.submit_generate`, plus sampling: ``temperature`` > 0 samples
        (with ``top_p``, and ``seed`` for repeatable draws); 0 or None is greedy."""
        spec = self.task(task)
        if spec.kind != TaskKind.GENERATION:
            raise WrongKindError(f"task {task!r} is a {spec.kind} task; use classify (or /v1/classify)")
        if not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= self.max_new_tokens_limit:
            raise InvalidInputError(f"max_new_tokens must be between 1 and {self.max_new_tokens_limit}, got {max_new_tokens!r}")
        for nm, v, lo, hi in (("temperature", temperature, 0.0, 2.0), ("top_p", top_p, 1e-6, 1.0)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                                  or not lo <= v <= hi):
                raise InvalidInputError(f"{nm} must be between {lo} and {hi}, got {v!r}", param=nm)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise InvalidInputError(f"seed must be an integer, got {seed!r}", param="seed")
        it = self._make_item("generate", spec, value, extra_tokens=max_new_tokens)
        it.max_new_tokens, it.stop_at_newline, it.on_token = max_new_tokens, stop_at_newline, on_token
        it.stop_strings = tuple(s for s in stop if s)
        it.sampling = {k: v for k, v in (("temperature", temperature), ("top_p", top_p), ("seed", seed)) if v is not None}
        self._enqueue([it])
        return it.future


class _SampledItem(_Item):
    __slots__ = ("sampling",)


# ----------------------------------------------------------------------------- construction
def make_vllm_backend(model: str, *, urls: Sequence[str] = (), max_model_len: int | None = None,
                      enforce_eager: bool = False, tensor_parallel_size: int = 1, health_interval_s: float = 5.0,
                      api_key: str | None = None, **engine_kw) -> VllmBackend:
    """``urls`` given: remote vLLM OpenAI servers; none: vLLM's async engine in this process
    (``enforce_eager`` skips its torch.compile warm-up: minutes on a small CPU)."""
    front = load_front_model(model)
    if urls:
        transport = RemoteTransport(list(urls), health_interval_s=health_interval_s,
                                    api_key=api_key or os.environ.get("SOFTPROMPT_VLLM_API_KEY"))
    else:
        max_logprobs = max(20, int(engine_kw.get("max_labels", 100)) + 1)
        transport = InProcessTransport(front.path, max_model_len=max_model_len, max_logprobs=max_logprobs,
                                       tensor_parallel_size=tensor_parallel_size,
                                       engine_kwargs={"enforce_eager": True} if enforce_eager else None)
    return VllmBackend(front, transport, base_name=model, **engine_kw)
