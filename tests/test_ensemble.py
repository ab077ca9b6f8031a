"""Prompt ensembles: one batched pass equals N separate evaluations (1e-5), one context pass
per batch, and the combine rules."""
import pytest
import torch

from softprompt.core.bank import PromptBank
from softprompt.apps.ensemble import combine, ensemble_classify
from softprompt.core.scoring import classify
from softprompt.data import Example
from softprompt.testing import tiny_causal_lm, tiny_tokenizer

VERB = {"neg": " no", "pos": " yes"}
TEXTS = ["good movie", "bad film", "love this movie a lot", "awful", "great great film", "hate it",
         "the service was slow and broken", "thanks", "amazing", "terrible order refund please", "fast help"]
EXAMPLES = [Example({"text": t}, "pos" if i % 2 == 0 else "neg") for i, t in enumerate(TEXTS)]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _bank():
    model, tok = tiny_causal_lm(), tiny_tokenizer()
    bank = PromptBank(model, tok)
    g = torch.Generator().manual_seed(0)
    d = model.config.hidden_size
    bank.add("a", "{soft:4} review : {text} label :", torch.randn(4, d, generator=g), verbalizer=VERB)
    bank.add("b", "{soft:7} review : {text} label :", torch.randn(7, d, generator=g), verbalizer=VERB)
    bank.add("c", "is it good ? review : {text} {soft:2} label :", torch.randn(2, d, generator=g), verbalizer=VERB)
    bank.add("hard", "review : {text} label :", verbalizer=VERB)
    return bank


def test_ensemble_equals_separate_evaluations():
    bank = _bank()
    members = ["a", "b", "c", "hard"]
    res = ensemble_classify(bank, members, EXAMPLES, batch_size=8)
    assert res.member_scores.shape == (4, len(EXAMPLES), 2)
    for j, name in enumerate(members):
        single = classify(bank, name, EXAMPLES, batch_size=3)
        torch.testing.assert_close(res.member_scores[j], single.scores, atol=1e-5, rtol=1e-5)
        assert res.member_predictions[j] == single.predictions
        assert res.metrics["members"][j]["accuracy"] == single.metrics["accuracy"]
    mean = torch.stack([classify(bank, n, EXAMPLES).probabilities for n in members]).mean(0)
    assert res.predictions["mean"] == [res.labels[i] for i in mean.argmax(-1).tolist()]
    assert set(res.metrics) == {"mean", "vote", "members"}


def test_one_context_pass_per_batch():
    bank = _bank()
    members = ["a", "b", "c"]
    ensemble_classify(bank, members, EXAMPLES[:2])  # computes and caches each member's prefix
    rows = []
    orig = bank.model.base_model.forward

    def counting(*a, **kw):
        rows.append(kw["inputs_embeds"].shape[0] if kw.get("inputs_embeds") is not None else kw["input_ids"].shape[0])
        return orig(*a, **kw)

    bank.model.base_model.forward = counting
    try:
        res = ensemble_classify(bank, members, EXAMPLES, batch_size=12)  # 12 rows = 4 examples x 3 prompts
    finally:
        bank.model.base_model.forward = orig
    assert res.n_batches == 3  # ceil(11 / 4)
    assert len(rows) == res.n_batches, "one forward pass per batch (label words are single tokens)"
    assert rows == [12, 12, 9]  # every example replicated once per member prompt


def test_combine_rules():
    # 3 members, 2 examples, 3 labels
    p = torch.tensor([
        [[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]],
        [[0.5, 0.4, 0.1], [0.1, 0.1, 0.8]],
        [[0.0, 0.9, 0.1], [0.4, 0.4, 0.2]],  # argmax tie on example 2 -> label 0 (first max)
    ])
    assert combine(p, "mean").tolist() == [1, 2]  # means [0.367, 0.533, 0.1] and [0.233, 0.333, 0.433]
    # votes: example 1 -> label 0 twice; example 2 -> labels 1, 2, 0 once each: the tie goes to the
    # label with the highest mean probability (2)
    assert combine(p, "vote").tolist() == [0, 2]
    with pytest.raises(ValueError, match="combine"):
        combine(p, "max")


def test_members_must_share_labels():
    bank = _bank()
    bank.add("other", "review : {text} label :", verbalizer={"x": " yes", "y": " no"})
    with pytest.raises(ValueError, match="label set"):
        ensemble_classify(bank, ["a", "other"], EXAMPLES)
