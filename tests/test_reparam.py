"""Reparameterised training (P-tuning, prefix tuning through an MLP) on tiny random models:
the loss falls, and the saved artifact is exactly the encoder's output, so it scores like
the prompt did during training and mixes with other kinds of prompt in one batch."""
import pytest
import torch

from softprompt.core.bank import PromptBank
from softprompt.core.conditioning import label_logprobs, run_context
from softprompt.core.prompts import SoftPrompt
from softprompt.core.reparam import PromptEncoder, PromptTensors
from softprompt.core.scoring import classify
from softprompt.data import Example, Task
from softprompt.testing import tiny_causal_lm, tiny_tokenizer
from softprompt.training.prompt import TrainConfig, encoders_for, train_prompt
from softprompt.training.checkpoint import CHECKPOINT, load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

POS = ["good movie", "great film", "love this movie", "amazing film", "good good", "happy great"]
NEG = ["bad movie", "awful film", "hate this movie", "terrible film", "bad bad", "sad awful"]
TRAIN = [Example({"text": t}, "pos") for t in POS] + [Example({"text": t}, "neg") for t in NEG]
VERB = {"pos": " yes", "neg": " no"}
# soft slots on both sides of the input: P-tuning's encoder sees all four as one sequence
SPLIT = Task(name="split", kind="classification", template="{soft:2} review : {text} {soft:2} label :", verbalizer=VERB)
HARD = Task(name="hard", kind="classification", template="review : {text} label :", verbalizer=VERB)


def _cfg(**kw) -> TrainConfig:
    # full-batch steps keep the loss curve smooth; an encoder's weights want a small lr
    return TrainConfig(**{"epochs": 30, "lr": 0.01, "batch_size": 12, "init": "vocab", "warmup_steps": 2,
                          "encoder_hidden": 32, **kw})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three trained runs on one tiny model, each with its out_dir: P-tuning (MLP and LSTM
    encoders) and prefix tuning through an MLP."""
    model, tok = tiny_causal_lm(), tiny_tokenizer()
    out = {}
    for name, task, cfg in [
        ("mlp", SPLIT, _cfg(method="ptuning", encoder="mlp")),
        ("lstm", SPLIT, _cfg(method="ptuning", encoder="lstm")),
        ("prefix", HARD, _cfg(method="prefix", reparam="mlp", prefix_tokens=2)),
    ]:
        d = tmp_path_factory.mktemp(name)
        res = train_prompt(model, tok, task, TRAIN, None, cfg, out_dir=d, progress=False)
        out[name] = (task, cfg, res, d)
    return model, tok, out


def _encoder_at_save(model, tok, task, cfg, out_dir) -> dict[str, torch.Tensor]:
    """Rebuild the run's encoder from its last checkpoint and run it (the training-time prompt)."""
    tensors, meta = load_checkpoint(out_dir / CHECKPOINT)
    assert meta["step"] == cfg.epochs  # one full-batch step per epoch: the final state
    shapes = {"prompt": tensors.get("prompt.base"), "kv": tensors.get("kv.base")}
    start = {k: torch.zeros_like(v) for k, v in shapes.items() if v is not None}
    trained = PromptTensors(start, encoders_for(cfg), hidden=cfg.encoder_hidden, seed=123)  # seed: overwritten
    trained.load_state(tensors)
    return trained.values()


def test_encoder_starts_at_its_base_and_reaches_every_position():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 2, 5, 4, generator=g)  # positions on axis 2
    for kind in ("mlp", "lstm"):
        enc = PromptEncoder(base, 2, encoder=kind, hidden=8, seed=1)
        assert torch.equal(enc(), base), "the zero-initialised last layer starts at the base values"
        enc.mlp[-1].bias.data.normal_(generator=g)
        enc.mlp[-1].weight.data.normal_(generator=g)
        out = enc()
        assert out.shape == base.shape
        # each position's slice has its own input vector, so the slices differ
        assert not torch.allclose(out[:, :, 0] - base[:, :, 0], out[:, :, 1] - base[:, :, 1])
        assert torch.equal(enc.materialise(), out.detach())
        out.square().sum().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())
    a, b = PromptEncoder(base, 2, encoder="lstm", hidden=8, seed=1), PromptEncoder(base, 2, encoder="lstm", hidden=8, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters())), "seeded"
    with pytest.raises(ValueError, match="even"):
        PromptEncoder(base, 2, encoder="lstm", hidden=7)


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="encoder"):
        encoders_for(TrainConfig(method="ptuning", encoder="gru"))
    with pytest.raises(ValueError, match="ptuning"):
        encoders_for(TrainConfig(method="ptuning", reparam="mlp"))
    assert encoders_for(TrainConfig(method="prompt", reparam="mlp")) == {"prompt": ("mlp", 0)}  # residual
    with pytest.raises(ValueError, match="method"):
        encoders_for(TrainConfig(method="lora"))
    assert encoders_for(TrainConfig(method="prefix")) == {} and encoders_for(TrainConfig()) == {}


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
def test_ptuning_trains_and_saves_the_encoder_output(runs, encoder):
    model, tok, out = runs
    task, cfg, res, d = out[encoder]
    first, last = res.history[0]["loss"], res.history[-1]["loss"]
    assert last < 0.6 * first, (first, last)
    saved = SoftPrompt.load(d / "prompt.safetensors", model=model)
    assert saved.method == "p_tuning" and saved.kv is None and saved.n_tokens == 4
    assert saved.training["method"] == "ptuning" and saved.training["encoder"] == encoder
    assert saved.training["reparameterised"]["prompt"]["encoder"] == encoder
    live = _encoder_at_save(model, tok, task, cfg, d)["prompt"]
    assert live.requires_grad
    assert torch.equal(saved.embeddings, live.detach()), "the artifact is the encoder's output at save time"
    assert not torch.allclose(saved.embeddings, _encoder_base(d)), "training moved the prompt off its start"
    # scores with the live (differentiable, recomputed) encoder output equal the reloaded artifact's
    b_live, b_saved = PromptBank(model, tok), PromptBank(model, tok)
    b_live.add("x", task.template, live, verbalizer=VERB)
    b_saved.add_prompt(saved, "x")
    assert torch.equal(classify(b_live, "x", TRAIN).scores, classify(b_saved, "x", TRAIN).scores)


def _encoder_base(d):
    tensors, _ = load_checkpoint(d / CHECKPOINT)
    return tensors["prompt.base"]


def test_prefix_mlp_materialised_kv_gives_the_training_logits(runs):
    model, tok, out = runs
    task, cfg, res, d = out["prefix"]
    assert res.history[-1]["loss"] < 0.6 * res.history[0]["loss"]
    saved = SoftPrompt.load(d / "prompt.safetensors", model=model)
    assert saved.method == "prefix_tuning" and saved.training["reparam"] == "mlp"
    assert saved.kv.shape == PromptBank(model, tok).kv_shape(2)
    live = _encoder_at_save(model, tok, task, cfg, d)["kv"]
    assert torch.equal(saved.kv, live.detach())
    b_live, b_saved = PromptBank(model, tok), PromptBank(model, tok)
    b_live.add("x", task.template, kv=live, verbalizer=VERB)
    b_saved.add_prompt(saved, "x")
    suffixes = [b_live.suffix_ids(0, ex.fields) for ex in TRAIN]
    idx = torch.zeros(len(TRAIN), dtype=torch.long)
    training = torch.stack(label_logprobs(b_live, run_context(b_live, idx, suffixes)))  # with grad, as in training
    assert training.requires_grad
    with torch.no_grad():
        served = torch.stack(label_logprobs(b_saved, run_context(b_saved, idx, suffixes)))
    torch.testing.assert_close(training.detach(), served, atol=1e-6, rtol=0)


def test_mixed_batch_of_ptuning_prompt_and_prefix_prompts_equals_one_by_one(runs):
    model, tok, out = runs
    bank = PromptBank(model, tok)
    bank.add_prompt(out["lstm"][2].prompt, "ptuning")
    bank.add("plain", "{soft:3} tweet : {text} answer :", torch.randn(3, 32, generator=torch.Generator().manual_seed(2)),
             verbalizer=VERB)
    bank.add_prompt(out["prefix"][2].prompt, "prefix")
    texts = [ex.fields["text"] for ex in TRAIN[:9]]
    entries = [0, 1, 2, 2, 0, 1, 1, 2, 0]
    with torch.no_grad():
        def scores(es, ts):
            ctx = run_context(bank, torch.tensor(es), [bank.suffix_ids(e, {"text": t}) for e, t in zip(es, ts)])
            return label_logprobs(bank, ctx)

        mixed = scores(entries, texts)
        for e, t, m in zip(entries, texts, mixed):
            (alone,) = scores([e], [t])
            torch.testing.assert_close(m, alone, atol=1e-5, rtol=0)


def test_residual_reparameterisation_of_soft_tokens(tmp_path):
    """method prompt + reparam mlp: soft tokens = their start + MLP(z), the MLP's last layer zero at
    step 0; the saved prompt is plain prompt-tuning vectors, and they moved."""
    from softprompt.core.prompts import SoftPrompt
    from softprompt.training.prompt import initial_prompt

    model, tok = tiny_causal_lm(), tiny_tokenizer()
    cfg = _cfg(method="prompt", reparam="mlp")
    res = train_prompt(model, tok, SPLIT, TRAIN, None, cfg, out_dir=tmp_path, progress=False)
    saved = SoftPrompt.load(tmp_path / "prompt.safetensors", model)
    start = initial_prompt(model, tok, SPLIT, cfg)
    assert saved.method == "prompt_tuning" and saved.embeddings.shape == start.shape
    assert saved.training["reparameterised"]["prompt"]["encoder"] == "mlp"
    assert not torch.allclose(saved.embeddings, start) and res.history[-1]["loss"] < res.history[0]["loss"]
    zero = train_prompt(model, tok, SPLIT, TRAIN, None, _cfg(method="prompt", reparam="mlp", lr=1e-12),
                        progress=False)
    assert torch.allclose(zero.prompt.embeddings, start, atol=1e-6)  # step 0 is the plain prompt
