"""Multitask prompt tuning (training/mpt.py) on tiny models: the multiplied-out task prompt scores as
the factored one trained, step 0 is the shared prompt, and the saved files are plain prompts."""
import pytest
import torch

from softprompt.core.bank import PromptBank
from softprompt.core.prompts import SoftPrompt
from softprompt.core.scoring import classify
from softprompt.testing import tiny_causal_lm, tiny_tokenizer
from softprompt.training.config import TrainConfig
from softprompt.training.mpt import MPTTrainable, train_mpt
from softprompt.training.multitask import mixture

from test_multitask import SENT, SENT_EX, TOPIC, TOPIC_EX

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_step_zero_is_the_shared_prompt_for_every_task():
    model, tok = tiny_causal_lm(), tiny_tokenizer()
    tr = MPTTrainable(model, tok, [SENT, TOPIC], mixture([SENT_EX, TOPIC_EX]), TrainConfig(init="vocab"), rank=2)
    shared = tr.trained.values()["prompt"]
    assert all(torch.allclose(p, shared) for p in tr.task_prompts())
    with pytest.raises(ValueError, match="rank"):
        MPTTrainable(model, tok, [SENT, TOPIC], mixture([SENT_EX, TOPIC_EX]), TrainConfig(init="vocab"), rank=0)


def test_multiplied_out_prompt_scores_like_the_factored_one(tmp_path):
    from softprompt.training.loop import fit

    model, tok = tiny_causal_lm(), tiny_tokenizer()
    cfg = TrainConfig(epochs=5, lr=0.1, batch_size=4, init="vocab", warmup_steps=1)
    pool = mixture([SENT_EX, TOPIC_EX])
    tr = MPTTrainable(model, tok, [SENT, TOPIC], pool, cfg, rank=1)
    res = fit(tr, pool, None, cfg, out_dir=tmp_path, progress=False)
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    saved = {t.name: SoftPrompt.load(tmp_path / f"prompt.{t.name}.safetensors", model) for t in (SENT, TOPIC)}
    shared = SoftPrompt.load(tmp_path / "prompt._shared.safetensors", model)
    assert not torch.allclose(saved["sent"].embeddings, saved["topic"].embeddings)  # the task parts moved apart
    assert not torch.allclose(saved["sent"].embeddings, shared.embeddings)
    assert saved["sent"].training["mpt_rank"] == 1 and saved["sent"].method == "prompt_tuning"
    tr.condition()  # the factored form, P * (u_k @ v_k), at the final state
    for k, (t, exs) in enumerate(((SENT, SENT_EX), (TOPIC, TOPIC_EX))):
        factored = classify(tr.bank, tr.entries[k], exs).scores
        bank = PromptBank(model, tok)
        plain = classify(bank, bank.add_prompt(saved[t.name], t.name), exs).scores
        assert torch.allclose(factored, plain, atol=1e-4), t.name


def test_train_mpt_runs_the_mixture(tmp_path):
    model, tok = tiny_causal_lm(), tiny_tokenizer()
    cfg = TrainConfig(epochs=2, lr=0.1, batch_size=4, init="vocab", warmup_steps=1)
    res = train_mpt(model, tok, [SENT, TOPIC], [SENT_EX, TOPIC_EX], [SENT_EX, TOPIC_EX], cfg, rank=2,
                    out_dir=tmp_path, progress=False)
    assert set(res.prompt.prompts) == {"sent", "topic", "_shared"}
    assert set(res.history[-1]["valid"]["per_task"]) == {"sent", "topic"}
