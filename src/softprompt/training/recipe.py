"""The one soft-prompt training recipe: optimizer, learning-rate rule, init, stopping rule and
collapse guard, in one place that ``train``, ``compare`` and ``demo`` all read.

Why a learning rate *relative to the embedding scale*: Lester et al.'s 0.3 was an Adafactor rate;
AdamW's step is absolute (about ``lr`` per entry per step, whatever the entry's size), and the
embedded model's input-embedding entries have a standard deviation of about 0.14, so AdamW at 0.3
moved every prompt entry by two standard deviations per step.  A recipe's ``lr`` is therefore in
units of the model's embedding-entry standard deviation (``lr_unit="embedding"``): the same number
means the same relative step on any model.  The default values come from the study in
``benchmarks/study_recipe.py`` (docs/benchmarks.md, "Training recipe study"), chosen on
validation scores.

Residual reparameterisation (``reparam="mlp"``, Razdaibiedina et al. 2023): the soft tokens are
their start (the label words) plus the output of a two-layer MLP over a small trainable input, its
last layer zero at step 0, so step 0 is the plain prompt; the network is dropped when the prompt
is saved (plain vectors).  An Adam step on the MLP's last layer moves an output entry by about 15x
the rate (core/reparam.py), so its rate is absolute and small (``reparam_lr``).

Stopping: a run ends when its validation score (or, without validation data, its training loss)
has stopped improving for ``patience`` evaluations, or at ``max_steps``; ``TrainResult.stop_reason``
and the last history record say which.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..core.method import Method
from .config import TrainConfig
from .selection import kept_validation

LR_UNITS = ("embedding", "absolute")
SEARCH_LRS = (0.3, 1.0, 2.2)  # candidate rates of soft tokens trained directly, in embedding-entry std units
ENCODER_LR = 1e-3  # absolute: P-tuning's encoder and prefix tuning's MLP (core/reparam.py)
ENCODER_LRS = (3e-4, 1e-3, 3e-3)  # their search


def embedding_scale(model) -> float:
    """The standard deviation of the model's input-embedding entries (SmolLM2-135M: ~0.14)."""
    w = model.get_input_embeddings().weight.detach()
    return float(w.float().std())


@dataclass(frozen=True)
class Recipe:
    """How a soft prompt is trained when the user names nothing else."""

    optimizer: str = "adamw"
    lr: float = 0.3  # peak learning rate, in ``lr_unit`` (SmolLM2-135M: 0.3 x 0.136 = 0.041 absolute)
    lr_unit: str = "embedding"  # embedding: lr x the model's embedding-entry std; absolute: lr as is
    reparam: str = "mlp"  # method "prompt": soft tokens through the residual MLP (mlp) or trained directly (none)
    reparam_lr: float = 0.003  # absolute peak rate of the residual MLP's weights (a step ~15x this per entry)
    init: str = "labels"
    warmup_steps: int = 10
    schedule: str = "linear"
    batch_size: int = 8
    max_steps: int = 120  # the longest a run may train (a search of six costs 2.75 x this: under a 3-rate grid)
    eval_every: int = 10  # steps between validations (and between training-loss checks without them)
    patience: int = 6  # evaluations without improvement before the run stops
    collapse_restarts: int = 2  # runs that collapse are retrained from another seed at most this often

    def __post_init__(self) -> None:
        if self.lr_unit not in LR_UNITS:
            raise ValueError(f"lr_unit must be one of {LR_UNITS}, got {self.lr_unit!r}")
        if not self.lr > 0:
            raise ValueError(f"the learning rate must be positive, got {self.lr}")

    def absolute_lr(self, model, lr: float | None = None) -> float:
        """The optimizer's peak rate for soft tokens trained directly on ``model`` (``lr`` in this
        recipe's unit, default its own)."""
        lr = self.lr if lr is None else lr
        return lr * embedding_scale(model) if self.lr_unit == "embedding" else lr

    def reparam_for(self, method: str = "prompt", model=None) -> str:
        """The reparameterisation a method (any spelling) gets by default: the recipe's for prompt
        tuning on a family that has it (``model`` given: its family decides), none else."""
        if _short(method) != "prompt":
            return "none"
        if model is not None:
            from ..families import family_for

            if not family_for(model).supports("reparam"):
                return "none"
        return self.reparam

    def default_lr(self, model, method: str = "prompt", reparam: str | None = None) -> float:
        """The absolute peak rate of a run with this method: the residual MLP's, an encoder's
        (P-tuning, prefix through an MLP: 1e-3), or the soft tokens' own."""
        reparam = self.reparam_for(method, model) if reparam is None else reparam
        method = _short(method)
        if method == "prompt" and reparam == "mlp":
            return self.reparam_lr
        if method == "ptuning" or reparam == "mlp":
            return ENCODER_LR
        return self.absolute_lr(model)

    def search_lrs(self, model, method: str = "prompt", reparam: str | None = None) -> tuple[float, ...]:
        """Absolute candidate rates of the automatic search, about 3x apart around the default."""
        reparam = self.reparam_for(method, model) if reparam is None else reparam
        method = _short(method)
        if method == "prompt" and reparam == "mlp":
            return tuple(round(self.reparam_lr * f, 6) for f in (1 / 3, 1.0, 10 / 3))
        if method == "ptuning" or reparam == "mlp":
            return ENCODER_LRS
        return tuple(self.absolute_lr(model, x) for x in SEARCH_LRS)

    def config(self, model, **overrides) -> TrainConfig:
        """A :class:`TrainConfig` for ``model`` (``overrides`` win; ``lr`` there is absolute; without
        one, :meth:`default_lr` for the method and reparameterisation)."""
        method = overrides.get("method") or "prompt"
        reparam = overrides.get("reparam") or self.reparam_for(method, model)
        kw = dict(optimizer=self.optimizer, init=self.init, reparam=reparam,
                  warmup_steps=self.warmup_steps, schedule=self.schedule, batch_size=self.batch_size,
                  epochs=0, max_steps=self.max_steps, eval_every=self.eval_every, patience=self.patience)
        kw.update({k: v for k, v in overrides.items() if v is not None or k in ("max_steps", "patience")})
        kw["reparam"] = reparam
        cfg = TrainConfig(**{**kw, "lr": kw.get("lr") or 1.0})  # checks the values, reads the method's spelling
        return cfg if kw.get("lr") is not None else replace(cfg, lr=self.default_lr(model, cfg.method, reparam))


DEFAULT_RECIPE = Recipe()


def _short(method: str) -> str:
    """A method's training spelling (``prompt``, ``ptuning``, ``prefix``); an unknown one as given
    (TrainConfig refuses it with the full list)."""
    try:
        return Method.parse(method).short
    except ValueError:
        return method


def uniform_loss(n_labels: int) -> float:
    """The rank loss of a prompt that knows nothing: ``log K`` for K labels."""
    return math.log(max(n_labels, 2))


def collapse_reason(result, n_labels: int, *, share: float = 0.9) -> str | None:
    """Why a finished classification run counts as collapsed, or None.

    * its kept prompt predicts one class for >= ``share`` of the validation examples, or
    * its training loss over the last evaluation window stayed at or above the uniform guess."""
    kept = kept_validation(result)
    if kept and kept.get("top_share") is not None and kept["top_share"] >= share:
        if kept.get("gold_top_share", 0.0) < share:  # a validation set that is itself one class cannot tell
            return f"predicts one class for {kept['top_share']:.0%} of the validation examples"
    losses = [h["loss"] for h in result.history]
    tail = losses[-max(1, min(len(losses), 10)):]
    if tail and sum(tail) / len(tail) >= uniform_loss(n_labels):
        return f"training loss {sum(tail) / len(tail):.3f} stayed at or above the uniform guess {uniform_loss(n_labels):.3f}"
    return None


def loss_plateaued(losses: list[float], window: int, patience: int, tol: float = 0.01) -> bool:
    """True when the mean training loss of the last ``patience`` complete windows of ``window``
    steps never beat the best earlier window by more than ``tol`` (relative)."""
    n = len(losses) // max(window, 1)
    if n <= patience:
        return False
    means = [sum(losses[i * window:(i + 1) * window]) / window for i in range(n)]
    best_before = min(means[: n - patience])
    return min(means[n - patience:]) > best_before * (1 - tol)


__all__ = ["DEFAULT_RECIPE", "ENCODER_LR", "ENCODER_LRS", "LR_UNITS", "SEARCH_LRS", "Recipe", "collapse_reason",
           "embedding_scale", "loss_plateaued", "uniform_loss"]
