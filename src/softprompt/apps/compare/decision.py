"""The decision of a comparison: which prompt to deploy, with a paired test on the same examples.

Why a module of its own: the numbers a user acts on must not depend on how a report is
drawn.  Three rules, each a guard against a measured failure (README.md, "Architecture"; issue 14):

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


from .decision_stats import (  # noqa: F401  (the statistics' public names stay importable from here)
    LEVEL, METRIC_NAMES, N_BOOT, SELECT_METRICS, _score, _weighted_metrics, at_or_below_majority, bootstrap_weights,
    macro_f1, majority_rate, mcnemar_exact, metric_value, paired_bootstrap, select,
)
from .decision_checks import beats_floor, break_even, majority_floor, stability, within_latency

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

# ----------------------------------------------------------------------------- the decision
def _pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def _public(c: dict | None, majority: float | None) -> dict | None:
    if c is None:
        return None
    out = {k: v for k, v in c.items() if k not in ("predictions", "valid_predictions")}
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


def _floor_text(floor: dict, metric: str) -> str:
    name = METRIC_NAMES.get(metric, metric)
    return f"always answering *{floor['label']}* (validation {name} {100 * floor['valid'][metric]:.1f})"


def _break_even_text(be: dict | None) -> str:
    if be is None:
        return ""
    lat = f"{be['soft_ms']:.1f} vs {be['hard_ms']:.1f} ms per query for the hard prompt"
    if be["queries"] == 0:
        return f" Break-even: the soft prompt cost no more to make than the hard prompt ({lat})."
    if be["queries"] is None:
        return (f" Break-even: never, in time: the soft prompt is not faster per query ({lat}), so its "
                f"{_secs(be['one_off_s'])} of training is not paid back by cheaper queries.")
    return (f" Break-even: the soft prompt's {_secs(be['one_off_s'])} of training (less the hard prompt's search) "
            f"is paid back by its faster queries ({lat}) after {be['queries']:,} queries.")


def decide(hard: dict | None, soft: dict | None, gold, n_labels: int, *, metric: str = "macro_f1",
           majority: float | None = None, n_boot: int = N_BOOT, seed: int = 0, valid_gold=None,
           labels: list[str] | None = None) -> dict[str, Any] | None:
    """The decision block of a comparison (kept in ``results.json`` and rendered first).

    ``hard`` and ``soft`` are the candidates :func:`select` chose, each a dict with ``name``,
    ``valid`` and ``test`` metrics, ``predictions`` (label indices on the test examples, in
    ``gold``'s order) and ``cost`` (``train_s``, ``search_s``, ``tokens_added``, ``latency_ms``).
    The rule: deploy the soft prompt only when it is not worse than the hard prompt on validation
    (when there is validation data; ``metric``, then the other metric) AND the test interval of
    the ``metric`` difference lies above zero.  With ``valid_gold`` (validation label indices) a
    prompt must also beat always answering the majority label there (``floor``), else neither is
    recommended (``deploy`` "neither"); ``break_even`` says when training pays for itself."""
    if hard is None and soft is None:
        return None
    name = METRIC_NAMES.get(metric, metric)
    floor = majority_floor(valid_gold, n_labels, labels, metric)
    if floor is not None:
        floor.update({"hard_beats": beats_floor(hard, floor, metric), "soft_beats": beats_floor(soft, floor, metric)})
        floor["beaten"] = bool(floor["hard_beats"] or floor["soft_beats"])
    be = break_even(hard, soft)
    out: dict[str, Any] = {"select_metric": metric, "majority_rate": majority, "n_test": len(gold),
                           "hard": _public(hard, majority), "soft": _public(soft, majority), "floor": floor,
                           "break_even": be}
    if floor is not None and not floor["beaten"]:
        chosen = " nor ".join(f"the {k} prompt *{c['name']}* ({name} {100 * c['valid'][metric]:.1f})"
                              for k, c in (("hard", hard), ("soft", soft)) if c is not None)
        out.update({"deploy": "neither", "difference": None, "mcnemar": None, "significant": None, "recommendation": (
            f"Deploy neither: neither {chosen} beats {_floor_text(floor, metric)} on the validation data, at this "
            f"data size and model. More data, another model or other prompts may; "
            f"a constant answer needs no model at all.")})
        return out
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
    text += _break_even_text(be)
    mc_significant = mc["p_value"] < 1 - LEVEL
    if mc_significant != significant and not worse_on_valid:
        text += (f" The two paired tests disagree (McNemar {'is' if mc_significant else 'is not'} significant, the "
                 f"{name} interval {'spans' if not significant else 'excludes'} zero): the rule follows the interval, "
                 f"because it measures the selection metric and the size of the difference, while McNemar counts "
                 f"only the examples exactly one prompt gets right (accuracy).")
    if floor is not None and not floor[f"{deploy}_beats"]:
        text += f" Note: the {deploy} prompt does not beat {_floor_text(floor, metric)} on validation."
    out.update({"deploy": deploy, "difference": diff, "mcnemar": mc, "significant": significant,
                "tests_agree": mc_significant == significant, "soft_worse_on_validation": worse_on_valid,
                "recommendation": text,
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
                                  **({"selection": v["selection"], "selection_n": v.get("selection_n")}
                                     if v.get("selection") else {}),
                                  "predictions": v["predictions"], "valid_predictions": v.get("valid_predictions"),
                                  "cost": cost,
                                  **({"artifact": rec["artifact"]} if rec.get("artifact") else {})})
    return out["hard"], out["soft"]


def from_results(results: dict[str, Any], metric: str | None = None, *, n_boot: int = N_BOOT, seed: int = 0,
                 max_latency_ms: float | None = None) -> dict[str, Any] | None:
    """The decision block of a comparison, a function of its ``results.json`` alone (classification
    tasks; None for generation or when nothing competed).  Candidates slower than ``max_latency_ms``
    per query (default: the comparison's ``--max-latency-ms``) are ruled out before choosing;
    ``stability`` reruns the choice on resamples of the validation examples."""
    data = results.get("data") or {}
    gold = data.get("test_gold")
    if (results.get("task") or {}).get("kind") != "classification" or not gold:
        return None
    config = results.get("config") or {}
    metric = metric or config.get("select_metric") or "macro_f1"
    max_ms = max_latency_ms if max_latency_ms is not None else config.get("max_latency_ms")
    hard, soft = candidates(results)
    counts = {"hard": len(hard), "soft": len(soft)}
    (hard, slow_h), (soft, slow_s) = within_latency(hard, max_ms), within_latency(soft, max_ms)
    limit = None if max_ms is None else {"max_ms": max_ms, "ruled_out": {"hard": len(slow_h), "soft": len(slow_s)}}
    if limit and not hard and not soft and (slow_h or slow_s):
        return {"select_metric": metric, "deploy": None, "latency_limit": limit, "candidates": counts,
                "recommendation": f"No decision: every candidate is slower than {max_ms:g} ms per query "
                                  "(--max-latency-ms)."}
    h, s = select(hard, metric), select(soft, metric)
    if (h is None and hard) or (s is None and soft):  # no validation data: nothing may be chosen on test
        return {"select_metric": metric, "deploy": None, "recommendation": (
            "No decision: without validation data no prompt can be chosen except by its test score, which "
            "this comparison does not do. Give validation data (--valid-file, or a training pool large enough "
            "to hold some out).")}
    labels = list((results.get("task") or {}).get("verbalizer") or {})
    n_labels = len(labels) or (max(gold) + 1)
    valid_gold = data.get("valid_gold")
    out = decide(h, s, gold, n_labels, metric=metric, majority=data.get("majority_accuracy"), n_boot=n_boot, seed=seed,
                 valid_gold=valid_gold, labels=labels or None)
    if out is not None:
        out["candidates"] = counts
        n_valid = len(valid_gold or [])
        out["selection_n"] = {side: (c.get("selection_n") or n_valid) if c else None for side, c in (("hard", h), ("soft", s))}
        out["latency_limit"] = limit
        if limit and (slow_h or slow_s):
            out["recommendation"] += (f" Ruled out before choosing, slower than {max_ms:g} ms per query: "
                                      f"{len(slow_h)} hard and {len(slow_s)} soft candidates.")
        st = stability(hard, soft, valid_gold, gold, n_labels, metric=metric, decision=out["deploy"], seed=seed,
                       n_boot=n_boot)
        out["stability"] = st
        if st is not None:
            out["recommendation"] += " " + stability_text(st, out["deploy"])
    return out


def stability_text(st: dict, deploy: str) -> str:
    """"The same recommendation in 94% of 200 resamples of the validation examples" and its split."""
    split = ", ".join(f"{k} {v}" for k, v in st["counts"].items() if v)
    same = "" if st.get("same_prompts") is None else (
        f"; the same two prompts were chosen in {100 * st['same_prompts']:.0f}%")
    return (f"Stability: {deploy} in {100 * st['agreement']:.0f}% of {st['resamples']} resamples of the validation "
            f"examples (each family's best and the decision rerun on each: {split}{same}).")
