"""Calibration of rank classification on a tiny random model: each estimate equals a hand
computation (a plain forward pass over the whole token sequence, not the bank's cached path),
no estimate reads a label, and the calibration travels with a prompt artifact."""
import math
import random

import pytest
import torch

from softprompt.hard import baselines as B
from softprompt.core.bank import PromptBank
from softprompt.core.calibrate import fit_calibration
from softprompt.core.calibration import (
    CONTENT_FREE, Calibration, class_prior_from, premise_suffix_ids,
)
from softprompt.core.prompts import ModelIdentity, PromptFileError, SoftPrompt
from softprompt.core.scoring import classify
from softprompt.data import Example, Task
from softprompt.core.templates import Template, encode_text

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

TASK = Task(name="toy", kind="classification", template="{soft:3} review : {text} \n label :",
            verbalizer={"neg": " no", "pos": " yes", "meh": " maybe"}, instruction="is the review good ?")
TEXTS = ["good movie", "bad film", "love this movie", "awful film", "happy great", "sad awful", "slow film"]
LABELS = ["pos", "neg", "pos", "neg", "pos", "neg", "meh"]
DATA = [Example({"text": t}, lab) for t, lab in zip(TEXTS, LABELS)]


def hand_label_logprobs(model, tok, seqs_embeds, verbalizer) -> torch.Tensor:
    """[N, L] summed label log-probs, one full forward pass per (sequence, label)."""
    emb = model.get_input_embeddings()
    rows = []
    for seq in seqs_embeds:
        row = []
        for word in verbalizer.values():
            lab = encode_text(tok, word)
            x = torch.cat([seq, emb(torch.tensor(lab))])
            lp = model(inputs_embeds=x[None]).logits[0].float().log_softmax(-1)
            n = seq.shape[0]
            row.append(sum(float(lp[n - 1 + j, t]) for j, t in enumerate(lab)))
        rows.append(row)
    return torch.tensor(rows)


def embeds_of(model, ids: list[int], soft: torch.Tensor | None = None) -> torch.Tensor:
    emb = model.get_input_embeddings()
    parts = [soft[-i - 1][None] if i < 0 else emb(torch.tensor([i])) for i in ids]
    return torch.cat(parts)


def hand_prior(scores: torch.Tensor) -> list[float]:
    p = scores.exp() / scores.exp().sum(-1, keepdim=True)  # normalise over the labels by hand
    return [float(v) for v in torch.log(p.mean(0))]


@pytest.fixture(scope="module")
def setup(lm):
    model, tok = lm
    bank = PromptBank(model, tok)
    soft = torch.randn(3, model.config.hidden_size, generator=torch.Generator().manual_seed(1)) * 0.5
    bank.add("soft", TASK.template, soft, verbalizer=TASK.verbalizer)
    bank.add("zs", B.zero_shot_template(TASK), verbalizer=TASK.verbalizer)
    return model, tok, bank, soft


def full_ids(bank, name, fields):
    e = bank.entries[bank.index(name)]
    return e.prefix_ids + e.template.suffix_ids(bank.tokenizer, fields)


@torch.no_grad()
@pytest.mark.parametrize("name", ["zs", "soft"])
def test_contextual_equals_hand_computation(setup, name):
    model, tok, bank, soft = setup
    cal = fit_calibration(bank, name, "contextual")
    seqs = [embeds_of(model, full_ids(bank, name, {"text": cf}), soft) for cf in CONTENT_FREE]
    want = hand_prior(hand_label_logprobs(model, tok, seqs, TASK.verbalizer))
    assert cal.method == "contextual"
    assert cal.log_prior == pytest.approx(want, abs=1e-4)
    assert sum(torch.tensor(cal.log_prior).exp()) == pytest.approx(1.0, abs=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("name", ["zs", "soft"])
def test_batch_equals_hand_computation_and_reads_no_label(setup, name):
    model, tok, bank, soft = setup
    cal = fit_calibration(bank, name, "batch", inputs=DATA)
    seqs = [embeds_of(model, full_ids(bank, name, ex.fields), soft) for ex in DATA]
    assert cal.log_prior == pytest.approx(hand_prior(hand_label_logprobs(model, tok, seqs, TASK.verbalizer)), abs=1e-4)
    # labels removed, or shuffled: the same estimate
    unlabelled = [Example(ex.fields) for ex in DATA]
    shuffled_labels = LABELS[:]
    random.Random(0).shuffle(shuffled_labels)
    shuffled = [Example(ex.fields, lab) for ex, lab in zip(DATA, shuffled_labels)]
    assert fit_calibration(bank, name, "batch", inputs=unlabelled).log_prior == cal.log_prior
    assert fit_calibration(bank, name, "batch", inputs=shuffled).log_prior == cal.log_prior
    assert fit_calibration(bank, name, "batch", inputs=[ex.fields for ex in DATA]).log_prior == cal.log_prior


@torch.no_grad()
@pytest.mark.parametrize("name", ["zs", "soft"])
def test_pmi_equals_hand_computation(setup, name):
    model, tok, bank, soft = setup
    cal = fit_calibration(bank, name, "pmi")
    e = bank.entries[bank.index(name)]
    # the domain premise: the template's head, then what follows its last field (" \n label :")
    ids = e.prefix_ids + encode_text(tok, " \n label :")
    assert premise_suffix_ids(e.template, tok) == encode_text(tok, " \n label :")
    want = hand_prior(hand_label_logprobs(model, tok, [embeds_of(model, ids, soft)], TASK.verbalizer))
    assert cal.log_prior == pytest.approx(want, abs=1e-4)


def test_premise_keeps_soft_slots_after_the_field(lm):
    _, tok = lm
    t = Template("{soft:2} a {text} b {soft:3} c")
    ids = premise_suffix_ids(t, tok)
    assert ids == encode_text(tok, " b ") + [-3, -4, -5] + encode_text(tok, " c")
    # nothing after the last field: the template with its fields rendered empty; nothing at all is an error
    assert premise_suffix_ids(Template("review : {text} . {other}"), tok) == encode_text(tok, " .")
    with pytest.raises(ValueError, match="domain premise"):
        premise_suffix_ids(Template("{text}"), tok)


@torch.no_grad()
def test_classify_applies_calibration_and_keeps_raw_scores(setup):
    _, _, bank, _ = setup
    raw = classify(bank, "zs", DATA)
    assert raw.raw_scores is raw.scores and raw.calibration == "none"
    cal = Calibration("contextual", [-0.1, -2.0, -3.0])
    res = classify(bank, "zs", DATA, calibration=cal)
    want = raw.scores - torch.tensor(cal.log_prior)
    assert torch.allclose(res.scores, want) and torch.equal(res.raw_scores, raw.scores)
    assert torch.allclose(res.probabilities, want.softmax(-1))
    # calibrated probabilities are p(y|x) / p(y), renormalised
    p = raw.probabilities / torch.tensor(cal.log_prior).exp()
    assert torch.allclose(res.probabilities, p / p.sum(-1, keepdim=True), atol=1e-6)
    assert res.predictions == [res.labels[j] for j in want.argmax(-1).tolist()]
    assert res.metrics["accuracy"] == pytest.approx(sum(p == g for p, g in zip(res.predictions, LABELS)) / len(DATA))
    assert res.calibration == "contextual"
    assert classify(bank, "zs", DATA, calibration=Calibration()).predictions == raw.predictions


def test_calibration_validation_and_round_trip():
    c = Calibration("pmi", [-1.0, -0.5, -2.0])
    assert Calibration.from_dict(c.to_dict()) == c
    assert Calibration.from_dict(None) == Calibration() and Calibration.from_dict({}) == Calibration()
    assert torch.equal(Calibration().apply(torch.ones(2, 3)), torch.ones(2, 3))
    with pytest.raises(ValueError, match="unknown calibration"):
        Calibration("platt", [0.0])
    with pytest.raises(ValueError, match="needs a log_prior"):
        Calibration("batch")
    with pytest.raises(ValueError, match="non-finite"):
        Calibration("batch", [float("-inf"), 0.0])
    with pytest.raises(ValueError, match="3 labels"):
        c.apply(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="unlabelled inputs"):
        fit_calibration(None, 0, "batch")


def test_artifact_carries_calibration_and_old_files_load_as_none(tmp_path, lm):
    model, tok = lm
    ident = ModelIdentity.of(model)
    cal = Calibration("contextual", [-0.2, -1.9, -3.1])
    p = SoftPrompt(torch.randn(3, ident.hidden_size), ident, template=TASK.template, verbalizer=TASK.verbalizer,
                   calibration=cal)
    p.save(tmp_path / "a.safetensors")
    assert SoftPrompt.load(tmp_path / "a.safetensors").calibration == cal
    old = SoftPrompt(torch.randn(3, ident.hidden_size), ident, template=TASK.template, verbalizer=TASK.verbalizer)
    assert "calibration" not in old.metadata()  # a "none" calibration leaves the header as before
    old.save(tmp_path / "b.safetensors")
    assert SoftPrompt.load(tmp_path / "b.safetensors").calibration == Calibration()
    import json

    from safetensors.torch import save_file

    meta = p.metadata()
    meta["calibration"] = {"method": "batch", "log_prior": None}
    save_file({"prompt": p.embeddings}, str(tmp_path / "c.safetensors"), metadata={"softprompt": json.dumps(meta)})
    with pytest.raises(PromptFileError, match="bad calibration"):
        SoftPrompt.load(tmp_path / "c.safetensors")
    meta["calibration"] = {"method": "batch", "log_prior": [-0.1, -2.0]}  # 2 priors, 3 labels
    save_file({"prompt": p.embeddings}, str(tmp_path / "d.safetensors"), metadata={"softprompt": json.dumps(meta)})
    with pytest.raises(PromptFileError, match="2 log-priors for 3 labels"):
        SoftPrompt.load(tmp_path / "d.safetensors")


@torch.no_grad()
def test_hard_prompt_artifact_end_to_end(tmp_path, lm):
    """A hard prompt is a SoftPrompt with no soft slots: save, load, score with its calibration."""
    model, tok = lm
    ident = ModelIdentity.of(model)
    bank = PromptBank(model, tok)
    tpl = B.zero_shot_template(TASK)
    bank.add("zs", tpl, verbalizer=TASK.verbalizer)
    cal = fit_calibration(bank, "zs", "pmi")
    hp = SoftPrompt(torch.zeros(0, ident.hidden_size), ident, template=tpl, verbalizer=TASK.verbalizer,
                    task="toy", method="hard_prompt", calibration=cal)
    hp.save(tmp_path / "hard.safetensors")
    back = SoftPrompt.load(tmp_path / "hard.safetensors", model=model)
    assert back.n_tokens == 0 and back.calibration == cal and back.template == tpl
    bank.add_prompt(back, "loaded")
    a = classify(bank, "zs", DATA, calibration=cal)
    b = classify(bank, "loaded", DATA, calibration=back.calibration)
    assert a.predictions == b.predictions and torch.allclose(a.probabilities, b.probabilities)


@torch.no_grad()
def test_encoder_decoder_and_encoder_banks():
    """T5: every calibration fits through the decoder scorer, and pmi equals scoring the premise
    as the encoder input; an encoder head has no label words, so only batch applies there."""
    from softprompt.families.seq2seq import encode, label_logprobs
    from softprompt.testing import tiny_t5, tiny_tokenizer

    model, tok = tiny_t5(), tiny_tokenizer()
    bank = PromptBank(model, tok)
    bank.add("t5", B.zero_shot_template(TASK), verbalizer=TASK.verbalizer)
    for method in ("contextual", "batch", "pmi"):
        cal = fit_calibration(bank, "t5", method, inputs=DATA)
        assert len(cal.log_prior) == 3 and classify(bank, "t5", DATA, calibration=cal).calibration == method
    pmi = fit_calibration(bank, "t5", "pmi")
    raw = label_logprobs(bank, encode(bank, torch.tensor([0]), [encode_text(tok, " \n label :")]))[0]
    assert pmi.log_prior == pytest.approx(raw.log_softmax(-1).tolist(), abs=1e-5)

    from softprompt.families import ENCODER

    class EncoderLike:
        family = ENCODER

    with pytest.raises(ValueError, match="batch only"):
        fit_calibration(EncoderLike(), 0, "contextual")


@torch.no_grad()
def test_class_prior_aims_at_the_training_label_distribution(setup):
    _, _, bank, _ = setup
    pi = class_prior_from(DATA, TASK.labels)  # neg 3, pos 3, meh 1, each +1 -> 4/10, 4/10, 2/10
    assert pi == pytest.approx([0.4, 0.4, 0.2])
    plain = fit_calibration(bank, "zs", "batch", inputs=DATA)
    aimed = fit_calibration(bank, "zs", "batch", inputs=DATA, class_prior=pi)
    assert aimed.log_prior == pytest.approx([a - math.log(p) for a, p in zip(plain.log_prior, pi)], abs=1e-6)
    # the shift moves probability towards the frequent labels, by exactly pi
    raw = classify(bank, "zs", DATA).scores
    q_plain = plain.apply(raw).softmax(-1)
    q_aimed = aimed.apply(raw).softmax(-1)
    want = q_plain * torch.tensor(pi)
    assert torch.allclose(q_aimed, want / want.sum(-1, keepdim=True), atol=1e-5)
    with pytest.raises(ValueError, match="3 positive"):
        fit_calibration(bank, "zs", "pmi", class_prior=[0.5, 0.5])
    with pytest.raises(ValueError, match="labelled"):
        class_prior_from([Example({"text": "x"})], TASK.labels)
