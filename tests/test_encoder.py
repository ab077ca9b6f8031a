"""Tests for softprompt.families.encoder: soft prompt + classification head on a frozen BERT-family encoder.

Mechanics run on a tiny random BERT (and a word-level tokenizer with BERT's [CLS]/[SEP]
layout) in seconds; the real all-MiniLM-L6-v2 check skips when its package is missing.
"""
from __future__ import annotations

import random

import pytest
import torch

from softprompt.families import encoder as enc
from softprompt.families.encoder import EncoderBank, classify, encoder_template
from softprompt.training.encoder_head import train_encoder_prompt
from softprompt.families import is_encoder_config
from softprompt.core.prompts import PromptFileError, PromptMismatchError, SoftPrompt
from softprompt.data import Example, Task
from softprompt.testing import TINY_WORDS, tiny_device
from softprompt.training.prompt import TrainConfig, train_prompt

pytestmark = pytest.mark.usefixtures("one_thread")

HIDDEN = 32


def tiny_bert_tokenizer():
    """Word-level tokenizer that adds [CLS] a [SEP] (b [SEP]) with token types, like BERT's."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for w in [*TINY_WORDS, *".,!?"]:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def tiny_bert(seed: int = 0, max_positions: int = 64):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(TINY_WORDS) + 16, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=max_positions, type_vocab_size=2, pad_token_id=0)
    model = BertModel(cfg).eval().to(tiny_device())
    for p in model.parameters():
        p.requires_grad_(False)
    model.softprompt_name = f"tiny-bert-{seed}"
    return model


@pytest.fixture(scope="module")
def bert():
    return tiny_bert(), tiny_bert_tokenizer()


SENTIMENT = Task(name="toy", kind="classification", template="{soft:4} Review: {text}\nSentiment:",
                 verbalizer={"negative": " negative", "positive": " positive"})
GOOD = ["good", "great", "amazing", "love", "happy", "thanks", "fast"]
BAD = ["bad", "awful", "terrible", "hate", "sad", "slow", "broken"]


def toy_examples(n: int, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        pos = rng.random() < 0.5
        words = rng.sample(GOOD if pos else BAD, 2) + rng.sample(["the", "movie", "film", "service", "it", "was"], 3)
        rng.shuffle(words)
        out.append(Example(fields={"text": " ".join(words)}, label="positive" if pos else "negative"))
    return out


def random_entry(bank: EncoderBank, name: str, n_soft: int, labels, seed: int, pooling="mean", fields=("text",)):
    g = torch.Generator().manual_seed(seed)
    soft = torch.randn(n_soft, HIDDEN, generator=g) if n_soft else None
    return bank.add(name, labels, fields=fields, soft=soft, weight=torch.randn(len(labels), HIDDEN, generator=g),
                    bias=torch.randn(len(labels), generator=g), pooling=pooling)


# ----------------------------------------------------------------------------- detection / loading
def test_family_detection():
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        BertConfig,
        DistilBertConfig,
        GPT2Config,
        LlamaConfig,
        RobertaConfig,
        T5Config,
    )

    from softprompt.families.loading import _auto_class

    assert is_encoder_config(BertConfig()) and is_encoder_config(RobertaConfig()) and is_encoder_config(DistilBertConfig())
    assert not is_encoder_config(BertConfig(is_decoder=True))
    assert not any(is_encoder_config(c) for c in (LlamaConfig(), GPT2Config(), T5Config()))
    assert _auto_class(BertConfig()) is AutoModel
    assert _auto_class(LlamaConfig()) is AutoModelForCausalLM


def test_bank_refuses_decoder_model(lm):
    model, tok = lm
    with pytest.raises(ValueError, match="not an encoder-only model"):
        EncoderBank(model, tok)


# ----------------------------------------------------------------------------- shapes and inputs
def test_input_layout_and_shapes(bert):
    model, tok = bert
    bank = EncoderBank(model, tok)
    e = random_entry(bank, "a", 3, ["x", "y", "z"], seed=1)
    (ids, types), = bank.encode(e, [Example(fields={"text": "good movie"})])
    assert ids[0] == tok.cls_token_id and ids[1:4] == [-1, -2, -3] and ids[-1] == tok.sep_token_id
    assert len(ids) == 3 + 4 and types == [0] * len(ids)
    pair = random_entry(bank, "pair", 2, ["x", "y"], seed=2, fields=("premise", "hypothesis"))
    (ids, types), = bank.encode(pair, [Example(fields={"premise": "good", "hypothesis": "bad movie"})])
    assert ids[1:3] == [-1, -2] and ids.count(tok.sep_token_id) == 2
    assert types == [0, 0, 0, 0, 0, 1, 1, 1]
    exs = toy_examples(5)
    assert bank.pooled([e] * 5, exs).shape == (5, HIDDEN)
    assert bank.logits([e] * 5, exs).shape == (5, 3)
    res = classify(bank, "a", exs + [Example(fields={"text": "it"})])
    assert res.probabilities.shape == (6, 3) and torch.allclose(res.probabilities.sum(-1), torch.ones(6))
    assert res.metrics == {}  # unlabeled example: no metrics


def test_truncation_keeps_room_for_soft_tokens(bert):
    model, tok = bert
    bank = EncoderBank(model, tok)
    assert bank.max_length == 64
    e = random_entry(bank, "a", 20, ["x", "y"], seed=1)
    long = Example(fields={"text": " ".join(["good"] * 200)})
    (ids, _), = bank.encode(e, [long])
    assert len(ids) == 64 and ids[-1] == tok.sep_token_id
    assert torch.isfinite(bank.logits([e], [long])).all()
    with pytest.raises(ValueError, match="no room"):
        bank.add("huge", ["x", "y"], soft=torch.zeros(62, HIDDEN))
    with pytest.raises(ValueError, match="do not fit"):
        bank.add("bad", ["x", "y"], soft=torch.zeros(2, HIDDEN + 1))
    with pytest.raises(ValueError, match="needs fields"):
        bank.logits([e], [Example(fields={"sentence": "good"})])


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_padding_invariance(bert, pooling):
    model, tok = bert
    bank = EncoderBank(model, tok)
    e = random_entry(bank, "a", 4, ["x", "y"], seed=3, pooling=pooling)
    short = Example(fields={"text": "good"})
    longer = Example(fields={"text": "the movie was not good but the service was great and fast"})
    alone = bank.logits([e], [short])
    padded = bank.logits([e, e], [short, longer])
    assert torch.allclose(alone[0], padded[0], atol=1e-5)
    assert not torch.allclose(padded[0], padded[1], atol=1e-3)


def test_mixed_batch_equals_one_by_one(bert):
    model, tok = bert
    bank = EncoderBank(model, tok)
    a = random_entry(bank, "a", 4, ["x", "y"], seed=1)
    b = random_entry(bank, "b", 0, ["p", "q", "r"], seed=2, pooling="cls")  # head only, more labels
    c = random_entry(bank, "c", 7, ["x", "y"], seed=3)
    exs = toy_examples(9, seed=5)
    idx = [a, b, c, c, a, b, b, a, c]
    mixed = bank.logits(idx, exs)
    assert mixed.shape == (9, 3)
    for i, (e, ex) in enumerate(zip(idx, exs)):
        one = bank.logits([e], [ex])[0]
        n = len(bank.entries[e].labels)
        assert torch.allclose(mixed[i, :n], one, atol=1e-5), i
        assert torch.isinf(mixed[i, n:]).all() and (mixed[i, n:] < 0).all()
    assert mixed[[0, 4, 7], :2].softmax(-1).sum(-1).allclose(torch.ones(3))


# ----------------------------------------------------------------------------- training
def one_step_prompt(model, tok) -> SoftPrompt:
    """A real encoder artifact (prompt + head) after one training step: for save/load/refusal checks."""
    return train_encoder_prompt(model, tok, SENTIMENT, toy_examples(8), None, TrainConfig(max_steps=1, init="random"),
                                progress=False).prompt


def test_training_freezes_encoder_and_loss_falls(bert, tmp_path):
    model, tok = bert
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train, valid = toy_examples(96, seed=1), toy_examples(32, seed=2)
    cfg = TrainConfig(epochs=3, batch_size=8, lr=0.1, warmup_steps=2, eval_every=12, init="random", seed=0)
    res = train_encoder_prompt(model, tok, SENTIMENT, train, valid, cfg, head_lr=0.2, out_dir=tmp_path,
                               progress=False)
    assert not any(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the encoder changed"
    first = sum(h["loss"] for h in res.history[:6]) / 6
    last = sum(h["loss"] for h in res.history[-6:]) / 6
    assert last < 0.3 * first, (first, last)
    sp = res.prompt
    assert sp.method == enc.METHOD_PROMPT and sp.n_tokens == 4 and sp.template == "{soft:4} {text}"
    assert sp.head["weight"].shape == (2, HIDDEN) and sp.head["bias"].shape == (2,)
    assert sp.n_params == 4 * HIDDEN + 2 * HIDDEN + 2
    assert (tmp_path / "prompt.safetensors").exists()
    bank = EncoderBank(model, tok)
    acc = classify(bank, bank.add_prompt(sp), valid).metrics["accuracy"]
    # the saved (folded) head reproduces the best validation; the toy task is learnable, far above chance
    assert max(h["valid"]["accuracy"] for h in res.history if "valid" in h) == acc
    assert acc >= 0.75, acc


@pytest.mark.parametrize("n_tokens", [4, 0])
def test_interrupted_training_resumes_to_the_same_prompt_and_head(bert, tmp_path, monkeypatch, n_tokens):
    """A run that dies after a checkpoint and is resumed ends where an uninterrupted one ends
    (validation-based selection and optimizer state included)."""
    model, tok = bert
    train, valid = toy_examples(32, seed=1), toy_examples(16, seed=2)
    cfg = TrainConfig(epochs=3, batch_size=8, lr=0.1, warmup_steps=2, eval_every=4, init="random", seed=0)
    kw = dict(n_tokens=n_tokens, head_lr=0.2, progress=False)
    whole = train_encoder_prompt(model, tok, SENTIMENT, train, valid, cfg, out_dir=tmp_path / "a", **kw)

    calls = {"n": 0}
    real = EncoderBank.logits if n_tokens else EncoderBank.head_logits

    def dies_after_six_steps(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 7 + 6 // 4:  # the 7th training step (validations call it too)
            raise KeyboardInterrupt("killed")
        return real(self, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(EncoderBank, "logits" if n_tokens else "head_logits", dies_after_six_steps)
        with pytest.raises(KeyboardInterrupt):
            train_encoder_prompt(model, tok, SENTIMENT, train, valid, cfg, out_dir=tmp_path / "b", **kw)
    from softprompt.training.checkpoint import CHECKPOINT, load_checkpoint

    assert 0 < load_checkpoint(tmp_path / "b" / CHECKPOINT)[1]["step"] < whole.steps  # died mid-run
    resumed = train_encoder_prompt(model, tok, SENTIMENT, train, valid, cfg, out_dir=tmp_path / "b", resume=True, **kw)
    assert resumed.steps == whole.steps and resumed.best_step == whole.best_step
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in whole.history], abs=1e-6)
    torch.testing.assert_close(resumed.prompt.embeddings, whole.prompt.embeddings, atol=1e-6, rtol=0)
    for k in ("weight", "bias"):
        torch.testing.assert_close(resumed.prompt.head[k], whole.prompt.head[k], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="different config"):
        train_encoder_prompt(model, tok, SENTIMENT, train, valid, TrainConfig(epochs=4), out_dir=tmp_path / "b",
                             resume=True, **kw)


def test_head_only_is_a_linear_probe(bert):
    model, tok = bert
    train = toy_examples(48, seed=1)
    cfg = TrainConfig(epochs=8, batch_size=8, warmup_steps=0, seed=0)
    res = train_encoder_prompt(model, tok, SENTIMENT, train, None, cfg, n_tokens=0, head_lr=0.2, progress=False)
    sp = res.prompt
    assert sp.n_tokens == 0 and sp.method == enc.METHOD_HEAD_ONLY and sp.template == "{text}"
    assert res.history[-1]["loss"] < 0.5 * res.history[0]["loss"]
    # cached features in training must give the same predictions as running the encoder
    bank = EncoderBank(model, tok)
    e = bank.add_prompt(sp)
    feats = enc._features(bank, e, train, 16)
    assert torch.allclose(bank.head_logits([e] * len(train), feats), bank.logits([e] * len(train), train), atol=1e-5)


def test_train_prompt_dispatches_to_encoder(bert):
    model, tok = bert
    res = train_prompt(model, tok, SENTIMENT, toy_examples(8), None, TrainConfig(max_steps=2, init="random"),
                       progress=False)
    assert res.prompt.head is not None and res.prompt.method == enc.METHOD_PROMPT and res.steps == 2
    assert res.prompt.training["head_lr"] == enc.DEFAULT_HEAD_LR


def test_training_refuses_what_encoders_cannot_do(bert):
    model, tok = bert
    qa = Task(name="qa", kind="generation", template="{soft:2} Q: {question}")
    with pytest.raises(ValueError, match="only support classification"):
        train_prompt(model, tok, qa, [Example(fields={"question": "why"}, target="yes")], progress=False)
    with pytest.raises(ValueError, match="not supported for encoder"):
        train_prompt(model, tok, SENTIMENT, toy_examples(4), config=TrainConfig(method="prefix"), progress=False)
    model.pooler.dense.weight.requires_grad_(True)
    try:
        with pytest.raises(ValueError, match="frozen"):
            train_prompt(model, tok, SENTIMENT, toy_examples(4), progress=False)
    finally:
        model.pooler.dense.weight.requires_grad_(False)


# ----------------------------------------------------------------------------- artifact
def test_save_load_round_trip(bert, tmp_path):
    model, tok = bert
    cfg = TrainConfig(max_steps=3, batch_size=4, init="random")
    sp = train_encoder_prompt(model, tok, SENTIMENT, toy_examples(12), None, cfg, progress=False).prompt
    path = tmp_path / "p.safetensors"
    size = sp.save(path)
    assert sp.nbytes <= size < sp.nbytes + 4096
    back = SoftPrompt.load(path, model=model)
    assert back.metadata() == __import__("json").loads(__import__("json").dumps(sp.metadata()))
    assert back.metadata()["format_version"] == 2 and back.pooling == "mean"
    assert torch.equal(back.embeddings, sp.embeddings)
    assert all(torch.equal(back.head[k], sp.head[k]) for k in ("weight", "bias"))
    bank = EncoderBank(model, tok)
    a, b = bank.add_prompt(sp, "orig"), bank.add_prompt(back, "loaded")
    exs = toy_examples(6, seed=9)
    assert torch.equal(bank.logits([a] * 6, exs), bank.logits([b] * 6, exs))


def test_decoder_artifacts_unchanged_and_kept_apart(bert, lm, tmp_path):
    from softprompt.core.bank import PromptBank
    from softprompt.core.prompts import ModelIdentity

    dec_model, dec_tok = lm
    plain = SoftPrompt(embeddings=torch.zeros(2, 32), identity=ModelIdentity.of(dec_model), template="{soft:2} {text}",
                       verbalizer={"a": " a", "b": " b"})
    meta = plain.metadata()
    assert meta["format_version"] == 1 and "head" not in meta
    plain.save(tmp_path / "dec.safetensors")
    back = SoftPrompt.load(tmp_path / "dec.safetensors")
    assert back.head is None and back.pooling is None
    with pytest.raises(ValueError, match="no classification head"):
        EncoderBank(*bert).add_prompt(SoftPrompt(embeddings=torch.zeros(2, HIDDEN), identity=EncoderBank(*bert).identity,
                                                 template="{soft:2} {text}", verbalizer={"a": "a", "b": "b"}))
    # an encoder artifact on a decoder bank of the same size: refused (identity first)
    model, tok = bert
    sp = one_step_prompt(model, tok)
    with pytest.raises(PromptMismatchError):
        PromptBank(dec_model, dec_tok).add_prompt(sp)


def test_identity_mismatch_refused(bert, tmp_path):
    model, tok = bert
    sp = one_step_prompt(model, tok)
    sp.save(tmp_path / "p.safetensors")
    other = tiny_bert(seed=1)  # same shapes, different weights
    with pytest.raises(PromptMismatchError, match="tiny-bert-0"):
        SoftPrompt.load(tmp_path / "p.safetensors", model=other)
    with pytest.raises(PromptMismatchError):
        EncoderBank(other, tok).add_prompt(sp)


def test_head_version_mismatch_is_a_file_error(bert, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    model, tok = bert
    sp = one_step_prompt(model, tok)
    sp.save(tmp_path / "p.safetensors")
    with safe_open(str(tmp_path / "p.safetensors"), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("head.")}
    save_file(tensors, str(tmp_path / "headless.safetensors"), metadata=meta)
    with pytest.raises(PromptFileError, match="needs a classification head"):
        SoftPrompt.load(tmp_path / "headless.safetensors")


def test_fold_standardised_is_the_same_map():
    g = torch.Generator().manual_seed(0)
    w, b, x = torch.randn(3, 8, generator=g), torch.randn(3, generator=g), torch.randn(5, 8, generator=g)
    mean, std = torch.randn(8, generator=g), torch.rand(8, generator=g) + 0.1
    fw, fb = enc.fold_standardised(w, b, mean, std)
    assert torch.allclose(((x - mean) / std) @ w.T + b, x @ fw.T + fb, atol=1e-5)


def test_encoder_template():
    assert encoder_template(5, ["premise", "hypothesis"]) == "{soft:5} {premise} {hypothesis}"
    assert encoder_template(0, ["text"]) == "{text}"
    with pytest.raises(ValueError):
        encoder_template(3, [])


# ----------------------------------------------------------------------------- real model
def test_embedded_minilm_loads_as_frozen_encoder():
    from softprompt.families.loading import EMBEDDED_MODELS, ModelNotAvailableError, load_model

    try:
        model, tok = load_model("minilm-l6")
    except ModelNotAvailableError as e:
        pytest.skip(f"minilm-l6 not installed ({EMBEDDED_MODELS['minilm-l6'].install_hint}): {e}")
    assert type(model).__name__ == "BertModel" and model.softprompt_name == "all-MiniLM-L6-v2"
    assert not any(p.requires_grad for p in model.parameters())
    bank = EncoderBank(model, tok)
    e = bank.add("probe", ["neg", "pos"])
    pooled = bank.pooled([e, e], [Example(fields={"text": "a wonderful film"}), Example(fields={"text": "dull"})])
    # sentence-transformers' own pipeline for this model is mean pooling; same numbers without soft tokens
    ids = tok(["a wonderful film", "dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**ids).last_hidden_state
    ref = (h * ids.attention_mask[..., None]).sum(1) / ids.attention_mask.sum(1, keepdim=True)
    assert torch.allclose(pooled, ref, atol=1e-5)


# ----------------------------------------------------------------------------- command line
def test_cli_train_and_predict_on_an_encoder_folder(bert, tmp_path):
    import json

    from typer.testing import CliRunner

    from softprompt.cli import app

    model, tok = bert
    folder = tmp_path / "tiny-bert"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    for name, exs in (("train", toy_examples(16, seed=1)), ("test", toy_examples(8, seed=2))):
        (tmp_path / f"{name}.csv").write_text("text,label\n" + "".join(f"{e.fields['text']},{e.label}\n" for e in exs))
    runner = CliRunner()
    r = runner.invoke(app, [
        "train", "--model", str(folder), "--train-file", str(tmp_path / "train.csv"),
        "--test-file", str(tmp_path / "test.csv"), "--template", "{soft:2} {text}", "--verbalizer", "negative=no",
        "--verbalizer", "positive=yes", "--init", "random", "--epochs", "1", "--out", str(tmp_path / "run"),
    ])
    assert r.exit_code == 0, r.output
    sp = SoftPrompt.load(tmp_path / "run" / "prompt.safetensors")
    assert sp.head is not None and sp.n_tokens == 2 and "accuracy" in sp.metrics["test"]
    r = runner.invoke(app, ["predict", str(tmp_path / "run" / "prompt.safetensors"), "--model", str(folder),
                            "--text", "good great movie"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output[r.output.index("{"):])  # after any progress bars on stderr
    assert out["label"] in ("negative", "positive") and abs(sum(out["probabilities"].values()) - 1) < 1e-3


def test_restarts_keep_the_best_fitting_encoder_run(bert):
    """train --restarts works for encoder models too: the kept prompt and head are the seed that
    fits the training examples best, as retraining that seed alone gives."""
    from softprompt.training.restarts import fit_score, train_with_restarts

    model, tok = bert
    train = toy_examples(16, seed=4)
    cfg = TrainConfig(epochs=1, batch_size=8, lr=0.05, warmup_steps=1, init="random", seed=5)
    chosen = train_with_restarts(model, tok, SENTIMENT, train, None, cfg, 3, progress=False)
    runs = chosen.prompt.training["restarts"]
    assert [r["seed"] for r in runs] == [5, 1005, 2005] and sum(r["chosen"] for r in runs) == 1
    singles = {s: train_prompt(model, tok, SENTIMENT, train, None, TrainConfig(**{**cfg.to_dict(), "seed": s}),
                               progress=False) for s in (5, 1005, 2005)}
    scores = {s: fit_score(model, tok, r, train, cfg)["score"] for s, r in singles.items()}
    assert len({round(sc[-1], 6) for sc in scores.values()}) == 3, "the runs should differ for this test to mean anything"
    best = max(scores, key=scores.get)
    assert [r["seed"] for r in runs if r["chosen"]] == [best]
    assert torch.equal(chosen.prompt.embeddings, singles[best].prompt.embeddings)
    assert torch.equal(chosen.prompt.head["weight"], singles[best].prompt.head["weight"])


def test_encoder_trainer_ranks_by_the_one_selection_rule(bert, monkeypatch):
    """The encoder trainer's validate() scores with training.selection.classification_score, as
    prompt training does: on 80/20 validation data a state stuck on the majority class (accuracy
    0.8, macro-F1 0.44) ranks below a balanced one (accuracy 0.7, macro-F1 0.67)."""
    import softprompt.training.encoder_head as EH
    from softprompt.core.scoring import Classification
    from softprompt.training.encoder_head import EncoderTrainable
    from softprompt.training.selection import classification_score

    model, tok = bert
    labels = SENTIMENT.labels
    gold = [labels[0]] * 8 + [labels[1]] * 2
    exs = [Example({"text": "good movie"}, g) for g in gold]
    trainable = EncoderTrainable(model, tok, SENTIMENT, exs, TrainConfig(seed=0), 2, pooling="mean", head_lr=0.1)
    preds = {"stuck": [labels[0]] * 10, "balanced": [labels[0]] * 5 + [labels[1]] * 5}
    which = {}

    def fake_classify(bank, entry, examples, batch_size=32):
        p = preds[which["now"]]
        scores = torch.tensor([[0.0, -1.0] if x == labels[0] else [-1.0, 0.0] for x in p])
        return Classification(labels, p, scores.softmax(-1), scores, {})

    monkeypatch.setattr(EH, "classify", fake_classify)
    out = {}
    for name in preds:
        which["now"] = name
        out[name] = trainable.validate(exs)
        assert out[name]["score"] == classification_score(out[name])
    assert out["stuck"]["accuracy"] > out["balanced"]["accuracy"] and out["balanced"]["score"] > out["stuck"]["score"]
