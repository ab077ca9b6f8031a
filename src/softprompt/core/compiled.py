"""A compiled forward of the frozen model for the ``full`` step (training and rank scoring).

A 135M model on a GPU is bound by kernel launches, not arithmetic; ``torch.compile`` fuses the
many small kernels of one layer.  Compilation specialises on shapes, so sequence lengths are
padded up to a multiple of ``bucket`` (right padding, masked out: the numbers do not change) and
the number of rows up to a power of two (8 and beyond: a multiple of 8; padded rows are dropped
from the outputs), so the number of distinct graphs stays bounded by ``max_len / bucket`` times a
few row counts: a smaller last batch or a packed batch with one row fewer reuses a graph instead
of compiling a new one (and dynamo's recompile limit, after which it runs eagerly, is not hit).
Static shapes are also what CUDA graphs need: ``SOFTPROMPT_COMPILE_MODE=reduce-overhead`` asks
``torch.compile`` for them (the default is inductor's ``default`` mode).  Eager stays the reference:
``compile="auto"`` is on for CUDA and off on CPUs, where compiled was not faster (docs/benchmarks.md).

bf16 autocast (CUDA only) covers the frozen model's forward; the trainable tensors stay fp32 and
the hidden states and key/values are handed back in fp32, so the LM head's log-softmax, the loss
and label scores are computed in fp32.
"""
from __future__ import annotations

import contextlib
import os
import weakref

import torch

from .cache_api import cache_layers, output_cache

COMPILE_MODES = ("auto", "on", "off")
COMPILE_ENV_VAR = "SOFTPROMPT_COMPILE"  # what "auto" means when set (on | off): e.g. the suite run compiled
TORCH_MODE_ENV_VAR = "SOFTPROMPT_COMPILE_MODE"  # torch.compile's mode: default | reduce-overhead | max-autotune
AUTOCAST_ENV_VAR = "SOFTPROMPT_AUTOCAST"  # the full/packed forward on CUDA: bf16 (default) | off
DEFAULT_BUCKET = 32
# compiled callables per frozen model, by (dynamic flag, torch.compile mode); weak, so a dropped model frees its graphs
_COMPILED: "weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple[bool, str], object]]" = weakref.WeakKeyDictionary()


def resolve_compile(mode: str | bool | None, device: torch.device | str) -> bool:
    """``auto`` (or None) -> ``$SOFTPROMPT_COMPILE`` when set, else on for CUDA and off elsewhere;
    ``on``/``off`` (or True/False) as given."""
    if mode is None:
        mode = "auto"
    if isinstance(mode, bool):
        return mode
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {COMPILE_MODES}, got {mode!r}")
    if mode == "auto":
        env = os.environ.get(COMPILE_ENV_VAR, "auto")
        if env not in COMPILE_MODES:
            raise ValueError(f"${COMPILE_ENV_VAR} must be one of {COMPILE_MODES}, got {env!r}")
        return torch.device(device).type == "cuda" if env == "auto" else env == "on"
    return mode == "on"


def bucketed(n: int, bucket: int = DEFAULT_BUCKET) -> int:
    """``n`` rounded up to a multiple of ``bucket`` (at least one bucket)."""
    if bucket < 1:
        raise ValueError(f"bucket must be >= 1, got {bucket}")
    return max(bucket, -(-n // bucket) * bucket)


def bucketed_rows(n: int) -> int:
    """A row count rounded up to 1, 2, 4, 8, then a multiple of 8: few distinct batch shapes, at
    most 2x the rows (below 8) or 7 padded rows (above)."""
    if n < 1:
        raise ValueError(f"a batch needs at least one row, got {n}")
    return 1 << (n - 1).bit_length() if n <= 8 else -(-n // 8) * 8


def pad_width(t: torch.Tensor, width: int, value=0, dim: int = 1) -> torch.Tensor:
    """Right-pad dimension ``dim`` (default 1) of ``t`` to ``width``."""
    extra = width - t.shape[dim]
    if extra <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t, t.new_full(shape, value)], dim=dim)


def pad_rows(embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, rows: int):
    """Append padding rows (zero embeddings, position 0) up to ``rows``.  A padded row's 2D mask
    keeps its first slot (a 4D additive mask: every slot) visible, so no attention row is empty
    (softmax over nothing is NaN); callers drop these rows from the outputs."""
    if rows <= embeds.shape[0]:
        return embeds, mask, positions
    mask = pad_width(mask, rows, 0, dim=0)
    if mask.dim() == 2:
        mask[embeds.shape[0]:, 0] = 1
    return pad_width(embeds, rows, 0, dim=0), mask, pad_width(positions, rows, 0, dim=0)


def _forward(base, embeds, mask, positions):
    out = base(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True)
    return out.last_hidden_state, [(k, v) for k, v in cache_layers(output_cache(out))]


def torch_compile_mode() -> str:
    """torch.compile's mode from ``$SOFTPROMPT_COMPILE_MODE`` (default: ``default``)."""
    return os.environ.get(TORCH_MODE_ENV_VAR) or "default"


def compiled_forward(model, dynamic: bool = False):
    """The compiled ``_forward`` for ``model`` (built once per model, ``dynamic`` flag and mode)."""
    per_model = _COMPILED.setdefault(model, {})
    key = (dynamic, torch_compile_mode())
    if key not in per_model:
        per_model[key] = torch.compile(_forward, dynamic=dynamic, fullgraph=False, mode=key[1])
    return per_model[key]


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA, nothing elsewhere (CPU bf16 is slower than fp32 on most CPUs);
    ``$SOFTPROMPT_AUTOCAST=off`` keeps CUDA in the model's own precision (a true fp32 run, e.g. to
    compare with an fp32 baseline)."""
    mode = os.environ.get(AUTOCAST_ENV_VAR) or "bf16"
    if mode not in ("bf16", "off"):
        raise ValueError(f"${AUTOCAST_ENV_VAR} must be bf16 or off, got {mode!r}")
    if device.type == "cuda" and mode == "bf16":  # pragma: no cover - no GPU in the test environment
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def full_forward(model, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, *,
                 compile: bool, bucket: int | None = None, dynamic: bool = False
                 ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Run the frozen base model on ``embeds`` [B, T, d] with ``mask`` (2D [B, T], or a 4D additive
    [B, 1, T, T] that the caller has already sized); returns (hidden [B, T', d], per-layer
    key/values, mask) where T' is T rounded up to ``bucket`` (default: DEFAULT_BUCKET when compiled,
    no padding eagerly; a 4D mask is never widened, so pass ``bucket=0`` with one).  Padded slots
    are masked, callers index real positions only.  Compiled, the row count is bucketed too
    (``bucketed_rows``) and the padded rows are dropped again here."""
    base = model.base_model
    if bucket is None:
        bucket = DEFAULT_BUCKET if compile else 0
    if bucket:
        width = bucketed(embeds.shape[1], bucket)
        embeds = pad_width(embeds, width)
        mask = pad_width(mask, width)
        positions = pad_width(positions, width)  # position 0 on padding: in range for learned position tables
    n = embeds.shape[0]
    if compile:
        embeds, mask, positions = pad_rows(embeds, mask, positions, bucketed_rows(n))
        if "reduce-overhead" in torch_compile_mode():  # pragma: no cover - CUDA graphs (GPU only)
            torch.compiler.cudagraph_mark_step_begin()  # each call a new step: earlier outputs may be reused
    fn = compiled_forward(model, dynamic) if compile else _forward
    with autocast_for(embeds.device):
        hidden, layers = fn(base, embeds, mask, positions)
    if hidden.dtype != embeds.dtype:  # bf16 autocast (CUDA; tests run it on the CPU)
        hidden = hidden.to(embeds.dtype)
        layers = [(k.to(embeds.dtype), v.to(embeds.dtype)) for k, v in layers]
    if hidden.shape[0] != n:
        hidden, layers, mask = hidden[:n], [(k[:n], v[:n]) for k, v in layers], mask[:n]
    return hidden, layers, mask
