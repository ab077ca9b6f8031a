"""A compiled forward of the frozen model for the ``full`` step (training and rank scoring).

A 135M model on a GPU is bound by kernel launches, not arithmetic; ``torch.compile`` fuses the
many small kernels of one layer.  Compilation specialises on shapes, so sequence lengths are
padded up to a multiple of ``bucket`` (right padding, masked out: the numbers do not change) and
the number of distinct graphs stays bounded by ``max_len / bucket``.  Eager stays the reference:
``compile="auto"`` is on for CUDA and off on CPUs, where compiled was not faster (docs/benchmarks.md).

bf16 autocast (CUDA only) covers the frozen model's forward; the trainable tensors stay fp32 and
the hidden states and key/values are handed back in fp32, so the LM head's log-softmax, the loss
and label scores are computed in fp32.
"""
from __future__ import annotations

import contextlib
import weakref

import torch

from .cache_api import cache_layers, output_cache

COMPILE_MODES = ("auto", "on", "off")
DEFAULT_BUCKET = 32
# compiled callables per frozen model (and dynamic flag); weak, so a dropped model frees its graphs
_COMPILED: "weakref.WeakKeyDictionary[torch.nn.Module, dict[bool, object]]" = weakref.WeakKeyDictionary()


def resolve_compile(mode: str | bool | None, device: torch.device | str) -> bool:
    """``auto`` (or None) -> on for CUDA, off elsewhere; ``on``/``off`` (or True/False) as given."""
    if mode is None:
        mode = "auto"
    if isinstance(mode, bool):
        return mode
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {COMPILE_MODES}, got {mode!r}")
    if mode == "auto":
        return torch.device(device).type == "cuda"
    return mode == "on"


def bucketed(n: int, bucket: int = DEFAULT_BUCKET) -> int:
    """``n`` rounded up to a multiple of ``bucket`` (at least one bucket)."""
    if bucket < 1:
        raise ValueError(f"bucket must be >= 1, got {bucket}")
    return max(bucket, -(-n // bucket) * bucket)


def pad_width(t: torch.Tensor, width: int, value=0) -> torch.Tensor:
    """Right-pad dim 1 of ``t`` to ``width``."""
    extra = width - t.shape[1]
    if extra <= 0:
        return t
    shape = list(t.shape)
    shape[1] = extra
    return torch.cat([t, t.new_full(shape, value)], dim=1)


def _forward(base, embeds, mask, positions):
    out = base(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True)
    return out.last_hidden_state, [(k, v) for k, v in cache_layers(output_cache(out))]


def compiled_forward(model, dynamic: bool = False):
    """The compiled ``_forward`` for ``model`` (built once per model and ``dynamic`` flag)."""
    per_model = _COMPILED.setdefault(model, {})
    if dynamic not in per_model:
        per_model[dynamic] = torch.compile(_forward, dynamic=dynamic, fullgraph=False)
    return per_model[dynamic]


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA, nothing elsewhere (CPU bf16 is slower than fp32 on most CPUs)."""
    if device.type == "cuda":  # pragma: no cover - no GPU in the test environment
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def full_forward(model, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, *,
                 compile: bool, bucket: int | None = None, dynamic: bool = False
                 ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Run the frozen base model on ``embeds`` [B, T, d]; returns (hidden [B, T', d], per-layer
    key/values, mask [B, T']) where T' is T rounded up to ``bucket`` (default: DEFAULT_BUCKET when
    compiled, no padding eagerly); padded slots are masked, callers index real positions only."""
    base = model.base_model
    if bucket is None:
        bucket = DEFAULT_BUCKET if compile else 0
    if bucket:
        width = bucketed(embeds.shape[1], bucket)
        embeds = pad_width(embeds, width)
        mask = pad_width(mask, width)
        positions = pad_width(positions, width)  # position 0 on padding: in range for learned position tables
    fn = compiled_forward(model, dynamic) if compile else _forward
    with autocast_for(embeds.device):
        hidden, layers = fn(base, embeds, mask, positions)
    if hidden.dtype != embeds.dtype:  # pragma: no cover - bf16 autocast (CUDA only)
        hidden = hidden.to(embeds.dtype)
        layers = [(k.to(embeds.dtype), v.to(embeds.dtype)) for k, v in layers]
    return hidden, layers, mask
