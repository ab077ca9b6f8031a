"""Resumable benchmark results: one JSON line per finished run, so a killed benchmark resumes where it
stopped (the scripts here skip the runs already in their ``--out`` file)."""
from __future__ import annotations

import json
from pathlib import Path


def load_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def append_row(path: Path, row: dict) -> None:
    """Print the finished run and add it to ``path``."""
    print(json.dumps(row), flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
