"""The training recipe (issue 22): stopping on convergence, the collapse guard, and the
learning-rate search by successive halving."""
import math

import pytest
import torch

from softprompt.data import Example
from softprompt.testing import tiny_causal_lm, tiny_tokenizer
from softprompt.training.config import TrainConfig
from softprompt.training.loop import Trainable, fit
from softprompt.training.prompt import train_prompt
from softprompt.training.recipe import DEFAULT_RECIPE, Recipe, collapse_reason, embedding_scale, loss_plateaued
from softprompt.training.search import SEARCH_LRS, guard_collapse, rung_steps, search_lr, successive_halving

from test_train import TASK, TRAIN  # the toy sentiment task of the training tests


# ----------------------------------------------------------------------------- stopping
class Scripted(Trainable):
    """A trainable whose loss follows a script (a real parameter, so the optimizer steps)."""

    def __init__(self, losses):
        self.losses, self.p = list(losses), torch.nn.Parameter(torch.zeros(1))

    def param_groups(self):
        return [{"params": [self.p]}]

    def state(self):
        return {"p": self.p}

    def load_state(self, tensors):
        self.p.data.copy_(tensors["p"])

    def loss(self, examples, index):
        return self.p.sum() * 0 + self.losses.pop(0), 1

    def validate(self, examples):
        return {"score": (0.0,)}

    def snapshot(self):
        return {"p": self.p.detach().clone()}

    def finish(self, final, summary):
        return Artifact(final)


class Artifact(dict):
    def save(self, path):
        torch.save(dict(self), path)


def test_loss_plateau_rule():
    assert loss_plateaued([1.0] * 40, window=10, patience=2)
    assert not loss_plateaued([1.0 - 0.01 * i for i in range(40)], window=10, patience=2)
    assert not loss_plateaued([1.0] * 20, window=10, patience=2)  # too few windows to tell


def test_a_flat_loss_stops_and_a_falling_one_runs_on():
    cfg = TrainConfig(epochs=0, max_steps=200, batch_size=1, eval_every=10, patience=3, warmup_steps=0)
    data = [Example({"text": "x"}, "pos")] * 4
    flat = fit(Scripted([0.7] * 200), data, None, cfg, progress=False)
    assert flat.stop_reason == "loss_plateau" and flat.steps == 40, (flat.stop_reason, flat.steps)
    assert flat.history[-1]["stop"] == "loss_plateau"
    falling = fit(Scripted([1.0 - 0.004 * i for i in range(200)]), data, None, cfg, progress=False)
    assert falling.stop_reason == "max_steps" and falling.steps == 200


def test_resuming_a_run_that_stopped_does_not_train_on(tmp_path):
    cfg = TrainConfig(epochs=0, max_steps=200, batch_size=1, eval_every=10, patience=3, warmup_steps=0)
    data = [Example({"text": "x"}, "pos")] * 4
    first = fit(Scripted([0.7] * 200), data, None, cfg, out_dir=tmp_path, progress=False)
    again = fit(Scripted([0.1] * 200), data, None, cfg, out_dir=tmp_path, resume=True, progress=False)
    assert (again.steps, again.stop_reason) == (first.steps, "loss_plateau") == (40, "loss_plateau")


def test_recipe_learning_rate_is_relative_to_the_embedding_scale():
    model = tiny_causal_lm()
    scale = embedding_scale(model)
    direct = DEFAULT_RECIPE.config(model, reparam="none")
    assert direct.lr == pytest.approx(DEFAULT_RECIPE.lr * scale) and direct.reparam == "none"
    assert Recipe(lr=0.05, lr_unit="absolute", reparam="none").config(model).lr == 0.05
    # through the residual MLP the rate is the MLP's own, absolute; other methods get no reparameterisation
    assert DEFAULT_RECIPE.config(model).lr == DEFAULT_RECIPE.reparam_lr
    assert DEFAULT_RECIPE.config(model).reparam == DEFAULT_RECIPE.reparam
    assert DEFAULT_RECIPE.config(model, method="prefix").reparam == "none"
    assert DEFAULT_RECIPE.config(model, method="prefix_tuning", reparam="mlp").lr == 1e-3
    assert DEFAULT_RECIPE.config(model, lr=0.2).lr == 0.2
    with pytest.raises(ValueError, match="lr_unit"):
        Recipe(lr_unit="relative")


# ----------------------------------------------------------------------------- collapse
def test_a_collapsed_run_is_detected_and_restarted_from_another_seed():
    model, tok = tiny_causal_lm(), tiny_tokenizer()
    only_pos = [ex for ex in TRAIN if ex.label == "pos"]
    cfg = TrainConfig(epochs=0, max_steps=40, lr=0.1, batch_size=4, init="vocab", warmup_steps=2, eval_every=5)
    seeds = []

    def train(c):  # the first attempt is forced to collapse: it only ever sees one class
        seeds.append(c.seed)
        return train_prompt(model, tok, TASK, only_pos if c.seed == cfg.seed else TRAIN, TRAIN, c, progress=False)

    res, attempts = guard_collapse(train, cfg, n_labels=2, restarts=2)
    assert attempts[0]["collapsed"] and "one class" in attempts[0]["collapsed"]
    assert attempts[1]["collapsed"] is None and attempts[1]["chosen"]
    assert len(attempts) == 2 and seeds == [cfg.seed, cfg.seed + 1000]
    assert collapse_reason(res, 2) is None
    assert res.wall_time_s == pytest.approx(sum(a["wall_time_s"] for a in attempts), abs=0.05)


# ----------------------------------------------------------------------------- successive halving
class Known:
    """A candidate whose validation score at each step is known in advance."""

    def __init__(self, curve):
        self.curve, self.steps, self.finished = curve, 0, False

    def advance(self, until_step):
        self.steps = until_step
        return (self.curve(until_step),)


def test_successive_halving_keeps_the_best_and_costs_less_than_a_grid():
    T = 200
    finals = [0.5, 0.9, 0.7, 0.6, 0.8, 0.4]
    runs = [Known(lambda s, f=f: f * s / T) for f in finals]
    winner, rungs = successive_halving(runs, T)
    assert winner == 1
    assert [len(r.scores) for r in rungs] == [6, 3, 1]
    assert set(rungs[1].scores) == {1, 4, 2}  # the better half after the first rung
    assert sum(r.steps for r in runs) <= 3 * T  # no more than a grid of three full runs
    # a candidate that starts badly is dropped even if it would have won (the price of halving)
    late = [Known(lambda s: 0.1 if s < T else 1.0)] + [Known(lambda s, f=f: f) for f in (0.5, 0.6, 0.7)]
    winner, _ = successive_halving(late, T)
    assert winner == 3
    assert rung_steps(T, 1) == [(T, 1)]


def test_search_on_a_real_model_equals_the_winner_trained_straight(tmp_path):
    """Paused and continued runs end where an uninterrupted run of the same candidate ends."""
    model, tok = tiny_causal_lm(), tiny_tokenizer()
    base = TrainConfig(epochs=0, max_steps=24, batch_size=4, init="vocab", warmup_steps=2, eval_every=3)

    def train(c, **kw):
        return train_prompt(model, tok, TASK, TRAIN, TRAIN, c, progress=False, **kw)

    res, records = search_lr(train, base, lrs=(0.01, 0.1, 0.3), seeds=(0,), work_dir=tmp_path)
    chosen = next(r for r in records if r["chosen"])
    assert sum(r["steps"] for r in records) <= 24 * 3
    assert [len(r["scores"]) for r in records].count(3) == 1
    straight = train(TrainConfig(**{**base.to_dict(), "lr": chosen["lr"], "seed": chosen["seed"]}))
    assert torch.allclose(res.prompt.embeddings, straight.prompt.embeddings, atol=1e-6)
    assert res.best_step == straight.best_step
    assert res.wall_time_s >= max(r["wall_time_s"] for r in records)
    assert math.isfinite(res.history[-1]["loss"])


def test_cli_train_by_default_searches_the_rate_and_says_why_it_stopped(tmp_path):
    from typer.testing import CliRunner

    from softprompt.cli import app
    from softprompt.core.prompts import SoftPrompt

    model, tok = tiny_causal_lm(), tiny_tokenizer()
    folder = tmp_path / "tiny-lm"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    rows = "text,label\n" + "".join(f"{e.fields['text']},{e.label}\n" for e in TRAIN)
    (tmp_path / "train.csv").write_text(rows)
    (tmp_path / "valid.csv").write_text(rows)
    args = ["train", "--model", str(folder), "--train-file", str(tmp_path / "train.csv"), "--valid-file",
            str(tmp_path / "valid.csv"), "--template", TASK.template, "--verbalizer", "pos= yes", "--verbalizer",
            "neg= no", "--max-steps", "12", "--batch-size", "4", "--out", str(tmp_path / "run")]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert r.output.count("<- chosen") == 1 and "training stopped:" in r.output
    saved = SoftPrompt.load(tmp_path / "run" / "prompt.safetensors")
    search = saved.training["lr_search"]
    assert len(search) == 6 and sum(s["chosen"] for s in search) == 1  # 3 rates x 2 seeds
    assert sorted({s["lr"] for s in search}) == sorted(DEFAULT_RECIPE.search_lrs(model))
    assert saved.training["reparam"] == DEFAULT_RECIPE.reparam and saved.method == "prompt_tuning"
    assert saved.training["recipe"]["lr_unit"] == "embedding"
    # the rates of soft tokens trained directly are in units of the embedding-entry std
    scale = embedding_scale(model)
    direct = DEFAULT_RECIPE.search_lrs(model, "prompt", "none")
    assert sorted(round(x / scale, 6) for x in direct) == sorted(SEARCH_LRS)
