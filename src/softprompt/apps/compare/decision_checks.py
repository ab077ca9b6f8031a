"""Checks on a comparison's decision (issue 23): would it survive the selection it rests on?

Why a module apart from ``decision.py``: these are not the rule, they question it.

* **Majority floor** (:func:`majority_floor`, :func:`beats_floor`).  A prompt chosen as the best
  of its family can still be no better than always answering the most common label.  The floor
  is that constant answer, scored on the validation data and ranked by the selection rule itself
  (``decision._score``): when neither chosen prompt ranks above it, no prompt is recommended.
* **Stability** (:func:`stability`).  With a few dozen validation examples the best of many
  candidates is partly luck (the winner's curse).  The whole choice (each family's best, the
  floor, the hard-vs-soft rule) is rerun on bootstrap resamples of the validation examples, all
  candidates scored at once from their per-example validation predictions; the share of
  resamples that give the same recommendation says how much the choice rests on those examples.
* **Cost per query** (:func:`break_even`, :func:`within_latency`).  Training is a one-off cost;
  a prompt that is faster per query pays it back after some number of queries.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .decision_stats import LEVEL, N_BOOT, _score, _weighted_metrics, bootstrap_weights, select

__all__ = ["N_STABILITY", "beats_floor", "break_even", "majority_floor", "stability", "within_latency"]

N_STABILITY = 200
"""Validation resamples of :func:`stability`: enough to tell 94% from 70%, cheap on arrays."""


def _other(metric: str) -> str:
    return "accuracy" if metric != "accuracy" else "macro_f1"


def majority_floor(valid_gold, n_labels: int, labels: list[str] | None = None,
                   metric: str = "macro_f1") -> dict[str, Any] | None:
    """Always answering the most common validation label, scored like a candidate (``valid``:
    the selection metric and the other of macro-F1/accuracy)."""
    gold = np.asarray(valid_gold if valid_gold is not None else [], dtype=int)
    if gold.size == 0:
        return None
    label = int(np.bincount(gold, minlength=n_labels).argmax())
    m = _weighted_metrics(np.ones((1, gold.size)), gold, np.full(gold.size, label), n_labels)
    keys = dict.fromkeys((metric, _other(metric)))
    return {"label": labels[label] if labels and label < len(labels) else str(label), "label_index": label,
            "valid": {k: float(m[k][0]) for k in keys}}


def beats_floor(c: dict | None, floor: dict | None, metric: str) -> bool | None:
    """True when candidate ``c`` ranks above the constant answer by the selection rule on
    validation (the metric, then the other one; a tie does not beat it)."""
    if c is None or floor is None or not c.get("valid"):
        return None
    return _score(c, metric)[:2] > _score({"valid": floor["valid"]}, metric)[:2]


def within_latency(cands: list[dict], max_ms: float | None) -> tuple[list[dict], list[dict]]:
    """(kept, ruled out): candidates measured slower than ``max_ms`` per query at batch 1 are ruled
    out before choosing; one without a measured latency is kept (nothing says it is slow)."""
    if max_ms is None:
        return list(cands), []
    slow = [c for c in cands if ((c.get("cost") or {}).get("latency_ms") or 0.0) > max_ms]
    return [c for c in cands if c not in slow], slow


def break_even(hard: dict | None, soft: dict | None) -> dict[str, Any] | None:
    """After how many queries the soft prompt's one-off cost (its whole training search, less the
    hard prompt's search) is paid back by its lower latency per query.  ``queries`` is None when
    the soft prompt is not faster (it never pays back in time) and 0 when it cost no more."""
    if hard is None or soft is None:
        return None
    hc, sc = hard.get("cost") or {}, soft.get("cost") or {}
    h_ms, s_ms = hc.get("latency_ms"), sc.get("latency_ms")
    if h_ms is None or s_ms is None:
        return None
    one_off = max(0.0, (sc.get("train_s") or 0.0) - (hc.get("search_s") or 0.0))
    saved = h_ms - s_ms
    if one_off == 0.0:
        queries = 0
    elif saved <= 0:
        queries = None
    else:
        queries = int(np.ceil(one_off * 1000.0 / saved))
    return {"one_off_s": one_off, "hard_ms": h_ms, "soft_ms": s_ms, "saved_ms_per_query": saved, "queries": queries}


# ----------------------------------------------------------------------------- stability
def _family_choice(cands: list[dict], w: np.ndarray, gold: np.ndarray, n_labels: int, metric: str):
    """Index of :func:`decision.select`'s choice among ``cands`` on each resample (rows of ``w``),
    and the chosen candidates' (metric, other) scores: [B] ints, [B] floats, [B] floats."""
    other = _other(metric)
    per = [_weighted_metrics(w, gold, np.asarray(c["valid_predictions"], dtype=int), n_labels) for c in cands]
    m, o = np.stack([p[metric] for p in per]), np.stack([p[other] for p in per])  # [C, B]
    # select's tie-breaks after the two metrics are per candidate (cost, then order): a static rank
    static = sorted(range(len(cands)), key=lambda i: tuple(-x for x in _score(cands[i], metric)[2:]) + (i,))
    rank = np.empty(len(cands))
    rank[static] = np.arange(len(cands))
    best = m == m.max(axis=0)
    o_in = np.where(best, o, -np.inf)
    best &= o_in == o_in.max(axis=0)
    idx = np.where(best, rank[:, None], np.inf).argmin(axis=0)
    cols = np.arange(w.shape[0])
    return idx, m[idx, cols], o[idx, cols]


def stability(hard: list[dict], soft: list[dict], valid_gold, test_gold, n_labels: int, *, metric: str,
              decision: str | None, n_resamples: int = N_STABILITY, seed: int = 0, n_boot: int = N_BOOT,
              level: float = LEVEL) -> dict[str, Any] | None:
    """How often the recommendation stays ``decision`` ("hard", "soft" or "neither") when the
    validation examples are resampled with replacement ``n_resamples`` times.  Each resample
    reruns the whole choice: each family's best (``select``'s order), the majority floor, the
    "not worse on validation" check, then the pair's paired test interval on test (fixed per pair).
    None when a candidate has no per-example validation predictions (results of an older version)."""
    vg = np.asarray(valid_gold if valid_gold is not None else [], dtype=int)
    if not vg.size or not (hard or soft):
        return None
    if any(len(c.get("valid_predictions") or []) != vg.size for c in (*hard, *soft)):
        return None
    w = bootstrap_weights(vg.size, n_resamples, seed)
    other, cols = _other(metric), np.arange(n_resamples)
    # the floor: the majority label of each resample, scored on that resample
    consts = [_weighted_metrics(w, vg, np.full(vg.size, k), n_labels) for k in range(n_labels)]
    maj = (w @ np.eye(n_labels)[vg]).argmax(axis=1)
    fm = np.stack([c[metric] for c in consts])[maj, cols]
    fo = np.stack([c[other] for c in consts])[maj, cols]

    def above_floor(m, o):
        return (m > fm) | ((m == fm) & (o > fo))

    fams = {}
    for side, cands in (("hard", hard), ("soft", soft)):
        if cands:
            fams[side] = _family_choice(cands, w, vg, n_labels, metric)
    beats = np.zeros(n_resamples, dtype=bool)
    for idx, m, o in fams.values():
        beats |= above_floor(m, o)
    out = np.where(beats, "", "neither").astype(object)
    if len(fams) == 1:
        side = next(iter(fams))
        out[beats] = side
    else:
        (hi, hm, ho), (si, sm, so) = fams["hard"], fams["soft"]
        worse = (sm < hm) | ((sm == hm) & (so < ho))
        tg = np.asarray(test_gold, dtype=int)
        wt = bootstrap_weights(tg.size, n_boot, seed)  # decide()'s test resamples
        verdict: dict[tuple[int, int], str] = {}
        for b in np.flatnonzero(beats):
            pair = (int(hi[b]), int(si[b]))
            if worse[b]:
                out[b] = "hard"
                continue
            if pair not in verdict:
                h, s = hard[pair[0]]["predictions"], soft[pair[1]]["predictions"]
                diffs = (_weighted_metrics(wt, tg, np.asarray(s, dtype=int), n_labels)[metric]
                         - _weighted_metrics(wt, tg, np.asarray(h, dtype=int), n_labels)[metric])
                lo = np.quantile(diffs, (1 - level) / 2)
                full = (_weighted_metrics(np.ones((1, tg.size)), tg, np.asarray(s, dtype=int), n_labels)[metric]
                        - _weighted_metrics(np.ones((1, tg.size)), tg, np.asarray(h, dtype=int), n_labels)[metric])
                verdict[pair] = "soft" if lo > 0 and full[0] > 0 else "hard"  # decide(): soft only above zero
            out[b] = verdict[pair]
    same_pair = None
    if len(fams) == 2:
        h0, s0 = select(hard, metric), select(soft, metric)
        same_pair = float(np.mean((fams["hard"][0] == hard.index(h0)) & (fams["soft"][0] == soft.index(s0))))
    counts = {k: int(np.sum(out == k)) for k in ("hard", "soft", "neither")}
    return {"resamples": n_resamples, "seed": seed, "counts": counts, "same_prompts": same_pair,
            "agreement": None if decision is None else counts.get(decision, 0) / n_resamples}
