"""Built-in tasks: their definitions are a table (``builtin_tasks.json``), read by a few generic readers.

Each row of the table is one task: the :class:`Task` fields (name, kind, template, verbalizer,
instruction, description), a ``notes`` line on where the data comes from, and how to read it:
``reader`` names one of the readers below and the rest of the row parameterises it (files per
split and the :func:`load_examples` arguments; counts for positional splits).  Adding a task in
an existing file format is a new row, not new code.

Built-in tasks (:func:`load_task`, :func:`list_tasks`) read the shared data directory found
by :func:`data_root`; it is never copied into the package.  The exception is ``demo``:

    The DEMO set (``softprompt/data/demo_support.csv``, columns ``text,label``) is a small,
    hand-written set of 300 short messages from customers of a fictional online shop,
    labelled ``complaint`` or ``praise`` (150 each, including sarcasm, polite complaints and
    mixed messages).  It exists so the quickstart runs anywhere, offline, in seconds.  It
    was written for this package, is not drawn from any data set, and is NOT a benchmark:
    do not report numbers on it.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from importlib.resources import as_file, files
from pathlib import Path
from typing import Any

from .hotpotqa import iter_hotpotqa
from .loaders import answers_of, data_root, load_examples, read_text
from .task import DataError, Example, Task, TaskData

__all__ = ["BUILTIN_TASKS", "builtin_task", "list_tasks", "load_task"]

_TASK_KEYS = ("name", "kind", "template", "verbalizer", "instruction", "description")


def _read_table() -> dict[str, dict[str, Any]]:
    text = files(__package__).joinpath("builtin_tasks.json").read_text(encoding="utf-8")
    return {row["name"]: row for row in json.loads(text)}


BUILTIN_TASKS: dict[str, dict[str, Any]] = _read_table()
"""Name -> table row (the task definition and how its data is read), in table order."""


def builtin_task(name: str) -> Task:
    """The :class:`Task` of a built-in task, without reading any data."""
    try:
        row = BUILTIN_TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks are {list_tasks()}") from None
    return Task(**{k: row[k] for k in _TASK_KEYS if k in row})


# --------------------------------------------------------------------------- readers
# Each reader takes (table row, data root or None, limit) and returns the splits.


def _read_files(row: Mapping[str, Any], root: Path, limit: int | None) -> dict[str, list[Example]]:
    """One file per split, all read with the row's :func:`load_examples` arguments."""
    return {split: load_examples(root / rel, **row["read"], limit=limit) for split, rel in row["files"].items()}


def _read_package_file(row: Mapping[str, Any], root: None, limit: int | None) -> dict[str, list[Example]]:
    """A file shipped in this package; row ``i`` (0-based) is "test" when ``i % test_every == 0``."""
    with as_file(files(__package__).joinpath(row["file"])) as path:
        rows = load_examples(path, **row["read"])
    splits: dict[str, list[Example]] = {"train": [], "test": []}
    for i, ex in enumerate(rows):
        splits["test" if i % row["test_every"] == 0 else "train"].append(ex)
    if limit is not None:
        splits = {k: v[:limit] for k, v in splits.items()}
    return splits


def _positional(items: Iterable[Any], build: Callable[[Any], Example], counts: Mapping[str, int],
                limit: int | None) -> dict[str, list[Example]]:
    """Split by position: the first ``counts[first]`` items go to the first split, and so on;
    reading stops once every split holds its quota (``limit`` caps each).  Only kept items are built."""
    quota = {s: (n if limit is None else min(limit, n)) for s, n in counts.items()}
    bounds, end = [], 0
    for s, n in counts.items():
        end += n
        bounds.append((end, s))
    splits: dict[str, list[Example]] = {s: [] for s in counts}
    for k, item in enumerate(items):
        split = next((s for b, s in bounds if k < b), None)
        if split is None or all(len(splits[s]) >= q for s, q in quota.items()):
            break
        if len(splits[split]) < quota[split]:
            splits[split].append(build(item))
    return splits


def _read_hotpotqa(row: Mapping[str, Any], root: Path, limit: int | None) -> dict[str, list[Example]]:
    """The 500 HotpotQA questions (:mod:`softprompt.data.hotpotqa`), split by position."""
    items = iter_hotpotqa(root, max_context_words=row["max_context_words"])
    return _positional(items, lambda ex: ex, row["positional"], limit)


def _read_squad(row: Mapping[str, Any], root: Path, limit: int | None) -> dict[str, list[Example]]:
    """SQuAD-format JSON, questions in file order (article, paragraph, question), split by position."""
    path = root / row["file"]
    try:
        data = json.loads(read_text(path, "utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno}: {e.msg}") from None

    def build(item: tuple[str, Mapping[str, Any]]) -> Example:
        context, qa = item
        answers = answers_of([a.get("text") for a in qa.get("answers", [])])
        if not answers:
            raise DataError(f"{path}: question id {qa.get('id')!r} has no answers")
        return Example({"context": context, "question": qa["question"].strip()}, target=answers[0], answers=answers)

    qas = (
        (para["context"].strip(), qa)
        for article in data["data"]
        for para in article["paragraphs"]
        for qa in para["qas"]
    )
    return _positional(qas, build, row["positional"], limit)


_READERS: dict[str, Callable[..., dict[str, list[Example]]]] = {
    "files": _read_files,
    "package_file": _read_package_file,
    "hotpotqa": _read_hotpotqa,
    "squad": _read_squad,
}


# --------------------------------------------------------------------------- public


def list_tasks() -> list[str]:
    """Names of the built-in tasks."""
    return list(BUILTIN_TASKS)


def load_task(
    name: str, data_dir: str | os.PathLike[str] | None = None, *, limit_per_split: int | None = None
) -> TaskData:
    """Load a built-in task with its splits, checked against the task's template/labels.

    ``limit_per_split`` keeps the first N examples of each split (deterministic), which
    also lets loaders stop reading early.  ``demo`` needs no data directory.
    """
    task = builtin_task(name)
    if limit_per_split is not None and limit_per_split < 0:
        raise ValueError(f"limit_per_split must be >= 0, got {limit_per_split}")
    row = BUILTIN_TASKS[name]
    root = None if row["reader"] == "package_file" else data_root(data_dir)
    td = TaskData(task, _READERS[row["reader"]](row, root, limit_per_split))
    if limit_per_split is not None:
        td.splits = {k: v[:limit_per_split] for k, v in td.splits.items()}
    for split, examples in td.splits.items():
        td.task.check(examples, source=f"task {name!r} split {split!r}")
    return td
