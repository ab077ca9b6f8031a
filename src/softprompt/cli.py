"""The ``softprompt`` command line: train, eval, predict, demo, models, serve.

Every command takes ``--model`` (an embedded alias such as ``smollm2-135m``, a local model
folder, or a hub id for users who have the hub) and either a built-in ``--task`` or your
own files (``--train-file``/``--test-file`` with ``--field``, ``--label-column``,
``--template`` and ``--verbalizer``).
"""
from __future__ import annotations

import json
import os
import random
import shlex
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
    from .core.templates import continue_with

    return {k: continue_with(template, v) for k, v in _parse_pairs(pairs, "--verbalizer").items()}


def _load_task_data(
    task: Optional[str], train_file: Optional[Path], test_file: Optional[Path], valid_file: Optional[Path],
    field: list[str] | None, label_column: Optional[str], target_column: Optional[str],
    template: Optional[str], verbalizer: list[str] | None, instruction: Optional[str], limit: Optional[int],
    encoding: str = "utf-8", name: Optional[str] = None,
):
    """A TaskData from a built-in name or from user files (with template and verbalizer).  User
    files are named ``name``, else after the files (``sms_train.csv`` + ``sms_test.csv`` -> ``sms``)."""
    from .data import DataError, DataNotFoundError, Task, TaskData, load_examples, load_task

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
        kind = "generation" if target_column else "classification"
        if kind == "classification" and not verb:
            _fail("classification needs --verbalizer LABEL=WORD for every label (e.g. --verbalizer positive=great)")
        t = Task(name=name or _files_name(train_file, test_file, valid_file), kind=kind, template=template,
                 verbalizer=verb or None, instruction=instruction or "")
        splits = {}
        for name, path in (("train", train_file), ("validation", valid_file), ("test", test_file)):
            if path:
                exs = load_examples(path, fields=fields, label_column=label_column or ("label" if kind == "classification" else None),
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
    from .families.loading import ModelNotAvailableError, load_model

    try:
        with console.status(f"loading {model} ..."):
            return load_model(model, device=_device(device))
    except (ModelNotAvailableError, OSError, ValueError) as e:
        _fail(str(e))


def _bank(model, tok):
    """The model family's bank: a PromptBank, or for an encoder-only model (BERT family) an
    EncoderBank (soft prompt + head)."""
    from .families import family_for

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
    from .core.calibration import CALIBRATIONS, Calibration
    from .core.calibrate import fit_calibration

    if choice == "saved":
        return saved if saved is not None else Calibration()
    if choice not in CALIBRATIONS:
        _fail(f"--calibration must be saved or one of {', '.join(CALIBRATIONS)}, got {choice!r}")
    try:
        return fit_calibration(bank, entry, choice, inputs=inputs, batch_size=batch_size)
    except ValueError as e:
        _fail(str(e))


def _evaluate(bank, entry, examples, kind: str, batch_size: int, desc: str, calibration=None) -> dict:
    from .core.scoring import classify, generate

    t = time.perf_counter()
    if kind == "classification":
        res = classify(bank, entry, examples, batch_size=batch_size, progress=desc, calibration=calibration)
    else:
        res = generate(bank, entry, examples, batch_size=max(batch_size // 2, 1), progress=desc)
    m = dict(res.metrics)
    if kind == "classification" and calibration is not None:
        m["calibration"] = calibration.to_dict()
    m["ms_per_example"] = 1000 * (time.perf_counter() - t) / max(len(examples), 1)
    return m


def _eval_calibrated(bank, entry, examples, kind, batch_size, choices, saved, key, title, rows, results) -> None:
    """One result (and table row) per calibration choice; keys ``key`` or ``key/choice`` when several."""
    several = kind == "classification" and len(choices) > 1
    for choice in (choices if kind == "classification" else ["none"]):
        cal = _calibration(bank, entry, choice, saved, examples, batch_size) if kind == "classification" else None
        k = f"{key}/{choice}" if several else key
        results[k] = _evaluate(bank, entry, examples, kind, batch_size, title, cal)
        rows.append(_row(title, results[k], {"calibration": cal.method} if cal is not None else None))


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
    ctx: typer.Context,
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
    method: str = typer.Option("prompt", help="prompt: train the template's {soft:N} tokens; ptuning: the same tokens through an encoder network (P-tuning); prefix: also learned key/values at every layer (prefix tuning)."),
    prefix_tokens: int = typer.Option(10, help="Length of the learned key/value prefix (--method prefix)."),
    encoder: str = typer.Option("lstm", help="P-tuning's prompt encoder (--method ptuning): lstm (bidirectional LSTM + MLP) | mlp."),
    encoder_hidden: int = typer.Option(128, help="Width of the encoder network (--method ptuning, --reparam mlp)."),
    reparam: str = typer.Option("none", help="--method prefix: none (train key/values directly) | mlp (produce them with an MLP while training; the saved prompt holds plain key/values)."),
    epochs: int = typer.Option(20),
    max_steps: Optional[int] = typer.Option(None),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (default 0.3; 0.001 when training through an encoder network: --method ptuning, --reparam mlp)."),
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
    restarts: int = typer.Option(1, min=1, help="Train N times (seeds SEED, SEED+1000, ...) and keep the prompt that scores best on the validation data, or on the training data without any: guards against a run stuck at the majority class. Costs N times the training."),
    resume: bool = typer.Option(False, help="Continue from OUT/checkpoint.safetensors (with --restarts: each run from its own OUT/restartN)."),
    eval_batch_size: int = typer.Option(32),
    encoding: str = typer.Option("utf-8", help="Text encoding of your files, e.g. latin-1 or cp1252."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for torch (default: torch's choice)."),
    processes: int = typer.Option(1, min=1, help="Train data-parallel on N processes of this host: re-runs this command under `accelerate launch --num_processes N` (one per GPU; on CPUs, gloo). Each process takes 1/N of every batch; the result equals a 1-process run to float rounding, and --resume works across process counts. Several hosts: run `accelerate launch -m softprompt train ...` yourself (README, 'Scaling out')."),
    compile: str = typer.Option("auto", help="torch.compile the frozen model's forward in the prompt + input training step: on | off | auto (on with CUDA; on CPUs eager was faster)."),
    shard_model: bool = typer.Option(False, help="Under several processes: shard the frozen model's decoder layers over them (FSDP2), for a model larger than one device. Prompt tuning on decoder models only."),
):
    """Train a soft prompt (the base model stays frozen), then score it on held-out data.

    Data-parallel: `--processes N`, or `accelerate launch --multi_gpu --num_processes N -m softprompt train ...`
    (accelerate's torchrun launcher; on a host without GPUs it starts N CPU processes with gloo) or
    `torchrun --nproc_per_node N -m softprompt train ...`."""
    from .training.distributed import DataParallel, launched, process_device, shard_frozen_model
    from .training.restarts import train_with_restarts
    from .core.compiled import resolve_compile
    from .core.method import Method
    from .training.prompt import TrainConfig, encoders_for

    if processes > 1 and launched() and processes != int(os.environ["WORLD_SIZE"]):
        _fail(f"--processes {processes} under a launcher that started {os.environ['WORLD_SIZE']} processes; "
              "drop --processes (the launcher decides)")
    if processes > 1 and not launched():
        raise typer.Exit(_launch(processes, [w for w in shlex.split(_command_line(ctx))[1:]], "--processes"))
    if shard_model and not launched():
        _fail("--shard-model needs several processes: add --processes N or run under `accelerate launch`")

    try:
        resolve_compile(compile, "cpu")  # a bad --compile fails before any data or model loads
    except ValueError as e:
        _fail(str(e))
    data = _load_task_data(task, train_file, test_file, valid_file, field, label_column, target_column,
                           template, verbalizer, instruction, None, encoding=encoding)
    _set_threads(threads)
    train_ex = list(_split(data, "train"))
    if train_limit and train_limit < len(train_ex):
        train_ex = random.Random(seed).sample(train_ex, train_limit)
    valid_ex = data.splits.get(valid_split)
    if valid_ex and valid_limit:
        valid_ex = valid_ex[:valid_limit]
    try:  # any spelling of the method (prompt, prompt_tuning, PEFT's PROMPT_TUNING) -> the training one
        method = Method.parse(method).short
    except ValueError as e:
        _fail(str(e))
    if lr is None:  # an encoder's weights move its output far more per Adam step than a prompt's own values
        lr = 1e-3 if method == Method.P_TUNING.short or reparam != "none" else 0.3
    cfg = TrainConfig(init=init, method=method, prefix_tokens=prefix_tokens, epochs=epochs, max_steps=max_steps, lr=lr, batch_size=batch_size, optimizer=optimizer,
                      loss=loss, warmup_steps=warmup_steps, eval_every=eval_every, patience=patience, seed=seed,
                      eval_batch_size=eval_batch_size, encoder=encoder, encoder_hidden=encoder_hidden, reparam=reparam,
                      compile=compile)
    try:
        encoders_for(cfg)  # a bad method/encoder combination fails before the model loads
    except ValueError as e:
        _fail(str(e))
    device = process_device(_device())
    # a sharded model is loaded on the CPU, and only its shard moves to the device
    m, tok = _load_model(model, "cpu" if shard_model else device)
    if shard_model:
        try:
            if method != "prompt":
                raise ValueError(f"--shard-model supports --method prompt only, not {method!r}")
            shard_frozen_model(m, device)
        except ValueError as e:
            _fail(str(e))
    dp = DataParallel.current(m)
    try:
        result = train_with_restarts(m, tok, data.task, train_ex, valid_ex, cfg, restarts, out_dir=out, resume=resume,
                                     progress=dp.is_main)
    except ValueError as e:
        _fail(str(e))
    if not dp.is_main and not dp.lockstep:
        return  # the main process scores, saves and reports
    for run in result.prompt.training.get("restarts", []):
        fit = ", ".join(f"{k} {v:.4f}" for k, v in run.items() if isinstance(v, float))
        console.print(f"restart seed {run['seed']}: {run['judged_on']} {fit}{'  <- kept' if run['chosen'] else ''}")
    rows = []
    test_ex = data.splits.get(test_split)
    if test_ex:
        test_ex = test_ex[:test_limit] if test_limit else test_ex
        bank = _bank(m, tok)
        entry = bank.add_prompt(result.prompt, "trained")
        metrics = _evaluate(bank, entry, test_ex, data.task.kind, eval_batch_size, f"scoring {test_split}")
        result.prompt.metrics = {test_split: {k: v for k, v in metrics.items() if k != "confusion"}}
        rows.append(_row("soft prompt", metrics))
    if not dp.is_main:
        return  # a sharded model: every rank ran the test forwards above, the main one reports
    size = result.prompt.save(out / "prompt.safetensors")
    (out / "metrics.json").write_text(json.dumps(result.prompt.metrics, indent=1))
    shape = f"{result.prompt.n_tokens} tokens x {result.prompt.hidden_size} floats"
    if result.prompt.kv is not None:
        shape += f" + {result.prompt.n_prefix}-position key/values at every layer"
    console.print(f"saved {out / 'prompt.safetensors'} ({size:,} bytes: {shape}, {result.prompt.n_params:,} parameters); "
                  f"{result.steps} steps in {result.wall_time_s:.0f}s, "
                  f"{result.tokens_per_s:.0f} training tokens/s, best step {result.best_step}")
    if rows:
        console.print(_results_table(rows, f"{data.task.name}: {test_split} ({len(test_ex)} examples)"))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(processes: int, args: list[str], port: int | None = None) -> list[str]:
    """``accelerate launch`` running ``python -m softprompt ARGS`` on ``processes`` processes of
    this host.  ``--multi_gpu`` selects accelerate's torchrun launcher, which is also the one that
    starts several CPU processes (gloo) on a host without GPUs."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(port or _free_port()),
            "-m", "softprompt", *args]


def _launch(processes: int, words: list[str], option: str) -> int:
    """Run this command again under ``accelerate launch`` without ``option`` (its own value)."""
    import subprocess

    args, skip = [], False
    for w in words:
        if skip:
            skip = False
        elif w == option:
            skip = True
        elif not w.startswith(option + "="):
            args.append(w)
    cmd = launch_command(processes, args)
    err.print(f"launching {processes} processes: {shlex.join(cmd)}", markup=False)
    return subprocess.run(cmd).returncode


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
    calibration: str = typer.Option("saved", help=EVAL_CALIBRATION_HELP),
    verbalizer: Optional[list[str]] = typer.Option(None, help="LABEL=WORD, one per label: score with these label words "
                                                   "instead of the prompt's or the task's. Repeatable."),
    encoding: str = typer.Option("utf-8", help="Text encoding of --test-file, e.g. latin-1."),
):
    """Score a saved prompt (and optionally the hard template) on a task's split."""
    from .core.prompts import PromptFileError, PromptMismatchError, SoftPrompt
    from .core.templates import Template

    if prompt is None and not hard:
        _fail("give a prompt file, or --hard for the zero-shot template")
    sp = None
    if prompt is not None:
        try:
            sp = SoftPrompt.load(prompt)
        except (PromptFileError, FileNotFoundError) as e:
            _fail(str(e))
    name = task or (sp.task if sp else None)
    if sp is not None and verbalizer:
        sp.verbalizer = _verbalizer(verbalizer, sp.template)
    data = _load_task_data(name if not test_file else None, None, test_file, None, field, label_column, target_column,
                           sp.template if (sp and test_file) else None,
                           verbalizer or ([f"{k}={v}" for k, v in (sp.verbalizer or {}).items()] if (sp and test_file)
                                          else None),
                           None, None, encoding=encoding)
    examples = _split(data, "test" if test_file else split)
    examples = examples[:limit] if limit else examples
    m, tok = _load_model(model)
    bank = _bank(m, tok)
    rows, results = [], {}
    choices = [c.strip() for c in calibration.split(",") if c.strip()] or ["saved"]
    if sp is not None:
        try:
            entry = bank.add_prompt(sp, "prompt")
        except PromptMismatchError as e:
            _fail(str(e))
        _eval_calibrated(bank, entry, examples, sp.kind, batch_size, choices, sp.calibration, "soft",
                         f"soft prompt ({prompt.name})", rows, results)
    if hard:
        if not bank.family.supports("rank_classification"):
            _fail("--hard needs a decoder model: an encoder has no zero-shot reading without a trained head")
        tmpl = Template(sp.template if sp else data.task.template).without_soft()
        e = bank.add("hard", tmpl, verbalizer=(sp.verbalizer if sp else data.task.verbalizer), kind=data.task.kind)
        _eval_calibrated(bank, e, examples, data.task.kind, batch_size, choices, None, "hard",
                         f"hard template: {tmpl.text!r}", rows, results)
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
    calibration: str = typer.Option("saved", help=CALIBRATION_HELP),
):
    """Print the prompt's answer for each input (label and probabilities, or generated text)."""
    from .core.prompts import PromptFileError, PromptMismatchError, SoftPrompt
    from .core.scoring import classify, generate
    from .data import Example
    from .core.templates import Template

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
    bank = _bank(m, tok)
    try:
        entry = bank.add_prompt(sp, "prompt")
    except PromptMismatchError as e:
        _fail(str(e))
    exs = [Example(fields={k: str(v) for k, v in obj.items()}) for obj in inputs]
    if sp.kind == "classification":
        res = classify(bank, entry, exs, calibration=_calibration(bank, entry, calibration, sp.calibration, exs))
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
    epochs: int = typer.Option(2, help="Training epochs of the soft prompt."),
    lr: float = typer.Option(0.3, help="Learning rate of the soft prompt (the one default of train and compare)."),
    seed: int = typer.Option(0),
):
    """The quickstart: on the bundled demo set (hand-written customer messages, complaint vs praise),
    score a zero-shot instruction as written, the best hard prompt found by instruction search
    (calibrated, chosen on the training messages only), and a trained soft prompt, on held-out
    messages; save the soft prompt."""
    from .hard.baselines import zero_shot_template
    from .core.bank import PromptBank
    from .hard.instruction_search import search_instructions
    from .data import load_task
    from .training.prompt import TrainConfig, train_prompt

    data = load_task("demo")
    task = data.task
    m, tok = _load_model(model)
    bank = PromptBank(m, tok)
    train, test = data.splits["train"], data.splits["test"]
    zs = bank.add("zero-shot", zero_shot_template(task), verbalizer=task.verbalizer)
    rows = [_row("zero-shot instruction (uncalibrated)", _evaluate(bank, zs, test, task.kind, 32, "zero-shot"),
                 {"trained params": 0, "artifact bytes": 0})]
    with console.status("searching instructions (scored on 64 training messages only) ..."):
        sample = random.Random(seed).sample(train, min(64, len(train)))  # a quick search: the demo takes minutes
        found = search_instructions(m, tok, task, sample, calibration="contextual", induce=2, seed=seed)
    hard = bank.add("searched", found.template, verbalizer=task.verbalizer)
    rows.append(_row(f"searched instruction, {found.calibration} calibration",
                     _evaluate(bank, hard, test, task.kind, 32, "searched", found.fitted),
                     {"trained params": 0, "artifact bytes": len(found.template.encode())}))
    cfg = TrainConfig(epochs=epochs, lr=lr, batch_size=8, init="labels", seed=seed, warmup_steps=5)
    result = train_prompt(m, tok, task, train, None, cfg, out_dir=out)
    size = result.prompt.save(out / "prompt.safetensors")
    e = bank.add_prompt(result.prompt, "soft")
    metrics = _evaluate(bank, e, test, task.kind, 32, "soft prompt")
    rows.append(_row("soft prompt (trained)", metrics, {"trained params": result.prompt.embeddings.numel(), "artifact bytes": size}))
    console.print(_results_table(rows, f"demo: {len(train)} train / {len(test)} held-out messages"))
    console.print(f"searched instruction ({len(found.candidates)} candidates, {found.seconds:.0f}s): {found.best!r}",
                  markup=False)
    console.print(f"prompt saved to {out / 'prompt.safetensors'}; try:\n  softprompt predict {out / 'prompt.safetensors'} "
                  "--text 'My parcel arrived crushed and nobody answers my emails.'")
    console.print("a full comparison with confidence intervals and a recommendation: softprompt compare --task demo")


# ----------------------------------------------------------------------------- serve
@app.command("serve")
def serve_cmd(
    model: str = typer.Option("smollm2-135m", help=MODEL_HELP),
    prompts: Path = typer.Option(Path("prompts"), help="Folder of prompt artifacts: <task>.safetensors, or a subfolder (ensemble)."),
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(8000),
    token: Optional[str] = typer.Option(None, help="Bearer token for admin endpoints (or SOFTPROMPT_SERVE_TOKEN)."),
    max_batch_size: int = typer.Option(32, help="Largest batch the dynamic batcher forms."),
    max_wait_ms: float = typer.Option(5.0, help="Longest a request waits for batch-mates."),
    protect_reads: bool = typer.Option(False, help="Require the token for every endpoint but /healthz (docs and schema too)."),
    max_queue: int = typer.Option(1024, help="Rows (inputs x ensemble members) queued at most; beyond: 503 + Retry-After."),
    max_inputs: int = typer.Option(64, help="Inputs per request at most; beyond: 422."),
    max_input_tokens: int = typer.Option(512, help="Tokens per input after the template at most; beyond: 422."),
    max_new_tokens: int = typer.Option(256, help="Largest max_new_tokens / max_tokens a request may ask for; beyond: 422."),
    max_body_bytes: int = typer.Option(1 << 20, help="Largest JSON request body; beyond: 413."),
    max_upload_bytes: int = typer.Option(8 << 20, help="Largest prompt upload (PUT /v1/tasks/NAME); beyond: 413."),
    max_concurrent_uploads: int = typer.Option(2, help="Uploads received at once; beyond: 429 + Retry-After."),
    max_concurrent_requests: int = typer.Option(256, help="Requests with a body in flight at once; beyond: 503 + Retry-After."),
    max_batch_tokens: int = typer.Option(8192, help="Tokens per forward pass (rows x (prompt + input [+ new tokens])); bounds scoring memory."),
    max_labels: int = typer.Option(100, help="Most labels a classification prompt may have; more is refused (422) at upload and load."),
    max_label_tokens: int = typer.Option(16, help="Most tokens per label word; longer words are refused at upload and load."),
    max_template_tokens: int = typer.Option(1024, help="Most tokens in a prompt's fixed prefix (template head); longer is refused."),
    backend: str = typer.Option("engine", help="engine: the in-process batching engine (default). vllm: send every "
                                "forward pass to vLLM as input embeddings (prompt/P-tuning prompts; prefix-tuned ones "
                                "are refused): vLLM's engine in this process (needs vllm installed, e.g. .venv-vllm "
                                "from `make setup-vllm`), or the servers given with --vllm-url."),
    vllm_url: Optional[list[str]] = typer.Option(None, "--vllm-url", help="With --backend vllm: base URL of a vLLM "
                                                 "OpenAI server started with --enable-prompt-embeds (repeat for "
                                                 "replicas: least-loaded first, health-checked; API key from "
                                                 "SOFTPROMPT_VLLM_API_KEY). None: vLLM runs in this process."),
    vllm_max_model_len: Optional[int] = typer.Option(None, help="In-process vLLM: context length to reserve KV cache for (default: the model's)."),
    vllm_eager: bool = typer.Option(False, help="In-process vLLM: skip torch.compile (starts in seconds instead of minutes on a small CPU; slower per token)."),
    vllm_tensor_parallel_size: int = typer.Option(1, help="In-process vLLM: shard the model over this many GPUs (tensor parallelism)."),
):
    """Serve every prompt in a folder from ONE frozen model over HTTP (FastAPI; docs at /docs).

    One server per prompts folder (it holds a lock on it); see README, "Limits and guarantees".
    With --backend vllm the HTTP API, prompt folder, model checks and hot swap are the same,
    and vLLM (in this process, or N replicas behind --vllm-url) runs the model."""
    from .families import UnsupportedError
    from .serve import TOKEN_ENV_VAR, EngineConfig, FolderLock, FolderLockedError, serve
    from .serve.backends import BACKENDS

    if not prompts.is_dir():
        _fail(f"prompt folder {prompts} does not exist; create it and put <task>.safetensors files in it")
    if backend not in BACKENDS:
        _fail(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if vllm_url and backend != "vllm":
        _fail("--vllm-url needs --backend vllm")
    if protect_reads and not (token or os.environ.get(TOKEN_ENV_VAR)):
        _fail(f"--protect-reads needs a token: give --token or set ${TOKEN_ENV_VAR}")
    try:
        config = EngineConfig(max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_queue=max_queue,
                              max_input_tokens=max_input_tokens, max_new_tokens_limit=max_new_tokens,
                              max_batch_tokens=max_batch_tokens, max_labels=max_labels,
                              max_label_tokens=max_label_tokens, max_template_tokens=max_template_tokens)
    except ValueError as e:
        _fail(str(e))
    try:
        FolderLock(prompts).acquire().release()  # fail before loading the model
        serve(model=model, prompts=prompts, host=host, port=port, token=token, config=config,
              protect_reads=protect_reads, device=_device(), max_inputs=max_inputs,
              max_body_bytes=max_body_bytes, max_upload_bytes=max_upload_bytes,
              max_concurrent_uploads=max_concurrent_uploads, max_concurrent_requests=max_concurrent_requests,
              backend=backend, vllm_urls=tuple(vllm_url or ()),
              vllm_max_model_len=vllm_max_model_len, vllm_eager=vllm_eager,
              vllm_tensor_parallel_size=vllm_tensor_parallel_size)
    except FolderLockedError as e:
        _fail(e.message)
    except UnsupportedError as e:  # the model's family cannot be served (families.CAPABILITIES)
        _fail(str(e))


# ----------------------------------------------------------------------------- models / tasks
@models_app.command("list")
def models_list():
    """Show the embedded models, whether installed and converted."""
    from .families.loading import list_models

    rows = [{"alias": r["alias"], "model": r["display_name"], "installed": r["installed"],
             "converted": r["converted"], "cache": str(r["cache_path"])} for r in list_models()]
    console.print(_results_table(rows, "embedded models"))


@models_app.command("capabilities")
def models_capabilities():
    """Show what each model family supports (methods, scoring, serving): the table the code checks."""
    from .families import FAMILIES, FAMILY_TITLES, capability_rows

    table = Table(title="model families: what each supports")
    table.add_column("capability")
    for f in FAMILIES.values():
        table.add_column(f"{f.name}\n{FAMILY_TITLES[f.name]}", justify="center")
    table.add_column("meaning")
    for r in capability_rows():
        table.add_row(*r.values())
    console.print(table)
    console.print("families: " + "; ".join(f"{f.name}: {f.examples}" for f in FAMILIES.values()))


@models_app.command("convert")
def models_convert(
    alias: str = typer.Argument("smollm2-135m"),
    force: bool = typer.Option(False, help="Convert again even if cached."),
):
    """Convert an embedded GGUF once into the safetensors cache (SOFTPROMPT_CACHE)."""
    from .families.loading import ModelNotAvailableError, convert_embedded

    try:
        path = convert_embedded(alias, force=force)
    except ModelNotAvailableError as e:
        _fail(str(e))
    console.print(f"{alias}: {path}")


@app.command()
def tasks():
    """List the built-in tasks."""
    from .data import BUILTIN_TASKS

    console.print("\n".join(sorted(BUILTIN_TASKS)))




# ----------------------------------------------------------------------------- compare / inspect
# (hard prompts vs soft prompts: one-command report; looking inside a trained prompt)
def _cmp_list(text: str, cast=str, what: str = "list") -> tuple:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    try:
        return tuple(cast(t) for t in items)
    except ValueError:
        _fail(f"--{what} {text!r}: expected comma-separated values, e.g. 1,5,20")


def _read_instructions(path: Optional[Path]) -> list[str]:
    if path is None:
        return []
    from .hard.instruction_search import read_instructions_file

    try:
        return read_instructions_file(path)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))


def _cmp_sizes(text: str) -> tuple:
    return tuple(0 if t.strip().lower() == "all" else int(t) for t in str(text).split(",") if t.strip())


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


@app.command()
def compare(
    ctx: typer.Context,
    task: Optional[str] = typer.Option(None, help="Built-in task (see `softprompt tasks`): classification or generation."),
    model: str = typer.Option("smollm2-135m", help=MODEL_HELP),
    out: Path = typer.Option(Path("reports/compare"), help="Report folder: report.md, report.html, PNGs, results.json."),
    train_file: Optional[Path] = typer.Option(None, help="Your training data (.csv/.tsv/.jsonl) instead of --task."),
    valid_file: Optional[Path] = typer.Option(None, help="Your validation data."),
    test_file: Optional[Path] = typer.Option(None, help="Your held-out data."),
    field: Optional[list[str]] = typer.Option(None, help="Template field = file column. Repeatable."),
    label_column: Optional[str] = typer.Option(None, help="Column holding the class label (default 'label')."),
    target_column: Optional[str] = typer.Option(None, help="Column holding the answer: makes your files a generation task (EM / F1)."),
    template: Optional[str] = typer.Option(None, help="Template with soft slot, e.g. '{soft:20} Text: {text}\\nLabel:' "
                                           "(default for your files: '{soft:20}Text: {text}\\nAnswer:', one line per --field)."),
    verbalizer: Optional[list[str]] = typer.Option(None, help="LABEL=WORD, one per label. Repeatable."),
    instruction: Optional[str] = typer.Option(None, help="Zero-shot instruction (default: the task's own; for your own files one "
                                              "built from the label words, e.g. 'Classify the text. Answer no or yes.')."),
    name: Optional[str] = typer.Option(None, help="Task name in the report title (default: your files' common name, e.g. sms)."),
    encoding: str = typer.Option("utf-8", help="Text encoding of your files, e.g. latin-1 or cp1252."),
    instructions_file: Optional[Path] = typer.Option(None, help="Instruction search (method search): your candidate "
                                                    "instructions, one per line (# comments)."),
    induce: int = typer.Option(3, help="Instruction search: instructions the frozen model writes from labelled examples."),
    methods: str = typer.Option("all", help="Comma list from: zero_shot,few_shot,knn,search,cot,soft,length,init,hybrid,ensemble,curve,transfer,"
                                "ptuning,prefix. 'all' = every method but ptuning and prefix (opt-in: they train "
                                "one prompt per seed each), e.g. 'all,ptuning,prefix'."),
    eval_task: Optional[str] = typer.Option(None, help="Transfer: also score the prompts on this built-in task's test split."),
    eval_label_map: Optional[list[str]] = typer.Option(None, help="Transfer: EVAL_LABEL=PROMPT_LABEL when the label names differ. Repeatable."),
    shots: Optional[int] = typer.Option(None, help="Few-shot: demonstrations per prompt (default: 4, or the number of classes "
                                        "when larger, so every class is shown; 0 skips few-shot)."),
    sampling: str = typer.Option("balanced", help="Few-shot: balanced | random demonstration sampling."),
    fewshot_seeds: str = typer.Option("0,1,2", help="Few-shot: sampling seeds."),
    fewshot_orders: int = typer.Option(2, help="Few-shot: orders of the demonstrations per seed."),
    cot_max_new_tokens: int = typer.Option(48, help="Chain-of-thought: tokens generated per answer."),
    cot_limit: Optional[int] = typer.Option(None, help="Chain-of-thought: score only the first N test examples (generation is slow)."),
    prompt_length: int = typer.Option(20, help="Soft tokens of the main prompt-tuning method and hybrids (the template's soft slot is resized to this)."),
    init: Optional[str] = typer.Option(None, help="Init of the main method: random | vocab | text | labels (default: text "
                                       "from the chosen hard prompt's instruction; labels without one; text for generation)."),
    seeds: str = typer.Option("0,1,2", help="Seeds of the main method (the ensemble uses one prompt per seed)."),
    sweep_seeds: str = typer.Option("0", help="Seeds of the length / init / hybrid sweeps."),
    lengths: str = typer.Option("1,5,20,100", help="Prompt lengths of the length sweep."),
    inits: str = typer.Option("random,vocab,text,labels", help="Inits of the init sweep."),
    positions: str = typer.Option("prefix,between,answer", help="Hybrid positions of the soft tokens."),
    epochs: int = typer.Option(15, help="Training epochs per prompt."),
    min_steps: int = typer.Option(60, help="At least this many training steps (small sets get more epochs)."),
    lr: float = typer.Option(0.3, help="Learning rate of the sweeps (length, init, hybrid, curve, ensemble members); "
                             "the one default of `train`, `compare` and `demo`."),
    lrs: str = typer.Option("0.03,0.1,0.3", help="Learning rates of the main prompt-tuning method (x --seeds); validation "
                            "data picks the best, and the whole grid counts as its training cost."),
    calibration: str = typer.Option("none,contextual,batch,pmi", help="Calibrations every rank-classified prompt is scored "
                                    "under (comma list); validation data picks one per prompt."),
    select_metric: str = typer.Option("macro_f1", help="Metric that chooses each family's best prompt on validation data: "
                                      "macro_f1 | balanced_accuracy | accuracy (a constant predictor can win accuracy)."),
    valid_fraction: float = typer.Option(0.25, help="Without validation data (--valid-file or a validation split): hold out "
                                         "this share of the training pool (stratified, at most --valid-limit) to choose on."),
    start_from_hard: bool = typer.Option(True, help="Soft prompts start from the hard prompt chosen on validation (its "
                                         "instruction as text init and hybrid text)."),
    chat: str = typer.Option("auto", help="Hand-written prompts in the model's chat format (from its tokenizer's chat "
                             "template), plain format as a second zero-shot row: auto (when the model has one and no "
                             "--template is given) | on | off."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for torch (default: torch's choice)."),
    batch_size: int = typer.Option(8),
    warmup_steps: int = typer.Option(10),
    optimizer: str = typer.Option("adamw", help="adamw | adafactor"),
    ptuning_encoder: str = typer.Option("lstm", help="P-tuning (--methods ptuning): prompt encoder, lstm | mlp."),
    encoder_lr: float = typer.Option(1e-3, help="Learning rate of P-tuning and of prefix tuning with --prefix-reparam mlp "
                                     "(an encoder's output moves several times lr per step)."),
    prefix_reparam: str = typer.Option("none", help="Prefix tuning (--methods prefix): none (key/values trained "
                                       "directly, at --lr) | mlp (through an MLP, at --encoder-lr)."),
    restarts: int = typer.Option(1, help="Train every soft prompt N times (seeds s, s+1000, ...) and keep the best fit "
                                 "to the validation data, or to the training data without any (N times the training)."),
    train_sizes: str = typer.Option("8,16,32,all", help="Learning curve: training-set sizes ('all' = the whole pool)."),
    curve_seeds: str = typer.Option("0", help="Learning curve: seeds per size."),
    train_limit: int = typer.Option(256, help="Training pool: a seeded sample of at most N examples (0 = all)."),
    valid_limit: int = typer.Option(64, help="Validation examples for best-prompt selection (0 = none)."),
    test_limit: int = typer.Option(1000, help="Test examples: a seeded sample of at most N, shared by all methods (0 = all)."),
    limit: Optional[int] = typer.Option(None, help="Smoke runs: cap train pool, validation and test at N examples each."),
    data_seed: int = typer.Option(0, help="Seed of the train/validation/test samples."),
    eval_batch_size: int = typer.Option(32),
    latency_examples: int = typer.Option(16, help="Test examples timed for latency per query."),
    device: Optional[str] = typer.Option(None, help="cpu | cuda (default: $SOFTPROMPT_DEVICE, else cuda when available)."),
    fresh: bool = typer.Option(False, help="Ignore finished runs in OUT/results.json and start over."),
    report_only: bool = typer.Option(False, help="Only re-render the report from OUT/results.json."),
    progress: bool = typer.Option(True, help="Show the progress bar."),
    publish: Optional[Path] = typer.Option(None, help="Also copy report.md and the PNGs (small; no HTML, JSON or prompts) here, e.g. docs/reports/raft."),
):
    """Run hand-written prompts (zero-shot, few-shot with random or nearest-neighbour demonstrations, a
    searched instruction, two-stage chain-of-thought; each under every calibration) and soft prompts (prompt tuning
    at several lengths and inits, hybrids, ensembles, learning curve, transfer; opt-in: P-tuning and
    prefix tuning) on the same splits with the same scorer, and write a report folder. Each family's best prompt is
    chosen on validation data; the report ends with a paired test of the two and a recommendation. Finished runs
    are kept in OUT/results.json and skipped when the command is run again."""
    from .apps.compare import DEFAULT_METHODS, RESULTS, CompareConfig, run_compare
    from .apps.report import load_results, metric_names, summarize, write_report

    if report_only:
        if not (out / RESULTS).exists():
            _fail(f"no {out / RESULTS} to render; run without --report-only first")
        res = load_results(out)
        if res.get("data", {}).get("test_gold"):  # the decision is a function of results.json: recompute it
            from .apps.compare.decision import from_results

            old = res.get("decision") or {}
            res["decision"] = from_results(res)
            for side in ("hard", "soft"):  # a saved prompt file stays valid while the same prompt is chosen
                new_c, old_c = (res["decision"] or {}).get(side), old.get(side) or {}
                if new_c and old_c.get("artifact") and (new_c["run"], new_c["calibration"]) == (
                        old_c.get("run"), old_c.get("calibration")):
                    new_c["artifact"] = old_c["artifact"]
        paths = write_report(res, out)
        console.print("wrote " + ", ".join(str(p) for p in paths.values()))
        _cmp_publish(out, publish)
        return
    chosen = tuple(dict.fromkeys(m for word in _cmp_list(methods, what="methods")
                                 for m in (DEFAULT_METHODS if word.lower() == "all" else (word,))))
    cap = (lambda n: n if limit is None else (min(n, limit) if n else limit))
    data = _load_task_data(task, train_file, test_file, valid_file, field, label_column, target_column, template,
                           verbalizer, None, None, encoding=encoding, name=name)
    notes = []
    if instruction is None and not task and data.task.kind == "classification":
        instruction = default_instruction(data.task)
        notes.append(f"Instruction built from the label words (no --instruction given): `{instruction}`")
    if shots is None:
        shots = max(4, len(data.task.labels))
    if chat == "auto" and template:
        chat = "off"  # your own --template wins
    _set_threads(threads)
    try:
        cfg = CompareConfig(
            methods=chosen, instruction=instruction, train_limit=cap(train_limit) or None,
            valid_limit=cap(valid_limit) if valid_limit else 0, test_limit=cap(test_limit) or None,
            data_seed=data_seed, shots=shots, sampling=sampling, fewshot_seeds=_cmp_list(fewshot_seeds, int, "fewshot-seeds"),
            fewshot_orders=fewshot_orders, cot_max_new_tokens=cot_max_new_tokens, cot_limit=cot_limit,
            prompt_length=prompt_length, init=init, seeds=_cmp_list(seeds, int, "seeds"),
            lrs=_cmp_list(lrs, float, "lrs"), calibrations=_cmp_list(calibration, what="calibration"),
            select_metric=select_metric, valid_fraction=valid_fraction, start_from_hard=start_from_hard, chat=chat,
            instructions=tuple(_read_instructions(instructions_file)), induce=induce,
            sweep_seeds=_cmp_list(sweep_seeds, int, "sweep-seeds"), lengths=_cmp_list(lengths, int, "lengths"),
            inits=_cmp_list(inits, what="inits"), positions=_cmp_list(positions, what="positions"), epochs=epochs,
            min_steps=min_steps, lr=lr, batch_size=batch_size, warmup_steps=warmup_steps, optimizer=optimizer,
            ptuning_encoder=ptuning_encoder, encoder_lr=encoder_lr, prefix_reparam=prefix_reparam, restarts=restarts,
            train_sizes=_cmp_sizes(train_sizes), curve_seeds=_cmp_list(curve_seeds, int, "curve-seeds"),
            eval_task=eval_task, eval_label_map=_parse_pairs(eval_label_map, "--eval-label-map"),
            eval_batch_size=eval_batch_size, latency_examples=latency_examples,
        )
    except ValueError as e:
        _fail(str(e))
    eval_data = None
    if eval_task and "transfer" in cfg.methods:
        eval_data = _load_task_data(eval_task, None, None, None, None, None, None, None, None, None, None)
    if fresh and (out / RESULTS).exists():
        (out / RESULTS).replace(out / (RESULTS + ".old"))
    m, tok = _load_model(model, device)
    try:
        results = run_compare(cfg, data, m, tok, out, eval_data=eval_data, model_name=model, progress=progress,
                              log=lambda s: err.print(s), command=_command_line(ctx), notes=notes)
    except ValueError as e:
        _fail(str(e))
    (_, first), (_, second) = metric_names(results)
    rows = [{"method": r["name"],
             first: f"{100 * r['primary']['mean']:.1f}" + (f" ± {100 * r['primary']['std']:.1f}" if r["primary"]["n"] > 1 else ""),
             second: f"{100 * r['secondary']['mean']:.1f}", "runs": r["n_done"]}
            for r in summarize(results) if r["primary"] and (r["in_table"] or r["section"] == "transfer")]
    console.print(_results_table(rows, f"{data.task.name}: test {first} % ({results['data']['test']} examples)"))
    dec = results.get("decision") or {}
    if dec.get("recommendation"):
        console.print(f"[bold]Recommendation:[/] {dec['recommendation']}", highlight=False)
    console.print(f"report: {out / 'report.md'}, {out / 'report.html'}; every number: {out / RESULTS}")
    _cmp_publish(out, publish)


def _cmp_publish(out: Path, dest: Optional[Path]) -> None:
    """Copy the markdown report and its PNGs (the parts small enough to commit) to ``dest``."""
    import shutil

    if dest is None:
        return
    dest.mkdir(parents=True, exist_ok=True)
    for f in [out / "report.md", *sorted(out.glob("*.png"))]:
        shutil.copy2(f, dest / f.name)
    console.print(f"published report.md and {len(list(out.glob('*.png')))} PNGs to {dest}")


def _cmp_default_model(identity_name: str) -> str:
    """The embedded alias (or local folder) a prompt was trained on, else the default model."""
    from .families.loading import DEFAULT_MODEL, EMBEDDED_MODELS

    for alias, spec in EMBEDDED_MODELS.items():
        if identity_name in (alias, spec.display_name):
            return alias
    return identity_name if Path(identity_name).is_dir() else DEFAULT_MODEL


@app.command("inspect")
def inspect_cmd(
    prompt: Path = typer.Argument(..., help="A prompt .safetensors."),
    model: Optional[str] = typer.Option(None, help=MODEL_HELP + " Default: the prompt's own base model."),
    top_k: int = typer.Option(5, help="Nearest vocabulary tokens per soft token."),
    json_out: bool = typer.Option(False, "--json", help="Print the full report as JSON (for machines)."),
    init_from: Optional[Path] = typer.Option(None, help="Measure drift from this prompt file instead of the recomputed init."),
):
    """For each soft token: nearest vocabulary tokens by cosine, norm relative to real token
    embeddings, and drift from the initialisation. Nearest tokens are a weak hint; see
    docs/inspecting-prompts.md."""
    from .apps.inspection import format_inspection, inspect_prompt
    from .core.prompts import PromptFileError, PromptMismatchError, SoftPrompt

    try:
        sp = SoftPrompt.load(prompt)
        init = SoftPrompt.load(init_from).embeddings if init_from else None
    except (PromptFileError, FileNotFoundError) as e:
        _fail(str(e))
    m, tok = _load_model(model or _cmp_default_model(sp.identity.name))
    try:
        report = inspect_prompt(sp, m, tok, k=top_k, init=init,
                                init_note=f"init taken from {init_from}" if init_from else None)
    except PromptMismatchError as e:
        _fail(str(e))
    if json_out:
        sys.stdout.write(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    else:
        sys.stdout.write(format_inspection(report) + "\n")


# ----------------------------------------------------------------------------- export / import (Hugging Face PEFT)
@app.command("export")
def export_cmd(
    prompt: Path = typer.Argument(..., help="A prompt .safetensors (from `softprompt train`)."),
    out_dir: Path = typer.Argument(..., help="Adapter folder to write (created if missing; its adapter files are replaced)."),
    format: str = typer.Option("peft", "--format", help="Output format. Only 'peft': a Hugging Face PEFT adapter folder."),
    model: Optional[str] = typer.Option(None, help=MODEL_HELP + " Default: the prompt's own base model."),
):
    """Write a prompt as a Hugging Face PEFT adapter that `PeftModel.from_pretrained(base_model, OUT_DIR)`
    loads and that scores like `softprompt eval`. Everything before the template's first input field
    (BOS, soft tokens, instruction text) is baked into the adapter's virtual tokens; OUT_DIR/README.md
    says which text to feed and how labels are scored. Prompts with soft tokens after an input field
    cannot be exported (PEFT puts all virtual tokens before the input)."""
    from .apps.interop.peft import PeftExportError, export_peft
    from .core.prompts import PromptFileError, PromptMismatchError, SoftPrompt

    if format.lower() != "peft":
        _fail(f"--format {format!r}: the only export format is 'peft' (a Hugging Face PEFT adapter folder)")
    try:
        sp = SoftPrompt.load(prompt)
    except (PromptFileError, FileNotFoundError) as e:
        _fail(str(e))
    m, tok = _load_model(model or _cmp_default_model(sp.identity.name))
    try:
        info = export_peft(sp, m, tok, out_dir)
    except (PeftExportError, PromptMismatchError) as e:
        _fail(str(e))
    console.print(f"wrote {out_dir} ({info.peft_type}, {info.num_virtual_tokens} virtual tokens = {info.baked!r})",
                  markup=False)
    console.print(f"PEFT input: {info.input_template!r} with the fields filled in, tokenized without special "
                  f"tokens; details in {out_dir / 'README.md'}", markup=False)


@app.command("import")
def import_cmd(
    adapter_dir: Path = typer.Argument(..., help="A PEFT prompt-tuning adapter folder (adapter_config.json + adapter_model.safetensors)."),
    out: Path = typer.Argument(..., help="The prompt file to write, e.g. prompt.safetensors."),
    template: Optional[str] = typer.Option(None, help="Template for the adapter's N virtual tokens; must start with {soft:N}, "
                                           "e.g. '{soft:20}Tweet: {text}\\nAnswer:'. Default: the original template "
                                           "(folders from `softprompt export`), else '{soft:N}{text}'."),
    verbalizer: Optional[list[str]] = typer.Option(None, help="LABEL=WORD, one per label (makes a classification prompt; "
                                                   "a space is put before WORD unless --template ends in a line "
                                                   "break or space). Repeatable."),
    model: Optional[str] = typer.Option(None, help=MODEL_HELP + " Default: the adapter's base model when it names one "
                                        "we know, else smollm2-135m."),
    task: Optional[str] = typer.Option(None, help="Task name stored in the prompt (default: the adapter's)."),
):
    """Turn a Hugging Face PEFT prompt-tuning adapter into a softprompt prompt file, to use with
    `softprompt eval`, `predict` and `serve`. The adapter's hidden size and layer count must match
    the model."""
    import warnings

    from rich.markup import escape

    from .apps.interop.peft import PeftImportError, PeftImportWarning, adapter_base_model, import_peft
    from .core.prompts import PromptMismatchError
    from .core.templates import TemplateError

    verb = _verbalizer(verbalizer, template or "{text}")  # the default templates end in text
    if model is None:
        named = adapter_base_model(adapter_dir)
        model = (named if named and Path(named).is_dir() else
                 _cmp_default_model(named.rsplit("/", 1)[-1]) if named else None) or "smollm2-135m"
    m, tok = _load_model(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PeftImportWarning)
        try:
            sp = import_peft(adapter_dir, m, tok, template=template, verbalizer=verb or None)
        except (PeftImportError, PromptMismatchError, TemplateError, FileNotFoundError) as e:
            _fail(str(e))
    for w in caught:
        err.print(f"[yellow]warning:[/] {escape(str(w.message))}", highlight=False)
    if task:
        sp.task = task
    size = sp.save(out)
    console.print(f"saved {out} ({size:,} bytes: {sp.n_tokens} soft tokens, template {sp.template!r}, "
                  f"{'labels ' + ', '.join(sp.labels) if sp.verbalizer else 'generation'})", markup=False)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
