"""The one method vocabulary: what kind of trained (or hand-written) prompt an artifact holds.

Two spellings grew up: the CLI, ``TrainConfig.method`` and compare's run specs say ``prompt`` /
``ptuning`` / ``prefix``; artifacts, the bank and PEFT say ``prompt_tuning`` / ``p_tuning`` /
``prefix_tuning`` (PEFT in capitals).  :class:`Method` is the one list: its values are the
artifact spelling (so metadata on disk is unchanged), :attr:`Method.short` is the training
spelling (so ``--method``, run specs and checkpoints are unchanged), a member's name is PEFT's
``peft_type`` (``PROMPT_TUNING``), and :meth:`Method.parse` reads any of them.
"""
from __future__ import annotations

from enum import StrEnum

__all__ = ["Method", "TRAINED"]


class Method(StrEnum):
    PROMPT_TUNING = "prompt_tuning"  # the template's {soft:N} tokens, trained directly
    P_TUNING = "p_tuning"  # the same tokens, produced by a trained encoder network (P-tuning)
    PREFIX_TUNING = "prefix_tuning"  # learned key/values at every layer (prefix tuning)
    HARD_PROMPT = "hard_prompt"  # a hand-written or searched instruction, no trained tensors
    ENCODER_PROMPT_TUNING = "encoder_prompt_tuning"  # soft tokens + head of an encoder classifier
    ENCODER_LINEAR_PROBE = "encoder_linear_probe"  # only the encoder classifier's head

    @property
    def short(self) -> str:
        """The training spelling (``train --method``, ``TrainConfig.method``)."""
        return _SHORT.get(self, self.value)

    @classmethod
    def parse(cls, text: str | Method) -> Method:
        """Any spelling -> the member: artifact (``prefix_tuning``), training (``prefix``), PEFT
        (``PREFIX_TUNING``) or hyphenated; a :class:`ValueError` lists the known ones."""
        if isinstance(text, cls):
            return text
        key = str(text).strip().lower().replace("-", "_")
        for m in cls:
            if key in (m.value, _SHORT.get(m)):
                return m
        raise ValueError(f"unknown method {text!r}; known methods are "
                         f"{', '.join(m.short for m in TRAINED)} (or {', '.join(m.value for m in cls)})")

    @classmethod
    def normalize(cls, text: str) -> str:
        """The artifact spelling of a known method, else ``text`` unchanged (a newer artifact's own word)."""
        try:
            return cls.parse(text).value
        except ValueError:
            return text


_SHORT = {Method.PROMPT_TUNING: "prompt", Method.P_TUNING: "ptuning", Method.PREFIX_TUNING: "prefix"}

TRAINED: tuple[Method, ...] = (Method.PROMPT_TUNING, Method.P_TUNING, Method.PREFIX_TUNING)
"""What ``train --method`` offers, in its order."""
