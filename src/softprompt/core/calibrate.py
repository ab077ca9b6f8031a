"""Fitting a calibration (``calibration.py``) for a bank entry: the label scores of content-free
inputs, of the unlabelled inputs, or of the template's domain premise.  A module apart from
the correction (``calibration.py``) because fitting runs the scorer, while the prompt artifacts
the scorer reads carry a correction: one module for both would be an import cycle."""
from __future__ import annotations

import torch

from .calibration import (CALIBRATIONS, CONTENT_FREE, Calibration, aimed_at, batch_calibration, log_prior_from_scores,
                          premise_suffix_ids)

__all__ = ["fit_calibration", "fit_per_entry"]


def _entry_index(bank, entry) -> int:
    return bank.index(entry) if isinstance(entry, str) else int(entry)


@torch.no_grad()
def fit_calibration(bank, entry, method: str, *, inputs=None, batch_size: int = 32,
                    class_prior=None) -> Calibration:
    """Estimate ``method``'s log-prior for bank entry ``entry`` (name or index). Labels are never read.

    contextual: mean label probs of the template filled with each :data:`CONTENT_FREE` string;
    batch: mean label probs over ``inputs`` (examples or field dicts; their labels are ignored);
    pmi (domain-conditional PMI, Holtzman et al. 2021): label probs after the template's domain
    premise, the template with the input removed (:func:`premise_suffix_ids`).
    ``class_prior`` (probabilities in the entry's label order) is the label distribution to aim
    at instead of a uniform one (see the module doc)."""
    cal = _fit(bank, entry, method, inputs=inputs, batch_size=batch_size)
    if class_prior is None or not cal.active:
        return cal
    return Calibration(cal.method, aimed_at(cal.log_prior, class_prior))


def _fit(bank, entry, method: str, *, inputs, batch_size: int) -> Calibration:
    from .scoring import classify
    from ..data import Example

    if method not in CALIBRATIONS:
        raise ValueError(f"unknown calibration {method!r}; choose one of {', '.join(CALIBRATIONS)}")
    if method == "none":
        return Calibration()
    e = _entry_index(bank, entry)
    if method == "batch":
        if not inputs:
            raise ValueError("batch calibration needs unlabelled inputs (e.g. the inputs to classify)")
        unlabelled = [Example(fields=dict(x.fields if isinstance(x, Example) else x)) for x in inputs]
        return batch_calibration(classify(bank, e, unlabelled, batch_size=batch_size).scores)
    if not bank.family.supports("rank_classification"):  # an encoder's head has no verbalizer to score
        raise ValueError(f"{method} calibration needs a language-model verbalizer; encoder heads support batch only")
    template = bank.entries[e].template
    if method == "contextual":
        fields = template.fields
        raw = classify(bank, e, [Example(fields={f: cf for f in fields}) for cf in CONTENT_FREE],
                       batch_size=batch_size).scores
        return Calibration("contextual", log_prior_from_scores(raw))
    from .scoring import _label_scores

    suffix = premise_suffix_ids(template, bank.tokenizer)
    raw = _label_scores(bank, torch.tensor([e]), [suffix])[0].float().cpu()[None]
    return Calibration("pmi", log_prior_from_scores(raw))


@torch.no_grad()
def fit_per_entry(bank, entries: list[int], method: str, *, batch_size: int = 32, class_prior=None) -> list[Calibration]:
    """``fit_calibration(bank, e, method)`` for each of ``entries`` (contextual or pmi), their
    content-free / domain-premise rows scored together in batches instead of a few rows per entry:
    prompts that differ per query (nearest-neighbour demonstrations) each need their own prior."""
    from .conditioning import DEFAULT_MAX_BATCH_TOKENS
    from .scoring import _label_scores, classify, length_sorted_batches
    from ..data import Example

    if method not in ("contextual", "pmi"):
        raise ValueError(f"per-entry calibration is contextual or pmi, got {method!r}")
    if not entries:
        return []
    if method == "contextual":
        rows = [(e, Example(fields={f: cf for f in bank.entries[e].template.fields})) for e in entries
                for cf in CONTENT_FREE]
        raw = classify(bank, [e for e, _ in rows], [x for _, x in rows], batch_size=batch_size).scores
        raw = raw.view(len(entries), len(CONTENT_FREE), -1)
    else:
        suffixes = [premise_suffix_ids(bank.entries[e].template, bank.tokenizer) for e in entries]
        prefix = max(len(bank.entries[e].prefix_ids) + bank.entries[e].n_prefix for e in entries)
        raw = torch.empty(len(entries), 1, len(bank.entries[entries[0]].label_ids))
        for idx in length_sorted_batches([len(s) for s in suffixes], batch_size, DEFAULT_MAX_BATCH_TOKENS, prefix):
            got = _label_scores(bank, torch.tensor([entries[i] for i in idx]), [suffixes[i] for i in idx])
            for i, s in zip(idx, got):
                raw[i, 0] = s.float().cpu()
    out = []
    for r in raw:
        log_prior = log_prior_from_scores(r)
        out.append(Calibration(method, log_prior if class_prior is None else aimed_at(log_prior, class_prior)))
    return out
