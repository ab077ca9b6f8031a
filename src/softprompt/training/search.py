"""Choosing the learning rate and seed on validation data by successive halving, and guarding a
run against silent collapse.

Successive halving (Jamieson & Talwalkar 2016; the rung schedule of Hyperband, Li et al. 2018):
every candidate (learning rate x seed) trains a quarter of the schedule, the better half by
validation score trains on to half of it, and the best of those finishes.  Each run follows the
full schedule's warmup and decay throughout, and is paused and continued from its checkpoint, not
restarted, so with six candidates the whole search costs 6/4 + 3/4 + 1/2 = 2.75 runs: less than a
grid of three full runs.  Its whole cost is the result's training time.

A collapsed run (``recipe.collapse_reason``: one class for nearly every validation example, or a
training loss that never left the uniform guess) is retrained from another seed, at most
``Recipe.collapse_restarts`` times; every attempt is recorded on the prompt and counted in the cost.
"""
from __future__ import annotations

import contextlib
import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Protocol

from ..core import atomic
from .config import TrainConfig, TrainResult
from .distributed import DataParallel
from .recipe import DEFAULT_RECIPE, ENCODER_LRS, SEARCH_LRS, Recipe, collapse_reason
from ..data.task import TaskKind

SEED_STRIDE = 1000  # attempt a of seed s trains with seed s + a * SEED_STRIDE


class Run(Protocol):
    """A training run that can be advanced to a step and tells its best validation score."""

    def advance(self, until_step: int) -> tuple: ...

    @property
    def finished(self) -> bool: ...


@dataclass
class Rung:
    steps: int
    scores: dict[int, tuple] = field(default_factory=dict)  # candidate index -> best validation score


def rung_steps(max_steps: int, n_candidates: int) -> list[tuple[int, int]]:
    """``(steps, runs)`` per rung: every candidate to a quarter of ``max_steps``, the better half to
    half of it, the best one to the end (two halvings at most: a quarter of the schedule is the
    shortest that tells runs apart)."""
    if n_candidates <= 1:
        return [(max_steps, 1)]
    if n_candidates == 2:
        return [(max(1, max_steps // 2), 2), (max_steps, 1)]
    return [(max(1, max_steps // 4), n_candidates), (max(1, max_steps // 2), math.ceil(n_candidates / 2)),
            (max_steps, 1)]


def successive_halving(runs: Sequence[Run], max_steps: int) -> tuple[int, list[Rung]]:
    """Advance ``runs`` rung by rung (:func:`rung_steps`), keeping the better half by score; returns the index of the
    winner and the rungs (what every candidate scored where).  A run that stopped on its own
    (converged) keeps its score and takes part in the ranking without more steps."""
    alive = list(range(len(runs)))
    history: list[Rung] = []
    for steps, keep in rung_steps(max_steps, len(runs)):
        alive = alive[:keep] if len(alive) > keep else alive
        rung = Rung(steps)
        for i in alive:
            rung.scores[i] = runs[i].advance(steps)
        history.append(rung)
        alive = sorted(alive, key=lambda i: rung.scores[i], reverse=True)
    return alive[0], history


# ----------------------------------------------------------------------------- prompt training
class PromptRun:
    """One candidate's prompt training, paused and continued through its checkpoint folder."""

    def __init__(self, train: Callable[..., TrainResult], cfg: TrainConfig, out_dir: Path, resume: bool = False):
        self.train, self.cfg, self.out_dir, self.resume = train, cfg, out_dir, resume
        self.result: TrainResult | None = None

    @property
    def finished(self) -> bool:
        return self.result is not None and self.result.stop_reason != "paused"

    def advance(self, until_step: int) -> tuple:
        if not self.finished:
            self.result = self.train(self.cfg, out_dir=self.out_dir, resume=self.resume or self.result is not None,
                                     until_step=until_step)
        return best_score(self.result)


def best_score(result: TrainResult) -> tuple:
    """The kept step's validation score (the one selection rule, ``selection.py``)."""
    from .selection import classification_score, generation_score, kept_validation

    kept = kept_validation(result)
    if kept is None:
        return (float("-inf"),)
    return classification_score(kept) if "macro_f1" in kept else generation_score(kept)


def search_lr(train: Callable[..., TrainResult], base: TrainConfig, lrs: Sequence[float], seeds: Sequence[int],
              *, work_dir: str | Path | None = None, resume: bool = False) -> tuple[TrainResult, list[dict]]:
    """Successive halving over ``lrs`` x ``seeds`` (absolute rates) with ``train(cfg, out_dir=,
    resume=, until_step=)``; returns the winner's result (its ``wall_time_s`` = the whole search's)
    and one record per candidate.  Candidates checkpoint under ``work_dir/c<i>`` (a temporary
    folder without one); ``resume=True`` continues each from there."""
    if not base.max_steps:
        raise ValueError("the search needs max_steps (every candidate follows the same schedule)")
    if work_dir is None and DataParallel.current().active:  # every process must continue from the same checkpoints
        raise ValueError("a data-parallel learning-rate search needs an out_dir shared by the processes")
    cands = [(lr, seed) for seed in seeds for lr in lrs]
    with tempfile.TemporaryDirectory(prefix="sp-search-") if work_dir is None else contextlib.nullcontext(work_dir) as d:
        runs = [PromptRun(train, replace(base, lr=lr, seed=seed), Path(d) / f"c{i}", resume)
                for i, (lr, seed) in enumerate(cands)]
        winner, rungs = successive_halving(runs, base.max_steps)
    records = [{"lr": lr, "seed": seed, "steps": runs[i].result.steps if runs[i].result else 0,
                "wall_time_s": round(runs[i].result.wall_time_s, 2) if runs[i].result else 0.0,
                "scores": [list(r.scores[i]) for r in rungs if i in r.scores], "chosen": i == winner}
               for i, (lr, seed) in enumerate(cands)]
    result = runs[winner].result
    result.wall_time_s = sum(r.result.wall_time_s for r in runs if r.result is not None)
    return result, records


def guard_collapse(train: Callable[[TrainConfig], TrainResult], cfg: TrainConfig, n_labels: int,
                   restarts: int) -> tuple[TrainResult, list[dict]]:
    """Train with ``cfg``; while the run collapsed, train again from another seed (at most
    ``restarts`` more times).  Returns the first healthy run, or the best collapsed one, with its
    ``wall_time_s`` the cost of every attempt, and one record per attempt."""
    attempts: list[tuple[TrainResult, str | None]] = []
    for a in range(restarts + 1):
        res = train(replace(cfg, seed=cfg.seed + a * SEED_STRIDE))
        why = collapse_reason(res, n_labels) if n_labels else None
        attempts.append((res, why))
        if why is None:
            break
    healthy = [r for r, why in attempts if why is None]
    chosen = healthy[0] if healthy else max((r for r, _ in attempts), key=best_score)
    records = [{"seed": cfg.seed + a * SEED_STRIDE, "collapsed": why, "chosen": r is chosen,
                "wall_time_s": round(r.wall_time_s, 2)} for a, (r, why) in enumerate(attempts)]
    chosen.wall_time_s = sum(r.wall_time_s for r, _ in attempts)
    return chosen, records



# ----------------------------------------------------------------------------- the default way to train


def train_with_recipe(model, tokenizer, task, train_examples, valid_examples=None, *, recipe: Recipe = DEFAULT_RECIPE,
                      lr: float | None = None, seed: int = 0, search: bool = True, search_seeds: int = 2, out_dir=None,
                      resume: bool = False, progress: bool = True, **overrides) -> TrainResult:
    """Train a prompt the way ``train``, ``compare`` and ``demo`` do by default.

    ``lr`` (absolute) given, or ``search=False``: one run.  Otherwise, with validation data, successive halving over
    the recipe's candidate rates (:meth:`Recipe.search_lrs`) x ``search_seeds`` seeds; without, one
    run at its default rate (:meth:`Recipe.default_lr`).  Every run stops on convergence (``recipe.max_steps`` at most) and a collapsed
    result is retrained from another seed (``recipe.collapse_restarts``).  ``overrides`` are
    :class:`TrainConfig` fields (``method``, ``init``, ...).  The prompt's ``training`` records the
    recipe, the search and the restarts; ``wall_time_s`` is their whole cost."""
    from .prompt import train_prompt

    base = recipe.config(model, seed=seed, **overrides)
    out = Path(out_dir) if out_dir is not None else None
    n_labels = len(task.labels) if task.kind == TaskKind.CLASSIFICATION else 0

    def run(cfg: TrainConfig, **kw) -> TrainResult:
        return train_prompt(model, tokenizer, task, train_examples, valid_examples, cfg, progress=progress, **kw)

    records: list[dict] = []
    if lr is None and valid_examples and search:
        lrs = recipe.search_lrs(model, base.method, base.reparam)
        seeds = [seed + s for s in range(max(1, search_seeds))]
        result, records = search_lr(run, base, lrs, seeds, work_dir=(out / "search") if out else None, resume=resume)
        chosen = next(r for r in records if r["chosen"])
        base = replace(base, lr=chosen["lr"], seed=chosen["seed"])
        first = result
    else:
        base = replace(base, lr=lr) if lr is not None else base
        first = None

    def attempt(cfg: TrainConfig) -> TrainResult:
        if cfg.seed == base.seed and first is not None:
            return first  # the search's winner is the first attempt (its wall time: the whole search's)
        sub = out if out is None or cfg.seed == base.seed else out / f"seed{cfg.seed}"
        return run(cfg, out_dir=sub, resume=resume)

    result, attempts = guard_collapse(attempt, base, n_labels, recipe.collapse_restarts)
    result.prompt.training = {**result.prompt.training, "recipe": asdict(recipe), "lr_search": records,
                              "collapse_restarts": attempts}
    if out is not None and DataParallel.current().is_main:  # data-parallel: the main process writes
        out.mkdir(parents=True, exist_ok=True)
        result.prompt.save(out / "prompt.safetensors")
        atomic.write_json(out / "history.json", result.history, indent=1, mode=0o644)
    return result


__all__ = ["ENCODER_LRS", "PromptRun", "Run", "SEARCH_LRS", "SEED_STRIDE", "best_score", "guard_collapse", "rung_steps",
           "search_lr", "successive_halving", "train_with_recipe"]
