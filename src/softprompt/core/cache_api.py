"""The one place that knows how transformers names its key/value cache.

transformers 5.0 takes and returns ``past_key_values``; later 5.x releases renamed it to
``cache`` and warn (``FutureWarning``) on every forward pass that still uses the old name.
pyproject admits the whole 5.x range, so each model class is asked ONCE (its ``forward``
signature) which name it takes, and each output class (its dataclass fields) which name
it returns.  Every forward pass in the package that passes or reads a cache goes through
:func:`cache_arg` / :func:`output_cache`; nothing else spells the old name.
"""
from __future__ import annotations

import dataclasses
import inspect
from functools import lru_cache

import torch

NEW, OLD = "cache", "past_key_values"


@lru_cache(maxsize=None)
def _forward_cache_name(cls: type) -> str:
    """``cache`` when ``cls.forward`` declares it (signature follows decorators' ``__wrapped__``)."""
    params = inspect.signature(cls.forward).parameters
    return NEW if NEW in params else OLD


def cache_arg(model, cache) -> dict:
    """The keyword argument that hands ``cache`` to ``model``'s forward: ``**cache_arg(m, c)``."""
    return {_forward_cache_name(type(model)): cache}


@lru_cache(maxsize=None)
def _output_cache_name(cls: type) -> str:
    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    return NEW if NEW in names else OLD


def output_cache(out):
    """The key/value cache a forward pass returned, read under the name its output class uses."""
    return getattr(out, _output_cache_name(type(out)))


def cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer of a transformers Cache, across 5.x versions."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return [(cache.key_cache[i], cache.value_cache[i]) for i in range(len(cache.key_cache))]  # pragma: no cover


def make_cache(layers: list[tuple[torch.Tensor, torch.Tensor]]):
    """A DynamicCache holding the given per-layer key/values (built through the public update API)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(layers):
        cache.update(k, v, i)
    return cache
