"""The user-facing docs name code that exists: every ``from softprompt... import ...`` /
``import softprompt...`` line and every dotted ``softprompt.x.y`` name in README.md and docs/
resolves.  Modules move (issue 25 found ``softprompt.inspection`` and ``softprompt.restarts``
left behind in the docs); this keeps the docs from rotting silently again."""
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

FROM_IMPORT = re.compile(r"^\s*from\s+(softprompt[\w.]*)\s+import\s+\(?([\w\s,]+?)\)?\s*(?:#.*)?$", re.M)
IMPORT = re.compile(r"^\s*import\s+(softprompt[\w.]*)", re.M)
DOTTED = re.compile(r"\bsoftprompt(?:\.\w+)+")


def _import_lines() -> list[tuple[str, str, list[str]]]:
    """(doc, module, names) for each import line; names is empty for a plain ``import``."""
    out = []
    for doc in DOCS:
        text = doc.read_text()
        for m in FROM_IMPORT.finditer(text):
            names = [n.strip().split(" as ")[0] for n in m.group(2).split(",") if n.strip()]
            out.append((doc.name, m.group(1), names))
        out.extend((doc.name, m.group(1), []) for m in IMPORT.finditer(text))
    return out


def _dotted_names() -> list[tuple[str, str]]:
    return sorted({(doc.name, m.group(0)) for doc in DOCS for m in DOTTED.finditer(doc.read_text())})


def _resolve(dotted: str):
    """The object ``dotted`` names: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError as e:
            if e.name is None or not ".".join(parts[:cut]).startswith(e.name):
                raise  # a real dependency is missing, not the documented module
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)  # AttributeError: the docs name something that is gone
        return obj
    raise ModuleNotFoundError(dotted)


def test_the_docs_have_imports_to_check():
    """The extraction finds the quickstart's imports (otherwise the checks below check nothing)."""
    modules = {module for _, module, _ in _import_lines()}
    assert "softprompt" in modules and "softprompt.apps.inspection" in modules
    assert len(_dotted_names()) >= 3


@pytest.mark.parametrize("doc,module,names", _import_lines(), ids=lambda v: v if isinstance(v, str) else None)
def test_doc_import_line_imports(doc, module, names):
    mod = importlib.import_module(module)
    missing = [n for n in names if not hasattr(mod, n)]
    assert not missing, f"{doc}: `from {module} import ...` names what {module} does not have: {missing}"


@pytest.mark.parametrize("doc,dotted", _dotted_names())
def test_doc_dotted_name_exists(doc, dotted):
    try:
        _resolve(dotted)
    except (ImportError, AttributeError) as e:
        pytest.fail(f"{doc} names `{dotted}`, which does not exist: {e}")
