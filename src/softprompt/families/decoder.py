"""Decoder-only models (Llama, Qwen2, GPT-2, ...): the reference family, which supports every
method and feature.  Soft tokens and prefix key/values condition the prompt's context, run once
per prompt and cached (``conditioning.py``); labels and answers are scored as continuations."""
from __future__ import annotations

from collections.abc import Set as AbstractSet

import torch

from ..core.bank import PromptBank
from ..core.conditioning import continuation_logprobs, full_context, greedy_generate, label_logprobs, run_context
from ..core.losses import answer_loss, answer_targets, classification_loss, label_targets
from ..core.packing import packed_label_scores, packed_logprobs
from ..data.task import TaskKind
from .base import FamilyBase


class DecoderFamily(FamilyBase):
    name = "decoder"
    examples = "llama, qwen2, gpt2, ..."

    def auto_class(self):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def batch_loss(self, bank: PromptBank, entry: int, examples, loss: str = "rank",
                   class_weights: torch.Tensor | None = None, context: str = "cached", compile: bool = False,
                   pack_tokens: int | None = None) -> tuple[torch.Tensor, int]:
        """``training.prompt.batch_loss`` for decoders: the prompt's context run cached, in one ``full`` pass, or
        ``packed`` (several examples and their label words per row, ``core/packing.py``)."""
        e = bank.entries[entry]
        suffixes = [bank.suffix_ids(entry, ex.fields) for ex in examples]
        entry_idx = torch.full((len(examples),), entry)
        packed = dict(compile=compile, pack_tokens=pack_tokens)
        if context == "packed":
            ctx = None
        elif context == "full":
            ctx = full_context(bank, entry_idx, suffixes, compile=compile)
        else:
            ctx = run_context(bank, entry_idx, suffixes)
        n_tokens = sum(len(s) for s in suffixes)
        if e.kind == TaskKind.CLASSIFICATION:
            rows = (label_logprobs(bank, ctx) if ctx is not None
                    else packed_logprobs(bank, entry_idx, suffixes, [e.label_ids] * len(examples), **packed))
            scores = torch.stack(rows)  # [B, n_labels]
            gold, soft = label_targets(examples, e.labels, scores.device)
            n_tokens += sum(len(ids) - 1 for ids in e.label_ids) * len(examples)
            return classification_loss(scores, gold, loss, class_weights, soft), n_tokens
        targets = answer_targets(bank.tokenizer, examples)
        lp = (continuation_logprobs(bank, ctx, list(range(len(examples))), targets) if ctx is not None
              else torch.cat(packed_logprobs(bank, entry_idx, suffixes, [[t] for t in targets], **packed)))
        n_tokens += sum(len(t) for t in targets)
        return answer_loss(lp, targets), n_tokens

    def label_scores(self, bank: PromptBank, entry_idx: torch.Tensor, suffixes: list[list[int]],
                     max_batch_tokens: int, compile: bool = False, context: str = "cached") -> list[torch.Tensor]:
        """Label log-probs scored from the prompt's cached context, one ``full`` pass per row, or
        ``packed`` rows (``compile``: the full and packed passes through ``compiled.py``)."""
        if context == "packed":
            return packed_label_scores(bank, entry_idx, suffixes, max_batch_tokens, compile=compile)
        ctx = (full_context(bank, entry_idx, suffixes, compile=compile) if context == "full"
               else run_context(bank, entry_idx, suffixes))
        return label_logprobs(bank, ctx, max_batch_tokens=max_batch_tokens)

    def generate(self, bank: PromptBank, entry_idx: torch.Tensor, suffixes: list[list[int]], *, max_new_tokens: int,
                 stop_ids: set[int], skip_leading: AbstractSet[int] = frozenset()) -> list[list[int]]:
        ctx = run_context(bank, entry_idx, suffixes)
        return greedy_generate(bank, ctx, max_new_tokens=max_new_tokens, stop_ids=stop_ids, skip_leading=skip_leading)
