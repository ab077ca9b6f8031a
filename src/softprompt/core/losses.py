"""Training objectives, shared by every model family's ``batch_loss``.

The families differ in how they produce scores (decoder-only: from the context's cache;
encoder-decoder: from the decoder), not in what is optimised, so the objectives live here
once: for classification, cross-entropy over the label scores (``rank``) or the negative
log-prob of the gold label words (``lm``), optionally class-weighted, against the gold label or,
when every example carries one, its ``soft_label`` distribution (a teacher's, in distillation);
for generation, the answer followed by EOS as the target tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .templates import encode_text


def balancing_weights(labels, examples) -> torch.Tensor:
    """Per-label weights inversely proportional to the labels' frequency in ``examples`` (1 when
    balanced), for ``balance=True`` training."""
    counts = torch.tensor([sum(ex.label == lab for ex in examples) for lab in labels], dtype=torch.float)
    return counts.sum() / (len(counts) * counts.clamp(min=1))


def label_targets(examples, labels: list[str], device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gold label indices ``[B]`` and, when every example has a ``soft_label``, the target
    distributions ``[B, n_labels]`` (else None)."""
    gold = torch.tensor([labels.index(ex.label) for ex in examples], device=device)
    if not examples or not all(ex.soft_label for ex in examples):
        return gold, None
    if any(len(ex.soft_label) != len(labels) for ex in examples):
        raise ValueError(f"a soft_label needs one probability per label ({len(labels)})")
    return gold, torch.tensor([ex.soft_label for ex in examples], dtype=torch.float, device=device)


def classification_loss(
    scores: torch.Tensor, gold: torch.Tensor, loss: str = "rank", class_weights: torch.Tensor | None = None,
    target_probs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted mean loss of label scores ``[B, n_labels]`` (summed label-word log-probs) against
    gold label indices ``[B]``, or against ``target_probs`` ``[B, n_labels]`` when given (the
    cross-entropy to a teacher's distribution: its KL divergence plus a constant); class weights
    follow ``gold``."""
    if loss not in ("rank", "lm"):
        raise ValueError(f"unknown loss {loss!r}; use rank or lm")
    if target_probs is not None:
        logp = F.log_softmax(scores, -1) if loss == "rank" else scores
        per = -(target_probs.to(scores.dtype) * logp).sum(-1)
    elif loss == "rank":
        per = F.cross_entropy(scores, gold, reduction="none")
    else:
        per = -scores.gather(1, gold[:, None]).squeeze(1)
    w = class_weights.to(scores.device)[gold] if class_weights is not None else torch.ones_like(per)
    return (per * w).sum() / w.sum()


def answer_targets(tokenizer, examples) -> list[list[int]]:
    """Token ids a generation example is trained to produce: its answer, then EOS (so the model
    learns to stop)."""
    eos = tokenizer.eos_token_id
    return [encode_text(tokenizer, " " + ex.target.strip()) + ([eos] if eos is not None else []) for ex in examples]


def answer_loss(logprobs: torch.Tensor, targets: list[list[int]]) -> torch.Tensor:
    """Mean over examples of the per-token negative log-likelihood of each target."""
    return -(logprobs / torch.tensor([len(t) for t in targets], device=logprobs.device)).mean()
