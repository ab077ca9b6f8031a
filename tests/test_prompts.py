"""The prompt artifact: save/load round trip, identity checks, init methods, templates."""
import json

import pytest
import torch
from safetensors.torch import save_file

from softprompt.core.bank import PromptBank
from softprompt.core.prompts import ModelIdentity, PromptFileError, PromptMismatchError, SoftPrompt, init_embeddings
from softprompt.core.scoring import classify
from softprompt.data import Example
from softprompt.core.templates import Template, TemplateError, soft_id
from softprompt.testing import tiny_causal_lm, tiny_tokenizer


def _prompt(model, n=4):
    return SoftPrompt(
        embeddings=torch.randn(n, model.config.hidden_size), identity=ModelIdentity.of(model),
        template=f"{{soft:{n}}} review : {{text}} label :", verbalizer={"pos": " good", "neg": " bad"},
        task="toy", init="random", training={"lr": 0.1}, metrics={"test": {"accuracy": 0.5}},
    )


def test_save_load_round_trip_and_size(tmp_path):
    model = tiny_causal_lm()
    sp = _prompt(model)
    size = sp.save(tmp_path / "p.safetensors")
    assert size == (tmp_path / "p.safetensors").stat().st_size
    assert sp.nbytes <= size < sp.nbytes + 4096, "file is the tensor plus a small header"
    back = SoftPrompt.load(tmp_path / "p.safetensors", model=model)
    assert torch.equal(back.embeddings, sp.embeddings)
    assert back.metadata() == json.loads(json.dumps(sp.metadata()))
    assert not list(tmp_path.glob(".*tmp")), "no temporary file left behind"
    # the loaded prompt scores exactly like the in-memory one
    tok = tiny_tokenizer()
    exs = [Example({"text": "the movie was great"}, "pos"), Example({"text": "awful film"}, "neg")]
    b1, b2 = PromptBank(model, tok), PromptBank(model, tok)
    b1.add_prompt(sp, "a")
    b2.add_prompt(back, "a")
    assert torch.equal(classify(b1, "a", exs).scores, classify(b2, "a", exs).scores)


def test_identity_mismatch_names_both_models(tmp_path):
    a, b = tiny_causal_lm(seed=0), tiny_causal_lm(seed=1)
    _prompt(a).save(tmp_path / "p.safetensors")
    with pytest.raises(PromptMismatchError) as e:
        SoftPrompt.load(tmp_path / "p.safetensors", model=b)
    assert "tiny-llama-0" in str(e.value) and "tiny-llama-1" in str(e.value)
    bank = PromptBank(b, tiny_tokenizer())
    with pytest.raises(PromptMismatchError):
        bank.add_prompt(SoftPrompt.load(tmp_path / "p.safetensors"))
    wider = tiny_causal_lm(hidden=48)
    with pytest.raises(PromptMismatchError, match="hidden 32.*hidden 48"):
        SoftPrompt.load(tmp_path / "p.safetensors", model=wider)


def test_not_a_prompt_file(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(PromptFileError, match="x.safetensors"):
        SoftPrompt.load(tmp_path / "x.safetensors")
    save_file({"prompt": torch.zeros(2, 2)}, tmp_path / "y.safetensors")
    with pytest.raises(PromptFileError, match="no softprompt metadata"):
        SoftPrompt.load(tmp_path / "y.safetensors")
    with pytest.raises(FileNotFoundError, match="nope"):
        SoftPrompt.load(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("method", ["random", "vocab", "text", "labels"])
def test_init_methods(method):
    model, tok = tiny_causal_lm(), tiny_tokenizer()
    emb = init_embeddings(model, tok, 5, method, text="the movie was", label_words=[" good", " bad"], seed=3)
    assert emb.shape == (5, 32) and emb.dtype == torch.float32
    table = model.get_input_embeddings().weight
    if method == "text":
        ids = tok("the movie was", add_special_tokens=False).input_ids
        assert torch.equal(emb[0], table[ids[0]]) and torch.equal(emb[3], table[ids[0]])
    if method == "labels":
        assert torch.allclose(emb[0], table[tok(" good", add_special_tokens=False).input_ids].mean(0))
    if method == "random":
        assert emb.min() >= -0.5 and emb.max() <= 0.5
    again = init_embeddings(model, tok, 5, method, text="the movie was", label_words=[" good", " bad"], seed=3)
    assert torch.equal(emb, again), "init is a function of the seed"
    with pytest.raises(ValueError, match="unknown init"):
        init_embeddings(model, tok, 5, "magic")


def test_template_parsing_and_rendering():
    tok = tiny_tokenizer()
    t = Template("{soft:2} review : {text} {soft:1} label : {{x}}")
    assert t.fields == ("text",) and t.n_soft == 3
    pre = t.prefix_ids(tok)
    assert pre[0] == tok.bos_token_id and pre[1:3] == [soft_id(0), soft_id(1)]
    suf = t.suffix_ids(tok, {"text": "good movie"})
    assert soft_id(2) in suf and suf[:2] == tok("good movie", add_special_tokens=False).input_ids
    assert t.without_soft().n_soft == 0 and "{text}" in t.without_soft().text
    with pytest.raises(TemplateError, match="stray"):
        Template("a { b")
    with pytest.raises(TemplateError, match="needs field 'text'"):
        t.suffix_ids(tok, {"sentence": "x"})


def test_bank_rejects_bad_entries():
    bank = PromptBank(tiny_causal_lm(), tiny_tokenizer())
    with pytest.raises(ValueError, match="3 soft tokens but the prompt has 2"):
        bank.add("x", "{soft:3} {text}", torch.zeros(2, 32), verbalizer={"a": " good"})
    with pytest.raises(ValueError, match="needs a verbalizer"):
        bank.add("x", "{soft:2} {text}", torch.zeros(2, 32))
    with pytest.raises(KeyError, match="no prompt named"):
        bank.index("missing")
