"""Validation data carved from the labelled pool, so that every choice can be made without test data.

Why: a comparison chooses each family's best prompt (hard prompt x calibration; learning rate x
seed) on validation data; when the user gives none, a stratified share of the training pool is
held out for it, and the prompts train (and draw demonstrations) on the rest only.
"""
from __future__ import annotations

import random
from collections import defaultdict

__all__ = ["holdout_split"]


def holdout_split(pool: list, labels: list[str] | None, fraction: float, limit: int | None, seed: int = 0,
                  min_train_per_label: int = 1) -> tuple[list, list]:
    """``(train, valid)``: about ``fraction`` of ``pool`` (at most ``limit``) held out, stratified by
    label, in a seeded order; every label keeps at least ``min_train_per_label`` training examples
    and, when it has two or more, gives at least one to validation.  Empty validation when the
    pool is too small to spare any."""
    if not pool or fraction <= 0:
        return list(pool), []
    by_label: dict = defaultdict(list)
    for ex in pool:
        by_label[ex.label].append(ex)
    order = [lab for lab in (labels or []) if lab in by_label] + [lab for lab in by_label if lab not in (labels or [])]
    rng = random.Random(f"holdout-{seed}")
    target = round(fraction * len(pool))
    if limit:
        target = min(target, limit)
    take: dict = {}
    for lab in order:
        exs = by_label[lab]
        rng.shuffle(exs)
        share = round(target * len(exs) / len(pool))
        take[lab] = max(min(share, len(exs) - min_train_per_label), 1 if len(exs) > min_train_per_label else 0)
    valid_ids = {id(ex) for lab in order for ex in by_label[lab][: take[lab]]}
    train = [ex for ex in pool if id(ex) not in valid_ids]
    valid = [ex for ex in pool if id(ex) in valid_ids]
    rng.shuffle(valid)
    return train, valid
