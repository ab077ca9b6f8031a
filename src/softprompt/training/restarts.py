"""Train from several seeds and keep the run that fits best: a guard against failed runs.

Why: with a few dozen labelled examples, prompt tuning sometimes never leaves the
majority-class solution.  On RAFT twitter_complaints (50 training tweets) one seed in three
did, with the plain template and with the chat template alike, and that one run decides
the mean and the spread over seeds.  Such a run also fits its own training examples
visibly worse (its final training loss was 0.58 against 0.28 and 0.40), so it can be caught
without held-out data: train ``restarts`` times from different seeds and keep the prompt
that scores best on the validation examples or, when there are none, on the training
examples themselves (at most ``FIT_LIMIT`` of them).  The price is ``restarts`` times the
training; scoring stays one prompt.

Selection uses :func:`softprompt.training.prompt.validate`'s score (macro-F1, then accuracy, then
lower loss, for classification: a run stuck on the majority class cannot win macro-F1; token F1 then exact match
for generation), the rule the training loop already uses to keep its best prompt.  Scoring the training examples favours
the run that fits them best, which is what separates a stuck run from a working one; it says
nothing about overfitting, which only held-out data can.
"""
from __future__ import annotations

import os
import random
import time
from dataclasses import replace
from pathlib import Path

from .distributed import DataParallel
from ..data import Task
from .prompt import TrainConfig, TrainResult, train_prompt, validate

SEED_STRIDE = 1000  # restart r of seed s trains with seed s + r * SEED_STRIDE: restart 0 is the plain run
FIT_LIMIT = 256  # judging on training examples: at most this many (a seeded sample), so a big set stays cheap


def restart_seeds(seed: int, restarts: int) -> list[int]:
    """The seeds of ``restarts`` runs for ``seed``; the first is ``seed`` itself."""
    if restarts < 1:
        raise ValueError(f"restarts must be at least 1, got {restarts}")
    return [seed + r * SEED_STRIDE for r in range(restarts)]


def fit_score(model, tokenizer, result: TrainResult, examples, cfg: TrainConfig) -> dict:
    """``validate``'s metrics for a trained prompt on ``examples`` (its ``score``: larger is better).
    An encoder model's prompt (soft tokens + head) is scored through its own bank."""
    from ..families import family_for

    bank = family_for(model).make_bank(model, tokenizer)
    return validate(bank, bank.add_prompt(result.prompt, "candidate"), examples, cfg)


def train_with_restarts(
    model,
    tokenizer,
    task: Task,
    train_examples,
    valid_examples=None,
    config: TrainConfig | None = None,
    restarts: int = 1,
    *,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train ``restarts`` prompts (seeds from :func:`restart_seeds`) and return the best one.

    The returned result is the chosen run's, except ``wall_time_s``: the whole cost, every run's
    training time (resumed runs included) and the choosing.  Its prompt's ``training["restarts"]`` lists every run (seed, selection
    metrics, training seconds, chosen or not), so the artifact says how it was picked.
    With ``out_dir`` each run writes to ``out_dir/restart{r}`` (resumable one by one) and the
    chosen prompt is also saved as ``out_dir/prompt.safetensors``.  ``restarts=1`` is exactly
    :func:`train_prompt`."""
    cfg = config or TrainConfig()
    seeds = restart_seeds(cfg.seed, restarts)
    if restarts == 1:
        return train_prompt(model, tokenizer, task, train_examples, valid_examples, cfg, out_dir=out_dir,
                            resume=resume, progress=progress)
    judged_on, judge = ("validation", valid_examples) if valid_examples else ("training", list(train_examples))
    if judged_on == "training" and len(judge) > FIT_LIMIT:
        judge = random.Random(cfg.seed).sample(judge, FIT_LIMIT)
    out = Path(out_dir) if out_dir is not None else None
    judging = 0.0
    runs: list[tuple[TrainResult, dict]] = []
    for r, seed in enumerate(seeds):
        res = train_prompt(model, tokenizer, task, train_examples, valid_examples, replace(cfg, seed=seed),
                           out_dir=(out / f"restart{r}") if out else None, resume=resume, progress=progress)
        t0 = time.perf_counter()
        runs.append((res, fit_score(model, tokenizer, res, judge, cfg)))
        judging += time.perf_counter() - t0
    best = max(range(len(runs)), key=lambda i: runs[i][1]["score"])
    summary = [{"seed": seed, "judged_on": judged_on, "chosen": i == best, "wall_time_s": round(res.wall_time_s, 2),
                **{k: v for k, v in metrics.items() if k != "score"}}
               for i, (seed, (res, metrics)) in enumerate(zip(seeds, runs))]
    chosen = runs[best][0]
    # each run's own training time (a resumed run's includes the time before its checkpoint) + the choosing
    chosen.wall_time_s = sum(res.wall_time_s for res, _ in runs) + judging
    chosen.prompt.training = {**chosen.prompt.training, "restarts": summary}
    if out is not None and DataParallel.current().is_main:  # data-parallel: the main process writes
        chosen.prompt.save(out / "prompt.safetensors")
    return chosen
