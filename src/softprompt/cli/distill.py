"""``softprompt distill``: teach a hand-written prompt to a short soft prompt on unlabelled inputs
(the library side is ``apps/distill.py``)."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Optional

import typer

from .common import MODEL_HELP, _fail, _load_model, _load_task_data, _results_table, _set_threads, app, console


@app.command()
def distill(
    task: Optional[str] = typer.Option(None, help="Built-in task: its training inputs (labels withheld) are the "
                                       "unlabelled data unless --unlabeled-file is given; its test split is scored."),
    model: str = typer.Option("smollm2-135m", help=MODEL_HELP),
    out: Path = typer.Option(Path("runs/distill"), help="Output folder: prompt.safetensors, teacher_outputs.json, "
                             "distill.json."),
    unlabeled_file: Optional[Path] = typer.Option(None, help="Unlabelled inputs (.csv/.tsv/.jsonl, as train reads; "
                                                  "labels in it are ignored)."),
    test_file: Optional[Path] = typer.Option(None, help="Labelled held-out data: teacher and student scored on it."),
    field: Optional[list[str]] = typer.Option(None, help="Template field = file column, e.g. --field text=Tweet."),
    label_column: Optional[str] = typer.Option(None, help="Label column of --test-file / --demo-file (default 'label')."),
    template: Optional[str] = typer.Option(None, help="The task's template (its soft slots are ignored for the teacher)."),
    verbalizer: Optional[list[str]] = typer.Option(None, help="LABEL=WORD, one per label. Repeatable."),
    teacher: Optional[Path] = typer.Option(None, help="A saved prompt as the teacher, e.g. compare's "
                                           "chosen/hard_prompt.safetensors (its calibration is used)."),
    instruction: Optional[str] = typer.Option(None, help="The teacher's instruction (default: the task's)."),
    demos: int = typer.Option(0, help="The teacher is a few-shot prompt with this many balanced demonstrations "
                              "(labelled: from the task's training split or --demo-file; excluded from the inputs)."),
    demo_file: Optional[Path] = typer.Option(None, help="Labelled examples to draw --demos from (user files)."),
    calibration: str = typer.Option("contextual", help="The teacher's calibration when built here: none | contextual "
                                    "| batch (fit on the unlabelled inputs) | pmi."),
    tokens: int = typer.Option(20, min=1, help="The student's soft tokens (before the task's template), or its "
                               "key/value positions with --method prefix."),
    method: str = typer.Option("prompt", help="The student: prompt (soft tokens) | prefix (key/values at every layer, "
                               "started from those of the teacher's own instruction and demonstrations)."),
    temperature: float = typer.Option(1.0, help="Softens the teacher's distribution the student matches (> 1: softer)."),
    valid_fraction: float = typer.Option(0.2, help="Share of the inputs held back to measure agreement (chooses the "
                                         "step and the learning rate)."),
    max_steps: Optional[int] = typer.Option(None, help="At most this many training steps (default: the recipe's)."),
    search: bool = typer.Option(True, help="Choose the learning rate and seed by successive halving on agreement."),
    unlabeled_limit: Optional[int] = typer.Option(None, help="Use at most N unlabelled inputs (a seeded sample)."),
    test_limit: Optional[int] = typer.Option(None, help="Score at most N held-out examples."),
    seed: int = typer.Option(0),
    resume: bool = typer.Option(False, help="Continue from OUT's checkpoint (the teacher's outputs are reused anyway "
                                "when they match)."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for torch."),
):
    """Distil a hand-written prompt (zero-shot, few-shot, or a saved one) into a short soft prompt, from
    unlabelled inputs: the student learns the teacher's calibrated answers. Reports agreement, and
    with labelled test data both prompts' accuracy with a paired interval, tokens per query and latency."""
    from ..apps.distill import Teacher, compare_to_teacher, distil
    from ..core.atomic import write_json
    from ..hard.baselines import sample_demos

    if teacher is not None and (demos or instruction):
        _fail("--teacher is a saved prompt; --demos/--instruction build one instead: give one or the other")
    if not task and not unlabeled_file:
        _fail("give a built-in --task or your own --unlabeled-file (with --field, --template, --verbalizer)")
    if demos and not task and not demo_file:
        _fail("--demos needs labelled examples: a built-in --task or --demo-file")
    t, inputs, demo_pool, test = _distill_data(task, unlabeled_file, test_file, demo_file, field, label_column,
                                               template, verbalizer, instruction)
    chosen_demos = []
    if demos:
        if not demo_pool:
            _fail("--demos needs labelled examples: a built-in --task or --demo-file")
        try:
            chosen_demos = sample_demos(demo_pool, demos, seed=seed, labels=t.labels)
        except ValueError as e:
            _fail(str(e))
        used = {tuple(sorted(d.fields.items())) for d in chosen_demos}
        inputs = [ex for ex in inputs if tuple(sorted(ex.fields.items())) not in used]  # no demonstration is an input
    if unlabeled_limit and unlabeled_limit < len(inputs):
        inputs = random.Random(seed).sample(inputs, unlabeled_limit)
    if test_limit:
        test = test[:test_limit]
    _set_threads(threads)
    m, tok = _load_model(model)
    try:
        teach = (Teacher.from_artifact(teacher, m) if teacher is not None else
                 Teacher.from_text(m, tok, t, instruction=instruction, demos=chosen_demos, calibration=calibration,
                                   inputs=inputs))
        overrides = {"max_steps": max_steps} if max_steps else {}
        if method not in ("prompt", "prefix"):
            raise ValueError(f"--method must be prompt or prefix, got {method!r}")
        d = distil(m, tok, t, teach, inputs, n_tokens=tokens, method=method, temperature=temperature, valid_fraction=valid_fraction,
                   seed=seed, out_dir=out, search=search, resume=resume, **overrides)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    report = {"teacher": teach.to_dict(), "n_inputs": d.n_train + d.n_valid, "n_valid": d.n_valid,
              "agreement_valid": d.agreement_valid, "teacher_cached": d.teacher_cached,
              "train_s": round(d.result.wall_time_s, 1), "teacher_s": d.teacher_seconds,
              "stop_reason": d.result.stop_reason}
    console.print(f"teacher: {teach.description} ({'outputs reused' if d.teacher_cached else 'outputs computed'}); "
                  f"student: {tokens} soft tokens; validation agreement {d.agreement_valid:.3f} on {d.n_valid} inputs",
                  markup=False)
    if test:
        report["test"] = cmp = compare_to_teacher(m, tok, t, d, test)
        rows = []
        for who in ("teacher", "student"):
            r = {"prompt": who, "tokens/query": cmp[f"{who}_tokens_per_query"],
                 "ms/query batch 1": cmp[f"{who}_ms_batch1"], "ms/query batched": cmp[f"{who}_ms_batched"]}
            for k in ("accuracy", "macro_f1"):
                if who in cmp:
                    r[k] = cmp[who][k]
            rows.append(r)
        console.print(_results_table(rows, f"distillation: agreement with the teacher {cmp['agreement']:.3f} "
                                           f"on {cmp['n_test']} held-out examples"))
        diff = (cmp.get("difference") or {}).get("accuracy")
        if diff:
            console.print(f"student - teacher accuracy {100 * diff['difference']:+.1f} points "
                          f"[{100 * diff['low']:+.1f}, {100 * diff['high']:+.1f}] (paired bootstrap 95%)")
    write_json(out / "distill.json", report, indent=1)
    console.print(f"student saved to {out / 'prompt.safetensors'}")


def _distill_data(task, unlabeled_file, test_file, demo_file, field, label_column, template, verbalizer, instruction):
    """The task, the unlabelled inputs (labels dropped), the labelled demonstration pool and the
    labelled test examples, from a built-in task and/or user files."""
    from ..apps.distill import unlabelled
    from ..data import DataError, Task, TaskKind, load_examples
    from .common import _parse_pairs, _verbalizer, default_template

    try:
        if task:
            data = _load_task_data(task, None, None, None, None, None, None, template, verbalizer, instruction, None)
            t = data.task
            pool = list(data.splits.get("train", []))
            test = list(data.splits.get("test", []))
        else:
            cols = _parse_pairs(field, "--field") or {"text": "text"}
            tpl = template or default_template(list(cols))
            verb = _verbalizer(verbalizer, tpl)
            if not verb:
                _fail("distillation of your own files needs --verbalizer LABEL=WORD for every label")
            t = Task(name=unlabeled_file.stem, kind=TaskKind.CLASSIFICATION, template=tpl, verbalizer=verb,
                     instruction=instruction or "")
            pool, test = [], []
        fields = _parse_pairs(field, "--field") or {f: f for f in t.input_fields}
        labelled = dict(fields=fields, label_column=label_column or "label")
        inputs = unlabelled(load_examples(unlabeled_file, fields=fields)) if unlabeled_file else unlabelled(pool)
        if demo_file:
            pool = load_examples(demo_file, **labelled)
            t.check(pool, source=str(demo_file))
        if test_file:
            test = load_examples(test_file, **labelled)
            t.check(test, source=str(test_file))
    except (DataError, FileNotFoundError, ValueError, KeyError) as e:
        _fail(str(e))
    return t, inputs, pool, test
