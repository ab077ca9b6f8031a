"""Model families: decoder-only, encoder-decoder (T5) and encoder-only (BERT) models, each one
class with the same small interface (:class:`Family`), chosen once by :func:`family_for`.

This module is the ONLY place that reads a model's family from its config; everything else
asks the family (``bank.family``, ``family_for(model)``).  What each family supports is the
table ``CAPABILITIES`` (printed by ``softprompt models capabilities``); asking a family for
something outside it raises :class:`UnsupportedError`.

Banks carry their family (``bank.family``), so core code (scoring, calibration) calls
``bank.family.label_scores(...)`` without importing this package: importing it installs
:func:`family_for` as the bank module's resolver.
"""
from __future__ import annotations

from collections.abc import Set as AbstractSet
from typing import Any, Protocol, runtime_checkable

import torch

from ..core import bank as _bank
from .base import CAPABILITIES, CAPABILITY_HELP, CAPABILITY_NAMES, FAMILY_TITLES, METHODS, UnsupportedError
from .decoder import DecoderFamily
from .encoder import EncoderFamily
from .seq2seq import Seq2SeqFamily


@runtime_checkable
class Family(Protocol):
    """What a model family provides.  ``name`` keys ``CAPABILITIES``."""

    name: str

    def auto_class(self) -> Any:
        """The transformers Auto* class that loads this family's checkpoints."""

    def make_bank(self, model, tokenizer) -> Any:
        """An empty bank of prompts for ``model`` (carrying this family as ``bank.family``)."""

    def batch_loss(self, bank, entry: int, examples, loss: str = "rank", class_weights: torch.Tensor | None = None,
                   context: str = "cached", compile: bool = False, pack_tokens: int | None = None
                   ) -> tuple[torch.Tensor, int]:
        """Mean training loss over ``examples`` with entry ``entry``, and the tokens run."""

    def label_scores(self, bank, entry_idx: torch.Tensor, suffixes: list[list[int]], max_batch_tokens: int,
                     compile: bool = False, context: str = "cached") -> list[torch.Tensor]:
        """Per row, the summed log-probs of its entry's label words (``context``: cached | full | packed)."""

    def generate(self, bank, entry_idx: torch.Tensor, suffixes: list[list[int]], *, max_new_tokens: int,
                 stop_ids: set[int], skip_leading: AbstractSet[int] = frozenset()) -> list[list[int]]:
        """Greedy answer token ids per row."""

    def classify_with_head(self, bank, entry, examples, *, batch_size: int = 32, progress: bool | str = False) -> Any:
        """Classification by a trained head (families without rank classification); else UnsupportedError."""

    trainable: str
    """Which trainable of ``training/`` trains the family's prompts ("prompt" or "encoder_head")."""

    def check_method(self, method: str) -> None:
        """Refuse a training method the family cannot run, before any work."""

    def supports(self, capability: str) -> bool: ...

    def require(self, capability: str) -> None: ...


DECODER, SEQ2SEQ, ENCODER = DecoderFamily(), Seq2SeqFamily(), EncoderFamily()
FAMILIES: dict[str, Family] = {f.name: f for f in (DECODER, SEQ2SEQ, ENCODER)}


def _config_of(model_or_config):
    return getattr(model_or_config, "config", model_or_config)


def is_encoder_decoder(model_or_config) -> bool:
    """True for encoder-decoder models (T5, BART, ...), read from the config."""
    return bool(getattr(_config_of(model_or_config), "is_encoder_decoder", False))


def is_encoder_config(config) -> bool:
    """Whether ``config`` describes an encoder-only model (BERT, RoBERTa, DistilBERT, ...).

    Encoder-only means: transformers has a masked-LM class for the family, and the config is
    neither an encoder-decoder (BART, T5) nor set up as a decoder (``is_decoder``, which the
    BERT family allows for its causal-LM variants).
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if getattr(config, "is_encoder_decoder", False) or getattr(config, "is_decoder", False):
        return False
    return getattr(config, "model_type", None) in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def family_for(model_or_config) -> Family:
    """The family of a model, or of its config: the one place that decides."""
    config = _config_of(model_or_config)
    if is_encoder_decoder(config):
        return SEQ2SEQ
    if config is not None and is_encoder_config(config):
        return ENCODER
    return DECODER


def require(family: Family, capability: str) -> None:
    """Raise :class:`UnsupportedError` unless ``family`` supports ``capability``."""
    family.require(capability)


def capability_rows() -> list[dict[str, str]]:
    """The capability table as rows, one per capability (yes/- per family, then its meaning): for the CLI."""
    return [{"capability": c, **{f.name: "yes" if f.supports(c) else "-" for f in FAMILIES.values()},
             "meaning": CAPABILITY_HELP[c]} for c in CAPABILITY_NAMES]


_bank.install_family_resolver(family_for)

__all__ = [
    "CAPABILITIES", "CAPABILITY_HELP", "CAPABILITY_NAMES", "DECODER", "ENCODER", "FAMILIES", "FAMILY_TITLES", "METHODS",
    "SEQ2SEQ",
    "Family", "UnsupportedError", "capability_rows", "family_for", "is_encoder_config", "is_encoder_decoder", "require",
]
