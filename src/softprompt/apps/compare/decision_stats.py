"""The statistics under a comparison's decision, on label-index arrays: metrics for rows of
example weights (a plain score is one row of ones, a bootstrap many), the paired bootstrap,
McNemar's exact test, and the selection rule among candidates.

Why apart from ``decision.py``: the rule's checks (``decision_checks.py``: majority floor,
stability under resampling, cost per query) and the decision itself both build on these; one
module below both keeps the imports one way.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ...training.selection import classification_score

__all__ = ["LEVEL", "METRIC_NAMES", "N_BOOT", "SELECT_METRICS", "at_or_below_majority", "bootstrap_weights", "macro_f1",
           "majority_rate", "mcnemar_exact", "metric_value", "paired_bootstrap", "select", "selection_metrics"]

SELECT_METRICS = ("macro_f1", "accuracy", "balanced_accuracy")
"""Metrics a family's best method can be chosen with (``--select-metric``); macro-F1 is the default."""
METRIC_NAMES = {"macro_f1": "macro-F1", "accuracy": "accuracy", "balanced_accuracy": "balanced accuracy"}
N_BOOT = 2000
LEVEL = 0.95


# ----------------------------------------------------------------------------- metrics on index arrays
def _indicators(labels: np.ndarray, n_labels: int) -> np.ndarray:
    out = np.zeros((len(labels), n_labels))
    out[np.arange(len(labels)), labels] = 1.0
    return out


def _weighted_metrics(w: np.ndarray, gold: np.ndarray, pred: np.ndarray, n_labels: int) -> dict[str, np.ndarray]:
    """Accuracy, macro-F1 and balanced accuracy of ``pred`` for each row of example weights ``w``
    ([B, n] counts: a bootstrap resample, or one row of ones for the plain metric).  Macro-F1
    follows ``scoring.classification_metrics``: per-label F1, zero for a label never predicted
    right, averaged over all labels."""
    g, p = _indicators(gold, n_labels), _indicators(pred, n_labels)
    n = w.sum(axis=1)
    tp = w @ (g * p)  # [B, L]
    gold_n, pred_n = w @ g, w @ p
    denom = gold_n + pred_n
    f1 = np.where(tp > 0, 2 * tp / np.where(denom > 0, denom, 1), 0.0)
    recall = np.where(gold_n > 0, tp / np.where(gold_n > 0, gold_n, 1), np.nan)
    balanced = np.nanmean(recall, axis=1)  # over the labels that occur in gold
    return {"accuracy": tp.sum(axis=1) / n, "macro_f1": f1.mean(axis=1), "balanced_accuracy": balanced}


def metric_value(gold, pred, n_labels: int, metric: str) -> float:
    """One metric of label-index predictions (``accuracy``, ``macro_f1``, ``balanced_accuracy``)."""
    if metric not in SELECT_METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(SELECT_METRICS)}")
    gold, pred = np.asarray(gold, dtype=int), np.asarray(pred, dtype=int)
    return float(_weighted_metrics(np.ones((1, len(gold))), gold, pred, n_labels)[metric][0])


def macro_f1(gold, pred, n_labels: int) -> float:
    return metric_value(gold, pred, n_labels, "macro_f1")


def majority_rate(gold, n_labels: int | None = None) -> float:
    """Accuracy of always answering the most frequent gold label."""
    gold = np.asarray(gold, dtype=int)
    if gold.size == 0:
        raise ValueError("no gold labels")
    return float(np.bincount(gold, minlength=n_labels or 0).max() / gold.size)


def at_or_below_majority(accuracy: float, majority: float | None, tol: float = 1e-9) -> bool:
    """True when a method does no better than always answering the majority class."""
    return majority is not None and accuracy <= majority + tol


# ----------------------------------------------------------------------------- paired statistics
def bootstrap_weights(n: int, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """[n_boot, n] resample counts: row b says how often each example is drawn in resample b
    (n draws with replacement).  Both prompts are scored on the SAME resamples: that is what
    makes the bootstrap paired."""
    if n <= 0:
        raise ValueError("the bootstrap needs at least one example")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    return np.stack([np.bincount(row, minlength=n) for row in idx]).astype(float)


def paired_bootstrap(gold, pred_a, pred_b, n_labels: int, *, metrics=("accuracy", "macro_f1"), n_boot: int = N_BOOT,
                     seed: int = 0, level: float = LEVEL) -> dict[str, dict[str, float]]:
    """Difference ``b - a`` of each metric on the same examples, with a percentile bootstrap
    interval at ``level``: ``{metric: {a, b, difference, low, high}}``."""
    gold, a, b = (np.asarray(x, dtype=int) for x in (gold, pred_a, pred_b))
    if not len(gold) == len(a) == len(b):
        raise ValueError(f"paired predictions need the same examples: {len(gold)} gold, {len(a)} and {len(b)} predictions")
    w = bootstrap_weights(len(gold), n_boot, seed)
    ma, mb = _weighted_metrics(w, gold, a, n_labels), _weighted_metrics(w, gold, b, n_labels)
    out = {}
    for m in metrics:
        diffs = mb[m] - ma[m]
        lo, hi = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
        va, vb = metric_value(gold, a, n_labels, m), metric_value(gold, b, n_labels, m)
        out[m] = {"a": va, "b": vb, "difference": vb - va, "low": float(lo), "high": float(hi)}
    return out


def mcnemar_exact(gold, pred_a, pred_b) -> dict[str, Any]:
    """McNemar's exact test: of the examples exactly one prompt gets right (``a_only`` +
    ``b_only``), is the split compatible with a fair coin?  Two-sided exact binomial p-value
    (``scipy.stats.binomtest``); 1.0 when the prompts never disagree on correctness."""
    from scipy.stats import binomtest

    gold, a, b = (np.asarray(x, dtype=int) for x in (gold, pred_a, pred_b))
    if not len(gold) == len(a) == len(b):
        raise ValueError(f"paired predictions need the same examples: {len(gold)} gold, {len(a)} and {len(b)} predictions")
    ra, rb = a == gold, b == gold
    a_only, b_only = int((ra & ~rb).sum()), int((rb & ~ra).sum())
    k = a_only + b_only
    p = 1.0 if k == 0 else float(binomtest(min(a_only, b_only), k, 0.5).pvalue)
    return {"a_only": a_only, "b_only": b_only, "p_value": min(p, 1.0)}


# ----------------------------------------------------------------------------- selection
def _score(c: dict, metric: str) -> tuple:
    """The trainers' rule (``training.selection.classification_score``: the metric, the other of
    macro-F1/accuracy, lower loss), then this comparison's cost tie-breaks."""
    cost = (c.get("cost") or {})
    return (*classification_score(selection_metrics(c) or {}, metric), -(cost.get("train_s") or 0.0),
            -(cost.get("tokens_added") or 0.0))


def selection_metrics(c: dict) -> dict | None:
    """What a candidate is chosen on: its ``selection`` metrics (validation plus the labelled
    examples its construction did not use: a hand-written prompt trains nothing) when it has
    them, else its validation metrics."""
    return c.get("selection") or c.get("valid")


def select(candidates: list[dict], metric: str = "macro_f1") -> dict | None:
    """The candidate with the best validation ``metric`` (ties: the other metric, then less
    training, then fewer tokens per query, then the first).  Only ``candidate["selection"]`` or
    ``["valid"]`` is read (:func:`selection_metrics`): a candidate's test scores cannot change the choice."""
    if metric not in SELECT_METRICS:
        raise ValueError(f"unknown selection metric {metric!r}; choose from {', '.join(SELECT_METRICS)}")
    scored = [c for c in candidates if c.get("valid")]
    if not scored:
        return None
    best = scored[0]
    for c in scored[1:]:
        if _score(c, metric) > _score(best, metric):
            best = c
    return best
