"""Calibration of rank classification: a per-label log-prior subtracted from label log-probs.

Uncalibrated rank classification on a small model often predicts one class for nearly every
input (the label words differ in prior probability). Each method here estimates that prior
``p(y)`` once, *without reading any label*, and a prediction becomes
``argmax_y log p(y|x) - log p(y)``; the calibrated probabilities are ``p(y|x) / p(y)``
renormalised over the labels:

* ``contextual`` (Zhao et al. 2021): the mean label distribution of the template filled with
  each content-free string (:data:`CONTENT_FREE`, in every input field);
* ``batch`` (Zhou et al. 2023): the mean label distribution over unlabelled inputs (e.g. the
  very inputs being classified);
* ``pmi`` (domain-conditional PMI, Holtzman et al. 2021): the label distribution after the
  template's *domain premise*: its example-independent head (BOS, soft tokens, instruction)
  followed by the text after its last input field (the answer cue, e.g. ``"\\nSentiment:"``),
  i.e. the template with the input removed.

Each method assumes roughly balanced classes (it pushes predictions towards a uniform label
distribution). On an imbalanced task, ``fit_calibration(..., class_prior=...)`` (e.g.
:func:`class_prior_from` the *training* labels) aims the calibrated predictions at that prior
instead: the stored log-prior becomes ``log p(y) - log pi(y)``.

Label distributions are softmaxes over the entry's label scores, so multi-token label words are
handled as in ``scoring.classify``. A calibration is plain data (``to_dict``) stored in a
prompt artifact's metadata and applied by ``scoring.classify`` and the server alike.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

CALIBRATIONS = ("none", "contextual", "batch", "pmi")
#: Content-free inputs for contextual calibration (Zhao et al. 2021).
CONTENT_FREE = ("N/A", "", "[MASK]")
#: the largest magnitude of a log-prior entry: a fitted one is a log-probability (>= -104 in
#: float32) minus a class prior's log, so anything near this is a broken or hostile artifact
#: (1e308 is finite in float64 but infinite in float32, and answers NaN probabilities)
MAX_ABS_LOG_PRIOR = 1e4


@dataclass
class Calibration:
    """``method`` and the per-label log-prior (entry's label order) it estimated."""

    method: str = "none"
    log_prior: list[float] | None = None

    def __post_init__(self) -> None:
        if self.method not in CALIBRATIONS:
            raise ValueError(f"unknown calibration {self.method!r}; choose one of {', '.join(CALIBRATIONS)}")
        if self.method != "none" and self.log_prior is None:
            raise ValueError(f"calibration {self.method!r} needs a log_prior (fit it with fit_calibration)")
        if self.log_prior is not None:
            self.log_prior = [float(v) for v in self.log_prior]
            if not all(math.isfinite(v) for v in self.log_prior):
                raise ValueError(f"calibration {self.method!r}: log_prior has non-finite values {self.log_prior}")
            if any(abs(v) > MAX_ABS_LOG_PRIOR for v in self.log_prior):
                raise ValueError(f"calibration {self.method!r}: log_prior has values beyond +-{MAX_ABS_LOG_PRIOR:g} "
                                 f"{self.log_prior[:8]}")

    @property
    def active(self) -> bool:
        return self.method != "none" and self.log_prior is not None

    def apply(self, scores: torch.Tensor) -> torch.Tensor:
        """[N, L] (or [L]) label log-probs -> calibrated scores; ``none`` returns ``scores`` itself."""
        if not self.active:
            return scores
        prior = torch.tensor(self.log_prior, dtype=scores.dtype, device=scores.device)
        if scores.shape[-1] != prior.shape[0]:
            raise ValueError(f"calibration has {prior.shape[0]} labels but the scores have {scores.shape[-1]}")
        return scores - prior

    def to_dict(self) -> dict:
        return {"method": self.method, "log_prior": self.log_prior}

    @classmethod
    def from_dict(cls, d: dict | None) -> "Calibration":
        """Inverse of :meth:`to_dict`; ``None`` (an artifact saved before calibrations) is ``none``."""
        if not d:
            return cls()
        if not isinstance(d, dict):
            raise ValueError(f"a calibration must be a mapping with 'method' and 'log_prior', got {type(d).__name__}")
        return cls(method=d.get("method", "none"), log_prior=d.get("log_prior"))


def log_prior_from_scores(scores: torch.Tensor) -> list[float]:
    """log of the mean label distribution of the rows of ``scores`` [N, L] (label log-probs)."""
    if scores.ndim != 2 or scores.shape[0] == 0:
        raise ValueError("a calibration needs at least one row of label scores")
    return scores.float().softmax(-1).mean(0).log().tolist()


def aimed_at(log_prior: list[float], class_prior) -> list[float]:
    """``log p(y) - log pi(y)``: a fitted log-prior re-aimed at the label distribution
    ``class_prior`` (probabilities in the same label order, renormalised) instead of a uniform one."""
    pi = torch.tensor([float(v) for v in class_prior])
    if pi.shape[0] != len(log_prior) or bool((pi <= 0).any()):
        raise ValueError(f"class_prior needs {len(log_prior)} positive probabilities, got {list(class_prior)}")
    return (torch.tensor(log_prior) - (pi / pi.sum()).log()).tolist()


def batch_calibration(raw: torch.Tensor, class_prior=None) -> Calibration:
    """Batch calibration fitted on raw label scores [N, L] already computed (the unlabelled
    inputs' own scores): the one place every caller derives it from, so that scoring runs once
    and the prior is never rebuilt inline."""
    log_prior = log_prior_from_scores(raw)
    return Calibration("batch", log_prior if class_prior is None else aimed_at(log_prior, class_prior))


def class_prior_from(examples, labels: list[str], *, smoothing: float = 1.0) -> list[float]:
    """Label frequencies of labelled (training) examples, add-``smoothing`` smoothed, in ``labels`` order."""
    counts = {lab: smoothing for lab in labels}
    for ex in examples:
        if ex.label is None:
            raise ValueError("a class prior is estimated from labelled examples; one has no label")
        if ex.label not in counts:
            raise ValueError(f"label {ex.label!r} is not one of {labels}")
        counts[ex.label] += 1
    total = sum(counts.values())
    return [counts[lab] / total for lab in labels]


def premise_suffix_ids(template, tokenizer) -> list[int]:
    """Ids of what follows a template's last input field (text and soft slots, soft tokens as
    negative ids numbered as in the full template): the domain premise's per-example part,
    scored on top of the entry's cached head. Falls back to the template with its fields
    rendered empty when nothing follows the last field."""
    from .templates import _encode, soft_id

    segs = template.segments
    last = max((i for i, s in enumerate(segs) if s.kind == "field"), default=None)
    if last is None:
        raise ValueError(f"template {template.text!r} has no input field")
    soft_k = sum(s.value for s in segs[:last] if s.kind == "soft")
    ids: list[int] = []
    for seg in segs[last + 1:]:
        if seg.kind == "soft":
            ids.extend(soft_id(soft_k + j) for j in range(seg.value))
            soft_k += seg.value
        else:
            ids.extend(_encode(tokenizer, seg.value))
    if not ids:
        ids = template.suffix_ids(tokenizer, {f: "" for f in template.fields})
    if not ids:
        raise ValueError(f"template {template.text!r}: nothing to score without the input (no domain premise)")
    return ids
