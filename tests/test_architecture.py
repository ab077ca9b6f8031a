"""The package's shape, checked: no import cycle, imports only go down the layers, no module too
long to hold in one's head, and one module that knows about model families (README: Architecture)."""
import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src" / "softprompt"
LAYERS = ["data", "core", "families", "hard", "training", "apps", "serve", "cli"]
"""Bottom to top: a module may import its own layer and the ones before it, never a later one."""
TOP_LEVEL = {"__init__", "__main__", "testing"}  # the public facade, the entry point, tiny test models
MAX_LINES = 500


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in SRC.rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """softprompt modules ``name`` imports, at any depth of its code (lazy imports count: a cycle
    hidden in a function body is still a cycle), except under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()

    def visit(node):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("softprompt"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("softprompt"):
                out.add(mod)  # `from pkg import sub` runs pkg/__init__.py too: an edge to pkg
                out.update(f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in known)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    resolved = set()
    for mod in out:
        while mod not in known and "." in mod:
            mod = mod.rpartition(".")[0]
        if mod in known and mod != name:
            resolved.add(mod)
    return resolved


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {n: _imports(n, p, known) for n, p in mods.items()}


def _layer(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) == 1:
        return None  # the package itself
    head = parts[1]
    if head in TOP_LEVEL:
        return None
    return LAYERS.index(head) if head in LAYERS else -1


def test_every_module_sits_in_a_layer():
    stray = [n for n in _modules() if _layer(n) == -1]
    assert not stray, f"modules outside the layers {LAYERS}: {stray}"


def test_imports_only_go_down():
    bad = []
    for name, deps in _graph().items():
        mine = _layer(name)
        if mine is None:
            continue
        for dep in deps:
            theirs = _layer(dep)
            if theirs is not None and theirs > mine:
                bad.append(f"{name} -> {dep}")
    assert not bad, "imports of a higher layer:\n" + "\n".join(sorted(bad))


def test_no_import_cycle():
    graph = _graph()  # a package's __init__ importing its children counts: a child importing the package is a cycle
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def dfs(n):
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                dfs(d)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            dfs(n)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_module_over_the_line_limit():
    long = {n: len(p.read_text().splitlines()) for n, p in _modules().items()}
    long = {n: k for n, k in long.items() if k > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


FAMILY_CHECKS = re.compile(r"is_encoder_decoder|is_encoder_model|is_encoder_config|\.is_decoder\b")


def test_family_check_lives_in_one_module():
    hits = sorted({_module_name(p) for p in SRC.rglob("*.py") if FAMILY_CHECKS.search(p.read_text())})
    assert hits == ["softprompt.families"], f"model-family checks outside softprompt/families/__init__.py: {hits}"


KIND_LITERAL = re.compile(r"""(?<!require\()["'](classification|generation)["']""")  # require(...): a capability
KIND_LITERAL_ALLOWED = {
    "softprompt.data.task",  # the home: TaskKind's values
    "softprompt.families.base",  # "generation" there is a capability name, not a task kind
    # edited concurrently when TaskKind came (issue 25): still to move to TaskKind
    "softprompt.apps.compare.decision", "softprompt.apps.compare.runner", "softprompt.cli.compare",
    "softprompt.hard.baselines",
}


def test_task_kind_is_spelled_in_one_place():
    """Task kinds are :class:`~softprompt.data.task.TaskKind` members, not string literals."""
    hits = sorted({_module_name(p) for p in SRC.rglob("*.py") if KIND_LITERAL.search(p.read_text())})
    assert not set(hits) - KIND_LITERAL_ALLOWED, f"task-kind string literals (use TaskKind): {sorted(set(hits) - KIND_LITERAL_ALLOWED)}"


FILE_WRITES = re.compile(r"""\.write_text\(|\.write_bytes\(|\bjson\.dump\(|\btorch\.save\(|\.savefig\(|\bshutil\.copy\w*\("""
                         r"""|\bopen\([^)]*["'][wax]b?\+?["']|\.open\(\s*["'][wax]|\bopen\([^)]*mode\s*=\s*["'][wax]""")
FILE_WRITES_ALLOWED = {
    "softprompt.core.atomic": "the one atomic writer itself",
    "softprompt.serve.backends.vllm_transport": "torch.save into an in-memory buffer (a request body), not a file",
}


def test_every_file_is_written_through_the_atomic_writer():
    """A crash must never leave half a file under its real name (core/atomic.py says why): no
    module writes a file itself.  A write on a line that calls ``atomic.`` fills its temp file."""
    hits = [f"{_module_name(p)}:{i}: {line.strip()}" for p in sorted(SRC.rglob("*.py"))
            if _module_name(p) not in FILE_WRITES_ALLOWED
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if FILE_WRITES.search(line) and "atomic." not in line]
    assert not hits, "files written outside core/atomic.py (use atomic.write_text / write_json / write_atomic):\n" + \
        "\n".join(hits)


@pytest.mark.parametrize("question,module", [("where does a soft token enter the model", "softprompt/core/conditioning.py"),
                                             ("where is a new method added", "softprompt/apps/compare/planners.py")])
def test_readme_answers_a_newcomer(question, module):
    readme = (SRC.parents[1] / "README.md").read_text()
    assert module in readme and (SRC.parent / module).exists(), f"README should point to {module} for {question!r}"


def test_ruff_finds_nothing():
    """``ruff check`` (pyproject's [tool.ruff]: unused imports, undefined names, ...) is clean; ruff
    comes with the test extra, so ``make test`` runs this."""
    ruff = Path(sys.executable).with_name("ruff")
    ruff = str(ruff) if ruff.exists() else shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]' installs it)")
    root = SRC.parents[1]
    r = subprocess.run([ruff, "check", "--no-cache", "src", "tests", "benchmarks"], cwd=root, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


DECODING_HOME = "softprompt.core.decoding"


def _root_name(node: ast.AST) -> str | None:
    """The variable an expression starts from: ``out`` in ``out.logits[:, -1]``."""
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def _feedback_argmaxes(tree: ast.AST) -> list[int]:
    """Lines of an ``argmax`` (``x.argmax(...)`` or ``torch.argmax(x, ...)``) inside a loop that
    also assigns ``x``: the picked token's logits come back around the loop, i.e. a greedy
    decoder.  An argmax over scores computed before the loop (predictions, votes) is not one."""
    hits = []
    for loop in ast.walk(tree):
        if not isinstance(loop, (ast.For, ast.AsyncFor, ast.While)):
            continue
        iterated = {id(n) for t in ast.walk(loop) if isinstance(t, (ast.For, ast.AsyncFor, ast.comprehension))
                    for n in ast.walk(t.target)}  # a loop variable walks precomputed values: not fed back
        assigned = {n.id for n in ast.walk(loop)
                    if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store) and id(n) not in iterated}
        for call in ast.walk(loop):
            if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "argmax"):
                continue
            subject = call.args[0] if _root_name(call.func.value) == "torch" and call.args else call.func.value
            if _root_name(subject) in assigned:
                hits.append(call.lineno)
    return hits


def test_one_greedy_decoding_loop():
    """Library, evaluation and the server decode through ``core/decoding.py``'s ``greedy_loop``
    (issue 25): a second loop that feeds its argmax back into the model, or a row rule
    (``take_token``) applied anywhere else, is a decoder drifting apart from the others.
    Checked on the syntax tree: a loop that assigns the name whose ``argmax`` it takes."""
    mods = _modules()
    assert _feedback_argmaxes(ast.parse(mods[DECODING_HOME].read_text())), "the check no longer sees the one loop"
    loops, rules = [], []
    for name, path in sorted(mods.items()):
        if name == DECODING_HOME:
            continue
        tree = ast.parse(path.read_text())
        loops += [f"{name}:{line}" for line in _feedback_argmaxes(tree)]
        rules += [f"{name}:{n.lineno}" for n in ast.walk(tree) if isinstance(n, ast.Call)
                  and (getattr(n.func, "id", None) or getattr(n.func, "attr", None)) == "take_token"]
    assert not loops, "greedy decoding loops outside core/decoding.py (give greedy_loop a step hook instead):\n" + "\n".join(loops)
    assert not rules, "take_token applied outside core/decoding.py:\n" + "\n".join(rules)


def test_the_loop_check_catches_a_decoder():
    seq2seq_style = "for _ in range(n):\n    nxt = out.logits[:, -1].argmax(-1)\n    out = model(nxt)\n"
    decoder_style = "while True:\n    t = torch.argmax(logits, -1)\n    logits, cache = step(t, cache)\n"
    scores = "for m in methods:\n    pred = [labels[j] for j in scores[m].argmax(-1).tolist()]\n"
    votes = "for name, s in zip(names, member_scores):\n    preds.append(labels[int(s.argmax())])\n"
    assert _feedback_argmaxes(ast.parse(seq2seq_style)) == [2]
    assert _feedback_argmaxes(ast.parse(decoder_style)) == [2]
    assert _feedback_argmaxes(ast.parse(scores)) == _feedback_argmaxes(ast.parse(votes)) == []
