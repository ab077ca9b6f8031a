"""Hugging Face PEFT interop: our prompts run in PEFT with the same numbers, PEFT prompts run in ours.

Every equality here is checked against the real ``peft`` library (``PeftModel.from_pretrained``
on the exported folder, ``get_peft_model(...).save_pretrained`` for adapters made by PEFT),
so a change in PEFT's format shows up as a failure, not as a silently wrong adapter.
"""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from softprompt.core.bank import PromptBank
from softprompt.cli import app
from softprompt.apps.interop.peft import (
    PeftExportError, PeftImportError, PeftImportWarning, export_peft, render_peft_input,
)
from softprompt.apps.interop.peft_import import import_peft
from softprompt.core.prompts import ModelIdentity, PromptMismatchError, SoftPrompt
from softprompt.core.scoring import classify
from softprompt.data import Example
from softprompt.core.templates import encode_text
from softprompt.testing import tiny_causal_lm, tiny_tokenizer

peft = pytest.importorskip("peft", reason="peft is an optional extra: pip install 'softprompt[hf]'")

pytestmark = pytest.mark.usefixtures("one_thread")

VERBALIZER = {"complaint": " yes", "no complaint": " no good"}  # a two-token label word on purpose
EXAMPLES = [
    Example({"text": "the flight was delayed , why ?"}, "complaint"),
    Example({"text": "thanks , great service"}, "no complaint"),
    Example({"text": "my order is broken please help"}, "complaint"),
    Example({"text": "i love this film"}, "no complaint"),
]
TEMPLATE = "help {soft:3} tweet : {text} is this a complaint ? answer :"


def _prompt(model, template=TEMPLATE, n=3, seed=1, kv=None):
    gen = torch.Generator().manual_seed(seed)
    return SoftPrompt(
        embeddings=torch.randn(n, model.config.hidden_size, generator=gen), identity=ModelIdentity.of(model),
        template=template, verbalizer=dict(VERBALIZER), task="toy", init="random", training={"lr": 0.1},
        metrics={"test": {"accuracy": 0.75}}, kv=kv, method="prefix_tuning" if kv is not None else "prompt_tuning",
    )


def _our_scores(model, tok, prompt):
    bank = PromptBank(model, tok)
    e = bank.add_prompt(prompt, "p")
    return classify(bank, e, EXAMPLES, batch_size=3), bank, e


@torch.no_grad()
def _peft_scores(peft_model, tok, input_texts):
    """Label scores the way a PEFT user computes them: feed the input text (no special tokens)
    plus the label word, sum the label tokens' log-probs from PEFT's own forward."""
    peft_model.eval()
    out = torch.empty(len(input_texts), len(VERBALIZER))
    for i, text in enumerate(input_texts):
        ids = tok(text, add_special_tokens=False).input_ids
        for j, word in enumerate(VERBALIZER.values()):
            lab = encode_text(tok, word)
            full = torch.tensor([ids + lab])
            logits = peft_model(input_ids=full, attention_mask=torch.ones_like(full)).logits[0]
            offset = logits.shape[0] - full.shape[1]  # prompt tuning returns logits for the virtual tokens too
            lp = F.log_softmax(logits.float(), -1)
            out[i, j] = sum(lp[offset + len(ids) - 1 + k, t] for k, t in enumerate(lab))
    return out


# ----------------------------------------------------------------------------- export
def test_export_prompt_tuning_scores_like_ours_in_peft(tmp_path, lm):
    model, tok = lm
    prompt = _prompt(model)
    info = export_peft(prompt, model, tok, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    # BOS + "help" + 3 soft + "tweet :" all baked; the input starts at the field
    assert cfg["peft_type"] == "PROMPT_TUNING" and cfg["num_virtual_tokens"] == 7 == info.num_virtual_tokens
    assert cfg["token_dim"] == model.config.hidden_size and cfg["task_type"] == "CAUSAL_LM"
    assert info.input_template == " {text} is this a complaint ? answer :"
    readme = (tmp_path / "adapter" / "README.md").read_text()
    assert "add_special_tokens=False" in readme and "' no good'" in readme and "library_name: peft" in readme

    ours, bank, e = _our_scores(model, tok, prompt)
    texts = [render_peft_input(info.input_template, ex.fields) for ex in EXAMPLES]
    for text, ex in zip(texts, EXAMPLES):  # the documented user input is exactly what our scorer feeds
        assert tok(text, add_special_tokens=False).input_ids == bank.suffix_ids(e, ex.fields)
    pm = peft.PeftModel.from_pretrained(tiny_causal_lm("llama"), tmp_path / "adapter")
    theirs = _peft_scores(pm, tok, texts)
    assert torch.allclose(ours.scores, theirs, atol=1e-4), (ours.scores, theirs)
    assert [VERBALIZER_LABELS[j] for j in theirs.argmax(-1).tolist()] == ours.predictions
    # and the soft tokens matter: the same adapter with other soft vectors scores differently
    other = export_peft(_prompt(model, seed=2), model, tok, tmp_path / "other")
    pm2 = peft.PeftModel.from_pretrained(tiny_causal_lm("llama"), other.out_dir)
    assert not torch.allclose(_peft_scores(pm2, tok, texts), theirs, atol=1e-3)


VERBALIZER_LABELS = list(VERBALIZER)


# peft (not this package) still hands the full model `past_key_values`; our own calls go to base_model
@pytest.mark.filterwarnings(r"ignore:.*past_key_values.*(ForCausalLM|LMHeadModel)\.forward:FutureWarning")
@pytest.mark.parametrize("family", ["llama", "gpt2"])  # grouped-query and multi-head attention
def test_export_prefix_tuning_scores_like_ours_in_peft(tmp_path, family):
    model, tok = tiny_causal_lm(family), tiny_tokenizer()
    kv_shape = PromptBank(model, tok).kv_shape(4)
    kv = torch.randn(*kv_shape, generator=torch.Generator().manual_seed(3))
    prompt = _prompt(model, template="{soft:2} tweet : {text} is this a complaint ? answer :", n=2, kv=kv)
    info = export_peft(prompt, model, tok, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    # 4 learned positions + BOS + 2 soft + "tweet :" as one key/value cache
    assert cfg["peft_type"] == "PREFIX_TUNING" and cfg["num_virtual_tokens"] == 4 + 1 + 2 + 2
    assert cfg["token_dim"] == kv_shape[2] * kv_shape[4] and not cfg["prefix_projection"]
    ours, _, _ = _our_scores(model, tok, prompt)
    pm = peft.PeftModel.from_pretrained(tiny_causal_lm(family), tmp_path / "adapter")
    theirs = _peft_scores(pm, tok, [render_peft_input(info.input_template, ex.fields) for ex in EXAMPLES])
    assert torch.allclose(ours.scores, theirs, atol=1e-4), (ours.scores, theirs)


def test_export_refuses_what_peft_cannot_express(tmp_path, lm):
    model, tok = lm
    late = _prompt(model, template="tweet : {text} {soft:3} answer :")
    with pytest.raises(PeftExportError, match=r"soft tokens after the input field \{text\}.*before the whole input"):
        export_peft(late, model, tok, tmp_path / "a")
    with pytest.raises(PromptMismatchError):
        export_peft(_prompt(model), tiny_causal_lm(seed=1), tok, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ----------------------------------------------------------------------------- import
def test_round_trip_restores_the_prompt(tmp_path, lm):
    model, tok = lm
    prompt = _prompt(model)
    export_peft(prompt, model, tok, tmp_path / "adapter")
    back = import_peft(tmp_path / "adapter", model, tok)
    assert torch.equal(back.embeddings, prompt.embeddings)
    for key in ("template", "verbalizer", "task", "kind", "method", "init", "training", "metrics"):
        assert getattr(back, key) == getattr(prompt, key), key
    assert torch.equal(_our_scores(model, tok, back)[0].scores, _our_scores(model, tok, prompt)[0].scores)
    with pytest.raises(PromptMismatchError):  # the export records the exact base model
        import_peft(tmp_path / "adapter", tiny_causal_lm(seed=1), tok)


def test_export_trained_further_in_peft_imports_as_soft_tokens(tmp_path, lm):
    """Changed baked hard tokens (as PEFT training would change them): every virtual token but the
    untouched BOS becomes a soft token, and our scores still equal PEFT's."""
    model, tok = lm
    export_peft(_prompt(model), model, tok, tmp_path / "adapter")
    w = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    w["prompt_embeddings"][1:] += 0.05 * torch.randn(w["prompt_embeddings"][1:].shape)
    save_file(w, tmp_path / "adapter" / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.warns(PeftImportWarning, match="baked hard tokens"):
        back = import_peft(tmp_path / "adapter", model, tok)
    assert back.template == "{soft:6} {text} is this a complaint ? answer :" and back.verbalizer == VERBALIZER
    ours, _, _ = _our_scores(model, tok, back)
    pm = peft.PeftModel.from_pretrained(tiny_causal_lm("llama"), tmp_path / "adapter")
    theirs = _peft_scores(pm, tok, [render_peft_input(" {text} is this a complaint ? answer :", ex.fields)
                                    for ex in EXAMPLES])
    assert torch.allclose(ours.scores, theirs, atol=1e-4)


def _peft_made_adapter(folder, model, n=4, peft_type="prompt"):
    cfg = {
        "prompt": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n),
        "prefix": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n),
        "lora": lambda: peft.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"]),
    }[peft_type]()
    pm = peft.get_peft_model(model, cfg)
    if peft_type == "prompt":
        with torch.no_grad():  # stand-in for training: vectors at the scale of real embeddings
            pm.prompt_encoder["default"].embedding.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(5))
    pm.save_pretrained(folder)
    return pm


def test_peft_made_adapter_scores_like_peft(tmp_path):
    """get_peft_model -> save_pretrained -> import: our scorer equals PEFT's forward. The tokenizer
    has no BOS here, so both feed the model exactly virtual tokens + input."""
    model, tok = tiny_causal_lm(), tiny_tokenizer()
    tok.bos_token = None
    pm = _peft_made_adapter(tmp_path / "adapter", tiny_causal_lm())
    template = "{soft:4} tweet : {text} is this a complaint ? answer :"
    prompt = import_peft(tmp_path / "adapter", model, tok, template=template, verbalizer=VERBALIZER)
    assert prompt.n_tokens == 4 and prompt.kind == "classification" and prompt.training["peft_config"]["num_virtual_tokens"] == 4
    assert torch.equal(prompt.embeddings, pm.prompt_encoder["default"].embedding.weight.detach())
    ours, _, _ = _our_scores(model, tok, prompt)
    theirs = _peft_scores(pm, tok, [f"tweet : {ex.fields['text']} is this a complaint ? answer :" for ex in EXAMPLES])
    assert torch.allclose(ours.scores, theirs, atol=1e-4), (ours.scores, theirs)
    plain = import_peft(tmp_path / "adapter", model, tok)  # defaults: '{soft:N}{text}', generation
    assert plain.template == "{soft:4}{text}" and plain.kind == "generation" and plain.verbalizer is None


def test_bos_before_virtual_tokens_is_flagged(tmp_path, lm):
    model, tok = lm  # this tokenizer has a BOS, which our templates put before the virtual tokens
    _peft_made_adapter(tmp_path / "adapter", tiny_causal_lm())
    with pytest.warns(PeftImportWarning, match="BOS"):
        prompt = import_peft(tmp_path / "adapter", model, tok, verbalizer=VERBALIZER)
    assert prompt.training["import_note"].startswith("not exact")


def test_import_errors(tmp_path, lm):
    model, tok = lm
    with pytest.raises(FileNotFoundError):
        import_peft(tmp_path / "nowhere", model, tok)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PeftImportError, match="no adapter_config.json"):
        import_peft(tmp_path / "empty", model, tok)
    _peft_made_adapter(tmp_path / "lora", tiny_causal_lm(), peft_type="lora")
    with pytest.raises(PeftImportError, match="only PEFT PROMPT_TUNING.*LORA"):
        import_peft(tmp_path / "lora", model, tok)
    _peft_made_adapter(tmp_path / "prefix", tiny_causal_lm(), peft_type="prefix")
    with pytest.raises(PeftImportError, match="PREFIX_TUNING: its key/values are per-layer"):
        import_peft(tmp_path / "prefix", model, tok)
    _peft_made_adapter(tmp_path / "pt", tiny_causal_lm())
    with pytest.raises(PeftImportError, match="size 32.*hidden size 48"):
        import_peft(tmp_path / "pt", tiny_causal_lm(hidden=48), tok)
    with pytest.raises(PeftImportError, match="2-layer base model but this model has 3 layers"):
        import_peft(tmp_path / "pt", tiny_causal_lm(layers=3), tok)
    with pytest.raises(PeftImportError, match="must start with exactly 4 soft tokens"):
        import_peft(tmp_path / "pt", model, tok, template="tweet : {soft:4} {text}")
    with pytest.raises(PeftImportError, match="must start with exactly 4 soft tokens"):
        import_peft(tmp_path / "pt", model, tok, template="{soft:3}{text}")
    cfg = json.loads((tmp_path / "pt" / "adapter_config.json").read_text())
    cfg["num_virtual_tokens"] = 5
    (tmp_path / "pt" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(PeftImportError, match=r"shape \(4, 32\).*num_virtual_tokens=5"):
        import_peft(tmp_path / "pt", model, tok)
    (tmp_path / "pt" / "adapter_model.safetensors").unlink()
    with pytest.raises(PeftImportError, match="no adapter_model.safetensors"):
        import_peft(tmp_path / "pt", model, tok)


# ----------------------------------------------------------------------------- CLI
def test_cli_export_then_import(tmp_path, lm):
    model, tok = lm
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    prompt = _prompt(model)
    prompt.save(tmp_path / "p.safetensors")
    runner = CliRunner()
    r = runner.invoke(app, ["export", "--format", "peft", str(tmp_path / "p.safetensors"), str(tmp_path / "adapter"),
                            "--model", str(folder)])
    assert r.exit_code == 0, r.output
    assert "PROMPT_TUNING, 7 virtual tokens" in r.stdout and "add_special_tokens" not in r.stdout
    r = runner.invoke(app, ["import", str(tmp_path / "adapter"), str(tmp_path / "back.safetensors"), "--model", str(folder)])
    assert r.exit_code == 0, r.output
    back = SoftPrompt.load(tmp_path / "back.safetensors", model=model)
    assert torch.equal(back.embeddings, prompt.embeddings) and back.template == prompt.template
    r = runner.invoke(app, ["import", str(tmp_path / "adapter"), str(tmp_path / "x.safetensors"), "--model", str(folder),
                            "--template", "{soft:6}{text}", "--verbalizer", "a=yes", "--verbalizer", "b=no"])
    assert r.exit_code == 0, r.output
    assert SoftPrompt.load(tmp_path / "x.safetensors").verbalizer == {"a": " yes", "b": " no"}
    r = runner.invoke(app, ["import", str(tmp_path / "adapter"), str(tmp_path / "y.safetensors"), "--model", str(folder),
                            "--template", "{soft:6}{text}\nAnswer:\n", "--verbalizer", "a=yes", "--verbalizer", "b=no"])
    assert r.exit_code == 0, r.output  # after a line break the words come unspaced, as in train/compare
    assert SoftPrompt.load(tmp_path / "y.safetensors").verbalizer == {"a": "yes", "b": "no"}
    r = runner.invoke(app, ["export", "--format", "onnx", str(tmp_path / "p.safetensors"), str(tmp_path / "o")])
    assert r.exit_code == 2 and "only export format is 'peft'" in r.output
    late = _prompt(model, template="tweet : {text} {soft:3} answer :")
    late.save(tmp_path / "late.safetensors")
    r = runner.invoke(app, ["export", str(tmp_path / "late.safetensors"), str(tmp_path / "l"), "--model", str(folder)])
    assert r.exit_code == 2 and "after the input field" in r.output
