"""How a comparison trains one planned soft prompt: the training recipe
(``search.train_with_recipe``: stop on convergence, collapse guard, and for the main method the
learning rate chosen on validation data), or ``--restarts`` (``restarts.train_with_restarts``,
a seed choice of its own).  A module of its own so the runner stays one screenful per concern.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ...data import Task
from ...training.config import TrainConfig, TrainResult

METHOD_KEYS = ("method", "encoder", "encoder_hidden", "reparam", "prefix_tokens")


def train_soft(comp, spec: dict[str, Any], task: Task, train: list, run_dir: Path) -> TrainResult:
    """Train the prompt ``spec`` describes, continuing from ``run_dir``'s checkpoints; a checkpoint
    written under another config (the spec changed) is dropped and the run starts over."""
    from ...training.recipe import DEFAULT_RECIPE
    from ...training.restarts import train_with_restarts
    from ...training.search import train_with_recipe

    auto = spec["lr"] == "auto"
    overrides = dict(init=spec["init"], init_text=spec["init_text"], epochs=0, max_steps=spec["max_steps"],
                     batch_size=spec["batch_size"], warmup_steps=spec["warmup_steps"], optimizer=spec["optimizer"],
                     eval_every=spec["eval_every"], patience=spec["patience"],
                     eval_batch_size=comp.cfg.eval_batch_size,
                     max_new_tokens=spec.get("max_new_tokens", TrainConfig.max_new_tokens),
                     **{k: spec[k] for k in METHOD_KEYS if k in spec})
    valid = comp.valid or None

    def go(resume: bool) -> TrainResult:
        if spec.get("restarts", 1) > 1:
            cfg = DEFAULT_RECIPE.config(comp.model, lr=spec["lr"], seed=spec["seed"], **overrides)
            return train_with_restarts(comp.model, comp.tok, task, train, valid, cfg, spec["restarts"],
                                       out_dir=run_dir, resume=resume, progress=comp.progress)
        return train_with_recipe(comp.model, comp.tok, task, train, valid, lr=None if auto else spec["lr"],
                                 seed=spec["seed"], search=auto, search_seeds=(spec.get("search") or {}).get("seeds", 2),
                                 out_dir=run_dir, resume=resume, progress=comp.progress, **overrides)

    try:
        return go(True)
    except ValueError as e:
        if "different config" not in str(e):
            raise
        for stale in run_dir.rglob("checkpoint.safetensors"):  # every candidate and restart keeps its own
            stale.unlink()
        return go(False)


def train_record(res: TrainResult, spec: dict[str, Any], n_train: int) -> dict[str, Any]:
    """The ``train`` entry of a soft run's record in results.json: cost, schedule, why it stopped,
    the learning rate it trained at and, when chosen automatically, every candidate of the search."""
    hist, training = res.history, res.prompt.training
    stride = max(1, math.ceil(len(hist) / 2000))
    rec: dict[str, Any] = {
        "wall_s": res.wall_time_s, "steps": res.steps, "max_steps": spec["max_steps"], "n_train": n_train,
        "best_step": res.best_step, "tokens_per_s": res.tokens_per_s, "stopped_early": res.stopped_early,
        "stop_reason": res.stop_reason, "lr": training.get("lr"), "lr_auto": spec["lr"] == "auto",
        "seed": training.get("seed"),
        "loss": [[h["step"], h["loss"]] for h in hist[::stride]],
        "valid": [[h["step"], h["valid"].get("accuracy", h["valid"].get("f1"))] for h in hist if "valid" in h],
    }
    for key in ("lr_search", "restarts"):
        if training.get(key):
            rec[key] = training[key]
    if len(training.get("collapse_restarts") or []) > 1:  # only when a run collapsed and was retrained
        rec["collapse_restarts"] = training["collapse_restarts"]
    return rec


__all__ = ["train_record", "train_soft"]
