"""Model families: one function picks the family, the capability table is what the code does,
and no module outside softprompt/families/ reads the family from a config."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from softprompt.core.bank import PromptBank
from softprompt.families.encoder import EncoderBank
from softprompt.families import (
    CAPABILITIES, CAPABILITY_NAMES, DECODER, ENCODER, FAMILIES, SEQ2SEQ, Family, UnsupportedError, capability_rows,
    family_for, require,
)
from softprompt.data import Example, Task
from softprompt.testing import tiny_causal_lm, tiny_t5, tiny_tokenizer
from softprompt.training.prompt import TrainConfig, train_prompt

pytestmark = pytest.mark.usefixtures("one_thread")

SRC = Path(__file__).resolve().parents[1] / "src" / "softprompt"
TASK = Task(name="toy", kind="classification", template="{soft:2} Review: {text}\nSentiment:",
            verbalizer={"negative": " bad", "positive": " good"})
TRAIN = [Example(fields={"text": t}, label=lab) for t, lab in
         [("good good", "positive"), ("bad bad", "negative"), ("good", "positive"), ("bad", "negative")]]
METHOD_CONFIGS = {"prompt": {}, "ptuning": {"encoder": "mlp"}, "prefix": {}}


@pytest.fixture(scope="module")
def t5():
    return tiny_t5(), tiny_tokenizer()


@pytest.fixture(scope="module")
def bert():
    from test_encoder import tiny_bert, tiny_bert_tokenizer

    return tiny_bert(), tiny_bert_tokenizer()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_decoder_models_are_the_decoder_family(arch):
    model = tiny_causal_lm(arch)
    assert family_for(model) is DECODER and family_for(model.config) is DECODER
    bank = DECODER.make_bank(model, tiny_tokenizer())
    assert isinstance(bank, PromptBank) and bank.family is DECODER
    assert PromptBank(model, tiny_tokenizer()).family is DECODER  # a bank built directly finds its family too


def test_t5_and_bert_families(t5, bert):
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, BertConfig, T5Config

    assert family_for(t5[0]) is SEQ2SEQ and family_for(T5Config()) is SEQ2SEQ
    assert family_for(bert[0]) is ENCODER and family_for(BertConfig()) is ENCODER
    assert family_for(BertConfig(is_decoder=True)) is DECODER  # BERT's causal-LM variant
    assert PromptBank(*t5).family is SEQ2SEQ and SEQ2SEQ.make_bank(*t5).family is SEQ2SEQ
    bank = ENCODER.make_bank(*bert)
    assert isinstance(bank, EncoderBank) and bank.family is ENCODER
    assert (DECODER.auto_class(), SEQ2SEQ.auto_class(), ENCODER.auto_class()) == (
        AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModel)
    assert all(isinstance(f, Family) for f in FAMILIES.values())


def test_table_covers_every_family_and_capability():
    assert set(CAPABILITIES) == set(FAMILIES)
    assert CAPABILITIES["decoder"] == frozenset(CAPABILITY_NAMES) - {"head_classification"}
    rows = capability_rows()
    by_name = {r["capability"]: r for r in rows}
    assert [by_name["prefix"][f] for f in FAMILIES] == ["yes", "-", "-"]
    assert [by_name["serve"][f] for f in FAMILIES] == ["yes", "-", "-"]
    with pytest.raises(ValueError, match="unknown capability"):
        DECODER.supports("flying")
    with pytest.raises(ValueError, match="unknown method"):  # TrainConfig refuses it
        train_prompt(tiny_causal_lm(), tiny_tokenizer(), TASK, TRAIN, config=TrainConfig(method="flying"), progress=False)


def test_unsupported_error_names_family_capability_and_what_is_supported():
    with pytest.raises(UnsupportedError) as e:
        require(ENCODER, "generation")
    msg = str(e.value)
    assert e.value.family == "encoder" and e.value.capability == "generation"
    assert "generate" in msg and "supports: prompt, head_classification" in msg
    assert isinstance(e.value, ValueError)
    require(DECODER, "serve")  # no error


@pytest.mark.parametrize("method", sorted(METHOD_CONFIGS))
@pytest.mark.parametrize("which", ["decoder", "seq2seq", "encoder"])
def test_training_methods_match_the_table(which, method, t5, bert):
    """Every training method trains (one step) where the table says yes, and raises
    UnsupportedError or the encoder loop's refusal where it says no."""
    model, tok = {"decoder": (tiny_causal_lm("llama"), tiny_tokenizer()), "seq2seq": t5, "encoder": bert}[which]
    cfg = TrainConfig(method=method, epochs=1, batch_size=4, eval_every=0, **METHOD_CONFIGS[method])
    if FAMILIES[which].supports(method):
        res = train_prompt(model, tok, TASK, TRAIN, config=cfg, progress=False)
        assert res.prompt is not None
    else:
        with pytest.raises(ValueError, match="not supported for encoder"):
            train_prompt(model, tok, TASK, TRAIN, config=cfg, progress=False)


def test_scoring_paths_follow_the_table(t5, bert):
    from softprompt.apps.ensemble import ensemble_classify
    from softprompt.core.scoring import classify, generate

    bank = PromptBank(*t5)
    for name in ("a", "b"):
        bank.add(name, TASK.template, torch.zeros(2, 32), verbalizer=TASK.verbalizer)
    assert classify(bank, "a", TRAIN[:2]).scores.shape == (2, 2)  # rank classification: yes
    qa = Task(name="qa", kind="generation", template="{soft:2} Q: {text}\nA:")
    bank.add("g", qa.template, torch.zeros(2, 32), kind="generation")
    assert len(generate(bank, "g", TRAIN[:2], max_new_tokens=2).texts) == 2  # generation: yes
    with pytest.raises(UnsupportedError, match="ensemble"):
        ensemble_classify(bank, ["a", "b"], TRAIN[:2])
    with pytest.raises(UnsupportedError, match="head_classification"):
        SEQ2SEQ.classify_with_head(bank, "a", TRAIN[:2])
    with pytest.raises(UnsupportedError):
        ENCODER.generate(EncoderBank(*bert), torch.tensor([0]), [[1]], max_new_tokens=1, stop_ids=set())


def test_server_refuses_non_decoder_models(t5, bert):
    from softprompt.serve.engine import Engine

    for model, tok in (t5, bert):
        with pytest.raises(UnsupportedError, match="serve"):
            Engine(model, tok)


def test_vllm_front_end_refuses_t5_before_reading_weights(tmp_path):
    pytest.importorskip("safetensors")
    from transformers import T5Config

    from softprompt.serve.backends.vllm import load_front_model

    T5Config(vocab_size=32, d_model=8, num_layers=1, num_heads=1, d_kv=8, d_ff=8).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedError, match="vllm"):
        load_front_model(str(tmp_path))


def test_peft_interop_refuses_t5(t5):
    from softprompt.apps.interop.peft import PeftExportError, _check_decoder_only

    with pytest.raises(PeftExportError, match="encoder-decoder"):
        _check_decoder_only(t5[0], "cannot export", PeftExportError)
    _check_decoder_only(tiny_causal_lm("gpt2"), "cannot export", PeftExportError)


def test_family_checks_live_only_in_families():
    """The acceptance rule: reading the family from a config happens in softprompt/families/ only."""
    pattern = re.compile(r"is_encoder_decoder|is_encoder_model|is_encoder_config|is_decoder\b|MODEL_FOR_MASKED_LM")
    offenders = [f"{p.relative_to(SRC)}:{i}" for p in SRC.rglob("*.py") if "families" not in p.relative_to(SRC).parts
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []


def test_cli_prints_the_capability_table():
    from typer.testing import CliRunner

    from softprompt.cli import app

    r = CliRunner().invoke(app, ["models", "capabilities"])
    assert r.exit_code == 0, r.output
    assert all(w in r.output for w in ("decoder", "seq2seq", "encoder", "prefix", "ensemble", "vllm"))
