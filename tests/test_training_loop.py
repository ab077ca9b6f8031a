"""The one training loop (``training/loop.py``) on a toy trainable: a linear regression with no
model at all, so everything here is the loop's own behaviour (family-agnostic by construction):
training, validation with best keeping, early stopping, per-group rates and exact resume."""
import json
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file, save_file

from softprompt.training.checkpoint import CHECKPOINT, load_checkpoint
from softprompt.training.config import TrainConfig
from softprompt.training.loop import Trainable, fit, lr_at

TRUE_W, TRUE_B = torch.tensor([1.0, -2.0, 0.5]), 0.3


@dataclass
class Point:
    x: torch.Tensor
    y: float


def points(n: int, seed: int) -> list[Point]:
    xs = torch.randn(n, 3, generator=torch.Generator().manual_seed(seed))
    return [Point(x, float(x @ TRUE_W + TRUE_B)) for x in xs]


TRAIN, VALID = points(40, 1), points(16, 2)


@dataclass
class Artifact:
    tensors: dict

    def save(self, path) -> None:
        save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(path))


class Line(Trainable):
    """y = x.w + b; the bias has its own peak rate (a ``base_lr`` group)."""

    description = "toy"

    def __init__(self, bias_lr: float = 0.05, die_at: int | None = None, scores=None):
        self.w = torch.zeros(3, requires_grad=True)
        self.b = torch.zeros(1, requires_grad=True)
        self.bias_lr, self.die_at, self.scores, self.calls = bias_lr, die_at, scores, 0

    def param_groups(self):
        return [{"params": [self.w]}, {"params": [self.b], "base_lr": self.bias_lr}]

    def state(self):
        return {"w": self.w, "b": self.b}

    @torch.no_grad()
    def load_state(self, tensors):
        self.w.copy_(tensors["w"])
        self.b.copy_(tensors["b"])

    def mse(self, examples) -> torch.Tensor:
        x = torch.stack([ex.x for ex in examples])
        y = torch.tensor([ex.y for ex in examples])
        return ((x @ self.w + self.b - y) ** 2).mean()

    def loss(self, examples, index):
        self.calls += 1
        if self.calls == self.die_at:
            raise KeyboardInterrupt("killed")
        return self.mse(examples), len(examples)

    def validate(self, examples):
        with torch.no_grad():
            m = float(self.mse(examples))
        score = (-m,) if self.scores is None else self.scores.pop(0)
        return {"mse": m, "score": score}

    def snapshot(self):
        return {"w": self.w.detach().clone(), "b": self.b.detach().clone()}

    def finish(self, final, summary):
        return Artifact(final)


CFG = TrainConfig(epochs=12, batch_size=8, lr=0.1, warmup_steps=3, eval_every=5, checkpoint_every=4,
                  weight_decay=0.0, seed=3)


def test_trains_and_keeps_the_best_validated_values(tmp_path):
    toy = Line()
    res = fit(toy, TRAIN, VALID, CFG, out_dir=tmp_path, progress=False)
    assert res.steps == 12 * 5 and not res.stopped_early and res.trainable_params == 4
    valid = [h["valid"]["mse"] for h in res.history if "valid" in h]
    assert valid[-1] < 0.05 * valid[0]
    assert "score" not in res.history[4]["valid"]  # the score selects; the history keeps the metrics
    best = min(range(len(valid)), key=valid.__getitem__)
    assert res.best_step == (best + 1) * 5
    saved = load_file(str(tmp_path / "prompt.safetensors"))
    torch.testing.assert_close(saved["w"], res.prompt.tensors["w"])
    assert json.loads((tmp_path / "history.json").read_text()) == res.history
    assert load_checkpoint(tmp_path / CHECKPOINT)[1]["step"] == res.steps


def test_every_group_follows_the_schedule_at_its_own_peak(tmp_path):
    cfg = TrainConfig(**{**CFG.to_dict(), "max_steps": 2})  # ends in warmup, where the rate is not 0
    res = fit(Line(bias_lr=0.02), TRAIN, None, cfg, out_dir=tmp_path, progress=False)
    assert [h["lr"] for h in res.history] == [lr_at(s, 2, cfg) for s in range(2)]
    assert res.best_step == res.steps == 2  # without validation: the last values
    groups = load_checkpoint(tmp_path / CHECKPOINT)[1]["optimizer"]["param_groups"]
    assert groups[0]["lr"] == lr_at(1, 2, cfg) and groups[1]["lr"] == pytest.approx(0.02 * lr_at(1, 2, cfg) / cfg.lr)


def test_early_stopping_returns_the_best_values():
    cfg = TrainConfig(epochs=12, batch_size=8, lr=0.1, warmup_steps=0, schedule="constant", eval_every=5, patience=2,
                      weight_decay=0.0, seed=3)
    toy = Line(scores=[(3.0,), (2.0,), (1.0,), (0.0,)])  # only the first validation is the best
    res = fit(toy, TRAIN, VALID, cfg, progress=False)
    assert res.stopped_early and res.steps == 15 and res.best_step == 5
    # the values after step 5: what the same run without validation ends at after 5 steps
    ref = fit(Line(), TRAIN, None, TrainConfig(**{**cfg.to_dict(), "max_steps": 5}), progress=False)
    for k in ("w", "b"):
        assert torch.equal(res.prompt.tensors[k], ref.prompt.tensors[k])


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_interrupted_run_resumes_exactly(tmp_path, optimizer):
    cfg = TrainConfig(**{**CFG.to_dict(), "optimizer": optimizer, "patience": 4})
    whole = fit(Line(), TRAIN, VALID, cfg, out_dir=tmp_path / "a", progress=False)
    with pytest.raises(KeyboardInterrupt):
        fit(Line(die_at=23), TRAIN, VALID, cfg, out_dir=tmp_path / "b", progress=False)
    assert load_checkpoint(tmp_path / "b" / CHECKPOINT)[1]["step"] == 20  # the last checkpoint before step 23
    assert not (tmp_path / "b" / "prompt.safetensors").exists()
    resumed = fit(Line(), TRAIN, VALID, cfg, out_dir=tmp_path / "b", resume=True, progress=False)
    assert resumed.history == whole.history
    assert (resumed.best_step, resumed.steps, resumed.stopped_early) == (whole.best_step, whole.steps,
                                                                         whole.stopped_early)
    for k in ("w", "b"):
        assert torch.equal(resumed.prompt.tensors[k], whole.prompt.tensors[k])
    with pytest.raises(ValueError, match="different config"):
        fit(Line(), TRAIN, VALID, TrainConfig(**{**cfg.to_dict(), "lr": 0.2}), out_dir=tmp_path / "b", resume=True,
            progress=False)
