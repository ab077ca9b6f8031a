"""What every command shares: the one typer ``app``, the consoles, ``_fail``, and the helpers that
turn options into task data, a loaded model, a bank, scores and result tables."""
from __future__ import annotations

import os
import shlex
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from ..data.task import TaskKind

app = typer.Typer(
    help="Train, evaluate and serve soft prompts for frozen language models.",
    no_args_is_help=True,
    # plain click help, wrapped to the terminal (up to 160 columns): rich's option panels cut long
    # words such as "zero_shot,few_shot,cot,..." with an ellipsis on an 80-column terminal
    rich_markup_mode=None,
    context_settings={"max_content_width": 160},
    add_completion=False,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="List and prepare base models (the embedded default needs no hub).", no_args_is_help=True)
app.add_typer(models_app, name="models")
console = Console()
err = Console(stderr=True)

MODEL_HELP = "Base model: an embedded alias (see `softprompt models list`), a local folder, or a hub id."


def _fail(msg: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {msg}")
    raise typer.Exit(code)


def _parse_pairs(items: list[str] | None, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            _fail(f"{what} {item!r} must look like NAME=VALUE")
        k, v = item.split("=", 1)
        out[k.strip()] = v
    return out


def _verbalizer(pairs: list[str] | None, template: str) -> dict[str, str]:
    """--verbalizer LABEL=WORD pairs, each WORD spaced as it continues the template
    (``templates.continue_with``)."""
    from ..core.templates import continue_with

    return {k: continue_with(template, v) for k, v in _parse_pairs(pairs, "--verbalizer").items()}


def _load_task_data(
    task: Optional[str], train_file: Optional[Path], test_file: Optional[Path], valid_file: Optional[Path],
    field: list[str] | None, label_column: Optional[str], target_column: Optional[str],
    template: Optional[str], verbalizer: list[str] | None, instruction: Optional[str], limit: Optional[int],
    encoding: str = "utf-8", name: Optional[str] = None,
):
    """A TaskData from a built-in name or from user files (with template and verbalizer).  User
    files are named ``name``, else after the files (``sms_train.csv`` + ``sms_test.csv`` -> ``sms``)."""
    from ..data import DataError, DataNotFoundError, Task, TaskData, load_examples, load_task

    try:
        if task:
            data = load_task(task, limit_per_split=limit)
            if template:
                data.task.template = template
            if verbalizer:
                data.task.verbalizer = _verbalizer(verbalizer, data.task.template)
            if instruction:
                data.task.instruction = instruction
            return data
        if not train_file and not test_file:
            _fail("give a built-in --task (see `softprompt tasks`) or your own --train-file/--test-file")
        fields = _parse_pairs(field, "--field") or {"text": "text"}
        template = template or default_template(list(fields))
        verb = _verbalizer(verbalizer, template)
        kind = TaskKind.GENERATION if target_column else TaskKind.CLASSIFICATION
        if kind == TaskKind.CLASSIFICATION and not verb:
            _fail("classification needs --verbalizer LABEL=WORD for every label (e.g. --verbalizer positive=great)")
        t = Task(name=name or _files_name(train_file, test_file, valid_file), kind=kind, template=template,
                 verbalizer=verb or None, instruction=instruction or "")
        splits = {}
        for name, path in (("train", train_file), ("validation", valid_file), ("test", test_file)):
            if path:
                exs = load_examples(path, fields=fields, label_column=label_column or ("label" if kind == TaskKind.CLASSIFICATION else None),
                                    target_column=target_column, limit=limit, encoding=encoding)
                t.check(exs, source=str(path))
                splits[name] = exs
        return TaskData(task=t, splits=splits)
    except (DataError, DataNotFoundError, FileNotFoundError, ValueError, KeyError) as e:
        _fail(str(e))


def _files_name(*paths: Optional[Path]) -> str:
    """A task name for user files: their stems' common part without train/test/valid words
    (``sms_train``, ``sms_test`` -> ``sms``), else the first stem."""
    import re

    files = [p for p in paths if p]
    cleaned = [re.sub(r"(?i)[-_. ]?(train(ing)?|test(ing)?|valid(ation)?|dev|eval)$", "", p.stem) for p in files]
    if not all(cleaned):  # train.csv, test.csv: the folder says what they are
        return files[0].resolve().parent.name or files[0].stem
    prefix = os.path.commonprefix(cleaned).rstrip("-_. ")
    return prefix if len(prefix) >= 2 else cleaned[0]


def default_template(fields: list[str]) -> str:
    """The template for user files given without --template: 20 soft tokens, each field on its
    own line under its name, then an answer cue (e.g. ``{soft:20}Text: {text}\nAnswer:``)."""
    lines = "".join(f"{f.replace('_', ' ').capitalize()}: {{{f}}}\n" for f in fields)
    return "{soft:20}" + lines + "Answer:"


def default_instruction(task) -> str:
    """An instruction built from the label words, for user files given without --instruction."""
    words = [w.strip() for w in (task.verbalizer or {}).values()]
    if len(words) < 2:
        return ""
    listed = ", ".join(words[:-1]) + f" or {words[-1]}"
    field = task.input_fields[0] if len(task.input_fields) == 1 else "input"
    return f"Classify the {field}. Answer {listed}."


def _set_threads(threads: Optional[int]) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _device(device: str | None = None) -> str:
    """``device``, else ``SOFTPROMPT_DEVICE``, else cuda when available, else cpu."""
    import torch

    return device or os.environ.get("SOFTPROMPT_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def _load_model(model: str, device: str | None = None):
    from ..families.loading import ModelNotAvailableError, load_model

    try:
        with console.status(f"loading {model} ..."):
            return load_model(model, device=_device(device))
    except (ModelNotAvailableError, OSError, ValueError) as e:
        _fail(str(e))


def _bank(model, tok):
    """The model family's bank: a PromptBank, or for an encoder-only model (BERT family) an
    EncoderBank (soft prompt + head)."""
    from ..families import family_for

    return family_for(model).make_bank(model, tok)


def _results_table(rows: list[dict], title: str) -> Table:
    table = Table(title=title)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    for c in cols:
        table.add_column(c, justify="left" if c in ("method", "prompt") else "right")
    for r in rows:
        table.add_row(*[f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols])
    return table


def _split(data, name: str):
    if name not in data.splits:
        _fail(f"task {data.task.name!r} has no {name!r} split; it has {list(data.splits)}")
    return data.splits[name]


CALIBRATION_HELP = ("Calibration of the label scores: saved (the artifact's own, default), none, contextual "
                    "(content-free inputs), batch (fit on the inputs being scored, labels unused) or pmi "
                    "(domain-conditional PMI: the template without its input).")
EVAL_CALIBRATION_HELP = CALIBRATION_HELP + " Several, comma-separated, give a row each (e.g. none,contextual,batch,pmi)."


def _calibration(bank, entry, choice: str, saved, inputs, batch_size: int = 32):
    """The Calibration to apply: the artifact's ``saved`` one, or ``choice`` fitted here
    (batch on ``inputs``, whose labels are never read)."""
    from ..core.calibration import CALIBRATIONS, Calibration
    from ..core.calibrate import fit_calibration

    if choice == "saved":
        return saved if saved is not None else Calibration()
    if choice not in CALIBRATIONS:
        _fail(f"--calibration must be saved or one of {', '.join(CALIBRATIONS)}, got {choice!r}")
    try:
        return fit_calibration(bank, entry, choice, inputs=inputs, batch_size=batch_size)
    except ValueError as e:
        _fail(str(e))


def _evaluate(bank, entry, examples, kind: str, batch_size: int, desc: str, calibration=None,
              scoring: dict | None = None) -> dict:
    """Metrics and ms per example; ``scoring``: classify's ``context`` / ``compile`` options."""
    from ..core.scoring import classify, generate

    t = time.perf_counter()
    if kind == TaskKind.CLASSIFICATION:
        res = classify(bank, entry, examples, batch_size=batch_size, progress=desc, calibration=calibration,
                       **(scoring or {}))
    else:
        res = generate(bank, entry, examples, batch_size=max(batch_size // 2, 1), progress=desc)
    m = dict(res.metrics)
    if kind == TaskKind.CLASSIFICATION and calibration is not None:
        m["calibration"] = calibration.to_dict()
    m["ms_per_example"] = 1000 * (time.perf_counter() - t) / max(len(examples), 1)
    return m


def _eval_calibrated(bank, entry, examples, kind, batch_size, choices, saved, key, title, rows, results,
                     scoring: dict | None = None) -> None:
    """One result (and table row) per calibration choice; keys ``key`` or ``key/choice`` when several."""
    several = kind == TaskKind.CLASSIFICATION and len(choices) > 1
    for choice in (choices if kind == TaskKind.CLASSIFICATION else ["none"]):
        cal = _calibration(bank, entry, choice, saved, examples, batch_size) if kind == TaskKind.CLASSIFICATION else None
        k = f"{key}/{choice}" if several else key
        results[k] = _evaluate(bank, entry, examples, kind, batch_size, title, cal, scoring)
        rows.append(_row(title, results[k], {"calibration": cal.method} if cal is not None else None))


def _row(name: str, m: dict, extra: dict | None = None) -> dict:
    row = {"method": name}
    for k in ("accuracy", "macro_f1", "exact_match", "f1"):
        if k in m:
            row[k] = m[k]
    row["ms/example"] = f"{m['ms_per_example']:.1f}"
    row.update(extra or {})
    return row


def _command_line(ctx: typer.Context) -> str:
    """The command as the user gave it (options set on the command line only, in declaration
    order), rebuilt from the parsed parameters so that it is the same however the CLI was invoked."""
    words = ["softprompt", ctx.info_name or ""]
    for p in ctx.command.params:
        source = ctx.get_parameter_source(p.name)  # compared by name: typer may bring its own click
        if not p.opts or getattr(source, "name", None) != "COMMANDLINE":
            continue
        value = ctx.params[p.name]
        if getattr(p, "is_flag", False):
            words.append(p.opts[0] if value else (p.secondary_opts or p.opts)[0])
            continue
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            words += [p.opts[0], str(v)]
    return shlex.join(words)
