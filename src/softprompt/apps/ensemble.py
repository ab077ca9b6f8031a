"""Prompt ensembles: N prompts scored in one batched pass, then combined.

Because every row of a batch carries the index of the prompt it uses (``bank.py``), an
ensemble needs no special model code: each example is replicated once per member prompt,
``entry_idx`` says which member each copy uses, and ONE ``run_context`` call per batch
runs all copies (each on its own member's cached prefix key/values).  The label scores
then come from that context's cache, exactly as in ``scoring.classify``, so member ``j``'s
scores equal a separate ``classify`` with prompt ``j`` (tested to 1e-5).

Two ways to combine members:

* ``mean``: average the members' label probabilities (softmax over each member's label
  scores), predict the argmax;
* ``vote``: each member votes for its argmax label; ties are broken by the mean
  probability of the tied labels.

Members may differ in template (length, position of the soft tokens, hard text) but must
share one label set (in the same order).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..core.bank import PromptBank
from ..core.conditioning import DEFAULT_MAX_BATCH_TOKENS, label_logprobs, run_context
from ..core.scoring import classification_metrics, length_sorted_batches

__all__ = ["COMBINE", "EnsembleResult", "combine", "ensemble_classify"]

COMBINE = ("mean", "vote")


@dataclass
class EnsembleResult:
    labels: list[str]
    members: list[str]  # member entry names
    member_scores: torch.Tensor  # [M, N, L] summed label log-probs per member
    member_probs: torch.Tensor  # [M, N, L] softmax over labels per member
    predictions: dict[str, list[str]]  # combine method -> [N] labels
    member_predictions: list[list[str]]  # [M][N]
    metrics: dict[str, dict] = field(default_factory=dict)  # "mean" / "vote" / "members" (list)
    n_batches: int = 0  # number of context passes (one per batch)


def combine(member_probs: torch.Tensor, method: str = "mean") -> torch.Tensor:
    """Ensemble label indices [N] from member probabilities [M, N, L]."""
    mean = member_probs.mean(0)  # [N, L]
    if method == "mean":
        return mean.argmax(-1)
    if method == "vote":
        n_labels = member_probs.shape[-1]
        winners = member_probs.argmax(-1)  # [M, N]
        votes = torch.nn.functional.one_hot(winners, n_labels).sum(0).float()  # [N, L]
        top = votes.max(-1, keepdim=True).values
        tied = votes == top
        # among the tied labels, the one with the highest mean probability wins
        return torch.where(tied, mean, torch.full_like(mean, -1.0)).argmax(-1)
    raise ValueError(f"unknown combine method {method!r}; use one of {COMBINE}")


@torch.no_grad()
def ensemble_classify(
    bank: PromptBank,
    members: list[int | str],
    examples,
    *,
    batch_size: int = 32,
    progress: bool | str = False,
) -> EnsembleResult:
    """Score every example with every member prompt in one context pass per batch.

    ``batch_size`` counts rows of the forward pass (example copies), so a batch holds
    ``max(1, batch_size // M)`` examples and the memory use matches ``classify`` with the
    same ``batch_size``.  Metrics are filled when examples carry labels: per member, and
    for each combine method.
    """
    bank.family.require("ensemble")  # one shared decoder context pass per batch (UnsupportedError otherwise)
    idx = [bank.index(m) if isinstance(m, str) else int(m) for m in members]
    if not idx:
        raise ValueError("an ensemble needs at least one member prompt")
    label_sets = {tuple(bank.entries[e].labels) for e in idx}
    if len(label_sets) != 1:
        raise ValueError(
            "ensemble members must share one label set in the same order; got "
            + ", ".join(f"{bank.entries[e].name}: {bank.entries[e].labels}" for e in idx)
        )
    labels = list(next(iter(label_sets)))
    m_count, n = len(idx), len(examples)
    # suffixes[i][j]: example i rendered with member j's template
    suffixes = [[bank.suffix_ids(e, ex.fields) for e in idx] for ex in examples]
    per_batch = max(1, batch_size // m_count)
    prefix = max(len(bank.entries[e].prefix_ids) + bank.entries[e].n_prefix for e in idx)
    # the token budget of classify(), counted per example as its M rows
    batches = length_sorted_batches([max(len(s) for s in row) for row in suffixes], per_batch,
                                    DEFAULT_MAX_BATCH_TOKENS // m_count, prefix)
    scores = torch.empty(m_count, n, len(labels))
    desc = progress if isinstance(progress, str) else "ensemble"
    for b in tqdm(batches, desc=desc, disable=not progress, unit="batch"):
        rows = [(i, j) for i in b for j in range(m_count)]  # each example once per member
        entry_idx = torch.tensor([idx[j] for _, j in rows])
        ctx = run_context(bank, entry_idx, [suffixes[i][j] for i, j in rows])
        lp = torch.stack(label_logprobs(bank, ctx)).float().cpu()  # [rows, L], one device->host copy
        for (i, j), s in zip(rows, lp):
            scores[j, i] = s
    probs = scores.softmax(-1)
    member_preds = [[labels[k] for k in probs[j].argmax(-1).tolist()] for j in range(m_count)]
    preds = {c: [labels[k] for k in combine(probs, c).tolist()] for c in COMBINE}
    res = EnsembleResult(
        labels=labels, members=[bank.entries[e].name for e in idx], member_scores=scores, member_probs=probs,
        predictions=preds, member_predictions=member_preds, n_batches=len(batches),
    )
    gold = [ex.label for ex in examples]
    if all(g is not None for g in gold):
        res.metrics = {c: classification_metrics(gold, preds[c], labels) for c in COMBINE}
        res.metrics["members"] = [classification_metrics(gold, p, labels) for p in member_preds]
    return res
