"""The decision statistics against reference computations: metrics as scoring computes them,
the paired bootstrap against a naive loop over the same resamples, McNemar against hand
computed exact binomial p-values, and selection that never reads test scores."""
import math
import random

import numpy as np
import pytest

from softprompt.apps.compare import decision as D
from softprompt.core.scoring import classification_metrics

LABELS = ["a", "b", "c"]


def _rand(n, seed, skew=0.0):
    rng = random.Random(seed)
    gold = [0 if rng.random() < skew else rng.randrange(3) for _ in range(n)]
    pa = [g if rng.random() < 0.6 else rng.randrange(3) for g in gold]
    pb = [g if rng.random() < 0.75 else rng.randrange(3) for g in gold]
    return gold, pa, pb


def _names(idx):
    return [LABELS[i] for i in idx]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_scoring(seed):
    gold, pa, _ = _rand(37, seed, skew=0.5)
    ref = classification_metrics(_names(gold), _names(pa), LABELS)
    assert D.metric_value(gold, pa, 3, "accuracy") == pytest.approx(ref["accuracy"])
    assert D.macro_f1(gold, pa, 3) == pytest.approx(ref["macro_f1"])
    recalls = [ref["confusion"][i][i] / sum(ref["confusion"][i]) for i in range(3) if sum(ref["confusion"][i])]
    assert D.metric_value(gold, pa, 3, "balanced_accuracy") == pytest.approx(sum(recalls) / len(recalls))


def test_constant_predictor_cannot_win_macro_f1():
    gold = [0] * 8 + [1] * 2
    const = [0] * 10
    assert D.metric_value(gold, const, 2, "accuracy") == 0.8
    assert D.majority_rate(gold) == 0.8
    assert D.at_or_below_majority(0.8, 0.8) and not D.at_or_below_majority(0.81, 0.8)
    assert D.macro_f1(gold, const, 2) <= 0.5  # at most 1 / n_labels


def test_paired_bootstrap_matches_a_naive_loop_over_the_same_resamples():
    gold, pa, pb = _rand(41, 3)
    res = D.paired_bootstrap(gold, pa, pb, 3, n_boot=300, seed=7)
    w = D.bootstrap_weights(41, 300, seed=7)
    diffs = {"accuracy": [], "macro_f1": []}
    for row in w:
        idx = [i for i, c in enumerate(row) for _ in range(int(c))]
        g, a, b = ([x[i] for i in idx] for x in (gold, pa, pb))
        ma, mb = classification_metrics(_names(g), _names(a), LABELS), classification_metrics(_names(g), _names(b), LABELS)
        for m in diffs:
            diffs[m].append(mb[m] - ma[m])
    for m in diffs:
        lo, hi = np.quantile(diffs[m], [0.025, 0.975])
        assert res[m]["low"] == pytest.approx(lo) and res[m]["high"] == pytest.approx(hi)
        full_a = classification_metrics(_names(gold), _names(pa), LABELS)[m]
        full_b = classification_metrics(_names(gold), _names(pb), LABELS)[m]
        assert res[m]["difference"] == pytest.approx(full_b - full_a)
        assert res[m]["low"] <= res[m]["difference"] <= res[m]["high"]


def test_paired_bootstrap_degenerate_cases():
    gold = [0, 1, 2, 0, 1, 2]
    same = D.paired_bootstrap(gold, gold, gold, 3, n_boot=50)
    assert same["accuracy"] == {"a": 1.0, "b": 1.0, "difference": 0.0, "low": 0.0, "high": 0.0}
    wrong = [1, 2, 0, 1, 2, 0]
    flip = D.paired_bootstrap(gold, wrong, gold, 3, n_boot=50)["accuracy"]
    assert (flip["difference"], flip["low"], flip["high"]) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="same examples"):
        D.paired_bootstrap(gold, gold[:5], gold, 3)


def test_mcnemar_exact_matches_hand_computation():
    # 1 example only a is right, 7 only b: two-sided exact p = 2 * (C(8,0) + C(8,1)) / 2^8
    gold = [0] * 10
    a = [0] + [1] * 7 + [0, 0]
    b = [1] + [0] * 7 + [0, 0]
    r = D.mcnemar_exact(gold, a, b)
    assert (r["a_only"], r["b_only"]) == (1, 7)
    assert r["p_value"] == pytest.approx(2 * (1 + 8) / 256)
    # balanced disagreement: p = 1; no disagreement: p = 1
    assert D.mcnemar_exact([0] * 4, [0, 1, 0, 0], [1, 0, 0, 0])["p_value"] == pytest.approx(1.0)
    assert D.mcnemar_exact(gold, gold, gold) == {"a_only": 0, "b_only": 0, "p_value": 1.0}
    # 0 vs 6: 2 * 0.5^6
    r = D.mcnemar_exact([0] * 6, [1] * 6, [0] * 6)
    assert r["p_value"] == pytest.approx(2 * 0.5 ** 6) and math.isclose(r["p_value"], 0.03125)


def test_selection_by_validation_ignores_test_scores():
    cands = [
        {"name": "test-best", "valid": {"macro_f1": 0.50, "accuracy": 0.7}, "test": {"macro_f1": 0.95, "accuracy": 0.95}},
        {"name": "valid-best", "valid": {"macro_f1": 0.60, "accuracy": 0.6}, "test": {"macro_f1": 0.40, "accuracy": 0.4}},
        {"name": "no validation", "valid": None, "test": {"macro_f1": 1.0, "accuracy": 1.0}},
    ]
    assert D.select(cands, "macro_f1")["name"] == "valid-best"
    assert D.select(cands, "accuracy")["name"] == "test-best"  # by validation accuracy, not test
    for c in cands:  # changing test scores never changes the choice
        c["test"] = {"macro_f1": random.random(), "accuracy": random.random()}
    assert D.select(cands, "macro_f1")["name"] == "valid-best"
    with pytest.raises(ValueError, match="selection metric"):
        D.select(cands, "loss")
    tie = [{"name": "slow", "valid": {"macro_f1": 0.5, "accuracy": 0.5}, "cost": {"train_s": 9}},
           {"name": "free", "valid": {"macro_f1": 0.5, "accuracy": 0.5}, "cost": {"train_s": 0}}]
    assert D.select(tie)["name"] == "free"


def _cand(name, preds, valid, cost=None):
    return {"name": name, "predictions": preds, "valid": {"macro_f1": valid, "accuracy": valid}, "test": {"accuracy": 0.5},
            "cost": cost or {}}


def test_decide_recommendations():
    rng = random.Random(0)
    gold = [rng.randrange(2) for _ in range(200)]
    good = [g if rng.random() < 0.95 else 1 - g for g in gold]
    coin = [g if rng.random() < 0.5 else 1 - g for g in gold]
    # soft much better on test and on validation: deploy soft, with its cost
    d = D.decide(_cand("hard", coin, 0.5), _cand("soft", good, 0.9, {"train_s": 12.0, "search_runs": 3, "tokens_added": 20}),
                 gold, 2, majority=D.majority_rate(gold))
    assert d["deploy"] == "soft" and d["significant"] and d["difference"]["macro_f1"]["low"] > 0
    assert "12 s of training (3 trainings searched)" in d["recommendation"] and "20 tokens" in d["recommendation"]
    assert "predictions" not in d["soft"]
    # the same test gain, but training did not beat the hard prompt on validation: keep the hard prompt
    d = D.decide(_cand("hard", coin, 0.8), _cand("soft", good, 0.7), gold, 2)
    assert d["deploy"] == "hard" and "did worse on validation" in d["recommendation"]
    # a tie on validation does not discard the trained prompt: the paired test decides
    d = D.decide(_cand("hard", coin, 0.8), _cand("soft", good, 0.8), gold, 2)
    assert d["deploy"] == "soft" and d["soft_worse_on_validation"] is False
    # no difference: the interval spans zero -> the hard prompt
    d = D.decide(_cand("hard", good, 0.5), _cand("soft", good, 0.9), gold, 2)
    assert d["deploy"] == "hard" and not d["significant"]
    assert d["recommendation"].startswith("No significant difference: use the hard prompt")
    # only one family
    assert D.decide(_cand("hard", good, 0.5), None, gold, 2)["deploy"] == "hard"
    assert D.decide(None, None, gold, 2) is None
