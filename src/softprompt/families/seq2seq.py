"""Encoder-decoder models (the T5 family): soft tokens feed the encoder, labels and answers
are decoder targets.  The work is done by ``softprompt/seq2seq.py``; prefix tuning, ensembles
and serving are not supported (``CAPABILITIES``)."""
from __future__ import annotations

from collections.abc import Set as AbstractSet

import torch

from .. import seq2seq as s2s
from ..bank import PromptBank
from .base import FamilyBase


class Seq2SeqFamily(FamilyBase):
    """A ``PromptBank`` and the shared training loop, as decoders; the forward passes differ."""

    name = "seq2seq"
    examples = "t5, bart, ..."

    def auto_class(self):
        from transformers import AutoModelForSeq2SeqLM

        return AutoModelForSeq2SeqLM

    def batch_loss(self, bank: PromptBank, entry: int, examples, loss: str = "rank",
                   class_weights: torch.Tensor | None = None, context: str = "cached", compile: bool = False
                   ) -> tuple[torch.Tensor, int]:
        """Encoder once per example, label words or answer + EOS as decoder targets; ``context``
        and ``compile`` have no encoder-decoder form and are ignored."""
        return s2s.batch_loss(bank, entry, examples, loss, class_weights)

    def label_scores(self, bank: PromptBank, entry_idx: torch.Tensor, suffixes: list[list[int]],
                     max_batch_tokens: int, compile: bool = False) -> list[torch.Tensor]:
        return s2s.label_logprobs(bank, s2s.encode(bank, entry_idx, suffixes), max_batch_tokens=max_batch_tokens)

    def generate(self, bank: PromptBank, entry_idx: torch.Tensor, suffixes: list[list[int]], *, max_new_tokens: int,
                 stop_ids: set[int], skip_leading: AbstractSet[int] = frozenset()) -> list[list[int]]:
        enc = s2s.encode(bank, entry_idx, suffixes)
        return s2s.greedy_generate(bank, enc, max_new_tokens=max_new_tokens, stop_ids=stop_ids, skip_leading=skip_leading)
