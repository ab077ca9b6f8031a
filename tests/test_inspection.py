"""`softprompt inspect`: nearest tokens, norms and drift from the (recomputed) init."""
import json

import pytest
import torch
from typer.testing import CliRunner

from softprompt.cli import app
from softprompt.apps.inspection import (
    format_inspection,
    inspect_prompt,
    nearest_tokens,
    recompute_init,
)
from softprompt.core.prompts import (
    ModelIdentity,
    PromptMismatchError,
    SoftPrompt,
    init_embeddings,
)
from softprompt.testing import tiny_causal_lm, tiny_tokenizer

VERB = {"neg": " no", "pos": " yes"}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _prompt(model, tok, init="vocab", seed=3, n=5, noise=0.0, init_text=None):
    emb = init_embeddings(model, tok, n, init, text=init_text, label_words=list(VERB.values()), seed=seed)
    if noise:
        emb = emb + noise * torch.randn(emb.shape, generator=torch.Generator().manual_seed(1))
    return SoftPrompt(embeddings=emb, identity=ModelIdentity.of(model), template=f"{{soft:{n}}} review : {{text}} label :",
                      verbalizer=VERB, task="toy", init=init, training={"seed": seed, "init": init, "init_text": init_text})


def test_report_shape_and_untrained_prompt():
    model, tok = tiny_causal_lm(), tiny_tokenizer()
    p = _prompt(model, tok)
    rep = inspect_prompt(p, model, tok, k=4)
    assert len(rep["tokens"]) == 5 and rep["k"] == 4 and rep["drift_available"]
    emb = model.get_input_embeddings().weight
    mean_norm = float(emb.norm(dim=-1).mean())
    assert rep["vocabulary"]["size"] == emb.shape[0]
    assert rep["vocabulary"]["mean_norm"] == pytest.approx(mean_norm, rel=1e-5)
    for t in rep["tokens"]:
        cos = [n["cosine"] for n in t["nearest"]]
        assert len(cos) == 4 and cos == sorted(cos, reverse=True)
        assert cos[0] == pytest.approx(1.0, abs=1e-5)  # a sampled vocabulary row is its own nearest token
        assert t["norm_ratio"] == pytest.approx(t["norm"] / mean_norm, rel=1e-5)
        assert t["drift"]["cosine_to_init"] == pytest.approx(1.0, abs=1e-5)
        assert t["drift"]["l2_from_init"] == pytest.approx(0.0, abs=1e-5)
        assert isinstance(t["nearest"][0]["token"], str) and isinstance(t["nearest"][0]["id"], int)
    assert "recomputed" in rep["init_source"] and "seed=3" in rep["init_source"]
    json.dumps(rep)  # JSON-ready
    text = format_inspection(rep)
    assert text.count("\n") >= 5 + 5 and repr(rep["tokens"][0]["nearest"][0]["token"]) in text


def test_trained_prompt_drifts_and_init_is_recomputed_exactly():
    model, tok = tiny_causal_lm(), tiny_tokenizer()
    p = _prompt(model, tok, init="labels", seed=5, noise=0.5)
    init, _note = recompute_init(p, model, tok)
    expect = init_embeddings(model, tok, 5, "labels", label_words=list(VERB.values()), seed=5)
    torch.testing.assert_close(init, expect)
    rep = inspect_prompt(p, model, tok, k=3)
    assert all(t["drift"]["l2_from_init"] > 0.1 and t["drift"]["cosine_to_init"] < 1 for t in rep["tokens"])
    assert rep["summary"]["mean_relative_drift"] > 0
    assert rep["pairwise_cosine"]["max"] <= 1.0 + 1e-6


def test_drift_unavailable_or_given_explicitly():
    model, tok = tiny_causal_lm(), tiny_tokenizer()
    p = _prompt(model, tok, init="text", init_text="good movie", n=3)
    p.training["init_text"] = None  # text init from an unrecorded task instruction
    rep = inspect_prompt(p, model, tok)
    assert not rep["drift_available"] and "drift unavailable" in rep["init_source"]
    assert "drift" not in rep["tokens"][0] and "cos0" not in format_inspection(rep)
    rep = inspect_prompt(p, model, tok, init=torch.zeros(3, model.config.hidden_size), init_note="given")
    assert rep["drift_available"] and rep["init_source"] == "given"
    with pytest.raises(PromptMismatchError):
        inspect_prompt(p, tiny_causal_lm(seed=1), tok)


def test_nearest_tokens_by_cosine():
    e = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    sims, ids = nearest_tokens(torch.tensor([[3.0, 0.1]]), e, k=2)
    assert ids.tolist() == [[0, 2]] and sims[0, 0] > sims[0, 1]


def test_cli_inspect_json(tmp_path):
    model, tok = tiny_causal_lm(), tiny_tokenizer()
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    p = _prompt(model, tok, noise=0.1)
    p.save(tmp_path / "p.safetensors")
    runner = CliRunner()
    r = runner.invoke(app, ["inspect", str(tmp_path / "p.safetensors"), "--model", str(folder), "--json", "--top-k", "3"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout[r.stdout.index("{"):])
    assert len(rep["tokens"]) == 5 and all(len(t["nearest"]) == 3 for t in rep["tokens"])
    r = runner.invoke(app, ["inspect", str(tmp_path / "p.safetensors"), "--model", str(folder)])
    assert r.exit_code == 0 and "nearest vocabulary tokens" in r.stdout and "caveat" in r.stdout
