"""The range a prompt's values may take, relative to the model's own scale.

Finiteness is not enough: soft tokens or prefix key/values of 3e38 are finite, yet the first
product overflows and every answer becomes NaN (null probabilities, invalid JSON).  So a
prompt's values are refused when they are far beyond what the model itself works with:

* soft tokens: at most :data:`SOFT_VALUE_SCALE` times the largest magnitude in the model's
  input embedding matrix (trained prompts grow larger than word embeddings, not 1000x);
* prefix key/values: at most :data:`KV_VALUE_SCALE` times the largest key/value magnitude
  the model produces on a short text, measured once per engine, when the first prefix-tuned
  prompt arrives (the vLLM backend serves no prefix key/values, so it never measures).
"""
from __future__ import annotations

import threading
from typing import Any

import torch

from ..core.cache_api import cache_layers, output_cache
from ..core.prompts import SoftPrompt
from .spec import PromptRejectedError

#: soft-token values may be this many times the input embeddings' largest magnitude
SOFT_VALUE_SCALE = 1000.0
#: prefix key/values may be this many times the largest key/value the model makes itself
KV_VALUE_SCALE = 1000.0
#: the text whose key/values set the model's scale
SCALE_TEXT = "The quick brown fox jumps over the lazy dog. Is this review positive? Answer: yes"

_lock = threading.Lock()


def check_values(owner: Any, what: str, p: SoftPrompt) -> None:
    """Refuse ``p`` (PromptRejectedError) unless its tensors are finite floats within range."""
    tensors = (("embeddings", p.embeddings), *((("prefix key/values", p.kv),) if p.kv is not None else ()))
    for name, t in tensors:
        if not t.is_floating_point():
            raise PromptRejectedError(f"{what}: its {name} have dtype {t.dtype}; they must be floating point")
        if not bool(torch.isfinite(t).all()):
            raise PromptRejectedError(f"{what}: {name} contain NaN or infinite values")
    _within(what, "soft-token values", p.embeddings, SOFT_VALUE_SCALE, embedding_absmax(owner),
            "the input embeddings' largest magnitude")
    if p.kv is not None:
        scale = kv_absmax(owner)
        if scale is not None:
            _within(what, "prefix key/values", p.kv, KV_VALUE_SCALE, scale,
                    "the largest key/value the model produces itself")


def _within(what: str, name: str, t: torch.Tensor, times: float, scale: float, of: str) -> None:
    if t.numel() == 0:
        return
    top = float(t.detach().abs().max())
    limit = times * max(scale, 1e-6)
    if top > limit:
        raise PromptRejectedError(
            f"{what}: its {name} reach {top:.3g}; the limit is {limit:.3g} ({times:g}x {of}): values this far "
            "beyond the model's own scale overflow into NaN answers", code="values_out_of_range")


def embedding_absmax(owner: Any) -> float:
    """The largest magnitude in ``owner.input_embeddings`` (computed once per owner)."""
    return _cached(owner, "_embedding_absmax", lambda: float(owner.input_embeddings.detach().abs().max()))


def kv_absmax(owner: Any) -> float | None:
    """The largest key/value magnitude ``owner.model`` produces on :data:`SCALE_TEXT`, measured
    once per owner; None without a model (the vLLM backend)."""
    model = getattr(owner, "model", None)
    if model is None:
        return None
    return _cached(owner, "_kv_absmax", lambda: _measure_kv(model, owner.tokenizer, owner.tokenizer_lock))


def _cached(owner: Any, attr: str, compute) -> float:
    value = owner.__dict__.get(attr)
    if value is None:
        with _lock:
            value = owner.__dict__.get(attr)
            if value is None:
                value = compute()
                setattr(owner, attr, value)
    return value


@torch.no_grad()
def _measure_kv(model, tokenizer, tokenizer_lock) -> float:
    with tokenizer_lock:
        ids = list(tokenizer(SCALE_TEXT, add_special_tokens=False).input_ids)
        if tokenizer.bos_token_id is not None:
            ids = [tokenizer.bos_token_id, *ids]
    device = model.get_input_embeddings().weight.device
    out = model(input_ids=torch.tensor([ids], device=device), use_cache=True)
    return max(float(t.abs().max()) for k, v in cache_layers(output_cache(out)) for t in (k, v))
