"""What a soft prompt is trained on: :class:`Task`, :class:`Example`, :class:`TaskData` and the data errors.

A :class:`Task` says *what* is asked of the frozen model: a template (input fields plus
``{soft:N}`` trainable slots, in the one grammar of :mod:`softprompt.data.grammar`), how labels
are spoken (the verbalizer) and a plain-text instruction for the hand-written-prompt baseline.
A :class:`TaskData` pairs a task with its splits of :class:`Example` s.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from .grammar import parse

__all__ = ["KINDS", "TaskKind", "DataError", "DataFileNotFoundError", "DataNotFoundError", "Example", "Task", "TaskData"]


class TaskKind(StrEnum):
    """What a task asks for, the one home of its spelling.  A :class:`~enum.StrEnum`: a member
    equals its value, so ``kind == "generation"``, JSON, artifacts and run files are unchanged."""

    CLASSIFICATION = "classification"  # score each label's verbalizer words, answer the best
    GENERATION = "generation"  # greedy-decode an answer, scored by exact match / F1


KINDS = tuple(TaskKind)

# --------------------------------------------------------------------------- errors


class DataError(ValueError):
    """Bad or unreadable data.  The message names the file, the row and the problem."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A data file does not exist.

    Both a :class:`DataError` (so one ``except DataError`` covers every data problem) and a
    :class:`FileNotFoundError` (so generic file handling still works).
    """


class DataNotFoundError(FileNotFoundError):
    """The built-in data directory could not be found (says where it looked, how to set it)."""


# --------------------------------------------------------------------------- core types


@dataclass(frozen=True)
class Example:
    """One labelled example.

    ``fields`` maps input field names (those used in a task template) to text.  A
    classification example has ``label`` (a key of :attr:`Task.verbalizer`); a generation
    example has ``target`` (the answer to train on, the first gold answer) and ``answers``
    (every gold answer, because EM/F1 take the best match over them).  ``soft_label``, when
    given, is a distribution over the task's labels (verbalizer order) that training matches
    instead of ``label``: a teacher prompt's answer in distillation (``apps/distill.py``).
    """

    fields: dict[str, str]
    label: str | None = None
    target: str | None = None
    answers: tuple[str, ...] = ()
    soft_label: tuple[float, ...] = ()



def _template_fields(template: str) -> tuple[str, ...]:
    """Input fields of ``template`` in order of first appearance, read with the template grammar."""
    return tuple(dict.fromkeys(s.value for s in parse(template) if s.kind == "field"))  # type: ignore[misc]


@dataclass
class Task:
    """What the frozen model is asked to do, and how its answer is read.

    ``verbalizer`` maps each label to the words the model should continue with, with a
    leading space (``" positive"``) because they follow the template's last word.  Label
    words are chosen to start with different tokens so the first-token scores already
    separate the classes.  ``instruction`` is a zero-shot instruction (no soft tokens) used
    by the hand-written-prompt baseline.
    """

    name: str
    kind: TaskKind | str  # a str is read as its TaskKind
    template: str
    verbalizer: dict[str, str] | None = None
    instruction: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"task {self.name!r}: kind must be one of {[k.value for k in KINDS]}, got {self.kind!r}")
        self.kind = TaskKind(self.kind)
        if self.kind == TaskKind.CLASSIFICATION:
            if not self.verbalizer:
                raise ValueError(f"task {self.name!r}: a classification task needs a verbalizer")
            empty = [k for k, v in self.verbalizer.items() if not str(v).strip()]
            if empty:
                raise ValueError(f"task {self.name!r}: empty verbalizer words for labels {empty}")

    @property
    def labels(self) -> list[str]:
        """Label names, in verbalizer order (empty for generation tasks)."""
        return list(self.verbalizer or {})

    @property
    def input_fields(self) -> tuple[str, ...]:
        """Input fields named in the template, in order of first appearance."""
        return _template_fields(self.template)

    def check(
        self, examples: Iterable[Example], source: str = "<examples>", *, require_labels: bool = True
    ) -> None:
        """Raise :class:`DataError` if any example cannot be used with this task.

        Checked: every template field is present and non-empty; for classification, the
        label is one of :attr:`labels`; for generation, a target exists.  Examples without a
        label/target pass when ``require_labels`` is False (unlabeled data to predict on).
        Rows are reported 1-based together with the 0-based list index.
        """
        needed = self.input_fields
        known = self.labels
        for i, ex in enumerate(examples):
            where = f"{source}: row {i + 1} (examples[{i}])"
            for name in needed:
                value = ex.fields.get(name)
                if value is None:
                    raise DataError(
                        f"{where}: missing field {name!r} used by the template of task "
                        f"{self.name!r}; the example has fields {sorted(ex.fields)}"
                    )
                if not str(value).strip():
                    raise DataError(f"{where}: field {name!r} is empty")
            if self.kind == TaskKind.CLASSIFICATION:
                if ex.label is None:
                    if require_labels:
                        raise DataError(f"{where}: no label (task {self.name!r} has labels {known})")
                elif ex.label not in (self.verbalizer or {}):
                    raise DataError(
                        f"{where}: unknown label {ex.label!r} for task {self.name!r}; "
                        f"known labels are {known}"
                    )
            elif require_labels and not ex.target:
                raise DataError(f"{where}: no target answer for generation task {self.name!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, e.g. to store next to a trained prompt."""
        return {
            "name": self.name,
            "kind": self.kind,
            "template": self.template,
            "verbalizer": dict(self.verbalizer) if self.verbalizer is not None else None,
            "instruction": self.instruction,
            "description": self.description,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Task:
        """Inverse of :meth:`to_dict`."""
        keys = ("name", "kind", "template", "verbalizer", "instruction", "description")
        return cls(**{k: d[k] for k in keys if k in d})


@dataclass
class TaskData:
    """A task with its data splits (e.g. ``"train"``, ``"validation"``, ``"test"``)."""

    task: Task
    splits: dict[str, list[Example]] = field(default_factory=dict)

    def __getitem__(self, split: str) -> list[Example]:
        try:
            return self.splits[split]
        except KeyError:
            raise KeyError(
                f"task {self.task.name!r} has no split {split!r}; splits are {list(self.splits)}"
            ) from None
