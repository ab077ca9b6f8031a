"""Labelled tasks: what a soft prompt is trained on, and how the data is read.

A :class:`Task` says *what* is asked of the frozen model: a template (input fields plus
``{soft:N}`` trainable slots), how labels are spoken (the verbalizer) and a plain-text
instruction for the hand-written-prompt baseline.  A :class:`TaskData` pairs a task with
its splits of :class:`Example` s.

Data loading is strict on purpose.  A soft prompt trained on silently mangled rows (a
shifted column, an unmapped label, mojibake) still "trains" and just reports a worse
number, so every problem is raised as a :class:`DataError` naming the file, the row and
the fix, instead of being skipped.

Template syntax (rendered elsewhere): ``{soft:N}`` is N soft tokens, ``{name}`` is an input
field, ``{{``/``}}`` are literal braces, anything else is literal text.  Classification
templates end just before the verbalizer word; generation templates end before the answer.

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

import csv
import io
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DataError",
    "DataFileNotFoundError",
    "DataNotFoundError",
    "Example",
    "Task",
    "TaskData",
    "load_examples",
    "from_hf_dataset",
    "data_root",
    "BUILTIN_TASKS",
    "load_task",
    "list_tasks",
    "hotpot_context",
    "hotpotqa_examples",
]

KINDS = ("classification", "generation")
DATA_ENV_VAR = "SOFTPROMPT_DATA"


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
    (every gold answer, because EM/F1 take the best match over them).
    """

    fields: dict[str, str]
    label: str | None = None
    target: str | None = None
    answers: tuple[str, ...] = ()


# `{{` / `}}` escapes, then a `{...}` placeholder.  Anything else is literal text.
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")
_SOFT = re.compile(r"soft:\s*\d+")


def _template_fields(template: str) -> tuple[str, ...]:
    names: list[str] = []
    for m in _PLACEHOLDER.finditer(template):
        inner = m.group(1)
        if inner is None or _SOFT.fullmatch(inner.strip()):
            continue
        name = inner.strip()
        if name and name not in names:
            names.append(name)
    return tuple(names)


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
    kind: str
    template: str
    verbalizer: dict[str, str] | None = None
    instruction: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"task {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "classification":
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
            if self.kind == "classification":
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


# --------------------------------------------------------------------------- file loading


_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl"}


def _detect_format(path: Path, format: str | None) -> str:
    if format is not None:
        fmt = format.lower()
        if fmt not in ("csv", "tsv", "jsonl"):
            raise ValueError(f"format must be 'csv', 'tsv' or 'jsonl', got {format!r}")
        return fmt
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"{path}: cannot tell the format from the suffix {path.suffix!r}; "
            f"pass format='csv', 'tsv' or 'jsonl'"
        )
    return fmt


def _read_text(path: Path, encoding: str) -> str:
    """Read the whole file, turning decode errors into a message with line and byte."""
    if not path.exists():
        where = "" if path.is_absolute() else f" (resolved to {path.resolve()})"
        raise DataFileNotFoundError(f"{path}: data file not found{where}")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a data file")
    raw = path.read_bytes()
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        bad = raw[e.start : e.end].hex(" ")
        hint = "encoding='latin-1' or encoding='cp1252'" if encoding.lower().replace("_", "-") in (
            "utf-8", "utf8", "utf-8-sig"
        ) else "encoding='utf-8'"
        raise DataError(
            f"{path}: cannot decode as {encoding!r} at line {line}, column {col} "
            f"(byte offset {e.start}, bytes {bad}): {e.reason}. "
            f"The file is probably in another encoding; try {hint}"
        ) from None
    except LookupError:
        raise ValueError(f"unknown encoding {encoding!r}") from None
    if text.startswith("\ufeff"):  # a UTF-8 byte-order mark would glue onto the first column name
        text = text[1:]
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    return text


def _scalar(value: Any) -> str | None:
    """A JSON/CSV/Arrow cell as text; JSON booleans use JSON spelling ("true"/"false")."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value).strip()
    return None


def _answers(value: Any) -> tuple[str, ...] | None:
    """A target cell as a tuple of answers: a string, a list of strings, or a SQuAD-style
    ``{"text": [...]}`` dict.  Duplicates are dropped (order kept); empties are ignored."""
    if isinstance(value, Mapping) and "text" in value:
        value = value["text"]
    if isinstance(value, (list, tuple)):
        out: list[str] = []
        for v in value:
            s = _scalar(v)
            if s and s not in out:
                out.append(s)
        return tuple(out)
    s = _scalar(value)
    return (s,) if s else None


class _RowBuilder:
    """Turns raw cells into Examples with uniform checks and messages for every format."""

    def __init__(self, source: str, label_map: Mapping[Any, str] | None, row_word: str):
        self.source = source
        self.label_map = None if label_map is None else {str(k): v for k, v in label_map.items()}
        self.row_word = row_word

    def where(self, row: int, line: int | None = None) -> str:
        extra = f" (line {line})" if line is not None and self.row_word != "line" else ""
        return f"{self.source}: {self.row_word} {row}{extra}"

    def text(self, value: Any, column: Any, what: str, where: str) -> str:
        if value is None:
            raise DataError(f"{where}: missing value for {what} (column {column!r})")
        s = _scalar(value)
        if s is None:
            raise DataError(
                f"{where}: {what} (column {column!r}) should be text, got {type(value).__name__}"
            )
        if not s:
            raise DataError(f"{where}: empty value for {what} (column {column!r})")
        return s

    def label(self, value: Any, column: Any, where: str) -> str:
        raw = self.text(value, column, "the label", where)
        if self.label_map is None:
            return raw
        try:
            return self.label_map[raw]
        except KeyError:
            raise DataError(
                f"{where}: unknown raw label {raw!r} in column {column!r}; "
                f"label_map knows {sorted(self.label_map)}"
            ) from None

    def target(self, value: Any, column: Any, where: str) -> tuple[str, ...]:
        if value is None:
            raise DataError(f"{where}: missing value for the target (column {column!r})")
        answers = _answers(value)
        if not answers:
            raise DataError(f"{where}: empty target (column {column!r})")
        return answers

    def build(
        self,
        get: Callable[[Any], Any],
        fields: Mapping[str, Any],
        label_column: Any,
        target_column: Any,
        where: str,
    ) -> Example:
        values = {
            name: self.text(get(col), col, f"field {name!r}", where) for name, col in fields.items()
        }
        label = self.label(get(label_column), label_column, where) if label_column is not None else None
        if target_column is not None:
            answers = self.target(get(target_column), target_column, where)
            return Example(values, label=label, target=answers[0], answers=answers)
        return Example(values, label=label)


def load_examples(
    path: str | os.PathLike[str],
    *,
    fields: Mapping[str, str | int],
    label_column: str | int | None = None,
    target_column: str | int | None = None,
    label_map: Mapping[Any, str] | None = None,
    format: str | None = None,
    encoding: str = "utf-8",
    delimiter: str | None = None,
    has_header: bool = True,
    limit: int | None = None,
) -> list[Example]:
    """Read labelled examples from a CSV, TSV or JSON-lines file.

    ``fields`` maps *our* field name (as used in the template) to the file's column: a
    header name or a 0-based column index for CSV/TSV (indices are the only choice with
    ``has_header=False``), or a top-level key for JSON lines.  ``label_column`` /
    ``target_column`` name the label and the generation target the same way; a JSON target
    may be a list of answers (all kept in ``answers``, the first is ``target``).
    ``label_map`` maps raw label values, compared as strings (``"1"``), to label names;
    without it the raw value is the label (JSON booleans become ``"true"``/``"false"``).

    The format is taken from the suffix unless given (``.csv``, ``.tsv``, ``.jsonl``/
    ``.json``/``.ndjson`` = JSON lines).  TSV is read without quote processing, as the
    GLUE-style files it is used for contain bare ``"`` characters.  Cell values are stripped
    of surrounding whitespace; blank lines are skipped.  ``limit`` stops after that many
    examples (the first ones, deterministically).

    Every problem raises :class:`DataError` naming the file and the row: missing file
    (:class:`DataFileNotFoundError`), empty file, undecodable bytes (with line, byte and an
    ``encoding=`` suggestion), unknown column (listing those that exist), empty value,
    malformed JSON line, unknown raw label under ``label_map``.
    """
    p = Path(path)
    fmt = _detect_format(p, format)
    text = _read_text(p, encoding)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if fmt == "jsonl":
        return _load_jsonl(p, text, fields, label_column, target_column, label_map, limit)
    return _load_delimited(
        p, text, fmt, fields, label_column, target_column, label_map, delimiter, has_header, limit
    )


def _load_jsonl(path, text, fields, label_column, target_column, label_map, limit) -> list[Example]:
    rows = _RowBuilder(str(path), label_map, "line")
    out: list[Example] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if limit is not None and len(out) >= limit:
            break
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            hint = ""
            if lineno == 1 and line.lstrip().startswith("["):
                hint = " (this looks like one JSON array; JSON lines needs one object per line)"
            raise DataError(f"{path}: line {lineno}: malformed JSON: {e.msg} at column {e.colno}{hint}") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}: line {lineno}: expected a JSON object, got {type(obj).__name__}")
        where = rows.where(lineno)
        for col in [*fields.values(), label_column, target_column]:
            if col is not None and col not in obj:
                raise DataError(f"{where}: key {col!r} not found; the object has keys {sorted(obj)}")
        out.append(rows.build(obj.get, fields, label_column, target_column, where))
    return out


def _load_delimited(
    path, text, fmt, fields, label_column, target_column, label_map, delimiter, has_header, limit
) -> list[Example]:
    if delimiter is None:
        delimiter = "\t" if fmt == "tsv" else ","
    quoting = csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL
    # Long passages (BoolQ, SQuAD contexts) can exceed csv's 128 KiB default cell limit.
    csv.field_size_limit(max(csv.field_size_limit(), 64 * 1024 * 1024))
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    rows = _RowBuilder(str(path), label_map, "row")

    wanted = [*fields.values(), label_column, target_column]
    header: list[str] | None = None
    if has_header:
        header = next((r for r in reader if any(c.strip() for c in r)), None)
        if header is None:
            raise DataError(f"{path}: file is empty")
        header = [h.strip() for h in header]
    index: dict[Any, int] = {}
    for col in wanted:
        if col is None or col in index:
            continue
        if isinstance(col, int) and not isinstance(col, bool):
            index[col] = col
        elif header is None:
            raise DataError(
                f"{path}: column {col!r} is a name, but has_header=False; "
                f"use 0-based column indices for headerless files"
            )
        elif col in header:
            index[col] = header.index(col)
        else:
            raise DataError(f"{path}: column {col!r} not found; the columns are {header}")

    out: list[Example] = []
    n = 0
    for cells in reader:
        if limit is not None and len(out) >= limit:
            break
        if not any(c.strip() for c in cells):
            continue
        n += 1
        where = rows.where(n, reader.line_num)

        def get(col, cells=cells, where=where):
            if col is None:
                return None
            i = index[col]
            if i >= len(cells):
                raise DataError(
                    f"{where}: has {len(cells)} column(s), so column {col!r} (index {i}) is missing"
                    + ("" if fmt != "tsv" else "; is the file really tab-separated?")
                )
            return cells[i]

        out.append(rows.build(get, fields, label_column, target_column, where))
    if not out and limit != 0:
        raise DataError(f"{path}: no data rows" + (" after the header" if has_header else ""))
    return out


def from_hf_dataset(
    ds: Any,
    *,
    fields: Mapping[str, str],
    label_column: str | None = None,
    target_column: str | None = None,
    label_names: Sequence[str] | Mapping[Any, str] | None = None,
) -> list[Example]:
    """Convert a ``datasets.Dataset`` into Examples.

    Integer labels of a ``ClassLabel`` column become their names automatically.
    ``label_names`` overrides that: a list maps integer label ``i`` to ``label_names[i]``, a
    dict maps raw values (compared as strings) to names.  A target column may hold a
    string, a list of strings, or SQuAD-style ``{"text": [...]}``.  ``datasets`` is only
    imported here, as it is an optional dependency.
    """
    try:
        from datasets import ClassLabel, Dataset, DatasetDict
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("from_hf_dataset needs the 'datasets' package: pip install softprompt[hf]") from e
    if isinstance(ds, DatasetDict):
        raise TypeError(f"pass one split, e.g. ds['train'], not a DatasetDict with splits {list(ds)}")
    if not isinstance(ds, Dataset):
        raise TypeError(f"expected a datasets.Dataset, got {type(ds).__name__}")

    source = f"<datasets.Dataset {getattr(ds.info, 'dataset_name', None) or ''}>".replace(" >", ">")
    columns = list(ds.column_names)
    for col in [*fields.values(), label_column, target_column]:
        if col is not None and col not in columns:
            raise DataError(f"{source}: column {col!r} not found; the columns are {columns}")

    label_map: dict[str, str] | None = None
    if label_names is not None:
        if isinstance(label_names, Mapping):
            label_map = {str(k): v for k, v in label_names.items()}
        else:
            label_map = {str(i): name for i, name in enumerate(label_names)}
    elif label_column is not None and isinstance(ds.features[label_column], ClassLabel):
        label_map = {str(i): name for i, name in enumerate(ds.features[label_column].names)}

    rows = _RowBuilder(source, label_map, "row")
    return [
        rows.build(record.get, fields, label_column, target_column, rows.where(i + 1))
        for i, record in enumerate(ds)
    ]


# --------------------------------------------------------------------------- data root


def data_root(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Find the shared data directory that the built-in tasks read.

    Order: ``data_dir``; the ``SOFTPROMPT_DATA`` environment variable; else a
    ``shared/data`` folder in the current working directory or one of its parents, then
    in this source file's folder or one of its parents (the checkout sits at ``X/main``
    with the data at ``X/shared/data``).  An explicit setting that does not exist is an
    error rather than falling through, so a typo is not silently replaced by other data.
    """
    if data_dir is not None:
        p = Path(data_dir).expanduser()
        if not p.is_dir():
            raise DataNotFoundError(f"data_dir={str(data_dir)!r} is not a directory ({p.resolve()})")
        return p
    env = os.environ.get(DATA_ENV_VAR)
    if env:
        p = Path(env).expanduser()
        if not p.is_dir():
            raise DataNotFoundError(f"{DATA_ENV_VAR}={env!r} is not a directory ({p.resolve()})")
        return p
    tried: list[Path] = []
    for start in (Path.cwd(), Path(__file__).resolve().parent):
        for d in (start, *start.parents):
            cand = d / "shared" / "data"
            if cand in tried:
                continue
            tried.append(cand)
            if cand.is_dir():
                return cand
    raise DataNotFoundError(
        "built-in task data not found. Looked for shared/data in:\n  "
        + "\n  ".join(str(t) for t in tried)
        + f"\nPoint at it with the {DATA_ENV_VAR} environment variable or data_dir=..."
    )


# --------------------------------------------------------------------------- built-in tasks


def _twitter_complaints(root: Path, *, limit: int | None = None) -> TaskData:
    """RAFT twitter_complaints: 50 train tweets; test = the 3,399 RAFT test tweets with labels
    rebuilt from Preotiuc-Pietro et al. (2019).  The Label column holds the names
    ("complaint"/"no complaint") directly, so no label map is needed."""
    task = Task(
        name="twitter_complaints",
        kind="classification",
        template="{soft:20} Tweet: {text}\nIs this tweet a complaint? Answer:",
        verbalizer={"complaint": " yes", "no complaint": " no"},
        instruction=(
            "Decide whether the tweet is a complaint about a company, product or service. "
            "Answer yes or no."
        ),
        description="RAFT twitter_complaints (complaint vs no complaint), 50-shot train.",
    )
    d = root / "raft_twitter_complaints"
    kw = dict(fields={"text": "Tweet text"}, label_column="Label", limit=limit)
    return TaskData(task, {
        "train": load_examples(d / "train.csv", **kw),
        "test": load_examples(d / "test_labeled_from_preotiuc2019.csv", **kw),
    })


def _sst2(root: Path, *, limit: int | None = None) -> TaskData:
    """GLUE SST-2 (ALPS split): train 60,614 + validation 6,735 (together the GLUE train
    set); test = GLUE dev, 872 sentences.  Files have a ``sentence<TAB>label`` header with
    labels 0/1."""
    task = Task(
        name="sst2",
        kind="classification",
        template="{soft:20} Review: {sentence}\nSentiment:",
        verbalizer={"negative": " negative", "positive": " positive"},
        instruction="Classify the sentiment of the movie review as positive or negative.",
        description="SST-2 binary sentiment of movie-review sentences.",
    )
    d = root / "sst2"
    kw = dict(fields={"sentence": "sentence"}, label_column="label",
              label_map={"0": "negative", "1": "positive"}, limit=limit)
    return TaskData(task, {
        "train": load_examples(d / "alps_train.tsv", **kw),
        "validation": load_examples(d / "alps_dev.tsv", **kw),
        "test": load_examples(d / "alps_test.tsv", **kw),
    })


def _agnews(root: Path, *, limit: int | None = None) -> TaskData:
    """AG News (ALPS files, headerless ``text<TAB>class-name``): train = 10,001 articles
    drawn from AG train; test = the 7,600-article AG test set (1,900 per class)."""
    task = Task(
        name="agnews",
        kind="classification",
        template="{soft:20} Article: {text}\nTopic:",
        verbalizer={"World": " World", "Sports": " Sports", "Business": " Business",
                    "Sci/Tech": " Technology"},
        instruction=(
            "Classify the news article by topic: World, Sports, Business, or Technology."
        ),
        description="AG News 4-way topic classification.",
    )
    d = root / "agnews"
    names = ["World", "Sports", "Business", "Sci/Tech"]
    kw = dict(fields={"text": 0}, label_column=1, has_header=False,
              label_map={n: n for n in names}, limit=limit)
    return TaskData(task, {
        "train": load_examples(d / "alps_dev.tsv", **kw),
        "test": load_examples(d / "alps_test.tsv", **kw),
    })


def _fewglue(root: Path, folder: str, fields: dict[str, str], limit: int | None) -> dict[str, list[Example]]:
    """FewGLUE 32-shot: train.jsonl (32) as train, dev32.jsonl (32) as validation, and the
    full SuperGLUE validation set (val.jsonl) as test (its test labels are hidden)."""
    d = root / "superglue_fewglue32dev" / folder
    kw = dict(fields=fields, label_column="label", limit=limit)
    return {
        "train": load_examples(d / "train.jsonl", **kw),
        "validation": load_examples(d / "dev32.jsonl", **kw),
        "test": load_examples(d / "val.jsonl", **kw),
    }


def _boolq(root: Path, *, limit: int | None = None) -> TaskData:
    """BoolQ (FewGLUE): JSON boolean labels, read as "true"/"false"; test = 3,270."""
    task = Task(
        name="boolq",
        kind="classification",
        template="{soft:20} Passage: {passage}\nQuestion: {question}?\nAnswer:",
        verbalizer={"false": " no", "true": " yes"},
        instruction="Read the passage and answer the yes/no question with yes or no.",
        description="SuperGLUE BoolQ yes/no questions about a passage; 32-shot train.",
    )
    return TaskData(task, _fewglue(root, "BoolQ", {"passage": "passage", "question": "question"}, limit))


def _rte(root: Path, *, limit: int | None = None) -> TaskData:
    """RTE (FewGLUE): labels entailment/not_entailment; test = 277."""
    task = Task(
        name="rte",
        kind="classification",
        template=(
            "{soft:20} Premise: {premise}\nHypothesis: {hypothesis}\n"
            "Does the premise entail the hypothesis? Answer:"
        ),
        verbalizer={"entailment": " yes", "not_entailment": " no"},
        instruction="Decide whether the premise entails the hypothesis. Answer yes or no.",
        description="SuperGLUE RTE textual entailment; 32-shot train.",
    )
    return TaskData(task, _fewglue(root, "RTE", {"premise": "premise", "hypothesis": "hypothesis"}, limit))


def _cb(root: Path, *, limit: int | None = None) -> TaskData:
    """CommitmentBank (FewGLUE): entailment/contradiction/neutral; test = 56."""
    task = Task(
        name="cb",
        kind="classification",
        template=(
            "{soft:20} Premise: {premise}\nHypothesis: {hypothesis}\n"
            "Is the hypothesis true given the premise? Yes, no, or maybe? Answer:"
        ),
        verbalizer={"entailment": " yes", "contradiction": " no", "neutral": " maybe"},
        instruction=(
            "Decide whether the hypothesis is true given the premise. "
            "Answer yes, no, or maybe."
        ),
        description="SuperGLUE CommitmentBank 3-way entailment; 32-shot train.",
    )
    return TaskData(task, _fewglue(root, "CB", {"premise": "premise", "hypothesis": "hypothesis"}, limit))


def _words(s: str) -> int:
    return len(s.split())


def _render_paragraph(title: Any, text: Any) -> str:
    return " ".join(f"{title or ''}: {text or ''}".split())


def _marked_sentences(p: Mapping[str, Any]) -> str | None:
    """The paragraph cut to its marked supporting sentences, or None without usable marks.

    Marks are ``sentences`` (the paragraph's sentences) plus ``supporting_sentences``
    (0-based indices into them, HotpotQA's ``supporting_facts``).  Out-of-range indices,
    a known quirk of a few HotpotQA entries, are ignored."""
    sentences = p.get("sentences")
    marks = p.get("supporting_sentences")
    if not sentences or not marks:
        return None
    keep = sorted({i for i in marks if isinstance(i, int) and 0 <= i < len(sentences)})
    if not keep:
        return None
    return _render_paragraph(p.get("title"), " ".join(str(sentences[i]).strip() for i in keep))


def hotpot_context(
    paragraphs: Sequence[Mapping[str, Any]],
    max_context_words: int = 150,
    *,
    tokenizer: Any = None,
    max_context_tokens: int | None = None,
) -> str:
    """Build one HotpotQA context string from its paragraphs, within a length budget.

    HotpotQA questions come with about ten paragraphs (1,400 tokens on average), more than
    a small model's prompt should carry, so the context is truncated by this rule:

    * **Budget.** ``max_context_words`` whitespace-separated words of the whole context
      (titles included); or, with ``tokenizer`` and ``max_context_tokens``, that many
      tokens of the context string encoded on its own (no special tokens).
    * **Format.** Each paragraph is written ``"Title: text"`` with whitespace collapsed;
      paragraphs are joined by newlines.  No paragraph is ever cut mid-sentence.
    * **Supporting paragraphs first, always kept.** Paragraphs marked ``is_supporting``
      come first, in file order, and are never dropped: without them the question cannot
      be answered, so when they alone exceed the budget the context exceeds it too.
    * **Supporting sentences, when marked.** If the supporting paragraphs alone exceed the
      budget, each one that carries sentence marks (``sentences`` and
      ``supporting_sentences`` indices) is reduced to its marked sentences, in order.
    * **Distractors fill the rest.** The other paragraphs are then taken in file order,
      each added whole only if the context stays within the budget; one that does not
      fit is skipped and a later, shorter one may still fit.
    * **No marks at all.** Only then may a paragraph be cut: if not even the first
      paragraph fits, its first words (or tokens) up to the budget are kept, so the
      context is never empty.

    Putting the supporting paragraphs first makes the task easier than HotpotQA's
    shuffled distractor setting; every method in a comparison sees the same contexts.
    """
    if max_context_tokens is not None:
        if tokenizer is None:
            raise ValueError("max_context_tokens needs a tokenizer to count tokens with")
        if max_context_tokens < 0:
            raise ValueError(f"max_context_tokens must be >= 0, got {max_context_tokens}")
        budget = max_context_tokens

        def length(s: str) -> int:
            return len(tokenizer(s, add_special_tokens=False).input_ids)

        def cut(s: str, n: int) -> str:
            return tokenizer.decode(tokenizer(s, add_special_tokens=False).input_ids[:n]).strip()
    else:
        if max_context_words < 0:
            raise ValueError(f"max_context_words must be >= 0, got {max_context_words}")
        budget, length = max_context_words, _words

        def cut(s: str, n: int) -> str:
            return " ".join(s.split()[:n])

    support = [p for p in paragraphs if p.get("is_supporting")]
    others = [p for p in paragraphs if not p.get("is_supporting")]
    chosen = [_render_paragraph(p.get("title"), p.get("paragraph_text")) for p in support]
    if chosen and length("\n".join(chosen)) > budget:
        chosen = [_marked_sentences(p) or full for p, full in zip(support, chosen)]
    for p in others:
        text = _render_paragraph(p.get("title"), p.get("paragraph_text"))
        if length("\n".join(chosen + [text])) <= budget:
            chosen.append(text)
    if not chosen and others:
        chosen = [cut(_render_paragraph(others[0].get("title"), others[0].get("paragraph_text")), budget)]
    return "\n".join(chosen)


def _hotpot_answers(objs: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
    out: list[str] = []
    for o in objs:
        cands = list(o.get("spans") or [])
        if not cands and o.get("number"):
            cands = [str(o["number"])]
        if not cands and any((o.get("date") or {}).values()):
            dt = o["date"]
            cands = [" ".join(str(dt[k]) for k in ("day", "month", "year") if dt.get(k))]
        for c in cands:
            c = " ".join(str(c).split())
            if c and c not in out:
                out.append(c)
    return tuple(out)


def _quotas(n_train: int, n_test: int, limit: int | None) -> dict[str, int]:
    if limit is None:
        return {"train": n_train, "test": n_test}
    return {"train": min(limit, n_train), "test": min(limit, n_test)}


def _split_of(k: int, n_train: int, n_test: int) -> str | None:
    """Positional split: the first ``n_train`` items train, the next ``n_test`` test."""
    if k < n_train:
        return "train"
    return "test" if k < n_train + n_test else None


def _full(splits: dict[str, list[Example]], quota: dict[str, int]) -> bool:
    return all(len(splits[s]) >= q for s, q in quota.items())


HOTPOT_TRAIN = 100
HOTPOT_TEST = 400
HOTPOT_FILE = Path("hotpotqa_ircot_dev500") / "dev_subsampled.jsonl"
HOTPOT_MARKS_FILE = Path("hotpotqa_distractor_dev100") / "hotpot_dev_distractor_v1_100.json"


def _hotpot_sentence_marks(root: Path) -> dict[str, dict[str, tuple[list[str], list[int]]]]:
    """Question id -> supporting title -> (its sentences, supporting sentence indices), from
    the official distractor-format file (the first 103 dev questions, all of which are in
    the 500-question file).  Empty when that file is absent: marks are optional."""
    path = root / HOTPOT_MARKS_FILE
    if not path.exists():
        return {}
    try:
        data = json.loads(_read_text(path, "utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno}: {e.msg}") from None
    marks: dict[str, dict[str, tuple[list[str], list[int]]]] = {}
    for i, entry in enumerate(data):
        try:
            sentences = {str(title): list(sents) for title, sents in entry["context"]}
            ids: dict[str, list[int]] = {}
            for title, idx in entry["supporting_facts"]:
                ids.setdefault(str(title), []).append(int(idx))
            marks[str(entry["_id"])] = {t: (sentences[t], v) for t, v in ids.items() if t in sentences}
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{path}: entry {i}: unexpected structure ({e!r})") from None
    return marks


def _iter_hotpotqa(root: Path, **context_kw: Any):
    """Examples of the 500-question file in file order, contexts per :func:`hotpot_context`
    (supporting paragraphs carry sentence marks where the official file has them)."""
    path = root / HOTPOT_FILE
    text = _read_text(path, "utf-8")
    marks = _hotpot_sentence_marks(root)
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}: line {lineno}"
        try:
            obj = json.loads(line)
            question = " ".join(obj["question_text"].split())
            answers = _hotpot_answers(obj["answers_objects"])
            qmarks = marks.get(str(obj.get("question_id")), {})
            paragraphs = []
            for p in obj["contexts"]:
                m = qmarks.get(str(p["title"])) if p.get("is_supporting") else None
                paragraphs.append({**p, "sentences": m[0], "supporting_sentences": m[1]} if m else p)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: malformed JSON: {e.msg}") from None
        except (KeyError, TypeError, AttributeError) as e:
            raise DataError(f"{where}: unexpected structure ({e!r})") from None
        if not question or not answers:
            raise DataError(f"{where}: empty question or no gold answer")
        context = hotpot_context(paragraphs, **context_kw)
        yield Example({"context": context, "question": question}, target=answers[0], answers=answers)


def hotpotqa_examples(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    limit: int | None = None,
    max_context_words: int = 150,
    tokenizer: Any = None,
    max_context_tokens: int | None = None,
) -> list[Example]:
    """All 500 HotpotQA questions (or the first ``limit``), in file order, unsplit, with
    contexts built by :func:`hotpot_context` under a word budget or, with ``tokenizer``
    and ``max_context_tokens``, a token budget.  For benchmarks that split the questions
    their own way; the built-in ``hotpotqa`` task splits them by position."""
    root = data_root(data_dir)
    out: list[Example] = []
    for ex in _iter_hotpotqa(root, max_context_words=max_context_words, tokenizer=tokenizer,
                             max_context_tokens=max_context_tokens):
        if limit is not None and len(out) >= limit:
            break
        out.append(ex)
    return out


def _hotpotqa(root: Path, *, limit: int | None = None, max_context_words: int = 150) -> TaskData:
    """HotpotQA distractor dev, 500-question IRCoT subsample.  Splits by file order: the
    first 100 questions are "train", the next 400 "test".  The context follows
    :func:`hotpot_context` (supporting paragraphs first, reduced to their marked sentences
    when they alone exceed the budget and marks exist, then distractors while under
    ``max_context_words``).  ``target`` is the first gold answer, ``answers`` all of them."""
    task = Task(
        name="hotpotqa",
        kind="generation",
        template="{soft:20} Context:\n{context}\nQuestion: {question}\nAnswer:",
        instruction=(
            "Answer the question using the context. Reply with only a short answer: "
            "a name, a date, a number, or a few words."
        ),
        description="HotpotQA multi-hop QA with gold paragraphs in the context (EM/F1).",
    )
    quota = _quotas(HOTPOT_TRAIN, HOTPOT_TEST, limit)
    splits: dict[str, list[Example]] = {"train": [], "test": []}
    for k, ex in enumerate(_iter_hotpotqa(root, max_context_words=max_context_words)):
        split = _split_of(k, HOTPOT_TRAIN, HOTPOT_TEST)
        if split is None or _full(splits, quota):
            break
        if len(splits[split]) < quota[split]:
            splits[split].append(ex)
    return TaskData(task, splits)


SQUAD_TRAIN = 500
SQUAD_TEST = 1000


def _squad(root: Path, *, limit: int | None = None) -> TaskData:
    """SQuAD v1.1 dev (rebuilt).  Questions are taken in file order (article, paragraph,
    question); the first 500 are "train" and the next 1,000 "test" (both from the dev set,
    so they share articles at the boundary).  ``answers`` = every gold answer text (dupes
    dropped, order kept); ``target`` = the first."""
    task = Task(
        name="squad",
        kind="generation",
        template="{soft:20} Context: {context}\nQuestion: {question}\nAnswer:",
        instruction="Answer the question with a short span copied from the context.",
        description="SQuAD v1.1 extractive QA (EM/F1).",
    )
    path = root / "squad_v1.1_dev" / "dev-v1.1.rebuilt.json"
    try:
        data = json.loads(_read_text(path, "utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno}: {e.msg}") from None
    quota = _quotas(SQUAD_TRAIN, SQUAD_TEST, limit)
    splits: dict[str, list[Example]] = {"train": [], "test": []}
    qas = (
        (para["context"].strip(), qa)
        for article in data["data"]
        for para in article["paragraphs"]
        for qa in para["qas"]
    )
    for k, (context, qa) in enumerate(qas):
        split = _split_of(k, SQUAD_TRAIN, SQUAD_TEST)
        if split is None or _full(splits, quota):
            break
        if len(splits[split]) >= quota[split]:
            continue
        answers = _answers([a.get("text") for a in qa.get("answers", [])])
        if not answers:
            raise DataError(f"{path}: question id {qa.get('id')!r} has no answers")
        splits[split].append(
            Example({"context": context, "question": qa["question"].strip()},
                    target=answers[0], answers=answers)
        )
    return TaskData(task, splits)


DEMO_FILE = "demo_support.csv"


def _demo(root: Path | None = None, *, limit: int | None = None) -> TaskData:
    """The hand-written demo set (see the module docstring); ``root`` is ignored.
    Row ``i`` (0-based, file order) is "test" when ``i % 3 == 0``, else "train":
    300 rows give 200 train / 100 test."""
    from importlib.resources import as_file, files

    task = Task(
        name="demo",
        kind="classification",
        template="{soft:8} Customer message: {text}\nIs this a complaint or praise? Answer:",
        verbalizer={"complaint": " complaint", "praise": " praise"},
        instruction="Decide whether the customer's message is a complaint or praise.",
        description="Hand-written DEMO set of shop customer messages (quickstart only, not a benchmark).",
    )
    with as_file(files("softprompt").joinpath("data").joinpath(DEMO_FILE)) as path:
        rows = load_examples(path, fields={"text": "text"}, label_column="label", format="csv")
    splits: dict[str, list[Example]] = {"train": [], "test": []}
    for i, ex in enumerate(rows):
        splits["test" if i % 3 == 0 else "train"].append(ex)
    if limit is not None:
        splits = {k: v[:limit] for k, v in splits.items()}
    return TaskData(task, splits)


BUILTIN_TASKS: dict[str, Callable[..., TaskData]] = {
    "demo": _demo,
    "twitter_complaints": _twitter_complaints,
    "sst2": _sst2,
    "agnews": _agnews,
    "boolq": _boolq,
    "rte": _rte,
    "cb": _cb,
    "hotpotqa": _hotpotqa,
    "squad": _squad,
}
"""Name -> loader.  Each loader takes the data root (a Path) and an optional keyword
``limit`` (first N per split), and reads only its own files."""

_NEEDS_NO_DATA = {"demo"}


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
    try:
        loader = BUILTIN_TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks are {list_tasks()}") from None
    if limit_per_split is not None and limit_per_split < 0:
        raise ValueError(f"limit_per_split must be >= 0, got {limit_per_split}")
    root = None if name in _NEEDS_NO_DATA else data_root(data_dir)
    td = loader(root, limit=limit_per_split)
    if limit_per_split is not None:
        td.splits = {k: v[:limit_per_split] for k, v in td.splits.items()}
    for split, examples in td.splits.items():
        td.task.check(examples, source=f"task {name!r} split {split!r}")
    return td
