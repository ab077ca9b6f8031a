"""Encoder-only models (the BERT family): soft prompt + a linear head trained with it
(``softprompt/encoder.py``).  Classification through the head only: no verbalizer scoring,
no generation, no serving, and the encoder's own training loop."""
from __future__ import annotations

from .base import FamilyBase, UnsupportedError


class EncoderFamily(FamilyBase):
    name = "encoder"
    examples = "bert, roberta, distilbert, ..."

    def auto_class(self):
        """The bare encoder: checkpoints such as all-MiniLM ship no masked-LM head, and the
        class is read by the head trained with the prompt."""
        from transformers import AutoModel

        return AutoModel

    def make_bank(self, model, tokenizer):
        from ..encoder import EncoderBank

        return EncoderBank(model, tokenizer)

    def classify_with_head(self, bank, entry, examples, *, batch_size: int = 32, progress: bool | str = False):
        from ..encoder import classify

        return classify(bank, entry, examples, batch_size=batch_size, progress=progress)

    def batch_loss(self, bank, entry, examples, loss="rank", class_weights=None, context="cached", compile=False):
        raise UnsupportedError(self.name, "rank_classification", "encoder prompts train with their head, in "
                               "encoder.train_encoder_prompt, not through train.batch_loss")

    def label_scores(self, bank, entry_idx, suffixes, max_batch_tokens, compile=False):
        self.require("rank_classification")

    def generate(self, bank, entry_idx, suffixes, *, max_new_tokens, stop_ids, skip_leading=frozenset()):
        self.require("generation")

    def train_separately(self, model, tokenizer, task, train_examples, valid_examples, cfg, **kw):
        """Training hook: soft prompt + classification head, trained by ``encoder.py``'s loop
        (which refuses methods and task kinds encoders cannot do)."""
        from ..encoder import train_encoder_prompt

        return train_encoder_prompt(model, tokenizer, task, train_examples, valid_examples, cfg, **kw)
