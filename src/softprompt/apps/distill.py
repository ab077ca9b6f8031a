"""Distillation: a hand-written prompt (the teacher) taught to a few soft vectors (the student) on
unlabelled inputs.

Why: a user's best hard prompt is often long (an instruction, demonstrations, a chat wrapper),
paid on every query, and prompt tuning needs labels they may not have.  Context distillation
(Askell et al. 2021; Snell et al. 2022) trains a short prompt to answer as the long one does,
from inputs alone.  Here the teacher is any prompt softprompt scores (a saved hard prompt, a
zero-shot or few-shot template) with its calibration; the student is a soft prompt before the
task's short template, trained with the one training recipe (``training/recipe.py``):

* classification: the student matches the teacher's calibrated label distribution (the
  cross-entropy to it, i.e. KL divergence plus a constant; ``temperature`` > 1 softens it);
  its validation score is agreement with the teacher's answer on held-back inputs, which
  chooses the kept step and stops training.
* generation: the student learns the teacher's greedy answers (sequence-level distillation).

The teacher's outputs are computed once, in batches on its cached prefix, and stored with the
run (``teacher_outputs.json``, keyed by teacher, model and inputs), so a repeated or resumed
distillation does not recompute them.  Labels in the input files are never read.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core.atomic import write_json
from ..core.bank import PromptBank
from ..core.calibration import Calibration
from ..core.prompts import ModelIdentity, SoftPrompt
from ..core.scoring import classify, generate
from ..data import Example, Task, TaskKind
from ..hard.baselines import hard_template

TEACHER_CACHE = "teacher_outputs.json"


@dataclass
class Teacher:
    """A prompt to distil: a template (with its verbalizer) and the calibration its scores get."""

    template: str
    verbalizer: dict[str, str] | None
    calibration: Calibration = field(default_factory=Calibration)
    description: str = ""
    soft: SoftPrompt | None = None  # a saved artifact used as the teacher (it may itself hold soft tokens)

    @classmethod
    def from_artifact(cls, path: str | Path, model) -> "Teacher":
        """A saved prompt (e.g. ``compare``'s ``chosen/hard_prompt.safetensors``) as the teacher."""
        p = SoftPrompt.load(path, model)
        if p.head is not None:
            raise ValueError(f"{path}: an encoder head cannot be a teacher (distillation scores label words)")
        return cls(p.template, p.verbalizer, p.calibration, f"prompt file {Path(path).name}", soft=p)

    @classmethod
    def from_text(cls, model, tok, task: Task, *, instruction: str | None = None, demos=(), template: str | None = None,
                  calibration: str = "contextual", inputs=(), batch_size: int = 32) -> "Teacher":
        """A hand-written teacher: ``template``, else the task's zero-shot prompt, or few-shot
        with ``demos`` (labelled examples); its ``calibration`` fitted here (``batch`` on
        ``inputs``, labels unread)."""
        from ..core.calibrate import fit_calibration
        from ..hard.baselines import few_shot_template, zero_shot_template

        if template is None:
            template = few_shot_template(task, list(demos), instruction) if demos else zero_shot_template(task, instruction)
        bank = PromptBank(model, tok)
        e = bank.add("teacher", template, verbalizer=task.verbalizer)
        cal = fit_calibration(bank, e, calibration, inputs=unlabelled(inputs), batch_size=batch_size)
        what = f"{len(demos)}-shot" if demos else "zero-shot"
        return cls(template, task.verbalizer, cal, f"{what} prompt, {calibration} calibration")

    def add_to(self, bank: PromptBank, name: str = "teacher", kind: str = TaskKind.CLASSIFICATION) -> int:
        """Put the teacher in ``bank`` as a prompt of ``kind`` (the task's: a saved artifact has its own)."""
        if self.soft is not None:
            return bank.add_prompt(self.soft, name)
        return bank.add(name, self.template, verbalizer=self.verbalizer, kind=kind)

    def to_dict(self) -> dict[str, Any]:
        return {"template": self.template, "verbalizer": self.verbalizer, "calibration": self.calibration.to_dict(),
                "description": self.description, "has_soft_tokens": bool(self.soft is not None and self.soft.n_tokens)}

    def fingerprint(self, model, inputs: list[Example]) -> str:
        """What the cached outputs depend on: this teacher, the model and the inputs, in order."""
        h = hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode())
        h.update(json.dumps(asdict(ModelIdentity.of(model)), sort_keys=True, default=str).encode())
        if self.soft is not None:
            h.update(self.soft.embeddings.detach().cpu().numpy().tobytes())
        for ex in inputs:
            h.update(json.dumps(ex.fields, sort_keys=True).encode())
        return h.hexdigest()


def unlabelled(examples) -> list[Example]:
    """The inputs alone: labels, targets and answers dropped, so nothing downstream can read them."""
    return [Example(fields=dict(ex.fields)) for ex in examples]


def teacher_outputs(model, tok, task: Task, teacher: Teacher, inputs: list[Example], *, batch_size: int = 32,
                    cache_dir: Path | None = None, progress: bool = True) -> dict[str, Any]:
    """The teacher's answers to ``inputs``: ``scores`` (calibrated label scores, in ``task.labels``
    order) for classification, ``texts`` for generation; read from ``cache_dir`` when it holds
    them for this teacher, model and inputs, else computed (prefix cached) and stored there."""
    key = teacher.fingerprint(model, inputs)
    path = Path(cache_dir) / TEACHER_CACHE if cache_dir is not None else None
    if path is not None and path.exists():
        try:
            cached = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            cached = {}
        if cached.get("fingerprint") == key:
            return {**cached, "cached": True}
    bank = PromptBank(model, tok)
    e = teacher.add_to(bank, kind=task.kind)
    t0 = time.perf_counter()
    out: dict[str, Any] = {"fingerprint": key, "n": len(inputs)}
    if task.kind == TaskKind.CLASSIFICATION:
        res = classify(bank, e, inputs, batch_size=batch_size, calibration=teacher.calibration,
                       progress="teacher" if progress else False)
        missing = sorted(set(task.labels) - set(res.labels))
        if missing:
            raise ValueError(f"the teacher's verbalizer has no word for the labels {missing}; it answers {res.labels}")
        cols = [res.labels.index(lab) for lab in task.labels]
        out["scores"] = res.scores[:, cols].tolist()
    else:
        out["texts"] = generate(bank, e, inputs, progress="teacher" if progress else False).texts
    out["seconds"] = round(time.perf_counter() - t0, 3)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, out)
    return {**out, "cached": False}


def distillation_examples(task: Task, inputs: list[Example], outputs: dict[str, Any],
                          temperature: float = 1.0) -> list[Example]:
    """Training examples whose targets are the teacher's: for classification its answer as the
    label (what validation agreement counts) and its distribution at ``temperature`` as the
    ``soft_label`` the loss matches; for generation its text as the target."""
    if not temperature > 0:
        raise ValueError(f"the temperature must be positive, got {temperature}")
    if task.kind != TaskKind.CLASSIFICATION:
        return [Example(fields=dict(ex.fields), target=t, answers=(t,)) for ex, t in zip(inputs, outputs["texts"])]
    scores = torch.tensor(outputs["scores"], dtype=torch.float64)
    probs = (scores / temperature).softmax(-1)
    labels = task.labels
    return [Example(fields=dict(ex.fields), label=labels[int(p.argmax())], soft_label=tuple(float(v) for v in p))
            for ex, p in zip(inputs, probs)]


def student_template(task: Task, n_tokens: int, method: str = "prompt") -> str:
    """``n_tokens`` soft tokens before the task's own hard template (its instruction-free form); for
    prefix tuning the hard template alone (the learned key/values go before it)."""
    if n_tokens < 1:
        raise ValueError(f"a student needs at least one soft token, got {n_tokens}")
    if method == "prefix":
        return hard_template(task.template).text
    return f"{{soft:{n_tokens}}} " + hard_template(task.template).text


def teacher_head_text(teacher: Teacher) -> str:
    """The teacher's example-independent text (instruction, demonstrations): what a prefix
    student's key/values start from, as Cartridges initialise from the context's own."""
    from ..core.templates import Template

    t = Template(teacher.template)
    return "".join(str(seg.value) for seg in t.segments[: t.first_field] if seg.kind == "text").strip()


@dataclass
class Distillation:
    prompt: SoftPrompt
    result: Any  # training.config.TrainResult
    teacher: Teacher
    agreement_valid: float | None
    teacher_seconds: float
    teacher_cached: bool
    n_train: int
    n_valid: int


def distil(model, tok, task: Task, teacher: Teacher, inputs, *, n_tokens: int = 20, method: str = "prompt",
           temperature: float = 1.0,
           valid_fraction: float = 0.2, max_valid: int = 200, seed: int = 0, out_dir: Path | None = None,
           search: bool = True, resume: bool = False, progress: bool = True, **overrides) -> Distillation:
    """Train a student soft prompt to answer as ``teacher`` on ``inputs`` (labels ignored).

    A seeded ``valid_fraction`` of the inputs (at most ``max_valid``) is held back: the student's
    agreement with the teacher there picks the kept step, the learning rate (successive halving,
    ``search``) and the stop.  ``method`` "prefix": the student is ``n_tokens`` key/value positions at
    every layer, started from the key/values of the teacher's own head text (instruction and
    demonstrations, cycled), as Cartridges start.  ``overrides`` are :class:`TrainConfig` fields."""
    from ..training.search import train_with_recipe
    from ..training.selection import kept_validation

    inputs = unlabelled(inputs)
    if len(inputs) < 2:
        raise ValueError(f"distillation needs unlabelled inputs; got {len(inputs)}")
    outputs = teacher_outputs(model, tok, task, teacher, inputs, cache_dir=out_dir, progress=progress)
    examples = distillation_examples(task, inputs, outputs, temperature)
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_valid = min(max_valid, max(1, math.floor(valid_fraction * len(examples)))) if valid_fraction > 0 else 0
    valid = [examples[i] for i in order[:n_valid]]
    train = [examples[i] for i in order[n_valid:]]
    student_task = Task(name=task.name, kind=task.kind, template=student_template(task, n_tokens, method),
                        verbalizer=task.verbalizer, instruction=task.instruction)
    if method == "prefix":
        head = teacher_head_text(teacher)
        overrides = {"prefix_tokens": n_tokens, **({"init": "text", "init_text": head} if head else {}), **overrides}
    overrides["method"] = method
    result = train_with_recipe(model, tok, student_task, train, valid or None, seed=seed, search=search,
                               out_dir=out_dir, resume=resume, progress=progress, **overrides)
    prompt = result.prompt
    kept = kept_validation(result) or {}
    agreement = kept.get("accuracy") if task.kind == TaskKind.CLASSIFICATION else kept.get("exact_match")
    prompt.training = {**prompt.training, "distilled_from": {
        **teacher.to_dict(), "temperature": temperature, "n_inputs": len(inputs), "n_valid": n_valid,
        "teacher_seconds": outputs.get("seconds"), "agreement_valid": agreement}}
    if out_dir is not None:
        prompt.save(Path(out_dir) / "prompt.safetensors")
    return Distillation(prompt, result, teacher, agreement, float(outputs.get("seconds") or 0.0),
                        bool(outputs.get("cached")), len(train), n_valid)


# ----------------------------------------------------------------------------- what it reports
def _scorer(bank: PromptBank, entry: int, calibration, kind: str):
    """``fn(examples, batch_size)`` scoring one prompt the task's way, for ``measure.latency``."""
    if kind == TaskKind.CLASSIFICATION:
        return lambda exs, bs: classify(bank, entry, exs, batch_size=bs, calibration=calibration)
    return lambda exs, bs: generate(bank, entry, exs, batch_size=bs)


def tokens_per_query(bank: PromptBank, entry: int, examples) -> float:
    """Tokens the model reads per query: the prompt's head (BOS, soft slots, instruction,
    demonstrations) plus the rendered input, averaged over ``examples``."""
    head = len(bank.entries[entry].prefix_ids) + bank.entries[entry].n_prefix
    rest = [len(bank.suffix_ids(entry, ex.fields)) for ex in examples]
    return head + sum(rest) / max(len(rest), 1)


def compare_to_teacher(model, tok, task: Task, d: Distillation, test, *, latency_examples: int = 16,
                       batch_size: int = 32) -> dict[str, Any]:
    """Teacher and student on the same examples: agreement, and with labels accuracy/macro-F1 of
    both with the paired bootstrap interval of the difference (student - teacher); tokens per
    query, batch-1 (median) and batched latency on ``latency_examples`` (``compare.measure.latency``),
    artifact bytes."""
    from .compare.decision_stats import paired_bootstrap
    from .compare.measure import latency

    bank = PromptBank(model, tok)
    te = d.teacher.add_to(bank, "teacher", kind=task.kind)
    st = bank.add_prompt(d.prompt, "student")
    inputs = unlabelled(test)
    out: dict[str, Any] = {"n_test": len(test)}
    if task.kind == TaskKind.CLASSIFICATION:
        rt = classify(bank, te, inputs, batch_size=batch_size, calibration=d.teacher.calibration)
        rs = classify(bank, st, inputs, batch_size=batch_size, calibration=d.prompt.calibration)
        pt, ps = rt.predictions, rs.predictions
        out["agreement"] = sum(a == b for a, b in zip(pt, ps)) / max(len(test), 1)
        if all(ex.label is not None for ex in test):
            from ..core.scoring import classification_metrics

            labels = task.labels
            out["teacher"] = classification_metrics([ex.label for ex in test], pt, labels)
            out["student"] = classification_metrics([ex.label for ex in test], ps, labels)
            gold = [labels.index(ex.label) for ex in test]
            out["difference"] = paired_bootstrap(gold, [labels.index(p) for p in pt], [labels.index(p) for p in ps],
                                                 len(labels))
    else:
        gt = generate(bank, te, inputs, batch_size=batch_size).texts
        gs = generate(bank, st, inputs, batch_size=batch_size).texts
        out["agreement"] = sum(a.strip() == b.strip() for a, b in zip(gt, gs)) / max(len(test), 1)
    for who, e, cal in (("teacher", te, d.teacher.calibration), ("student", st, d.prompt.calibration)):
        out[f"{who}_tokens_per_query"] = tokens_per_query(bank, e, inputs)
        lat = latency(_scorer(bank, e, cal, task.kind), inputs, latency_examples)  # as compare times every prompt
        out[f"{who}_ms_batch1"], out[f"{who}_ms_batched"] = lat["batch1_ms"], lat["batched_ms"]
    out["student_artifact_bytes"] = d.prompt.nbytes
    out["teacher_artifact_bytes"] = len(d.teacher.template.encode("utf-8")) + (d.teacher.soft.nbytes if d.teacher.soft
                                                                                else 0)
    out["distillation_s"] = round(d.teacher_seconds + d.result.wall_time_s, 1)
    return out


__all__ = ["Distillation", "TEACHER_CACHE", "Teacher", "compare_to_teacher", "distil", "distillation_examples",
           "student_template", "teacher_head_text", "teacher_outputs", "tokens_per_query", "unlabelled"]
