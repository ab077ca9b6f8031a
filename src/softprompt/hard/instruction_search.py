"""Instruction search: automatic prompt engineering on the hard side (APE-style).

The soft side gets restarts, sweeps and ensembles; the hard side gets this. Candidates come
from four places, in this order (the first of equally good candidates wins):

1. the task's own instruction;
2. the user's instructions (``--instructions-file``: one per line, ``#`` comments);
3. built-in paraphrase patterns per task shape (``data/instruction_patterns.json``: a table,
   filled with the task's input name and label words);
4. instructions the frozen model writes itself from a few labelled training examples
   (induction, Zhou et al. 2023 "Large Language Models Are Human-Level Prompt Engineers"):
   greedy generation after "The instruction was to", through the same generate path as
   every other answer.

Each candidate becomes a zero-shot template (``baselines.zero_shot_template``), is
calibrated without labels (``calibration.py``) and scored by rank classification on the
labelled *training* examples only. Test data is never an argument here. The search cost
(candidates, forward passes of the frozen model, seconds) is reported, so that it can be
counted as the soft side's training is.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

import torch

from ..core.bank import PromptBank
from ..core.method import Method
from ..core.calibration import CALIBRATIONS, Calibration
from ..core.calibrate import fit_calibration
from ..core.scoring import classify, generate
from ..data import Example, Task
from ..data.task import TaskKind
from ..core.templates import Template

METRICS = ("macro_f1", "accuracy")
INDUCTION_HEAD = (
    "I gave a friend an instruction and some inputs. The friend read the instruction and wrote an "
    "output for every one of the inputs. Here are the input-output pairs:"
)
INDUCTION_CUE = "The instruction was to"


@dataclass
class InstructionSearchResult:
    best: str
    score: float
    candidates: list[tuple[str, float]]
    forward_passes: int
    seconds: float
    calibration: str
    template: str = ""  # the best candidate's zero-shot template
    fitted: Calibration | None = None  # the best candidate's calibration (log-prior included)
    metric: str = "macro_f1"
    sources: dict[str, str] = field(default_factory=dict)  # candidate -> task | user | pattern | induced
    n_train: int = 0

    def to_prompt(self, model, task: Task):
        """The chosen instruction as a hard-prompt artifact (its calibration included)."""
        return hard_prompt(model, task, self.template, self.fitted, instruction_search=self.to_dict())

    def to_dict(self) -> dict:
        return {"best": self.best, "score": self.score, "metric": self.metric, "template": self.template,
                "calibration": self.calibration, "fitted": self.fitted.to_dict() if self.fitted else None,
                "candidates": [{"instruction": c, "score": s, "source": self.sources.get(c, "")}
                               for c, s in self.candidates],
                "n_candidates": len(self.candidates), "forward_passes": self.forward_passes,
                "seconds": self.seconds, "n_train": self.n_train}


def hard_prompt(model, task: Task, template: str, calibration: Calibration | None = None, **training):
    """A hard-prompt artifact: a ``SoftPrompt`` with no soft slots (template + verbalizer +
    calibration), saved, loaded, evaluated and served like any other prompt."""
    from ..core.prompts import ModelIdentity, SoftPrompt

    ident = ModelIdentity.of(model)
    if Template(template).n_soft:
        raise ValueError(f"a hard prompt has no soft slots; template {template!r} has some")
    return SoftPrompt(torch.zeros(0, ident.hidden_size), ident, template=template, verbalizer=task.verbalizer,
                      task=task.name, kind=task.kind, method=Method.HARD_PROMPT.value, init="none", training=training,
                      calibration=calibration or Calibration())


def load_patterns() -> dict[str, list[str]]:
    text = files("softprompt").joinpath("data").joinpath("instruction_patterns.json").read_text(encoding="utf-8")
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def _input_name(task: Task) -> str:
    """How the patterns name the input: its field names ("premise and hypothesis")."""
    names = [f.replace("_", " ") for f in task.input_fields]
    return names[0] if len(names) == 1 else " and ".join([", ".join(names[:-1]), names[-1]])


def pattern_instructions(task: Task) -> list[str]:
    """The built-in paraphrases for the task's shape (one input field, or a pair), filled in."""
    if task.kind != TaskKind.CLASSIFICATION:
        raise ValueError(f"instruction search ranks labels; task {task.name!r} is a {task.kind} task")
    words = list(dict.fromkeys(w.strip() for w in (task.verbalizer or {}).values()))
    or_ = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]
    values = {"input": _input_name(task), "words_or": or_, "words_list": ", ".join(words),
              "labels_list": ", ".join(task.labels)}
    shape = "single" if len(task.input_fields) == 1 else "pair"
    return [p.format(**values) for p in load_patterns()[shape]]


def read_instructions_file(path: str | Path) -> list[str]:
    """One instruction per non-empty line; lines starting with ``#`` are comments."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no instructions file at {path}")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    out = [ln for ln in lines if ln and not ln.startswith("#")]
    if not out:
        raise ValueError(f"{path}: no instructions in it (one per line, # for comments)")
    return out


def instruction_candidates(task: Task, *, user_instructions=(), induced=()) -> list[str]:
    """The task's instruction, the user's, the built-in paraphrases, then induced ones; each once."""
    return list(_sourced(task, user_instructions, induced))


def _sourced(task: Task, user_instructions=(), induced=()) -> dict[str, str]:
    out: dict[str, str] = {}
    for source, items in (("task", [task.instruction]), ("user", user_instructions),
                          ("pattern", pattern_instructions(task)), ("induced", induced)):
        for text in items:
            text = " ".join(str(text or "").split())
            if text and text not in out:
                out[text] = source
    return out


def _render_input(task: Task, ex: Example) -> str:
    fields = task.input_fields
    if len(fields) == 1:
        return " ".join(str(ex.fields[fields[0]]).split())
    return " ".join(f"{f}: {' '.join(str(ex.fields[f]).split())}" for f in fields)


def clean_instruction(text: str) -> str:
    """First line of a generated instruction, capitalised, ending with a full stop ("" if empty)."""
    text = text.strip().split("\n")[0].strip().strip('"').strip()
    if not text:
        return ""
    text = text[0].upper() + text[1:]
    return text if text.endswith((".", "?", "!")) else text + "."


@torch.no_grad()
def induce_instructions(bank_or_model, task: Task, examples: list[Example], *, n: int = 3, seed: int = 0,
                        tokenizer=None, k: int = 4, max_new_tokens: int = 32) -> list[str]:
    """``n`` instructions written by the frozen model, each from ``k`` labelled examples drawn
    class-balanced with seed ``seed + i`` (APE's forward induction template, greedy decoding).
    Empty or repeated generations are dropped, so fewer than ``n`` may come back."""
    from .baselines import sample_demos

    bank = bank_or_model if isinstance(bank_or_model, PromptBank) else PromptBank(bank_or_model, tokenizer)
    if n <= 0:
        return []
    labelled = [ex for ex in examples if ex.label is not None]
    if not labelled:
        raise ValueError("instruction induction needs labelled training examples")
    k = min(k, len(labelled))
    # the pairs are the field's text, so braces in the data stay literal; the head is cached once
    name = "__induce__"
    bank.add(name, INDUCTION_HEAD + "\n\n{pairs}\n\n" + INDUCTION_CUE, kind=TaskKind.GENERATION)
    queries = []
    for i in range(n):
        demos = sample_demos(labelled, k, seed=seed + i, labels=task.labels)
        pairs = "\n\n".join(f"Input: {_render_input(task, d)}\nOutput: {(task.verbalizer or {})[d.label].strip()}"
                            for d in demos)
        queries.append(Example({"pairs": pairs}))
    try:
        texts = generate(bank, name, queries, max_new_tokens=max_new_tokens, batch_size=n).texts
    finally:
        bank.remove(name)
    out: list[str] = []
    for t in texts:
        c = clean_instruction(t)
        if c and c not in out:
            out.append(c)
    return out


class ForwardCounter:
    """Counts forward passes of the frozen model's transformer (prefixes, contexts, label
    continuations, decode steps) while active: the search's cost in the model's own units."""

    def __init__(self, model):
        self.module = model.base_model
        self.n = 0

    def __enter__(self) -> "ForwardCounter":
        self._hook = self.module.register_forward_pre_hook(lambda *_: self._tick())
        return self

    def _tick(self) -> None:
        self.n += 1

    def __exit__(self, *exc) -> None:
        self._hook.remove()


def _metric_value(metrics: dict, metric: str) -> tuple[float, float]:
    other = "accuracy" if metric == "macro_f1" else "macro_f1"
    return float(metrics[metric]), float(metrics[other])


@torch.no_grad()
def search_instructions(model, tokenizer, task: Task, train_examples: list[Example], *, instructions_file=None,
                        calibration: str = "contextual", induce: int = 3, metric: str = "macro_f1", seed: int = 0,
                        batch_size: int = 32, user_instructions=(), induce_k: int = 4,
                        class_prior=None) -> InstructionSearchResult:
    """Score every candidate instruction on the labelled ``train_examples`` (the only data it
    sees) with ``calibration`` and keep the best by ``metric`` (ties: the other metric, then the
    earlier candidate, so the task's own instruction wins a tie). ``class_prior``: see
    ``calibrate.fit_calibration``."""
    from .baselines import zero_shot_template

    if calibration not in CALIBRATIONS:
        raise ValueError(f"unknown calibration {calibration!r}; choose one of {', '.join(CALIBRATIONS)}")
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    if not train_examples or any(ex.label is None for ex in train_examples):
        raise ValueError("instruction search scores candidates on labelled training examples; give some, all labelled")
    task.check(train_examples, source="instruction search training data")
    t0 = time.perf_counter()
    bank = PromptBank(model, tokenizer)
    user = list(user_instructions) + (read_instructions_file(instructions_file) if instructions_file else [])
    with ForwardCounter(model) as counter:
        induced = induce_instructions(bank, task, train_examples, n=induce, seed=seed, k=induce_k) if induce else []
        sourced = _sourced(task, user, induced)
        scored: list[tuple[str, float]] = []
        best = None
        for i, instr in enumerate(sourced):
            template = zero_shot_template(task, instr)
            name = f"__candidate{i}__"
            bank.add(name, template, verbalizer=task.verbalizer)
            cal = fit_calibration(bank, name, calibration, inputs=[Example(ex.fields) for ex in train_examples],
                                  batch_size=batch_size, class_prior=class_prior)
            res = classify(bank, name, train_examples, batch_size=batch_size, calibration=cal)
            bank.remove(name)  # one candidate's cached key/values at a time
            key = _metric_value(res.metrics, metric)
            scored.append((instr, key[0]))
            if best is None or key > best[0]:
                best = (key, instr, template, cal)
    assert best is not None  # the patterns alone give candidates
    return InstructionSearchResult(
        best=best[1], score=best[0][0], candidates=scored, forward_passes=counter.n,
        seconds=time.perf_counter() - t0, calibration=calibration, template=best[2], fitted=best[3],
        metric=metric, sources=sourced, n_train=len(train_examples))
