"""``softprompt compare``: hard prompts vs soft prompts on the same splits, one report folder."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import (MODEL_HELP, _command_line, _fail, _load_model, _load_task_data, _parse_pairs, _results_table,
                     _set_threads, app, console, default_instruction, err)


def _cmp_list(text: str, cast=str, what: str = "list") -> tuple:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    try:
        return tuple(cast(t) for t in items)
    except ValueError:
        _fail(f"--{what} {text!r}: expected comma-separated values, e.g. 1,5,20")


def _read_instructions(path: Optional[Path]) -> list[str]:
    if path is None:
        return []
    from ..hard.instruction_search import read_instructions_file

    try:
        return read_instructions_file(path)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))


def _cmp_sizes(text: str) -> tuple:
    return tuple(0 if t.strip().lower() == "all" else int(t) for t in str(text).split(",") if t.strip())


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
    unlabeled_file: Optional[Path] = typer.Option(None, help="Unlabelled inputs (same columns as your data; labels in "
                                                  "it are ignored): the chosen hard prompt is distilled into a soft "
                                                  "prompt on them, a third option in the decision with its cost."),
    instructions_file: Optional[Path] = typer.Option(None, help="Instruction search (method search): your candidate "
                                                    "instructions, one per line (# comments)."),
    induce: int = typer.Option(3, help="Instruction search: instructions the frozen model writes from labelled examples."),
    budget: Optional[str] = typer.Option(None, help="Time budget for the whole command, e.g. 90s, 15m, 2h: this "
                                         "machine's speed is measured first, the methods that fit are chosen (the "
                                         "zero-shot, few-shot and main soft prompt first, cut down if even they do not "
                                         "fit; then the others) and the plan is printed before anything runs. "
                                         "Without it every method runs; the plan and its estimate are printed too."),
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
    init_from: Optional[Path] = typer.Option(None, help="A saved prompt (e.g. trained on a related task, or on a "
                                             "mixture: train --task a --task b): the init sweep also starts from it "
                                             "(transfer), a soft-side candidate like the others."),
    positions: str = typer.Option("prefix,between,answer", help="Hybrid positions of the soft tokens."),
    max_steps: Optional[int] = typer.Option(None, help="At most this many steps per trained prompt (default: the training "
                                            "recipe's); a run stops earlier once its validation score (or, without "
                                            "validation data, its training loss) stops improving."),
    epochs: Optional[int] = typer.Option(None, help="Instead of stopping on convergence: a fixed schedule of exactly N "
                                         "epochs per trained prompt."),
    min_steps: int = typer.Option(0, help="With --epochs: at least this many steps (small sets get more epochs)."),
    lr: Optional[float] = typer.Option(None, help="Learning rate (absolute) of the sweeps (length, init, hybrid, curve) and "
                                       "of prefix tuning (default: the training recipe's, as `train` and `demo` use: 0.003 for "
                                       "prompt tuning's residual MLP, 0.3 x the model's embedding-entry std for "
                                       "tensors trained directly)."),
    lrs: str = typer.Option("", help="Main prompt-tuning method: an explicit grid of absolute learning rates, e.g. "
                            "0.03,0.1,0.3 (one row per rate x --seeds; validation data picks; the whole grid counts as "
                            "training cost). Default: each seed's rate chosen on validation data by successive halving "
                            "over the recipe's 3 rates (0.001/0.003/0.01 for the residual MLP) and 2 seeds (the cost "
                            "of 2.75 runs)."),
    calibration: str = typer.Option("none,contextual,batch,pmi", help="Calibrations every rank-classified prompt is scored "
                                    "under (comma list); validation data picks one per prompt."),
    select_metric: str = typer.Option("macro_f1", help="Metric that chooses each family's best prompt on validation data: "
                                      "macro_f1 | balanced_accuracy | accuracy (a constant predictor can win accuracy)."),
    max_latency_ms: Optional[float] = typer.Option(None, help="Rule out prompts slower than this many ms per query "
                                                   "(batch 1, as measured) before choosing; with --report-only, "
                                                   "recompute the decision under it."),
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
                                 "to the validation data, or to the training data without any (N times the training; "
                                 "replaces the main method's learning-rate search: its runs train at --lr)."),
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
    import time

    started = time.time()
    from ..apps.compare import DEFAULT_METHODS, RESULTS, CompareConfig, run_compare
    from ..apps.report import load_results, metric_names, summarize, write_report

    if report_only:
        if not (out / RESULTS).exists():
            _fail(f"no {out / RESULTS} to render; run without --report-only first")
        res = load_results(out)
        if res.get("data", {}).get("test_gold"):  # the decision is a function of results.json: recompute it
            from ..apps.compare.decision import from_results

            old = res.get("decision") or {}
            if max_latency_ms is not None:
                res.setdefault("config", {})["max_latency_ms"] = max_latency_ms
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
    budget_s = None
    if budget is not None:
        from ..apps.compare.budget import parse_duration

        try:
            budget_s = parse_duration(budget)
        except ValueError as e:
            _fail(f"--{e}")
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
            select_metric=select_metric, max_latency_ms=max_latency_ms, valid_fraction=valid_fraction, start_from_hard=start_from_hard, chat=chat,
            instructions=tuple(_read_instructions(instructions_file)), induce=induce,
            sweep_seeds=_cmp_list(sweep_seeds, int, "sweep-seeds"), lengths=_cmp_list(lengths, int, "lengths"),
            inits=_cmp_list(inits, what="inits"), init_from=str(init_from) if init_from else None, positions=_cmp_list(positions, what="positions"), epochs=epochs,
            min_steps=min_steps, max_steps=max_steps, lr=lr, batch_size=batch_size, warmup_steps=warmup_steps, optimizer=optimizer,
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
    unlabeled = _unlabeled(unlabeled_file, field, data.task, encoding) if unlabeled_file else None
    m, tok = _load_model(model, device)
    try:
        results = run_compare(cfg, data, m, tok, out, unlabeled=unlabeled, eval_data=eval_data, model_name=model, progress=progress,
                              log=lambda s: err.print(s, highlight=False, markup=False), command=_command_line(ctx),
                              notes=notes, budget_s=budget_s, started=started)
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
    from ..core import atomic

    if dest is None:
        return
    dest.mkdir(parents=True, exist_ok=True)
    for f in [out / "report.md", *sorted(out.glob("*.png"))]:
        atomic.write_bytes(dest / f.name, f.read_bytes(), mode=0o644)
    console.print(f"published report.md and {len(list(out.glob('*.png')))} PNGs to {dest}")


def _unlabeled(path: Path, field, task, encoding: str) -> list:
    """``--unlabeled-file``'s inputs, read with the data's field mapping; labels dropped."""
    from ..apps.distill import unlabelled
    from ..data import DataError, load_examples

    try:
        fields = _parse_pairs(field, "--field") or {f: f for f in task.input_fields}
        return unlabelled(load_examples(path, fields=fields, encoding=encoding))
    except (DataError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
