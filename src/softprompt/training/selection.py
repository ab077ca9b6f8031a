"""The one rule that ranks trained prompts on labelled examples, used by every trainer (prompt,
encoder head), every process count and the restart/search code alike, so one process and N keep
the same prompt.  Larger is better.

Classification: macro-F1, then accuracy, then lower loss.  Macro-F1 first: a prompt stuck on the
majority class can win accuracy on imbalanced data, not macro-F1.  Generation: token F1, then
exact match.  ``softprompt compare`` ranks its candidates with the same function
(``apps/compare/decision.select``); only there may the user put another metric first
(``--select-metric``), because that choice is the deployment's objective, not a training detail.
"""
from __future__ import annotations

import torch


def classification_score(m: dict, metric: str = "macro_f1") -> tuple:
    """``(metric, the other of macro-F1/accuracy, -loss)``; a missing value ranks lowest (compare's
    candidates carry no loss: every one of them ties there)."""
    other = "accuracy" if metric != "accuracy" else "macro_f1"
    inf = float("inf")
    return (m.get(metric, -inf), m.get(other, -inf), -m.get("loss", inf))


def generation_score(m: dict) -> tuple:
    return (m["f1"], m["exact_match"])


def kept_validation(result) -> dict | None:
    """The validation metrics of the step a finished run kept (``result.best_step``), or None
    when it was never validated."""
    return next((h["valid"] for h in result.history if h["step"] == result.best_step and "valid" in h), None)


def prediction_shares(pred: torch.Tensor, gold: torch.Tensor) -> dict:
    """The share of the most predicted class and of the most common gold class: a prompt that
    answers one class for (nearly) every input has collapsed (``recipe.collapse_reason``)."""
    def top(t: torch.Tensor) -> float:
        return float(torch.bincount(t).max()) / len(t) if len(t) else 0.0

    return {"top_share": top(pred), "gold_top_share": top(gold)}


__all__ = ["classification_score", "generation_score", "kept_validation", "prediction_shares"]
