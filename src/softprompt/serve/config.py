"""The engine's tuning knobs in one validated dataclass.

``softprompt serve`` builds one :class:`EngineConfig` from its options and hands it to
:func:`softprompt.serve.serve`, which hands it to the :class:`~softprompt.serve.engine.Engine`
(or the vLLM backend), so no layer re-declares the knobs.  ``"auto"`` values are resolved
per device when the engine starts (:meth:`EngineConfig.resolve`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..core.conditioning import DEFAULT_MAX_BATCH_TOKENS

BATCHING_MODES = ("mixed", "per_task")


@dataclass(frozen=True)
class EngineConfig:
    """Batching, queue and memory limits of one engine (see the engine module docstring)."""

    max_batch_size: int = 32  # rows per batch
    max_wait_ms: float = 5.0  # longest a request waits for batch-mates
    max_queue: int = 1024  # rows queued at most; beyond: OverloadedError
    max_input_tokens: int = 512  # tokens per input after the template
    max_input_chars: int = 20_000  # characters per input field (checked before tokenizing)
    max_new_tokens_limit: int = 256  # largest max_new_tokens a request may ask for
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS  # tokens per forward pass
    max_labels: int = 100  # labels per classification prompt
    max_label_tokens: int = 16  # tokens per label word
    max_template_tokens: int = 1024  # tokens in a prompt's fixed prefix
    max_tasks: int = 256  # tasks served at once; beyond: too_many_tasks
    max_prefix_cache_bytes: int = 2 << 30  # cached template-head key/values of all tasks; beyond: prefix_memory_full
    max_response_bytes: int = 16 << 20  # estimated JSON size of one classify answer, refused before any work
    batching: str = "mixed"  # "mixed" (rows of any task) or "per_task"
    prefix_cache: bool | str = "auto"  # reuse template-head key/values; "auto": on a CPU only
    split_padding: float | None | str = "auto"  # padded fraction a pass may have; "auto": 0.25 on a CPU

    def __post_init__(self) -> None:
        if self.batching not in BATCHING_MODES:
            raise ValueError(f"batching must be one of {BATCHING_MODES}, got {self.batching!r}")
        if self.max_batch_size < 1 or self.max_queue < 1 or self.max_wait_ms < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1 and max_wait_ms >= 0")
        if min(self.max_batch_tokens, self.max_labels, self.max_label_tokens, self.max_template_tokens) < 1:
            raise ValueError("max_batch_tokens, max_labels, max_label_tokens and max_template_tokens must be >= 1")
        if self.max_response_bytes < 1:
            raise ValueError("max_response_bytes must be >= 1")
        if min(self.max_input_tokens, self.max_input_chars, self.max_new_tokens_limit) < 1:
            raise ValueError("max_input_tokens, max_input_chars and max_new_tokens_limit must be >= 1")
        if self.max_tasks < 1 or self.max_prefix_cache_bytes < 1:
            raise ValueError("max_tasks and max_prefix_cache_bytes must be >= 1")
        if self.prefix_cache != "auto" and not isinstance(self.prefix_cache, bool):
            raise ValueError(f"prefix_cache must be True, False or 'auto', got {self.prefix_cache!r}")
        sp = self.split_padding
        if sp != "auto" and sp is not None and (isinstance(sp, (str, bool)) or not 0 <= float(sp) < 1):
            raise ValueError(f"split_padding must be in [0, 1) or None, got {sp!r}")

    def limits(self) -> dict:
        """The request and prompt limits every backend enforces (the vLLM one has no batcher)."""
        keys = ("max_queue", "max_input_tokens", "max_input_chars", "max_new_tokens_limit", "max_labels",
                "max_label_tokens", "max_template_tokens", "max_tasks",
                "max_response_bytes")
        return {k: getattr(self, k) for k in keys}

    def replace(self, **changes) -> "EngineConfig":
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)

    def resolve(self, device_type: str) -> "EngineConfig":
        """The ``"auto"`` choices made for a device, measured (docs/benchmarks.md): reusing
        prefix key/values and splitting padded passes pay on a CPU, not on a GPU."""
        cpu = device_type == "cpu"
        return self.replace(
            prefix_cache=cpu if self.prefix_cache == "auto" else self.prefix_cache,
            split_padding=(0.25 if cpu else None) if self.split_padding == "auto" else
            (None if self.split_padding is None else float(self.split_padding)),
        )
