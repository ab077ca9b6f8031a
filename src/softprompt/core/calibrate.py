"""Fitting a calibration (``calibration.py``) for a bank entry: the label scores of content-free
inputs, of the unlabelled inputs, or of the template's domain premise.  A module apart from
the correction (``calibration.py``) because fitting runs the scorer, while the prompt artifacts
the scorer reads carry a correction: one module for both would be an import cycle."""
from __future__ import annotations

import torch

from .calibration import CALIBRATIONS, CONTENT_FREE, Calibration, log_prior_from_scores, premise_suffix_ids

__all__ = ["fit_calibration"]


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
    pi = torch.tensor([float(v) for v in class_prior])
    if pi.shape[0] != len(cal.log_prior) or bool((pi <= 0).any()):
        raise ValueError(f"class_prior needs {len(cal.log_prior)} positive probabilities, got {list(class_prior)}")
    return Calibration(cal.method, (torch.tensor(cal.log_prior) - (pi / pi.sum()).log()).tolist())


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
        raw = classify(bank, e, unlabelled, batch_size=batch_size).scores
        return Calibration("batch", log_prior_from_scores(raw))
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
