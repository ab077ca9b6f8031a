"""The decision of a comparison: which prompt to deploy, with a paired test on the same examples.

Why a module of its own: the numbers a user acts on must not depend on how a report is
drawn.  Three rules, each a guard against a measured failure (docs: DESIGN.md, issue 14):

* **Choose on validation, never on test.**  Each family's candidates (every hard prompt x
  calibration; every trained prompt x learning rate x seed) are ranked by their validation
  score (:func:`select`); the test set is looked at only afterwards, once, for the two
  chosen prompts.  Picking by test accuracy flatters the family with more rows.
* **Use a metric a constant predictor cannot win.**  With imbalanced classes a prompt that
  always answers the majority class scores its rate in accuracy; its macro-F1 is at most
  ``1 / n_labels``.  The default selection metric is macro-F1 and every method at or below
  the majority-class rate is marked (:func:`at_or_below_majority`).
* **Compare paired, with an interval.**  Both chosen prompts answer the same test examples,
  so the difference is measured on them: a paired bootstrap 95% interval of the difference
  (accuracy and macro-F1, :func:`paired_bootstrap`) and McNemar's exact test on the examples
  where exactly one of them is right (:func:`mcnemar_exact`).  When the interval spans zero
  the recommendation is the hard prompt, which needs no training (:func:`decide`).
"""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "SELECT_METRICS",
    "at_or_below_majority",
    "bootstrap_weights",
    "decide",
    "macro_f1",
    "majority_rate",
    "mcnemar_exact",
    "metric_value",
    "paired_bootstrap",
    "select",
]

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
    v = c.get("valid") or {}
    other = "accuracy" if metric != "accuracy" else "macro_f1"
    cost = (c.get("cost") or {})
    return (v.get(metric, float("-inf")), v.get(other, float("-inf")), -(cost.get("train_s") or 0.0),
            -(cost.get("tokens_added") or 0.0))


def select(candidates: list[dict], metric: str = "macro_f1") -> dict | None:
    """The candidate with the best validation ``metric`` (ties: the other metric, then less
    training, then fewer tokens per query, then the first).  Only ``candidate["valid"]`` is
    read: a candidate's test scores cannot change the choice."""
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


# ----------------------------------------------------------------------------- the decision
def _pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def _public(c: dict | None, majority: float | None) -> dict | None:
    if c is None:
        return None
    out = {k: v for k, v in c.items() if k != "predictions"}
    test = c.get("test") or {}
    out["at_or_below_majority"] = at_or_below_majority(test.get("accuracy", 0.0), majority) if test else None
    return out


def _secs(x: float) -> str:
    return f"{x:.0f} s" if x >= 10 else f"{x:.1f} s"


def _cost_text(c: dict) -> str:
    cost = c.get("cost") or {}
    parts = []
    if cost.get("train_s"):
        parts.append(f"{_secs(cost['train_s'])} of training" + (f" ({cost['search_runs']} trainings searched)"
                                                            if cost.get("search_runs", 0) > 1 else ""))
    elif cost.get("search_s"):
        parts.append(f"{_secs(cost['search_s'])} of search and validation, no training")
    else:
        parts.append("no training")
    if cost.get("tokens_added") is not None:
        parts.append(f"{cost['tokens_added']:.0f} tokens added per query")
    if cost.get("latency_ms") is not None:
        parts.append(f"{cost['latency_ms']:.1f} ms per query at batch 1")
    return ", ".join(parts)


def decide(hard: dict | None, soft: dict | None, gold, n_labels: int, *, metric: str = "macro_f1",
           majority: float | None = None, n_boot: int = N_BOOT, seed: int = 0) -> dict[str, Any] | None:
    """The decision block of a comparison (kept in ``results.json`` and rendered first).

    ``hard`` and ``soft`` are the candidates :func:`select` chose, each a dict with ``name``,
    ``valid`` and ``test`` metrics, ``predictions`` (label indices on the test examples, in
    ``gold``'s order) and ``cost`` (``train_s``, ``search_s``, ``tokens_added``, ``latency_ms``).
    The rule: deploy the soft prompt only when it is not worse than the hard prompt on validation
    (when there is validation data; ``metric``, then the other metric) AND the test interval of
    the ``metric`` difference lies above zero."""
    if hard is None and soft is None:
        return None
    name = METRIC_NAMES.get(metric, metric)
    out: dict[str, Any] = {"select_metric": metric, "majority_rate": majority, "n_test": len(gold),
                           "hard": _public(hard, majority), "soft": _public(soft, majority)}
    if hard is None or soft is None:
        only = hard or soft
        kind = "hard" if hard else "soft"
        out.update({"deploy": kind, "difference": None, "mcnemar": None, "significant": None,
                    "recommendation": f"Deploy the {kind} prompt *{only['name']}*: it is the only family that ran "
                                      f"({_cost_text(only)})."})
        return out
    diff = paired_bootstrap(gold, hard["predictions"], soft["predictions"], n_labels,
                            metrics=tuple(dict.fromkeys((metric, "accuracy", "macro_f1"))), n_boot=n_boot, seed=seed)
    mc = mcnemar_exact(gold, hard["predictions"], soft["predictions"])
    d = diff[metric]
    significant = d["low"] > 0 or d["high"] < 0
    other = "accuracy" if metric != "accuracy" else "macro_f1"
    hv, sv = (hard.get("valid") or {}).get(metric), (soft.get("valid") or {}).get(metric)
    # worse on validation (the metric, then the other one): the hard prompt is kept.  A tie, common on a
    # few dozen validation examples, does not discard the trained prompt: the paired test decides.
    worse_on_valid = None if hv is None or sv is None else (
        (sv, (soft["valid"].get(other) or 0.0)) < (hv, (hard["valid"].get(other) or 0.0)))
    interval = f"{_pts(d['difference'])} {name} points (95% CI {_pts(d['low'])} to {_pts(d['high'])}, McNemar p = {mc['p_value']:.3g})"
    if worse_on_valid:
        deploy = "hard"
        text = (f"Deploy the hard prompt *{hard['name']}*: the trained prompt did worse on validation "
                f"({name} {100 * sv:.1f} vs {100 * hv:.1f}), so the hard prompt is kept; it needs no training. "
                f"On test the trained prompt's difference is {interval}.")
    elif not significant:
        deploy = "hard"
        text = (f"No significant difference: use the hard prompt *{hard['name']}*, it needs no training. "
                f"Soft minus hard on test: {interval}.")
    elif d["difference"] > 0:
        deploy = "soft"
        text = (f"Deploy the soft prompt *{soft['name']}*: it gains {interval} over the hard prompt "
                f"*{hard['name']}*. It costs {_cost_text(soft)}; the hard prompt: {_cost_text(hard)}.")
    else:
        deploy = "hard"
        text = (f"Deploy the hard prompt *{hard['name']}*: the soft prompt is worse on test, {interval}; "
                "and the hard prompt needs no training.")
    if deploy == "hard":
        text += f" Costs: the hard prompt {_cost_text(hard)}; the soft prompt {_cost_text(soft)}."
    out.update({"deploy": deploy, "difference": diff, "mcnemar": mc, "significant": significant,
                "soft_worse_on_validation": worse_on_valid, "recommendation": text,
                "bootstrap": {"resamples": n_boot, "level": LEVEL, "seed": seed, "kind": "paired percentile"}})
    return out


# ----------------------------------------------------------------------------- from a comparison's results.json
HARD_FAMILIES = ("prompt engineering",)
SOFT_FAMILIES = ("prompt tuning", "hybrid", "ensemble")
SELECT_SECTIONS = ("main", "length", "init", "position", "ensemble")
"""Report sections whose runs compete (the learning curve trains on less data; transfer is another task)."""


def candidates(results: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    """(hard, soft) candidates of a comparison: one per finished run x calibration variant of the
    rows in :data:`SELECT_SECTIONS`.  Each family's cost is its whole search: a soft candidate
    carries the training time of every soft run that competed (``train_s``, ``search_runs``),
    a hard candidate the validation scoring of every hard prompt that competed (``search_s``)."""
    runs = results.get("runs", {})
    fams: dict[str, list[tuple[str, dict]]] = {"hard": [], "soft": []}
    seen: set[str] = set()
    for row in results.get("rows", []):
        side = "hard" if row["family"] in HARD_FAMILIES else "soft" if row["family"] in SOFT_FAMILIES else None
        if side is None or row["section"] not in SELECT_SECTIONS or row.get("variant") == "vote":
            continue
        for rid in row["runs"]:
            rec = runs.get(rid) or {}
            if rid in seen or rec.get("status") != "done" or not rec.get("variants"):
                continue
            seen.add(rid)
            fams[side].append((rid, rec))
    search_s = sum((r.get("valid_wall_s") or 0.0) + ((r.get("search") or {}).get("seconds") or 0.0)
                   for _, r in fams["hard"])
    train_s = sum(((r.get("train") or {}).get("wall_s") or 0.0) + (r.get("valid_wall_s") or 0.0)
                  for _, r in fams["soft"] if r.get("kind") != "ensemble")
    # a run whose learning rate was searched counts every candidate it trained
    n_soft = sum(max(1, len((r.get("train") or {}).get("lr_search") or []))
                 for _, r in fams["soft"] if r.get("kind") != "ensemble")
    out: dict[str, list[dict]] = {"hard": [], "soft": []}
    for side, recs in fams.items():
        for rid, rec in recs:
            lat = (rec.get("latency") or {}).get("batch1_ms")
            for cal, v in rec["variants"].items():
                cost = {"tokens_added": rec.get("tokens_added"), "latency_ms": lat}
                if side == "soft":
                    cost.update({"train_s": train_s, "search_runs": n_soft,
                                 "kept_run_train_s": (rec.get("train") or {}).get("wall_s")})
                else:
                    cost.update({"search_s": search_s, "search_runs": len(recs)})
                out[side].append({"name": rec.get("label", rid) + ("" if cal == "none" else f", {cal} calibration"),
                                  "run": rid, "calibration": cal, "template": rec.get("template"),
                                  "instruction": rec.get("instruction"), "valid": v.get("valid"), "test": v["test"],
                                  "predictions": v["predictions"], "cost": cost,
                                  **({"artifact": rec["artifact"]} if rec.get("artifact") else {})})
    return out["hard"], out["soft"]


def from_results(results: dict[str, Any], metric: str | None = None, *, n_boot: int = N_BOOT,
                 seed: int = 0) -> dict[str, Any] | None:
    """The decision block of a comparison, a function of its ``results.json`` alone (classification
    tasks; None for generation or when nothing competed)."""
    data = results.get("data") or {}
    gold = data.get("test_gold")
    if (results.get("task") or {}).get("kind") != "classification" or not gold:
        return None
    metric = metric or (results.get("config") or {}).get("select_metric") or "macro_f1"
    hard, soft = candidates(results)
    h, s = select(hard, metric), select(soft, metric)
    if (h is None and hard) or (s is None and soft):  # no validation data: nothing may be chosen on test
        return {"select_metric": metric, "deploy": None, "recommendation": (
            "No decision: without validation data no prompt can be chosen except by its test score, which "
            "this comparison does not do. Give validation data (--valid-file, or a training pool large enough "
            "to hold some out).")}
    n_labels = len((results.get("task") or {}).get("verbalizer") or {}) or (max(gold) + 1)
    out = decide(h, s, gold, n_labels, metric=metric, majority=data.get("majority_accuracy"), n_boot=n_boot, seed=seed)
    if out is not None:
        out["candidates"] = {"hard": len(hard), "soft": len(soft)}
    return out
