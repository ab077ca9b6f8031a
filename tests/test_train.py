"""Training mechanics on a tiny random model: loss falls, the model stays frozen, resume is exact."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from softprompt.core.prompts import SoftPrompt
from softprompt.data import Example, Task
from softprompt.testing import tiny_causal_lm, tiny_tokenizer
from softprompt.training.prompt import TrainConfig, train_prompt
from softprompt.training.checkpoint import CHECKPOINT, RunProgress
from softprompt.training.loop import batch_plan, lr_at

POS = ["good movie", "great film", "love this movie", "amazing film", "good good", "happy great"]
NEG = ["bad movie", "awful film", "hate this movie", "terrible film", "bad bad", "sad awful"]
TASK = Task(name="toy", kind="classification", template="{soft:4} review : {text} label :",
            verbalizer={"pos": " yes", "neg": " no"})
TRAIN = [Example({"text": t}, "pos") for t in POS] + [Example({"text": t}, "neg") for t in NEG]


def test_loss_falls_and_model_stays_frozen(tmp_path):
    model, tok = tiny_causal_lm(), tiny_tokenizer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(epochs=15, lr=0.1, batch_size=4, init="vocab", warmup_steps=2)
    res = train_prompt(model, tok, TASK, TRAIN, TRAIN, cfg, out_dir=tmp_path, progress=False)
    first, last = res.history[0]["loss"], res.history[-1]["loss"]
    assert last < 0.5 * first, (first, last)
    assert res.history[-1]["valid"]["accuracy"] == 1.0
    assert all(not p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), "base weights untouched"
    saved = SoftPrompt.load(tmp_path / "prompt.safetensors", model=model)
    assert saved.training["best_step"] == res.best_step and saved.n_tokens == 4


def test_generation_task_trains():
    model, tok = tiny_causal_lm(), tiny_tokenizer()
    task = Task(name="qa", kind="generation", template="{soft:3} question : {q} answer :")
    exs = [Example({"q": q}, target="the world", answers=("the world",)) for q in ("who", "what", "where", "why")]
    res = train_prompt(model, tok, task, exs, exs, TrainConfig(epochs=40, lr=0.1, batch_size=4, init="vocab", warmup_steps=2),
                       progress=False)
    assert res.history[-1]["loss"] < 0.5 * res.history[0]["loss"]
    assert res.history[0]["valid"]["exact_match"] == 0.0
    assert res.history[-1]["valid"]["f1"] >= 0.75, res.history[-1]["valid"]


def test_refuses_unfrozen_model_and_unknown_label():
    model, tok = tiny_causal_lm(), tiny_tokenizer()
    with pytest.raises(ValueError, match="label"):
        train_prompt(model, tok, TASK, [Example({"text": "good"}, "meh")], progress=False)
    model.lm_head.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="frozen"):
        train_prompt(model, tok, TASK, TRAIN, progress=False)


def test_schedule_and_plan_are_deterministic():
    cfg = TrainConfig(lr=1.0, warmup_steps=4, schedule="linear")
    assert lr_at(0, 20, cfg) == 0.25 and lr_at(3, 20, cfg) == 1.0 and lr_at(19, 20, cfg) < 0.1
    assert batch_plan(10, 3, 2, seed=1) == batch_plan(10, 3, 2, seed=1)
    assert batch_plan(10, 3, 2, seed=1) != batch_plan(10, 3, 2, seed=2)


SCRIPT = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {src!r}); sys.path.insert(0, {tests!r})
    from test_train import TASK, TRAIN
    from softprompt.testing import tiny_causal_lm, tiny_tokenizer
    from softprompt.training.prompt import TrainConfig, train_prompt
    import softprompt.training.prompt as T
    slow = float(sys.argv[2])
    if slow:
        orig = T.batch_loss
        def batch_loss(*a, **k):
            time.sleep(slow)
            return orig(*a, **k)
        T.batch_loss = batch_loss
    method = sys.argv[4]  # ptuning: an LSTM encoder's weights and their optimizer state must resume too
    cfg = TrainConfig(epochs=6, lr=0.1 if method == "prompt" else 0.01, batch_size=4, init="vocab", warmup_steps=2,
                      eval_every=3, checkpoint_every=2, optimizer=sys.argv[3], method=method, encoder="lstm", encoder_hidden=16)
    train_prompt(tiny_causal_lm(), tiny_tokenizer(), TASK, TRAIN, TRAIN[::2], cfg, out_dir=sys.argv[1], resume=True, progress=False)
""")


@pytest.mark.parametrize("optimizer,method", [("adamw", "prompt"), ("adafactor", "prompt"), ("adamw", "ptuning")])
def test_sigkill_then_resume_gives_the_same_prompt(tmp_path, optimizer, method):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(src=str(Path(__file__).parents[1] / "src"), tests=str(Path(__file__).parent)))
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    subprocess.run([sys.executable, str(script), str(ref), "0", optimizer, method], check=True, env=env)
    proc = subprocess.Popen([sys.executable, str(script), str(killed), "0.25", optimizer, method], env=env)
    deadline = time.time() + 120
    while time.time() < deadline:
        ck = killed / CHECKPOINT
        if ck.exists():
            from safetensors import safe_open
            with safe_open(str(ck), framework="pt") as f:
                if json.loads(f.metadata()["state"])["step"] >= 4:
                    break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "prompt.safetensors").exists(), "the run was killed before it finished"
    subprocess.run([sys.executable, str(script), str(killed), "0", optimizer, method], check=True, env=env)
    a = SoftPrompt.load(ref / "prompt.safetensors")
    b = SoftPrompt.load(killed / "prompt.safetensors")
    assert torch.equal(a.embeddings, b.embeddings)
    assert json.loads((ref / "history.json").read_text()) == json.loads((killed / "history.json").read_text())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("kind", ["classification", "generation"])
def test_full_and_cached_contexts_give_the_same_loss_and_gradient(family, kind):
    """The GPU training step (prompt + input in one pass) and the CPU one (prompt key/values once,
    then each input) compute the same function, multi-token label words included."""
    from softprompt.core.bank import PromptBank
    from softprompt.training.prompt import batch_loss, resolve_context

    model, tok = tiny_causal_lm(family), tiny_tokenizer()
    if kind == "classification":
        task = Task(name="t", kind=kind, template="{soft:3} review : {text} {soft:2} label :",
                    verbalizer={"pos": " yes", "neg": " no not"})
        exs = TRAIN[:5]
    else:
        task = Task(name="t", kind=kind, template="{soft:4} question : {text} answer :")
        exs = [Example({"text": t}, target="the world", answers=("the world",)) for t in POS[:3] + ["why", "a"]]
    results = {}
    for context in ("cached", "full"):
        soft = torch.nn.Parameter(torch.randn(5 if kind == "classification" else 4, 32, generator=torch.Generator().manual_seed(0)))
        bank = PromptBank(model, tok)
        entry = bank.add("t", task.template, soft, verbalizer=task.verbalizer, kind=kind)
        loss, n = batch_loss(bank, entry, exs, "rank", context=context)
        loss.backward()
        results[context] = (loss.detach(), soft.grad.clone(), n)
    torch.testing.assert_close(results["full"][0], results["cached"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results["full"][1], results["cached"][1], atol=1e-5, rtol=1e-4)
    assert results["full"][2] == results["cached"][2]
    assert resolve_context("auto", model) == "cached" and resolve_context("full", model) == "full"
    with pytest.raises(ValueError, match="context"):
        resolve_context("fast", model)


def test_full_context_trains_like_cached(tmp_path):
    """A whole run with context="full" ends where the default (cached, on a CPU) ends."""
    model, tok = tiny_causal_lm(), tiny_tokenizer()
    cfg = dict(epochs=3, lr=0.1, batch_size=4, init="vocab", warmup_steps=1)
    a = train_prompt(model, tok, TASK, TRAIN, None, TrainConfig(**cfg, context="cached"), progress=False)
    b = train_prompt(model, tok, TASK, TRAIN, None, TrainConfig(**cfg, context="full"), progress=False)
    torch.testing.assert_close(a.prompt.embeddings, b.prompt.embeddings, atol=1e-4, rtol=1e-4)


def test_run_progress_judges_validations_and_survives_a_checkpoint():
    """The state both training loops checkpoint: best score, its step, patience count, clock."""
    run = RunProgress()
    run.step = 4
    assert run.judge([0.5, 0.4]) and run.best_step == 4
    run.step = 8
    assert not run.judge((0.5, 0.3)) and run.bad_evals == 1 and not run.out_of_patience(2)
    assert not run.judge((0.5, 0.4)) and run.out_of_patience(2)  # a tie is not an improvement
    assert not run.out_of_patience(None)
    run.step, run.elapsed, run.tokens_seen = 12, 3.0, 600
    meta = json.loads(json.dumps(run.meta({"lr": 0.1})))  # as the checkpoint stores it
    back = RunProgress.from_meta(meta)
    assert (back.step, back.best_score, back.best_step, back.bad_evals, back.tokens_per_s) == (12, (0.5, 0.4), 4, 2, 200)
    assert back.judge((0.6, 0.0)) and back.bad_evals == 0 and back.best_step == 12


def test_labels_init_on_a_generation_task_starts_from_the_instruction():
    """The recipe's default init ("labels") has no label words on a generation task: it starts from
    the instruction's tokens instead (sampled vocabulary without one), rather than failing."""
    from softprompt.training.prompt import initial_prompt

    model, tok = tiny_causal_lm(), tiny_tokenizer()
    task = Task(name="qa", kind="generation", template="{soft:3} question : {q} answer :", instruction="answer it")
    start = initial_prompt(model, tok, task, TrainConfig(init="labels"))
    text = initial_prompt(model, tok, task, TrainConfig(init="text"))
    assert torch.equal(start, text)
    bare = Task(name="qa", kind="generation", template="{soft:3} question : {q} answer :")
    assert torch.equal(initial_prompt(model, tok, bare, TrainConfig(init="labels", seed=4)),
                       initial_prompt(model, tok, bare, TrainConfig(init="vocab", seed=4)))
