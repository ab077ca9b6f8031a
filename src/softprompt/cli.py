"""The ``softprompt`` command line: train, eval, predict, demo, models, serve.

Every command takes ``--model`` (an embedded alias such as ``smollm2-135m``, a local model
folder, or a hub id for users who have the hub) and either a built-in ``--task`` or your
own files (``--train-file``/``--test-file`` with ``--field``, ``--label-column``,
``--template`` and ``--verbalizer``).
"""
from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="Train, evaluate and serve soft prompts for frozen language models.",
    no_args_is_help=True,
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


def _load_task_data(
    task: Optional[str], train_file: Optional[Path], test_file: Optional[Path], valid_file: Optional[Path],
    field: list[str] | None, label_column: Optional[str], target_column: Optional[str],
    template: Optional[str], verbalizer: list[str] | None, instruction: Optional[str], limit: Optional[int],
):
    """A TaskData from a built-in name or from user files (with template and verbalizer)."""
    from .tasks import DataError, DataNotFoundError, Task, TaskData, load_examples, load_task

    try:
        if task:
            data = load_task(task, limit_per_split=limit)
            if template:
                data.task.template = template
            if verbalizer:
                data.task.verbalizer = {k: (v if v.startswith(" ") else " " + v) for k, v in _parse_pairs(verbalizer, "--verbalizer").items()}
            if instruction:
                data.task.instruction = instruction
            return data
        if not train_file and not test_file:
            _fail("give a built-in --task (see `softprompt tasks`) or your own --train-file/--test-file")
        fields = _parse_pairs(field, "--field") or {"text": "text"}
        if not template:
            _fail("with your own files, give --template, e.g. '{soft:20} Text: {text}\\nLabel:'")
        verb = {k: (v if v.startswith(" ") else " " + v) for k, v in _parse_pairs(verbalizer, "--verbalizer").items()}
        kind = "generation" if target_column else "classification"
        if kind == "classification" and not verb:
            _fail("classification needs --verbalizer LABEL=WORD for every label (e.g. --verbalizer positive=great)")
        t = Task(name=(train_file or test_file).stem, kind=kind, template=template, verbalizer=verb or None,
                 instruction=instruction or "")
        splits = {}
        for name, path in (("train", train_file), ("validation", valid_file), ("test", test_file)):
            if path:
                exs = load_examples(path, fields=fields, label_column=label_column or ("label" if kind == "classification" else None),
                                    target_column=target_column, limit=limit)
                t.check(exs, source=str(path))
                splits[name] = exs
        return TaskData(task=t, splits=splits)
    except (DataError, DataNotFoundError, FileNotFoundError, ValueError, KeyError) as e:
        _fail(str(e))


def _load_model(model: str):
    from .models import ModelNotAvailableError, load_model

    try:
        with console.status(f"loading {model} ..."):
            return load_model(model)
    except (ModelNotAvailableError, OSError, ValueError) as e:
        _fail(str(e))


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


def _evaluate(bank, entry, examples, kind: str, batch_size: int, desc: str) -> dict:
    from .scoring import classify, generate

    t = time.perf_counter()
    if kind == "classification":
        res = classify(bank, entry, examples, batch_size=batch_size, progress=desc)
    else:
        res = generate(bank, entry, examples, batch_size=max(batch_size // 2, 1), progress=desc)
    m = dict(res.metrics)
    m["ms_per_example"] = 1000 * (time.perf_counter() - t) / max(len(examples), 1)
    return m


def _row(name: str, m: dict, extra: dict | None = None) -> dict:
    row = {"method": name}
    for k in ("accuracy", "macro_f1", "exact_match", "f1"):
        if k in m:
            row[k] = m[k]
    row["ms/example"] = f"{m['ms_per_example']:.1f}"
    row.update(extra or {})
    return row


# ----------------------------------------------------------------------------- train
@app.command()
def train(
    task: Optional[str] = typer.Option(None, help="Built-in task name (see `softprompt tasks`)."),
    model: str = typer.Option("smollm2-135m", help=MODEL_HELP),
    out: Path = typer.Option(Path("runs/prompt"), help="Output folder: prompt.safetensors, checkpoint, history, metrics."),
    train_file: Optional[Path] = typer.Option(None, help="Your training data (.csv/.tsv/.jsonl)."),
    valid_file: Optional[Path] = typer.Option(None, help="Your validation data (for best-prompt selection)."),
    test_file: Optional[Path] = typer.Option(None, help="Your held-out data (scored after training)."),
    field: Optional[list[str]] = typer.Option(None, help="Template field = file column, e.g. --field text='Tweet text'. Repeatable."),
    label_column: Optional[str] = typer.Option(None, help="Column holding the class label (default 'label')."),
    target_column: Optional[str] = typer.Option(None, help="Column holding the answer, for generation tasks."),
    template: Optional[str] = typer.Option(None, help="Template, e.g. '{soft:20} Tweet: {text}\\nAnswer:'."),
    verbalizer: Optional[list[str]] = typer.Option(None, help="LABEL=WORD, one per label. Repeatable."),
    instruction: Optional[str] = typer.Option(None, help="Zero-shot instruction (baseline; also 'text' init)."),
    init: str = typer.Option("labels", help="Init: random | vocab | text | labels."),
    epochs: int = typer.Option(20),
    max_steps: Optional[int] = typer.Option(None),
    lr: float = typer.Option(0.3, help="Peak learning rate."),
    batch_size: int = typer.Option(8),
    optimizer: str = typer.Option("adamw", help="adamw | adafactor"),
    loss: str = typer.Option("rank", help="rank (cross-entropy over labels) | lm (log-prob of the gold words)"),
    warmup_steps: int = typer.Option(10),
    eval_every: int = typer.Option(0, help="Validate every N steps (0: each epoch)."),
    patience: Optional[int] = typer.Option(None, help="Stop after N validations without improvement."),
    valid_split: str = typer.Option("validation", help="Split used for validation when it exists."),
    valid_limit: Optional[int] = typer.Option(200, help="Use at most N validation examples."),
    train_limit: Optional[int] = typer.Option(None, help="Use at most N training examples (a seeded sample)."),
    test_split: str = typer.Option("test"),
    test_limit: Optional[int] = typer.Option(None, help="Score at most N held-out examples."),
    seed: int = typer.Option(0),
    resume: bool = typer.Option(False, help="Continue from OUT/checkpoint.safetensors."),
    eval_batch_size: int = typer.Option(32),
):
    """Train a soft prompt (the base model stays frozen), then score it on held-out data."""
    from .bank import PromptBank
    from .train import TrainConfig, train_prompt

    data = _load_task_data(task, train_file, test_file, valid_file, field, label_column, target_column,
                           template, verbalizer, instruction, None)
    train_ex = list(_split(data, "train"))
    if train_limit and train_limit < len(train_ex):
        train_ex = random.Random(seed).sample(train_ex, train_limit)
    valid_ex = data.splits.get(valid_split)
    if valid_ex and valid_limit:
        valid_ex = valid_ex[:valid_limit]
    m, tok = _load_model(model)
    cfg = TrainConfig(init=init, epochs=epochs, max_steps=max_steps, lr=lr, batch_size=batch_size, optimizer=optimizer,
                      loss=loss, warmup_steps=warmup_steps, eval_every=eval_every, patience=patience, seed=seed,
                      eval_batch_size=eval_batch_size)
    try:
        result = train_prompt(m, tok, data.task, train_ex, valid_ex, cfg, out_dir=out, resume=resume)
    except ValueError as e:
        _fail(str(e))
    rows = []
    test_ex = data.splits.get(test_split)
    if test_ex:
        test_ex = test_ex[:test_limit] if test_limit else test_ex
        bank = PromptBank(m, tok)
        entry = bank.add_prompt(result.prompt, "trained")
        metrics = _evaluate(bank, entry, test_ex, data.task.kind, eval_batch_size, f"scoring {test_split}")
        result.prompt.metrics = {test_split: {k: v for k, v in metrics.items() if k != "confusion"}}
        rows.append(_row("soft prompt", metrics))
    size = result.prompt.save(out / "prompt.safetensors")
    (out / "metrics.json").write_text(json.dumps(result.prompt.metrics, indent=1))
    console.print(f"saved {out / 'prompt.safetensors'} ({size:,} bytes: {result.prompt.n_tokens} tokens x "
                  f"{result.prompt.hidden_size} floats); {result.steps} steps in {result.wall_time_s:.0f}s, "
                  f"{result.tokens_per_s:.0f} training tokens/s, best step {result.best_step}")
    if rows:
        console.print(_results_table(rows, f"{data.task.name}: {test_split} ({len(test_ex)} examples)"))


# ----------------------------------------------------------------------------- eval / predict
@app.command("eval")
def eval_(
    prompt: Optional[Path] = typer.Argument(None, help="A prompt .safetensors (omit with --hard)."),
    task: Optional[str] = typer.Option(None, help="Built-in task (default: the prompt's own task)."),
    model: str = typer.Option("smollm2-135m", help=MODEL_HELP),
    split: str = typer.Option("test"),
    limit: Optional[int] = typer.Option(None, help="Score at most N examples."),
    hard: bool = typer.Option(False, help="Also score the template without soft tokens (zero-shot baseline)."),
    test_file: Optional[Path] = typer.Option(None, help="Your own labelled file instead of a built-in task."),
    field: Optional[list[str]] = typer.Option(None),
    label_column: Optional[str] = typer.Option(None),
    target_column: Optional[str] = typer.Option(None),
    batch_size: int = typer.Option(32),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the metrics here."),
):
    """Score a saved prompt (and optionally the hard template) on a task's split."""
    from .bank import PromptBank
    from .prompts import PromptFileError, PromptMismatchError, SoftPrompt
    from .templates import Template

    if prompt is None and not hard:
        _fail("give a prompt file, or --hard for the zero-shot template")
    sp = None
    if prompt is not None:
        try:
            sp = SoftPrompt.load(prompt)
        except (PromptFileError, FileNotFoundError) as e:
            _fail(str(e))
    name = task or (sp.task if sp else None)
    data = _load_task_data(name if not test_file else None, None, test_file, None, field, label_column, target_column,
                           sp.template if (sp and test_file) else None,
                           [f"{k}={v}" for k, v in (sp.verbalizer or {}).items()] if (sp and test_file) else None,
                           None, None)
    examples = _split(data, "test" if test_file else split)
    examples = examples[:limit] if limit else examples
    m, tok = _load_model(model)
    bank = PromptBank(m, tok)
    rows, results = [], {}
    if sp is not None:
        try:
            entry = bank.add_prompt(sp, "prompt")
        except PromptMismatchError as e:
            _fail(str(e))
        results["soft"] = _evaluate(bank, entry, examples, sp.kind, batch_size, "soft prompt")
        rows.append(_row(f"soft prompt ({prompt.name})", results["soft"]))
    if hard:
        tmpl = Template(sp.template if sp else data.task.template).without_soft()
        e = bank.add("hard", tmpl, verbalizer=(sp.verbalizer if sp else data.task.verbalizer), kind=data.task.kind)
        results["hard"] = _evaluate(bank, e, examples, data.task.kind, batch_size, "hard template")
        rows.append(_row(f"hard template: {tmpl.text!r}", results["hard"]))
    console.print(_results_table(rows, f"{data.task.name}: {split} ({len(examples)} examples)"))
    if json_out:
        json_out.write_text(json.dumps(results, indent=1))


@app.command()
def predict(
    prompt: Path = typer.Argument(..., help="A prompt .safetensors."),
    text: Optional[list[str]] = typer.Option(None, help="Input text (for single-field templates). Repeatable."),
    input_file: Optional[Path] = typer.Option(None, help="A .jsonl file of objects with the template's fields."),
    model: str = typer.Option("smollm2-135m", help=MODEL_HELP),
    max_new_tokens: int = typer.Option(24),
):
    """Print the prompt's answer for each input (label and probabilities, or generated text)."""
    from .bank import PromptBank
    from .prompts import PromptFileError, PromptMismatchError, SoftPrompt
    from .scoring import classify, generate
    from .tasks import Example
    from .templates import Template

    try:
        sp = SoftPrompt.load(prompt)
    except (PromptFileError, FileNotFoundError) as e:
        _fail(str(e))
    fields_needed = Template(sp.template).fields
    inputs: list[dict] = []
    for t in text or []:
        if len(fields_needed) != 1:
            _fail(f"this prompt's template needs fields {list(fields_needed)}; use --input-file with JSON lines")
        inputs.append({fields_needed[0]: t})
    if input_file:
        for n, line in enumerate(input_file.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    inputs.append(json.loads(line))
                except json.JSONDecodeError as e:
                    _fail(f"{input_file} line {n}: not JSON ({e})")
    if not inputs:
        _fail("give --text or --input-file")
    for n, obj in enumerate(inputs, 1):
        missing = [f for f in fields_needed if f not in obj]
        if missing:
            _fail(f"input {n} lacks fields {missing}; the template needs {list(fields_needed)}")
    m, tok = _load_model(model)
    bank = PromptBank(m, tok)
    try:
        entry = bank.add_prompt(sp, "prompt")
    except PromptMismatchError as e:
        _fail(str(e))
    exs = [Example(fields={k: str(v) for k, v in obj.items()}) for obj in inputs]
    if sp.kind == "classification":
        res = classify(bank, entry, exs)
        for obj, pred, probs in zip(inputs, res.predictions, res.probabilities.tolist()):
            console.print_json(json.dumps({"input": obj, "label": pred,
                                           "probabilities": dict(zip(res.labels, [round(p, 4) for p in probs]))}))
    else:
        res = generate(bank, entry, exs, max_new_tokens=max_new_tokens)
        for obj, t in zip(inputs, res.texts):
            console.print_json(json.dumps({"input": obj, "output": t}))


# ----------------------------------------------------------------------------- demo
@app.command()
def demo(
    model: str = typer.Option("smollm2-135m", help=MODEL_HELP),
    out: Path = typer.Option(Path("runs/demo"), help="Where the trained prompt is saved."),
    epochs: int = typer.Option(4),
    seed: int = typer.Option(0),
):
    """The quickstart: train a soft prompt on the bundled demo set (hand-written customer messages,
    complaint vs praise), compare it with a zero-shot instruction on held-out messages, save it."""
    from .bank import PromptBank
    from .tasks import load_task
    from .templates import Template
    from .train import TrainConfig, train_prompt

    data = load_task("demo")
    task = data.task
    m, tok = _load_model(model)
    bank = PromptBank(m, tok)
    test = data.splits["test"]
    zs_template = Template(f"{task.instruction}\n" + Template(task.template).without_soft().text)
    zs = bank.add("zero-shot", zs_template, verbalizer=task.verbalizer)
    rows = [_row(f"zero-shot instruction", _evaluate(bank, zs, test, task.kind, 32, "zero-shot"), {"trained params": 0, "artifact bytes": 0})]
    cfg = TrainConfig(epochs=epochs, lr=0.03, batch_size=8, init="labels", seed=seed, warmup_steps=5)
    result = train_prompt(m, tok, task, data.splits["train"], None, cfg, out_dir=out)
    size = result.prompt.save(out / "prompt.safetensors")
    e = bank.add_prompt(result.prompt, "soft")
    metrics = _evaluate(bank, e, test, task.kind, 32, "soft prompt")
    rows.append(_row("soft prompt (trained)", metrics, {"trained params": result.prompt.embeddings.numel(), "artifact bytes": size}))
    console.print(_results_table(rows, f"demo: {len(data.splits['train'])} train / {len(test)} held-out messages"))
    console.print(f"prompt saved to {out / 'prompt.safetensors'}; try:\n  softprompt predict {out / 'prompt.safetensors'} "
                  "--text 'My parcel arrived crushed and nobody answers my emails.'")


# ----------------------------------------------------------------------------- models / tasks
@models_app.command("list")
def models_list():
    """Show the embedded models, whether installed and converted."""
    from .models import list_models

    rows = [{"alias": r["alias"], "model": r["display_name"], "installed": r["installed"],
             "converted": r["converted"], "cache": str(r["cache_path"])} for r in list_models()]
    console.print(_results_table(rows, "embedded models"))


@models_app.command("convert")
def models_convert(
    alias: str = typer.Argument("smollm2-135m"),
    force: bool = typer.Option(False, help="Convert again even if cached."),
):
    """Convert an embedded GGUF once into the safetensors cache (SOFTPROMPT_CACHE)."""
    from .models import ModelNotAvailableError, convert_embedded

    try:
        path = convert_embedded(alias, force=force)
    except ModelNotAvailableError as e:
        _fail(str(e))
    console.print(f"{alias}: {path}")


@app.command()
def tasks():
    """List the built-in tasks."""
    from .tasks import BUILTIN_TASKS

    console.print("\n".join(sorted(BUILTIN_TASKS)))


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
