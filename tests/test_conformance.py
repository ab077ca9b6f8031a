"""Conformance suite: one test body per property, run over every (model family x training method) pair.

A pair the capability table (``families/base.py``) supports must pass the body; a pair it does not
support must be refused with the library's error.  Nothing is skipped silently, so a new family or
method shows up here as a complete row (PEFT's shared test bodies work the same way).  Each pair
is trained once per module (tiny random models, a few steps) and the trained prompts are shared.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from softprompt.core.prompts import SoftPrompt
from softprompt.core.scoring import classify
from softprompt.data import Example, Task
from softprompt.families import UnsupportedError, family_for
from softprompt.testing import tiny_causal_lm, tiny_t5, tiny_tokenizer
from softprompt.training.config import TrainResult
from softprompt.training.prompt import TrainConfig, train_prompt

pytestmark = pytest.mark.usefixtures("one_thread")

#: model kind -> family name (decoder-only with grouped-query and with multi-head attention, T5, BERT)
ARCHS = {"llama": "decoder", "gpt2": "decoder", "t5": "seq2seq", "bert": "encoder"}
#: training method -> (capability it needs, TrainConfig fields)
METHODS = {
    "prompt": ("prompt", {"method": "prompt"}),
    "ptuning": ("ptuning", {"method": "ptuning", "encoder": "mlp", "encoder_hidden": 16}),
    "prefix": ("prefix", {"method": "prefix", "prefix_tokens": 2}),
    "prompt_mlp": ("reparam", {"method": "prompt", "reparam": "mlp", "encoder_hidden": 16}),
}
PAIRS = [pytest.param(a, m, id=f"{a}-{m}") for a in ARCHS for m in METHODS]

TASK = Task(name="toy", kind="classification", template="{soft:3} review : {text} label :",
            verbalizer={"positive": " good", "negative": " bad"})
TRAIN = [Example({"text": t}, lab) for t, lab in [
    ("great movie", "positive"), ("awful service", "negative"), ("love it", "positive"), ("slow and broken", "negative"),
    ("amazing film", "positive"), ("terrible flight", "negative"), ("happy thanks", "positive"), ("sad hate", "negative"),
]]
EXAMPLES = [Example({"text": t}, lab) for t, lab in [
    ("the movie was good", "positive"), ("why is my refund delayed please help", "negative"), ("great", "positive"),
    ("it was not bad", "negative"), ("what a terrible , awful , slow , broken service", "negative"),
]]


def supported(arch: str, method: str) -> bool:
    from softprompt.families import FAMILIES

    return FAMILIES[ARCHS[arch]].supports(METHODS[method][0])


def config(method: str, seed: int) -> TrainConfig:
    return TrainConfig(**METHODS[method][1], epochs=0, max_steps=3, batch_size=4, eval_every=0, warmup_steps=0,
                       lr=0.01 if method in ("ptuning", "prompt_mlp") else 0.3, seed=seed)


@pytest.fixture(scope="module")
def models():
    """Each model kind built once per module, on first use."""
    built = {}

    def get(arch: str):
        if arch not in built:
            if arch == "bert":
                from test_encoder import tiny_bert, tiny_bert_tokenizer

                built[arch] = tiny_bert(), tiny_bert_tokenizer()
            elif arch == "t5":
                built[arch] = tiny_t5(), tiny_tokenizer()
            else:
                built[arch] = tiny_causal_lm(arch), tiny_tokenizer()
        return built[arch]

    return get


@pytest.fixture(scope="module")
def trained(models):
    """Each (model, method, seed) trained once per module; seeds 0 and 1 give two different prompts."""
    done = {}

    def get(arch: str, method: str, seed: int = 0) -> TrainResult:
        key = (arch, method, seed)
        if key not in done:
            model, tok = models(arch)
            done[key] = train_prompt(model, tok, TASK, TRAIN[seed:] + TRAIN[:seed], config=config(method, seed),
                                     progress=False)
        return done[key]

    return get


def assert_refused(models, arch: str, method: str) -> None:
    """A pair outside the table: training it raises the library's UnsupportedError (a ValueError)
    naming the family and the missing capability."""
    model, tok = models(arch)
    with pytest.raises(UnsupportedError, match="not supported for (encoder-only|encoder-decoder) models") as e:
        train_prompt(model, tok, TASK, TRAIN, config=config(method, 0), progress=False)
    assert (e.value.family, e.value.capability) == (ARCHS[arch], METHODS[method][0])


def scores(model, tok, prompts: list[SoftPrompt], entries=None, examples=EXAMPLES) -> torch.Tensor:
    """Label scores of ``examples`` on a fresh bank of the model's family holding ``prompts``."""
    bank = family_for(model).make_bank(model, tok)
    idx = [bank.add_prompt(p, f"p{k}") for k, p in enumerate(prompts)]
    return classify(bank, [idx[k] for k in entries] if entries is not None else idx[0], examples).scores


# ----------------------------------------------------------------------------- the table itself
def test_matrix_is_complete():
    """Every family and method is in the matrix, and the table refuses exactly what is listed here;
    a change to the table (or a new family) must be reflected in this suite."""
    from softprompt.families import CAPABILITIES, METHODS as TABLE_METHODS

    assert set(ARCHS.values()) == set(CAPABILITIES)
    # hybrid: a template, not a trainer; reparam: prompt tuning through the residual MLP (the default recipe's)
    assert {cap for cap, _ in METHODS.values()} == (set(TABLE_METHODS) - {"hybrid"}) | {"reparam"}
    refused = sorted(f"{a}-{m}" for a in ARCHS for m in METHODS if not supported(a, m))
    assert refused == ["bert-prefix", "bert-prompt_mlp", "bert-ptuning", "t5-prefix"]


# ----------------------------------------------------------------------------- 0. training
@pytest.mark.parametrize("arch, method", PAIRS)
def test_training_runs_the_method_it_records(arch, method, models, trained):
    """A few steps train the asked method: the prompt moved, the artifact says how it was trained,
    and a reparameterised run trained a network larger than the prompt it saved."""
    if not supported(arch, method):
        return assert_refused(models, arch, method)
    res = trained(arch, method)
    p = res.prompt
    assert res.steps == 3 and not torch.equal(p.embeddings, trained(arch, method, 1).prompt.embeddings)
    assert p.training["method"] == METHODS[method][1]["method"]
    expected = {"ptuning": "p_tuning", "prefix": "prefix_tuning"}.get(method, "prompt_tuning")
    assert p.method == ("encoder_" + expected if arch == "bert" else expected)
    through_network = method in ("ptuning", "prompt_mlp")
    assert bool(p.training.get("reparameterised")) == through_network
    assert (res.trainable_params > p.n_params) == through_network


# ----------------------------------------------------------------------------- 1. save / load
@pytest.mark.parametrize("arch, method", PAIRS)
def test_saved_and_loaded_prompt_scores_like_the_trained_one(arch, method, models, trained, tmp_path):
    """Train, save, load: the loaded prompt is the same artifact and scores exactly alike."""
    if not supported(arch, method):
        return assert_refused(models, arch, method)
    model, tok = models(arch)
    prompt = trained(arch, method).prompt
    prompt.save(tmp_path / "p.safetensors")
    back = SoftPrompt.load(tmp_path / "p.safetensors", model=model)
    assert (back.kv is None) == (prompt.kv is None) == (method != "prefix")
    assert (getattr(back, "head", None) is None) == (getattr(prompt, "head", None) is None) == (arch != "bert")
    assert (back.method, back.training) == (prompt.method, prompt.training)
    torch.testing.assert_close(scores(model, tok, [back]), scores(model, tok, [prompt]), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- 2. mixed batches
@pytest.mark.parametrize("arch, method", PAIRS)
def test_mixed_batch_equals_one_by_one(arch, method, models, trained):
    """Two trained prompts in one bank, a batch mixing them (an entry per example), scores each
    example exactly as scoring it alone with its own prompt."""
    if not supported(arch, method):
        return assert_refused(models, arch, method)
    model, tok = models(arch)
    a, b = trained(arch, method, 0).prompt, trained(arch, method, 1).prompt
    mix = [0, 1, 1, 0, 1]
    together = scores(model, tok, [a, b], entries=mix)
    alone = torch.cat([scores(model, tok, [(a, b)[k]], examples=[ex]) for k, ex in zip(mix, EXAMPLES)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(scores(model, tok, [a]), scores(model, tok, [b]), atol=1e-3)  # the two differ


# ----------------------------------------------------------------------------- 3. server
@pytest.mark.parametrize("arch, method", PAIRS)
def test_server_scores_like_the_library(arch, method, models, trained):
    """The in-process server answers as ``classify`` does; a family it cannot serve is refused
    when the engine is built for its model, and its prompts are refused at register by an engine
    that serves another model."""
    from softprompt.serve.engine import Engine, ModelMismatchError

    if not supported(arch, method):
        return assert_refused(models, arch, method)
    model, tok = models(arch)
    prompt = trained(arch, method).prompt
    if not family_for(model).supports("serve"):
        with pytest.raises(UnsupportedError, match="cannot be served") as e:
            Engine(model, tok)
        assert (e.value.family, e.value.capability) == (ARCHS[arch], "serve")
        with Engine(*models("llama")) as eng:  # nor does a served model's engine take this family's prompt
            with pytest.raises(ModelMismatchError, match=f"trained for base model 'tiny-{arch}-0'"):
                eng.register("t", prompt)
            assert not eng.tasks()
        return
    with Engine(model, tok) as eng:
        eng.register("t", prompt)
        got = eng.classify("t", [ex.fields for ex in EXAMPLES])
    bank = family_for(model).make_bank(model, tok)
    res = classify(bank, bank.add_prompt(prompt, "p"), EXAMPLES)
    probs = torch.tensor([[r.probabilities[lab] for lab in res.labels] for r in got])
    torch.testing.assert_close(probs, res.probabilities, atol=1e-5, rtol=1e-5)
    assert [r.label for r in got] == res.predictions


# ----------------------------------------------------------------------------- 4. PEFT
@torch.no_grad()
def peft_scores(peft_model, tok, texts: list[str]) -> torch.Tensor:
    """Label scores from PEFT's own forward: input text (no special tokens) + label word, the label
    tokens' log-probs summed (as tests/test_peft_io.py computes them)."""
    from softprompt.core.templates import encode_text

    peft_model.eval()
    out = torch.empty(len(texts), len(TASK.verbalizer))
    for i, text in enumerate(texts):
        ids = tok(text, add_special_tokens=False).input_ids
        for j, word in enumerate(TASK.verbalizer.values()):
            lab = encode_text(tok, word)
            full = torch.tensor([ids + lab])
            lp = peft_model(input_ids=full, attention_mask=torch.ones_like(full)).logits[0].float().log_softmax(-1)
            offset = lp.shape[0] - full.shape[1]  # prompt tuning returns logits for the virtual tokens too
            out[i, j] = sum(lp[offset + len(ids) - 1 + k, t] for k, t in enumerate(lab))
    return out


NO_PEFT = importlib.util.find_spec("peft") is None


# peft (not this package) still hands the full model `past_key_values` for prefix adapters
@pytest.mark.filterwarnings(r"ignore:.*past_key_values.*(ForCausalLM|LMHeadModel)\.forward:FutureWarning")
@pytest.mark.skipif(NO_PEFT, reason="peft is an optional extra: pip install 'softprompt[hf]'")
@pytest.mark.parametrize("arch, method", PAIRS)
def test_peft_round_trip(arch, method, models, trained, tmp_path):
    """Export to a PEFT adapter: PEFT's own forward scores as ours; imported back, the prompt scores as
    the trained one.
    Prefix prompts export (PREFIX_TUNING) but are not read back; families PEFT interop does not
    cover are refused on export and on import."""
    import peft

    from softprompt.apps.interop.peft import PeftExportError, PeftImportError, export_peft, render_peft_input
    from softprompt.apps.interop.peft_import import import_peft

    if not supported(arch, method):
        return assert_refused(models, arch, method)
    model, tok = models(arch)
    prompt = trained(arch, method).prompt
    if not family_for(model).supports("peft"):
        with pytest.raises(PeftExportError, match="PEFT interop supports decoder-only"):
            export_peft(prompt, model, tok, tmp_path / "adapter")
        assert not (tmp_path / "adapter").exists()
        return
    info = export_peft(prompt, model, tok, tmp_path / "adapter")
    pm = peft.PeftModel.from_pretrained(tiny_causal_lm(arch), tmp_path / "adapter")  # the same numbers in PEFT itself
    texts = [render_peft_input(info.input_template, ex.fields) for ex in EXAMPLES]
    torch.testing.assert_close(peft_scores(pm, tok, texts), scores(model, tok, [prompt]), atol=1e-4, rtol=1e-4)
    if method == "prefix":
        assert info.peft_type == "PREFIX_TUNING"
        with pytest.raises(PeftImportError, match="only PEFT PROMPT_TUNING.*per-layer"):
            import_peft(tmp_path / "adapter", model, tok)
        return
    assert info.peft_type == "PROMPT_TUNING"
    back = import_peft(tmp_path / "adapter", model, tok)
    assert torch.equal(back.embeddings, prompt.embeddings) and back.template == prompt.template
    torch.testing.assert_close(scores(model, tok, [back]), scores(model, tok, [prompt]), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(NO_PEFT, reason="peft is an optional extra: pip install 'softprompt[hf]'")
def test_peft_import_refuses_other_families(models, tmp_path):
    """An adapter exported from a decoder cannot be imported into a family PEFT interop does not cover."""
    from softprompt.apps.interop.peft import PeftImportError, export_peft
    from softprompt.apps.interop.peft_import import import_peft

    model, tok = models("llama")
    export_peft(trained_plain(model), model, tok, tmp_path / "adapter")
    for arch in ("t5", "bert"):
        with pytest.raises(PeftImportError, match="PEFT interop supports decoder-only"):
            import_peft(tmp_path / "adapter", *models(arch))


def trained_plain(model) -> SoftPrompt:
    from softprompt.serve.testing import random_prompt

    return random_prompt(model, TASK.template, verbalizer=TASK.verbalizer, seed=1)
