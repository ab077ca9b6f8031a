"""Reading labelled examples from user files (CSV, TSV, JSON lines) and ``datasets``, and finding the shared data.

Data loading is strict on purpose.  A soft prompt trained on silently mangled rows (a
shifted column, an unmapped label, mojibake) still "trains" and just reports a worse
number, so every problem is raised as a :class:`DataError` naming the file, the row and
the fix, instead of being skipped.
"""
from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .task import DataError, DataFileNotFoundError, DataNotFoundError, Example

__all__ = ["DATA_ENV_VAR", "load_examples", "from_hf_dataset", "data_root", "read_text", "answers_of"]

DATA_ENV_VAR = "SOFTPROMPT_DATA"

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


def read_text(path: Path, encoding: str) -> str:
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


def answers_of(value: Any) -> tuple[str, ...] | None:
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
        answers = answers_of(value)
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
    text = read_text(p, encoding)
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
