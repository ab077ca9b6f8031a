"""Training and scoring commands: train, eval, predict, demo."""
from __future__ import annotations

import json
import os
import random
import shlex
from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer

from ..core import atomic
from .common import (CALIBRATION_HELP, EVAL_CALIBRATION_HELP, MODEL_HELP, _bank, _calibration, _command_line,
                     _device, _eval_calibrated, _evaluate, _fail, _load_model, _load_task_data, _results_table,
                     _row, _set_threads, _split, _verbalizer, app, console)
from .launch import _launch
from ..data.task import TaskKind


# ----------------------------------------------------------------------------- train
@app.command()
def train(
    ctx: typer.Context,
    task: Optional[list[str]] = typer.Option(None, help="Built-in task name (see `softprompt tasks`). Repeat it (--task a --task b) to train ONE prompt on the tasks' mixture, each example in its own task's template and verbalizer; saved as OUT/prompt.<task>.safetensors per task."),
    model: str = typer.Option("smollm2-135m", help=MODEL_HELP),
    out: Path = typer.Option(Path("runs/prompt"), help="Output folder: prompt.safetensors, checkpoint, history, metrics."),
    mix: str = typer.Option("proportional", help="Several --task: proportional (every example once per epoch) | temperature (task shares proportional to size^(1/--mix-temperature))."),
    mix_temperature: float = typer.Option(2.0, help="--mix temperature: 1 = proportional, large = equal shares."),
    mpt_rank: int = typer.Option(0, min=0, help="Several --task: 0 = one shared prompt; R >= 1 = multitask prompt tuning (MPT: the shared prompt times a rank-R matrix per task, saved multiplied out, plus OUT/prompt._shared.safetensors)."),
    train_file: Optional[Path] = typer.Option(None, help="Your training data (.csv/.tsv/.jsonl)."),
    valid_file: Optional[Path] = typer.Option(None, help="Your validation data (for best-prompt selection)."),
    test_file: Optional[Path] = typer.Option(None, help="Your held-out data (scored after training)."),
    field: Optional[list[str]] = typer.Option(None, help="Template field = file column, e.g. --field text='Tweet text'. Repeatable."),
    label_column: Optional[str] = typer.Option(None, help="Column holding the class label (default 'label')."),
    target_column: Optional[str] = typer.Option(None, help="Column holding the answer, for generation tasks."),
    template: Optional[str] = typer.Option(None, help="Template, e.g. '{soft:20} Tweet: {text}\\nAnswer:'."),
    verbalizer: Optional[list[str]] = typer.Option(None, help="LABEL=WORD, one per label. Repeatable."),
    instruction: Optional[str] = typer.Option(None, help="Zero-shot instruction (baseline; also 'text' init)."),
    init: str = typer.Option("labels", help="Init: random | vocab | text | labels | prompt:PATH (a saved prompt's soft tokens: transfer from another task; cut or cycled to the length)."),
    method: str = typer.Option("prompt", help="prompt: train the template's {soft:N} tokens; ptuning: the same tokens through an encoder network (P-tuning); prefix: also learned key/values at every layer (prefix tuning)."),
    prefix_tokens: int = typer.Option(10, help="Length of the learned key/value prefix (--method prefix)."),
    encoder: str = typer.Option("lstm", help="P-tuning's prompt encoder (--method ptuning): lstm (bidirectional LSTM + MLP) | mlp."),
    encoder_hidden: int = typer.Option(128, help="Width of the encoder network (--method ptuning, --reparam mlp)."),
    reparam: Optional[str] = typer.Option(None, help="none (train the tensors directly) | mlp (train them through an MLP whose output is added to their start; the saved prompt holds plain vectors). Default: the recipe's, mlp for --method prompt (residual reparameterisation; then --lr is the MLP's rate), none for prefix; none with --epochs or --restarts (a fixed schedule trains as configured)."),
    epochs: Optional[int] = typer.Option(None, help="Train exactly this many epochs (default: the recipe's, until validation, or the training loss without validation data, stops improving, at most --max-steps)."),
    max_steps: Optional[int] = typer.Option(None, help="At most this many steps (default: the recipe's, 120)."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate, absolute (default: the recipe's, chosen on the validation data by successive halving over 3 rates x 2 seeds: 0.001/0.003/0.01 for the residual MLP of --method prompt, 0.3/1.0/2.2 x the model's embedding-entry std for soft tokens trained directly (--reparam none), 3e-4/1e-3/3e-3 for --method ptuning and prefix --reparam mlp; without validation data the middle one)."),
    batch_size: int = typer.Option(8),
    optimizer: Optional[str] = typer.Option(None, help="adamw (default) | adafactor | adafactor-relative (steps scaled by each tensor's RMS, as Lester et al.)"),
    loss: str = typer.Option("rank", help="rank (cross-entropy over labels) | lm (log-prob of the gold words)"),
    warmup_steps: Optional[int] = typer.Option(None, help="Linear warmup steps (default 10)."),
    eval_every: Optional[int] = typer.Option(None, help="Validate every N steps (default: the recipe's 10; with --epochs, each epoch)."),
    patience: Optional[int] = typer.Option(None, help="Stop after N evaluations without improvement (default: the recipe's 6; none with --epochs)."),
    valid_split: str = typer.Option("validation", help="Split used for validation when it exists."),
    valid_limit: Optional[int] = typer.Option(200, help="Use at most N validation examples."),
    train_limit: Optional[int] = typer.Option(None, help="Use at most N training examples (a seeded sample)."),
    test_split: str = typer.Option("test"),
    test_limit: Optional[int] = typer.Option(None, help="Score at most N held-out examples."),
    seed: int = typer.Option(0),
    restarts: int = typer.Option(1, min=1, help="Train N times (seeds SEED, SEED+1000, ...) and keep the prompt that scores best on the validation data, or on the training data without any. Costs N times the training. Without it, a run that collapsed (one class for >= 90% of the validation examples, or a training loss at the uniform guess) is retrained from another seed automatically, at most twice."),
    resume: bool = typer.Option(False, help="Continue from OUT/checkpoint.safetensors (with --restarts: each run from its own OUT/restartN)."),
    eval_batch_size: int = typer.Option(32),
    encoding: str = typer.Option("utf-8", help="Text encoding of your files, e.g. latin-1 or cp1252."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for torch (default: torch's choice)."),
    processes: int = typer.Option(1, min=1, help="Train data-parallel on N processes of this host: re-runs this command under `accelerate launch --num_processes N` (one per GPU; on CPUs, gloo). Each process takes 1/N of every batch; the result equals a 1-process run to float rounding, and --resume works across process counts. Several hosts: run `accelerate launch -m softprompt train ...` yourself (README, 'Scaling out')."),
    context: str = typer.Option("auto", help="How a training batch runs: cached (the prompt's key/values once, then each input) | full (prompt + input in one pass per row) | packed (full, several examples per row under a block-diagonal mask: less padding) | auto (cached on CPUs, full with CUDA). The same numbers to float rounding."),
    compile: str = typer.Option("auto", help="torch.compile the frozen model's forward in the prompt + input training step: on | off | auto (on with CUDA; on CPUs eager was faster)."),
    shard_model: bool = typer.Option(False, help="Under several processes: shard the frozen model's decoder layers over them (FSDP2), for a model larger than one device. Prompt tuning on decoder models only."),
):
    """Train a soft prompt (the base model stays frozen), then score it on held-out data.

    Data-parallel: `--processes N`, or `accelerate launch --multi_gpu --num_processes N -m softprompt train ...`
    (accelerate's torchrun launcher; on a host without GPUs it starts N CPU processes with gloo) or
    `torchrun --nproc_per_node N -m softprompt train ...`."""
    from ..training.distributed import DataParallel, launched, process_device, shard_frozen_model
    from ..training.restarts import train_with_restarts
    from ..training.prompt import TrainConfig
    from ..training.recipe import DEFAULT_RECIPE
    from ..training.search import train_with_recipe

    tasks = list(task or [])
    task = tasks[0] if tasks else None
    if len(tasks) > 1 and (train_file or test_file or processes > 1 or restarts > 1 or epochs is not None):
        _fail("several --task train one prompt on their mixture: built-in tasks only, one process, the recipe's schedule")
    if processes > 1 and launched() and processes != int(os.environ["WORLD_SIZE"]):
        _fail(f"--processes {processes} under a launcher that started {os.environ['WORLD_SIZE']} processes; "
              "drop --processes (the launcher decides)")
    if processes > 1 and not launched():
        raise typer.Exit(_launch(processes, [w for w in shlex.split(_command_line(ctx))[1:]], "--processes"))
    if shard_model and not launched():
        _fail("--shard-model needs several processes: add --processes N or run under `accelerate launch`")

    # the recipe's (training/recipe.py) unless the user fixed them; --epochs or --restarts: the fixed-schedule path
    given = {k: v for k, v in dict(optimizer=optimizer, warmup_steps=warmup_steps, eval_every=eval_every,
                                   patience=patience, max_steps=max_steps).items() if v is not None}
    fixed_schedule = epochs is not None or restarts > 1
    recipe = DEFAULT_RECIPE
    overrides = dict(init=init, method=method, prefix_tokens=prefix_tokens, batch_size=batch_size, loss=loss,
                     eval_batch_size=eval_batch_size, encoder=encoder, encoder_hidden=encoder_hidden, reparam=reparam,
                     compile=compile, context=context, **given)
    if fixed_schedule:
        overrides.update(epochs=epochs or 20, max_steps=max_steps, eval_every=eval_every or 0, patience=patience)
    try:
        # TrainConfig checks its values (and reads any spelling of the method) before any data or model loads
        # (reparam: the recipe's default is resolved with the model's family, after it loads)
        cfg = TrainConfig(**{"optimizer": recipe.optimizer, "warmup_steps": recipe.warmup_steps,
                             **overrides, "reparam": reparam or "none"})
    except (ValueError, TypeError) as e:
        _fail(str(e))
    if len(tasks) > 1:  # every task's data is read by the mixture itself
        _set_threads(threads)
        m, tok = _load_model(model, process_device(_device()))
        return _train_mixture(m, tok, tasks, overrides, lr, seed, mix, mix_temperature, mpt_rank, train_limit, valid_limit,
                              test_limit, out, resume, eval_batch_size)
    data = _load_task_data(task, train_file, test_file, valid_file, field, label_column, target_column,
                           template, verbalizer, instruction, None, encoding=encoding)
    _set_threads(threads)
    train_ex = list(_split(data, "train"))
    if train_limit and train_limit < len(train_ex):
        train_ex = random.Random(seed).sample(train_ex, train_limit)
    valid_ex = data.splits.get(valid_split)
    if valid_ex and valid_limit:
        valid_ex = valid_ex[:valid_limit]
    device = process_device(_device())
    # a sharded model is loaded on the CPU, and only its shard moves to the device
    m, tok = _load_model(model, "cpu" if shard_model else device)
    if shard_model:
        try:
            if cfg.method != "prompt":
                raise ValueError(f"--shard-model supports --method prompt only, not {cfg.method!r}")
            shard_frozen_model(m, device)
        except ValueError as e:
            _fail(str(e))
    dp = DataParallel.current(m)
    try:
        if fixed_schedule:
            cfg = replace(cfg, reparam=reparam or "none")  # a fixed schedule trains as configured: directly
            if lr is None:  # an encoder's weights move its output far more per Adam step than a prompt's own values
                lr = recipe.default_lr(m, cfg.method, cfg.reparam)
            result = train_with_restarts(m, tok, data.task, train_ex, valid_ex, replace(cfg, lr=lr, seed=seed), restarts,
                                         out_dir=out, resume=resume, progress=dp.is_main)
        else:
            result = train_with_recipe(m, tok, data.task, train_ex, valid_ex, recipe=recipe, lr=lr, seed=seed,
                                       out_dir=out, resume=resume, progress=dp.is_main, **overrides)
    except ValueError as e:
        _fail(str(e))
    if not dp.is_main and not dp.lockstep:
        return  # the main process scores, saves and reports
    print_training_choices(result.prompt.training, result.stop_reason)
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
    atomic.write_json(out / "metrics.json", result.prompt.metrics, indent=1, mode=0o644)
    shape = f"{result.prompt.n_tokens} tokens x {result.prompt.hidden_size} floats"
    if result.prompt.kv is not None:
        shape += f" + {result.prompt.n_prefix}-position key/values at every layer"
    console.print(f"saved {out / 'prompt.safetensors'} ({size:,} bytes: {shape}, {result.prompt.n_params:,} parameters); "
                  f"{result.steps} steps in {result.wall_time_s:.0f}s, "
                  f"{result.tokens_per_s:.0f} training tokens/s, best step {result.best_step}")
    if rows:
        console.print(_results_table(rows, f"{data.task.name}: {test_split} ({len(test_ex)} examples)"))


def _train_mixture(m, tok, names, overrides, lr, seed, mix, mix_temperature, mpt_rank, train_limit, valid_limit, test_limit, out, resume,
                   eval_batch_size) -> None:
    """``train --task a --task b``: one prompt on the tasks' mixture (training/multitask.py), scored per task."""
    from ..data import load_task
    from ..training.mpt import train_mpt
    from ..training.multitask import train_multitask
    from ..training.recipe import DEFAULT_RECIPE

    datas = [load_task(n) for n in names]
    rng = random.Random(seed)
    train = [list(_split(d, "train")) for d in datas]
    train = [rng.sample(x, train_limit) if train_limit and train_limit < len(x) else x for x in train]
    valid = [list(d.splits.get("validation", []))[:valid_limit] for d in datas]
    cfg = DEFAULT_RECIPE.config(m, seed=seed, **overrides, **({"lr": lr} if lr is not None else {}))
    try:
        how = dict(sampling=mix, temperature=mix_temperature, out_dir=out, resume=resume)
        args = (m, tok, [d.task for d in datas], train, valid if all(valid) else None, cfg)
        result = train_mpt(*args, rank=mpt_rank, **how) if mpt_rank else train_multitask(*args, **how)
    except ValueError as e:
        _fail(str(e))
    console.print(f"training stopped: {STOP_REASONS.get(result.stop_reason, result.stop_reason)}; "
                  f"{result.steps} steps, best step {result.best_step}; saved "
                  + ", ".join(str(out / f"prompt.{n}.safetensors") for n in names))
    rows = []
    for d in datas:
        test_ex = d.splits.get("test")
        if test_ex:
            bank = _bank(m, tok)
            e = bank.add_prompt(result.prompt.prompts[d.task.name], d.task.name)
            rows.append(_row(d.task.name, _evaluate(bank, e, test_ex[:test_limit] if test_limit else test_ex,
                                                    d.task.kind, eval_batch_size, f"scoring {d.task.name}")))
    if rows:
        console.print(_results_table(rows, "the shared prompt on each task's test split"))


def print_training_choices(training: dict, stop_reason: str) -> None:
    """What the training chose and why: the learning-rate search, collapse restarts, --restarts runs."""
    for run in training.get("lr_search", []):
        scores = " -> ".join("/".join(f"{x:.3f}" for x in sc[:2]) for sc in run["scores"])
        console.print(f"lr {run['lr']:.4g} seed {run['seed']}: {run['steps']} steps, validation {scores}"
                      f"{'  <- chosen' if run['chosen'] else ''}")
    for a in training.get("collapse_restarts", []):
        if a["collapsed"]:
            console.print(f"seed {a['seed']} collapsed ({a['collapsed']}): "
                          f"{'kept, every retry collapsed too' if a['chosen'] else 'retrained from another seed'}")
    for run in training.get("restarts", []):
        fit = ", ".join(f"{k} {v:.4f}" for k, v in run.items() if isinstance(v, float))
        console.print(f"restart seed {run['seed']}: {run['judged_on']} {fit}{'  <- kept' if run['chosen'] else ''}")
    console.print(f"training stopped: {STOP_REASONS.get(stop_reason, stop_reason)}")


STOP_REASONS = {"max_steps": "reached --max-steps", "epochs": "reached --epochs",
                "validation_plateau": "the validation score stopped improving",
                "loss_plateau": "the training loss stopped improving"}


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
    context: str = typer.Option("auto", help="How a batch is scored, the same scores either way: cached (prompt once, "
                                "each input on top; fastest on CPUs) | full (prompt + input in one pass) | packed "
                                "(full, several examples per row) | auto (full when compiled, else cached)."),
    compile: str = typer.Option("auto", help="torch.compile the full and packed passes: on | off | auto (on with CUDA)."),
):
    """Score a saved prompt (and optionally the hard template) on a task's split."""
    from ..core.prompts import PromptFileError, PromptMismatchError, SoftPrompt
    from ..core.scoring import scoring_context
    from ..core.templates import Template

    try:
        scoring_context(context, compile, "cpu")  # bad --context / --compile fail before anything loads
    except ValueError as e:
        _fail(str(e))
    scoring = {"context": context, "compile": compile}
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
                         f"soft prompt ({prompt.name})", rows, results, scoring)
    if hard:
        if not bank.family.supports("rank_classification"):
            _fail("--hard needs a decoder model: an encoder has no zero-shot reading without a trained head")
        tmpl = Template(sp.template if sp else data.task.template).without_soft()
        e = bank.add("hard", tmpl, verbalizer=(sp.verbalizer if sp else data.task.verbalizer), kind=data.task.kind)
        _eval_calibrated(bank, e, examples, data.task.kind, batch_size, choices, None, "hard",
                         f"hard template: {tmpl.text!r}", rows, results, scoring)
    console.print(_results_table(rows, f"{data.task.name}: {split} ({len(examples)} examples)"))
    if json_out:
        atomic.write_json(json_out, results, indent=1, mode=0o644)


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
    from ..core.prompts import PromptFileError, PromptMismatchError, SoftPrompt
    from ..core.scoring import classify, generate
    from ..data import Example
    from ..core.templates import Template

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
    if sp.kind == TaskKind.CLASSIFICATION:
        res = classify(bank, entry, exs, calibration=_calibration(bank, entry, calibration, sp.calibration, exs))
        for obj, pred, probs in zip(inputs, res.predictions, res.probabilities.tolist()):
            console.print_json(json.dumps({"input": obj, "label": pred,
                                           "probabilities": dict(zip(res.labels, [round(p, 4) for p in probs]))}))
    else:
        res = generate(bank, entry, exs, max_new_tokens=max_new_tokens)
        for obj, t in zip(inputs, res.texts):
            console.print_json(json.dumps({"input": obj, "output": t}))


# ----------------------------------------------------------------------------- demo
DEMO_VALID = 32  # training messages held out (stratified) to validate the demo's soft prompt
DEMO_MAX_STEPS = 100  # the demo's step budget: the whole demo stays within a few minutes on 2 cores


@app.command()
def demo(
    model: str = typer.Option("smollm2-135m", help=MODEL_HELP),
    out: Path = typer.Option(Path("runs/demo"), help="Where the trained prompt is saved."),
    max_steps: int = typer.Option(DEMO_MAX_STEPS, help="At most this many training steps (the recipe stops earlier once the "
                                  "validation score stops improving)."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate, absolute (default: the training recipe's, as train "
                                       "and compare use: 0.003 for the residual MLP the soft tokens train through)."),
    seed: int = typer.Option(0),
):
    """The quickstart: on the bundled demo set (hand-written customer messages, complaint vs praise),
    score a zero-shot instruction as written, the best hard prompt found by instruction search
    (calibrated, chosen on the training messages only), and a trained soft prompt, on held-out
    messages; save the soft prompt."""
    from ..hard.baselines import zero_shot_template
    from ..core.bank import PromptBank
    from ..hard.instruction_search import search_instructions
    from ..data import load_task
    from ..data.splits import holdout_split
    from ..training.search import train_with_recipe

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
    # the training recipe (training/recipe.py) with a demo's step budget; 32 held-out training messages validate it
    fit_on, valid = holdout_split(train, task.labels, DEMO_VALID / len(train), DEMO_VALID, seed)
    result = train_with_recipe(m, tok, task, fit_on, valid, lr=lr, seed=seed, search=False, out_dir=out,
                               max_steps=max_steps, warmup_steps=5)
    print_training_choices(result.prompt.training, result.stop_reason)
    size = result.prompt.save(out / "prompt.safetensors")
    e = bank.add_prompt(result.prompt, "soft")
    metrics = _evaluate(bank, e, test, task.kind, 32, "soft prompt")
    rows.append(_row("soft prompt (trained)", metrics, {"trained params": result.prompt.embeddings.numel(), "artifact bytes": size}))
    console.print(_results_table(rows, f"demo: {len(fit_on)} train + {len(valid)} validation / {len(test)} held-out messages"))
    console.print(f"searched instruction ({len(found.candidates)} candidates, {found.seconds:.0f}s): {found.best!r}",
                  markup=False)
    console.print(f"prompt saved to {out / 'prompt.safetensors'}; try:\n  softprompt predict {out / 'prompt.safetensors'} "
                  "--text 'My parcel arrived crushed and nobody answers my emails.'")
    console.print("a full comparison with confidence intervals and a recommendation: softprompt compare --task demo")

