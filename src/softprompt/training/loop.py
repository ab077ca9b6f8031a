"""The one training loop: :func:`fit` drives any :class:`Trainable` (a soft prompt on a decoder
or T5, P-tuning, prefix tuning, an encoder's prompt + head, a toy in the tests).

The loop is plain PyTorch on top of ``accelerate`` (device placement, mixed precision,
``backward``), readable top to bottom:

    for step, batch in plan[start:]:
        condition; loss = trainable.loss(batch); backward; clip; optimizer.step()
        every `eval_every` steps: validate, keep the best values, maybe stop early
        every `checkpoint_every` steps: write a checkpoint atomically (checkpoint.py)

Determinism is what makes ``resume`` exact: the whole batch plan is a function of the seed,
the frozen model has no dropout, and a checkpoint holds the trainable's state, the optimizer
state, the best values so far and the history.  A run killed with SIGKILL and resumed ends
where an uninterrupted run ends.

Under ``accelerate launch`` (or torchrun) the same loop runs data-parallel: the trainable
computes its rank's part of every global batch's loss, the loop sums the gradients over
processes (``distributed.py``) and takes validation metrics from the main process; the batch
plan, the checkpoint and the result do not depend on the process count, and only the main
process writes files.

What is family- or method-specific (how a batch's loss is computed, how a validation is
scored, what the final artifact is) lives in the trainable, never here.
"""
from __future__ import annotations

import math
import os
import random
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..core import atomic
from .distributed import DataParallel
from .checkpoint import CHECKPOINT, RunProgress, checkpoint_to_resume, optimizer_state, save_checkpoint
from .config import TrainConfig, TrainResult
from .recipe import loss_plateaued

ARTIFACT = "prompt.safetensors"


def batch_plan(n: int, batch_size: int, epochs: int, seed: int) -> list[tuple[int, list[int]]]:
    """(epoch, example indices) for every step: a fixed function of the seed, so resume is exact."""
    plan = []
    for epoch in range(epochs):
        order = list(range(n))
        random.Random(seed * 100003 + epoch).shuffle(order)
        for i in range(0, n, batch_size):
            plan.append((epoch, order[i : i + batch_size]))
    return plan


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Learning rate for 0-based ``step``: linear warmup, then linear/cosine decay or constant."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(total - cfg.warmup_steps, 1)
    frac = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * frac))
    return cfg.lr * (1 - frac)


def make_optimizer(params, cfg: TrainConfig):
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer in ("adafactor", "adafactor-relative"):
        from transformers.optimization import Adafactor

        # adafactor-relative: each step scaled by the parameter's RMS, as Lester et al. trained prompts
        return Adafactor(
            params, lr=cfg.lr, weight_decay=cfg.weight_decay, scale_parameter=cfg.optimizer == "adafactor-relative",
            relative_step=False, warmup_init=False,
        )
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; use adamw, adafactor or adafactor-relative")


def set_lr(optimizer, step: int, total: int, cfg: TrainConfig) -> None:
    """Every group on the schedule: a group follows ``cfg.lr``, or its own peak ``base_lr`` scaled
    by the same factor (an encoder's head trains at another rate than its soft tokens)."""
    lr = lr_at(step, total, cfg)
    scale = lr / cfg.lr if cfg.lr else 1.0
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * scale if "base_lr" in g else lr


def check_training_inputs(model, task, train_examples, valid_examples) -> None:
    """Refuse, before any work, what no model family can train on: no examples, examples the
    task cannot use (unknown label, missing field), or a base model that is not frozen."""
    if not train_examples:
        raise ValueError("no training examples")
    task.check(train_examples, source="training examples")
    if valid_examples:
        task.check(valid_examples, source="validation examples")
    if any(p.requires_grad for p in model.parameters()):
        raise ValueError("the base model must be frozen (no parameter may require grad); use softprompt.families.loading.freeze")


class Trainable(ABC):
    """What :func:`fit` trains: a few tensors, a batch loss and a validation score.

    The loop calls, in order: :meth:`param_groups` (the optimizer's), :meth:`state` (broadcast
    from the main process, then checkpointed), :meth:`prepare` once, then per step
    :meth:`condition` and :meth:`loss`, and per validation :meth:`condition`, :meth:`validate`
    and, on a new best, :meth:`snapshot`; at the end :meth:`finish` with the kept values.
    """

    description = "training"  # the progress bar's label
    dp: DataParallel = DataParallel()  # this process's place in a data-parallel run (a group of one by default)

    @abstractmethod
    def param_groups(self) -> list[dict]:
        """Optimizer parameter groups: ``{"params": [...]}`` follows ``cfg.lr``; a group with a
        ``"base_lr"`` has its own peak rate (same schedule)."""

    @abstractmethod
    def state(self) -> dict[str, torch.Tensor]:
        """The named tensors a checkpoint stores (the parameters themselves, not copies)."""

    @abstractmethod
    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy a checkpoint's tensors in place (the optimizer keeps pointing at the same ones)."""

    def run_config(self, cfg: TrainConfig) -> dict:
        """The configuration a checkpoint must match to be resumed."""
        return cfg.to_dict()

    def prepare(self) -> None:
        """One-off work after the start values are shared and before a checkpoint is loaded,
        timed as training (e.g. cached features)."""

    def condition(self) -> None:
        """Make the model see the current parameters (before a step's loss and a validation)."""

    @abstractmethod
    def loss(self, examples: list, index: list[int]) -> tuple[torch.Tensor, int]:
        """This process's part of the mean loss over ``examples`` (their positions in the training
        set are ``index``; the parts sum to the mean over processes) and its token count."""

    @abstractmethod
    def validate(self, examples) -> dict:
        """Metrics on ``examples`` plus a ``score`` tuple (larger is better) to keep the best by."""

    @abstractmethod
    def snapshot(self) -> dict[str, torch.Tensor]:
        """Detached copies of the values to keep (the best so far, or the last)."""

    @abstractmethod
    def finish(self, final: dict[str, torch.Tensor], summary: dict) -> Any:
        """The final artifact (with a ``save(path)``) from the kept values; ``summary`` holds
        ``train_examples``, ``best_step``, ``steps`` and ``wall_time_s``."""


def epochs_needed(cfg: TrainConfig, n: int) -> int:
    """``cfg.epochs``, or with ``epochs=0`` as many as ``cfg.max_steps`` needs (the recipe's way:
    a run is bounded by steps and stopped on convergence, not by an epoch count)."""
    if cfg.epochs:
        return cfg.epochs
    if not cfg.max_steps:
        raise ValueError("epochs=0 needs max_steps (train until convergence, at most max_steps)")
    return math.ceil(cfg.max_steps / math.ceil(n / cfg.batch_size))


def fit(trainable: Trainable, train_examples, valid_examples, cfg: TrainConfig, *,
        out_dir: str | os.PathLike | None = None, resume: bool = False, progress: bool = True,
        until_step: int | None = None) -> TrainResult:
    """Train ``trainable`` on ``train_examples``.

    With ``valid_examples`` the best values by validation score are kept (and early stopping
    applies); without, the last values are (and ``patience`` stops on a flat training loss).
    With ``out_dir`` checkpoints, the final artifact (``prompt.safetensors``) and
    ``history.json`` are written there, and ``resume=True`` continues from the last checkpoint.
    ``until_step`` pauses the run after that step (checkpointed; ``stop_reason`` "paused"), so a
    search can continue only the runs worth it (``search.py``) with the same schedule."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    dp = trainable.dp
    run_config = trainable.run_config(cfg)
    groups = trainable.param_groups()
    params = [p for g in groups for p in g["params"]]
    run = RunProgress()
    run.start_clock()
    dp.broadcast_(trainable.state().values())  # every rank starts from the main process's tensors
    optimizer = accelerator.prepare(make_optimizer(groups, cfg))
    trainable.prepare()

    plan = batch_plan(len(train_examples), cfg.batch_size, epochs_needed(cfg, len(train_examples)), cfg.seed)
    if cfg.max_steps is not None:
        plan = plan[: cfg.max_steps]
    total = len(plan)
    eval_every = cfg.eval_every or math.ceil(len(train_examples) / cfg.batch_size)
    ckpt_every = cfg.checkpoint_every or eval_every
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)

    best = trainable.snapshot()
    saved = checkpoint_to_resume(out, resume, run_config)
    if saved is not None:
        tensors, meta = saved
        trainable.load_state(tensors)
        best = {k: tensors[f"best.{k}"].clone() for k in best}
        optimizer.load_state_dict(optimizer_state(tensors, meta["optimizer"]))
        run = RunProgress.from_meta(meta)
        run.start_clock()

    def checkpoint() -> None:
        if out is not None and dp.is_main:
            save_checkpoint(out / CHECKPOINT, params=trainable.state(), best=best, optimizer=optimizer,
                            meta=run.meta(run_config))

    bar = tqdm(total=total, initial=run.step, desc=trainable.description, disable=not (progress and dp.is_main),
               unit="step")
    stopped_early = False
    stop_reason = "max_steps" if cfg.max_steps is not None and cfg.max_steps <= total else "epochs"
    running = None
    stop_at = total if until_step is None else min(total, until_step)
    if run.history and "stop" in run.history[-1]:  # resuming a run that had already ended (stopped early too)
        stop_at = run.step
    for step in range(run.step, stop_at):
        epoch, idx = plan[step]
        set_lr(optimizer, step, total, cfg)
        trainable.condition()
        optimizer.zero_grad(set_to_none=True)
        loss, n_tok = trainable.loss([train_examples[i] for i in idx], idx)
        accelerator.backward(loss)
        loss_value = float(loss.detach())
        if dp.active:  # each rank computed its part of the global batch: sum gradients, loss and tokens
            loss_value, n_tok = dp.sum_gradients(params, [loss_value, n_tok])
            n_tok = round(n_tok)
        if cfg.grad_clip:
            accelerator.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        run.step = step + 1
        run.tokens_seen += n_tok
        run.tick()
        running = loss_value if running is None else 0.9 * running + 0.1 * loss_value
        record = {"step": step + 1, "epoch": epoch, "loss": loss_value, "lr": optimizer.param_groups[0]["lr"]}
        done = step + 1 == total
        if valid_examples and ((step + 1) % eval_every == 0 or done):
            trainable.condition()
            m = dp.from_main(trainable.validate(valid_examples))  # every rank judges the same numbers
            score = m.pop("score")
            record["valid"] = m
            if run.judge(score):
                best = trainable.snapshot()
            stopped_early = run.out_of_patience(cfg.patience)
            if stopped_early:
                stop_reason = "validation_plateau"
        elif not valid_examples and cfg.patience and (step + 1) % eval_every == 0:
            stopped_early = loss_plateaued([h["loss"] for h in run.history] + [loss_value], eval_every, cfg.patience)
            if stopped_early:
                stop_reason = "loss_plateau"
        paused = step + 1 == stop_at and not done and not stopped_early
        if stopped_early or done:
            record["stop"] = stop_reason
        run.history.append(record)
        bar.update(1)
        bar.set_postfix(loss=f"{running:.4f}", tok_s=f"{run.tokens_per_s:.0f}",
                        **({"valid": f"{record['valid'].get('accuracy', record['valid'].get('f1', 0)):.3f}"}
                           if "valid" in record else {}))
        if (step + 1) % ckpt_every == 0 or done or stopped_early or paused:
            checkpoint()
        if stopped_early:
            break
    bar.close()
    if not stopped_early:
        if run.history and "stop" in run.history[-1]:  # ended now, or before a resume
            stop_reason = run.history[-1]["stop"]
        elif run.step < total:
            stop_reason = "paused"
    best_step = run.best_step if valid_examples else len(run.history)
    if valid_examples:
        final = best
    else:
        trainable.condition()
        final = trainable.snapshot()
    artifact = trainable.finish(final, {"train_examples": len(train_examples), "best_step": best_step,
                                        "steps": len(run.history), "wall_time_s": round(run.elapsed, 2)})
    result = TrainResult(
        prompt=artifact, history=run.history, best_step=best_step, steps=len(run.history), wall_time_s=run.elapsed,
        tokens_per_s=run.tokens_per_s, stopped_early=stopped_early, trainable_params=sum(p.numel() for p in params),
        stop_reason=stop_reason,
    )
    if out is not None and dp.is_main:
        artifact.save(out / ARTIFACT)
        atomic.write_json(out / "history.json", run.history, indent=1, mode=0o644)
    dp.barrier()  # the files exist when any rank returns
    return result


__all__ = ["Trainable", "batch_plan", "check_training_inputs", "epochs_needed", "fit", "lr_at", "make_optimizer", "set_lr"]
