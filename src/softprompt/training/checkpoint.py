"""Checkpoints of a training run: one safetensors file (tensors + a JSON header, no pickle)
written atomically with ``os.replace``, so a run killed at any moment leaves either the old
checkpoint or the new one.

A checkpoint holds the trainable's state tensors, the best values kept so far (``best.*``),
the optimizer state (tensors as ``opt.<param>.<key>``, the rest as JSON) and the
:class:`RunProgress` (history, best score, early-stopping count, clock).  Together with a
batch plan that is a function of the seed, that is everything ``resume`` needs to end where
an uninterrupted run ends.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..core import atomic
from .config import TrainConfig

CHECKPOINT = "checkpoint.safetensors"


def _atomic_save(tensors: dict[str, torch.Tensor], meta: dict, path: Path) -> None:
    atomic.write_safetensors(path, {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                             metadata={"state": json.dumps(meta)})


def save_checkpoint(path: Path, *, params: dict, best: dict, optimizer, meta: dict) -> None:
    """Trainable tensors, their best values and optimizer state as tensors; everything else as JSON."""
    tensors = {**params, **{f"best.{k}": v for k, v in best.items()}}
    sd = optimizer.state_dict()
    opt_meta: dict[str, Any] = {"param_groups": sd["param_groups"], "state": {}}
    for pid, st in sd["state"].items():
        opt_meta["state"][str(pid)] = {}
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt.{pid}.{k}"] = v
                opt_meta["state"][str(pid)][k] = {"tensor": f"opt.{pid}.{k}"}
            else:
                opt_meta["state"][str(pid)][k] = {"value": v}
    _atomic_save(tensors, {**meta, "optimizer": opt_meta}, path)


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["state"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, meta


def optimizer_state(tensors: dict[str, torch.Tensor], opt_meta: dict) -> dict:
    """The optimizer ``state_dict`` that :func:`save_checkpoint` split into tensors and JSON."""
    state = {}
    for pid, st in opt_meta["state"].items():
        state[int(pid)] = {k: tensors[v["tensor"]] if "tensor" in v else v["value"] for k, v in st.items()}
    return {"state": state, "param_groups": opt_meta["param_groups"]}


def config_matches(saved: dict, current: dict) -> bool:
    """Whether a checkpoint's run config equals ``current``; TrainConfig fields added since the
    checkpoint was written take their defaults (so it still resumes)."""
    return {**json.loads(json.dumps(TrainConfig().to_dict())), **saved} == json.loads(json.dumps(current))


def checkpoint_to_resume(out: Path | None, resume: bool, run_config: dict) -> tuple[dict[str, torch.Tensor], dict] | None:
    """``out``'s checkpoint (tensors, meta) when resuming and there is one; an error when it was
    written with another config, since continuing it would train a mixture of two runs."""
    if not (resume and out is not None and (out / CHECKPOINT).exists()):
        return None
    tensors, meta = load_checkpoint(out / CHECKPOINT)
    if not config_matches(meta["config"], run_config):
        raise ValueError(f"{out / CHECKPOINT} was written with a different config; start a new out_dir or drop --resume")
    return tensors, meta


@dataclass
class RunProgress:
    """Where a training run stands apart from its tensors: the history, the best validation score
    and its step, the validations since it last improved (early stopping), and the clock and token
    count behind tokens/s.  A checkpoint's metadata holds exactly this, so a resumed run
    continues all of it."""

    step: int = 0
    history: list[dict] = field(default_factory=list)
    best_score: tuple | None = None
    best_step: int = 0
    bad_evals: int = 0
    elapsed: float = 0.0  # training seconds so far, earlier runs of a resumed training included
    tokens_seen: int = 0
    _started: float = field(default=0.0, repr=False)

    @classmethod
    def from_meta(cls, meta: dict) -> "RunProgress":
        best = meta["best_score"]
        return cls(step=meta["step"], history=meta["history"], best_score=tuple(best) if best is not None else None,
                   best_step=meta["best_step"], bad_evals=meta["bad_evals"], elapsed=meta["elapsed"],
                   tokens_seen=meta["tokens_seen"])

    def meta(self, config: dict) -> dict:
        """The checkpoint metadata (JSON) for this point of the run."""
        return {"step": self.step, "history": self.history, "best_score": self.best_score,
                "best_step": self.best_step, "bad_evals": self.bad_evals, "elapsed": self.elapsed,
                "tokens_seen": self.tokens_seen, "config": config}

    def start_clock(self) -> None:
        """Start timing, continuing from the seconds already recorded."""
        self._started = time.perf_counter() - self.elapsed

    def tick(self) -> None:
        self.elapsed = time.perf_counter() - self._started

    def judge(self, score) -> bool:
        """Count a validation at the current step; True when ``score`` is the best so far (the
        caller then keeps the current values)."""
        if self.best_score is None or tuple(score) > self.best_score:
            self.best_score, self.best_step, self.bad_evals = tuple(score), self.step, 0
            return True
        self.bad_evals += 1
        return False

    def out_of_patience(self, patience: int | None) -> bool:
        return patience is not None and self.bad_evals >= patience

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_seen / max(self.elapsed, 1e-9)


__all__ = ["CHECKPOINT", "RunProgress", "checkpoint_to_resume", "config_matches", "load_checkpoint",
           "optimizer_state", "save_checkpoint"]
