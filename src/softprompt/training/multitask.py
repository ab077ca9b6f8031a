"""One soft prompt trained on several tasks at once.

Why: a prompt trained on related source tasks is a better start for a new task than text or
vocabulary (Lester et al. 2021, section 7; SPoT, Vu et al. 2022), and one prompt shared by
several tasks is one file to serve.  Each example keeps its own task's template and verbalizer;
the tasks' bank entries hold the *same* soft-token tensor, so a mixed batch is scored as the
server scores mixed traffic (every example through its own entry) and every gradient lands on
the one prompt.  The loss of a batch is the mean over its examples (each task's part computed
by the family's ``batch_loss``), validation the mean over the tasks of each task's metrics, so a
large task cannot hide a collapsed small one.

Sampling: ``proportional`` uses every example once per epoch (tasks weigh as their sizes);
``temperature`` T resamples each task to a share proportional to ``n_k ** (1 / T)`` (Raffel et
al. 2020's temperature-scaled mixing; T = 1 is proportional, large T equal shares).

The result is one :class:`~softprompt.core.prompts.SoftPrompt` per task, holding the shared
tensor with that task's template and verbalizer (``OUT/prompt.<task>.safetensors``); start a
new task from it with ``init="prompt:PATH"``.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.prompts import SoftPrompt
from ..core.templates import Template
from ..data import Example, Task, TaskKind
from .config import TrainConfig, TrainResult
from .loop import check_training_inputs, fit
from .prompt import PromptTrainable, batch_loss, encoders_for, validate
from .selection import classification_score

SAMPLINGS = ("proportional", "temperature")
SHARED = "_shared"  # the name a multi-task method saves its shared prompt under (mpt.py)


@dataclass(frozen=True)
class TaskExample:
    """An example and the index of its task in the mixture."""

    task: int
    example: Example


def mixture(per_task: list[list[Example]], sampling: str = "proportional", temperature: float = 2.0,
            seed: int = 0) -> list[TaskExample]:
    """The training pool of a mixture, tagged with each example's task (see the module doc)."""
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    if sampling == "temperature" and not temperature > 0:
        raise ValueError(f"the mixing temperature must be positive, got {temperature}")
    sizes = [len(x) for x in per_task]
    if sampling == "proportional":
        return [TaskExample(k, ex) for k, exs in enumerate(per_task) for ex in exs]
    weights = [n ** (1.0 / temperature) for n in sizes]
    total = sum(sizes)
    rng = random.Random(seed)
    out: list[TaskExample] = []
    for k, exs in enumerate(per_task):
        want = max(1, round(total * weights[k] / sum(weights)))
        picked = [exs[i % len(exs)] for i in range(want)] if want > len(exs) else rng.sample(exs, want)
        out += [TaskExample(k, ex) for ex in picked]
    return out


class PromptSet:
    """The shared prompt, once per task (its template and verbalizer), saved side by side."""

    def __init__(self, prompts: dict[str, SoftPrompt]):
        self.prompts = prompts

    def save(self, path: str | Path) -> int:
        """``PATH`` = ``.../prompt.safetensors`` writes ``.../prompt.<task>.safetensors`` per task."""
        path = Path(path)
        return sum(p.save(path.with_name(f"{path.stem}.{name}{path.suffix}")) for name, p in self.prompts.items())

    @property
    def embeddings(self) -> torch.Tensor:
        return next(iter(self.prompts.values())).embeddings


class MultiTaskTrainable(PromptTrainable):
    """:class:`PromptTrainable` with one bank entry per task, all holding the one trained tensor."""

    def __init__(self, model, tokenizer, tasks: list[Task], train_examples, cfg: TrainConfig, **kw):
        super().__init__(model, tokenizer, tasks[0], [t.example for t in train_examples], cfg, encoders_for(cfg), **kw)
        self.tasks = tasks
        self.description = "training " + "+".join(t.name for t in tasks)
        self.entries: list[int] = []

    def _put(self) -> None:
        vals = self.trained.values()
        self.entries = [self.bank.add(t.name, t.template, vals["prompt"], verbalizer=t.verbalizer, kind=t.kind)
                        for t in self.tasks]
        self.values, self.entry = vals, self.entries[0]

    def loss(self, examples: list[TaskExample], index: list[int]) -> tuple[torch.Tensor, int]:
        total, n_tok = None, 0
        for k in sorted({x.task for x in examples}):
            group = [x.example for x in examples if x.task == k]
            part, n = batch_loss(self.bank, self.entries[k], group, self.cfg.loss, None, self.context,
                                 self.compile_full, self.cfg.pack_tokens)
            part = part * (len(group) / len(examples))
            total, n_tok = (part if total is None else total + part), n_tok + n
        return total, n_tok

    def validate(self, examples: list[TaskExample]) -> dict:
        per = {}
        for k, t in enumerate(self.tasks):
            group = [x.example for x in examples if x.task == k]
            if group:
                per[t.name] = {key: v for key, v in validate(self.bank, self.entries[k], group, self.cfg).items()
                               if key != "score"}
        keys = ("accuracy", "macro_f1", "loss", "top_share", "gold_top_share")
        m = {key: sum(p[key] for p in per.values()) / len(per) for key in keys if all(key in p for p in per.values())}
        m["per_task"] = per
        m["score"] = classification_score(m)
        return m

    def finish(self, final: dict[str, torch.Tensor], summary: dict) -> PromptSet:
        prompts = {}
        for t in self.tasks:
            self.task = t
            p = super().finish(final, summary)
            p.training = {**p.training, "multitask": [x.name for x in self.tasks]}
            prompts[t.name] = p
        self.task = self.tasks[0]
        return PromptSet(prompts)


def check_mixture(model, tasks: list[Task], train, valid, cfg: TrainConfig) -> list[TaskExample] | None:
    """Refuse what cannot share one prompt; returns the tagged validation examples (or None)."""
    from .distributed import DataParallel

    if len(tasks) < 2 or len(train) != len(tasks) or (valid is not None and len(valid) != len(tasks)):
        raise ValueError("multi-task training needs two or more tasks, with one training (and validation) list each")
    if len({t.name for t in tasks}) != len(tasks):
        raise ValueError(f"task names must differ: {[t.name for t in tasks]}")
    if cfg.method != "prompt" or cfg.balance:
        raise ValueError("multi-task training shares soft tokens: method 'prompt' only, without class balancing")
    lengths = {Template(t.template).n_soft for t in tasks}
    if len(lengths) != 1 or 0 in lengths:
        raise ValueError(f"every task's template needs the same number of soft tokens to share them; got "
                         f"{ {t.name: Template(t.template).n_soft for t in tasks} }")
    for k, t in enumerate(tasks):
        if t.kind != TaskKind.CLASSIFICATION:
            raise ValueError(f"task {t.name!r} is {t.kind}: multi-task training mixes classification tasks")
        check_training_inputs(model, t, train[k], valid[k] if valid else None)
    if DataParallel.current(model).active:
        raise ValueError("multi-task training runs in one process")
    return [TaskExample(k, ex) for k, exs in enumerate(valid or []) for ex in exs] or None


def train_multitask(model, tokenizer, tasks: list[Task], train: list[list[Example]],
                    valid: list[list[Example]] | None = None, cfg: TrainConfig | None = None, *,
                    sampling: str = "proportional", temperature: float = 2.0, out_dir=None, resume: bool = False,
                    progress: bool = True) -> TrainResult:
    """Train one prompt on the mixture of ``tasks`` (``train[k]`` / ``valid[k]`` are task k's
    examples); ``result.prompt`` is a :class:`PromptSet`."""
    cfg = cfg or TrainConfig()
    held = check_mixture(model, tasks, train, valid, cfg)
    pool = mixture(train, sampling, temperature, cfg.seed)
    trainable = MultiTaskTrainable(model, tokenizer, tasks, pool, cfg)
    return fit(trainable, pool, held, cfg, out_dir=out_dir, resume=resume, progress=progress)


__all__ = ["MultiTaskTrainable", "PromptSet", "SAMPLINGS", "SHARED", "TaskExample", "check_mixture", "mixture",
           "train_multitask"]
