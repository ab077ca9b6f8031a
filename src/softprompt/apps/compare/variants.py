"""Score one prompt under every calibration, on validation and test, from one pass each.

Why: a comparison treats "this prompt with that calibration" as one deployable candidate and
chooses among them on validation data (``decision.select``).  The label scores of a prompt do
not depend on the calibration, so each split is scored once (``scoring.classify`` keeps the
raw scores) and each calibration is a subtraction of its log-prior (``calibration.py``):
contextual and PMI priors cost a few extra passes, batch calibration is fitted on the
unlabelled inputs of the split it scores (validation inputs for the validation score, test
inputs for the test score), and no calibration ever reads a label.
"""
from __future__ import annotations

import time
from typing import Any

import torch

from ...core.calibration import Calibration, batch_calibration

from ...core.calibrate import fit_calibration
from ...core.scoring import classification_metrics, classify
from .decision import metric_value, select

__all__ = ["ensemble_variants", "score_calibrated", "score_variants", "summary_metrics", "unseen_pool",
           "variants_from_scores"]


def summary_metrics(gold: list[str], pred: list[str], labels: list[str], *, confusion: bool = False) -> dict[str, Any]:
    """classification_metrics plus balanced accuracy (the confusion matrix only when asked)."""
    m = classification_metrics(gold, pred, labels)
    pos = {lab: i for i, lab in enumerate(labels)}
    m["balanced_accuracy"] = metric_value([pos[g] for g in gold], [pos[p] for p in pred], len(labels),
                                          "balanced_accuracy")
    if not confusion:
        m.pop("confusion", None)
    return m


def _predict(scores: torch.Tensor, cal: Calibration, labels: list[str]) -> list[str]:
    return [labels[j] for j in cal.apply(scores).argmax(-1).tolist()]


def score_variants(bank, entry, valid, test, calibrations, *, batch_size: int = 32,
                   select_metric: str = "macro_f1", extra=None) -> dict[str, Any]:
    """``{"variants": {cal: {"valid", "test", "predictions", "calibration"}}, "calibration": chosen,
    "metrics": chosen test metrics (with confusion), "valid_metrics": chosen validation metrics,
    "valid_s": seconds spent scoring validation (the selection's cost)}``.

    ``predictions`` are label indices on ``test`` (for the paired test of ``decision``),
    ``valid_predictions`` on ``valid`` (for the decision's stability under resampling);
    ``calibration`` is the fitted prior applied to test (what a deployed prompt would carry).
    The run's own choice among its calibrations is the best on validation by ``select_metric``
    (without validation data: the first of ``calibrations``).  ``extra``: further labelled examples
    the prompt never saw (a hand-written prompt's share of the training pool): each variant then
    also has ``selection`` metrics on validation + ``extra`` (``selection_n`` examples), which the
    choice reads instead (``decision_stats.selection_metrics``)."""
    cals = list(dict.fromkeys(calibrations)) or ["none"]
    res_test = classify(bank, entry, test, batch_size=batch_size)
    labels = res_test.labels
    raw_test = res_test.raw_scores if res_test.raw_scores is not None else res_test.scores
    raw_valid, valid_s = None, 0.0
    if valid:
        t0 = time.perf_counter()
        r = classify(bank, entry, valid, batch_size=batch_size)
        raw_valid = r.raw_scores if r.raw_scores is not None else r.scores
        if extra:
            r = classify(bank, entry, extra, batch_size=batch_size)
            raw_valid = torch.cat([raw_valid, r.raw_scores if r.raw_scores is not None else r.scores])
        valid_s = time.perf_counter() - t0
    n_valid = len(valid or [])
    sel_gold = [ex.label for ex in [*(valid or []), *(extra or [])]]
    gold_test = [ex.label for ex in test]
    variants: dict[str, dict[str, Any]] = {}
    for method in cals:
        if method == "batch":  # fit_calibration(..., "batch", inputs=split) from the scores already computed
            cal_test = batch_calibration(raw_test)
            cal_valid = batch_calibration(raw_valid) if raw_valid is not None else None
        else:
            cal_test = cal_valid = fit_calibration(bank, entry, method, batch_size=batch_size)
        pred = _predict(raw_test, cal_test, labels)
        v = {"test": summary_metrics(gold_test, pred, labels), "calibration": cal_test.to_dict(),
             "predictions": [labels.index(p) for p in pred], "valid": None}
        if raw_valid is not None:
            sp = _predict(raw_valid, cal_valid, labels)  # validation, then the extra examples
            vp = sp[:n_valid]
            v["valid"] = summary_metrics([ex.label for ex in valid], vp, labels)
            v["valid_predictions"] = [labels.index(p) for p in vp]  # decision_checks.stability resamples them
            if extra:
                v["selection"] = summary_metrics(sel_gold, sp, labels)
                v["selection_n"] = len(sp)
        variants[method] = v
    chosen = select([{"name": k, **v} for k, v in variants.items()], select_metric) if valid else None
    name = chosen["name"] if chosen else cals[0]
    pred = [labels[i] for i in variants[name]["predictions"]]
    return {"variants": variants, "calibration": name, "metrics": summary_metrics(gold_test, pred, labels, confusion=True),
            "valid_metrics": variants[name]["valid"], "valid_s": valid_s}


def variants_from_scores(labels: list[str], valid, test, valid_scores: dict | None, test_scores: dict,
                         calibrations, select_metric: str = "macro_f1") -> dict[str, Any]:
    """As :func:`score_variants`, from label scores already calibrated per method
    (``{calibration: [N, L] scores}`` for test, and for validation when there is any): for methods
    whose prompt differs per input (nearest-neighbour demonstrations, two-stage reasoning)."""
    gold_test = [ex.label for ex in test]
    variants: dict[str, dict[str, Any]] = {}
    for method in calibrations:
        pred = [labels[j] for j in test_scores[method].argmax(-1).tolist()]
        v = {"test": summary_metrics(gold_test, pred, labels), "calibration": {"method": method},
             "predictions": [labels.index(p) for p in pred], "valid": None}
        if valid_scores is not None and valid:
            vp = [labels[j] for j in valid_scores[method].argmax(-1).tolist()]
            v["valid"] = summary_metrics([ex.label for ex in valid], vp, labels)
            v["valid_predictions"] = [labels.index(p) for p in vp]
        variants[method] = v
    chosen = select([{"name": k, **v} for k, v in variants.items()], select_metric) if valid_scores else None
    name = chosen["name"] if chosen else list(variants)[0]
    pred = [labels[i] for i in variants[name]["predictions"]]
    return {"variants": variants, "calibration": name, "metrics": summary_metrics(gold_test, pred, labels, confusion=True),
            "valid_metrics": variants[name]["valid"]}


def unseen_pool(comp, name: str) -> list:
    """The training-pool examples a hand-written prompt's text does not contain (few-shot: all but
    its demonstrations; zero-shot: all): free selection data, since such a prompt trains nothing.
    An example counts as used when any of its field values appears in the template (conservative)."""
    text = comp.bank.entries[comp.bank.index(name)].template.text
    return [ex for ex in comp.pool if not any(str(v).strip() and str(v).strip() in text for v in ex.fields.values())]


def score_calibrated(comp, name: str, calibrations, *, free_selection: bool = False) -> dict[str, Any]:
    """Classification on validation and test under each calibration (variants.py); the record
    fields shared by hard and soft runs.  ``free_selection`` (hand-written prompts built without the
    training pool): also scored on the pool examples the prompt does not contain (:func:`unseen_pool`),
    which its choice then reads."""
    t = time.perf_counter()
    extra = unseen_pool(comp, name) if free_selection and comp.valid else None
    sv = score_variants(comp.bank, name, comp.valid, comp.test, calibrations, batch_size=comp.cfg.eval_batch_size,
                        select_metric=comp.cfg.select_metric, extra=extra)
    wall = time.perf_counter() - t - sv["valid_s"]
    lat = comp._latency(lambda exs, bs: classify(comp.bank, name, exs, batch_size=bs), comp.test)
    return {"metrics": sv["metrics"], "latency": lat, "eval_wall_s": wall, "valid_wall_s": sv["valid_s"],
            "valid_metrics": sv["valid_metrics"], "calibration": sv["calibration"], "variants": sv["variants"]}


def ensemble_variants(comp, names: list[str], res) -> tuple[dict, float]:
    """The mean-probability ensemble as one uncalibrated candidate (validation + test predictions)."""
    from ..ensemble import ensemble_classify

    labels = res.labels
    pred = res.predictions["mean"]
    v: dict[str, Any] = {"test": summary_metrics([ex.label for ex in comp.test], pred, labels),
                         "predictions": [labels.index(p) for p in pred], "calibration": {"method": "none"},
                         "valid": None}
    t = time.perf_counter()
    if comp.valid:
        rv = ensemble_classify(comp.bank, names, comp.valid, batch_size=comp.cfg.eval_batch_size * len(names))
        v["valid"] = summary_metrics([ex.label for ex in comp.valid], rv.predictions["mean"], labels)
        v["valid_predictions"] = [labels.index(p) for p in rv.predictions["mean"]]
    return {"none": v}, time.perf_counter() - t
