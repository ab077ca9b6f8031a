"""The plan of a comparison: one planner per method, in a registry.

A planner is a function ``(comparison, plan) -> list[Row]`` registered with
``@planner("name")``; it adds its runs to the comparison (:func:`add`, :func:`soft_run`,
:func:`hard_run`) and returns its report rows.  :func:`plan` calls the planners of the
comparison's methods in :data:`~.config.PLAN_ORDER`.  **A new method** is a name in
``config.ALL_METHODS`` and ``PLAN_ORDER`` and one planner here (or in a module the runner
imports, as ``hard_runs`` does); a new kind of run also registers its ``@executor(kind)``.

The imports only go one way (``A <- B``: B imports A)::

    config <- templates <- planners <- hard_runs <- runner <- __init__
                              ^                        |
                              +------------------------+

The runner imports ``planners`` (for :func:`plan` and :data:`EXECUTORS`) and ``hard_runs``
(whose planners and executors register themselves on import), and calls :func:`plan` with
itself; a planner receives the comparison as an argument, so nothing here imports the runner.
"""
from __future__ import annotations

from pathlib import Path

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ...hard import baselines as B
from ...core.templates import Template
from ...training.recipe import DEFAULT_RECIPE
from ...core.prompts import TRANSFER_PREFIX
from ...training.search import SEARCH_LRS, rung_steps
from .config import (
    CLASSIFICATION_ONLY,
    ENCODER_HIDDEN,
    FAMILY_EN,
    FAMILY_HY,
    FAMILY_PE,
    FAMILY_PT,
    FAMILY_TR,
    PLAN_ORDER,
    Row,
    Run,
    fingerprint,
)
from .templates import few_shot_answer_template, hybrid_template, with_soft_length

__all__ = ["EXECUTORS", "PLANNERS", "Plan", "add", "executor", "hard_run", "plan", "planner", "recipe_lr", "schedule",
           "search_runs", "soft_run"]



@dataclass(frozen=True)
class Planner:
    fn: Callable[[Any, "Plan"], list[Row]]
    when: tuple[str, ...]  # the methods that need it (the main prompt-tuning runs serve three)


PLANNERS: dict[str, Planner] = {}
"""Method name -> its planner (``@planner``)."""
EXECUTORS: dict[str, Callable[[Any, Run], dict[str, Any]]] = {}
"""Run kind -> ``fn(comparison, run) -> record``, for kinds the runner does not execute itself."""


def planner(name: str, *, when: tuple[str, ...] | None = None):
    """Register ``fn(comparison, plan) -> rows`` as the planner of method ``name``; it is
    called when the comparison runs any method of ``when`` (default: ``name``)."""
    def register(fn):
        if name in PLANNERS:
            raise ValueError(f"method {name!r} has a planner already")
        PLANNERS[name] = Planner(fn, when or (name,))
        return fn
    return register


def executor(kind: str):
    """Register ``fn(comparison, run) -> record`` as the executor of runs of ``kind``."""
    def register(fn):
        EXECUTORS[kind] = fn
        return fn
    return register


def _tokens(n: int, word: str = "token") -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


# ----------------------------------------------------------------------------- the plan's shared state
@dataclass
class Plan:
    """What the planners of one plan share: the methods, the chat formatter, and the main
    prompt-tuning runs (trained once, reused by the length, init, curve, ensemble and transfer rows)."""

    comp: Any
    methods: set[str]
    chat: Callable[[str], tuple[str, dict[str, str]]] | None
    main_tpl: str
    main_init: str
    main_label: str
    best_of: str
    main: list[str] = field(default_factory=list)

    def main_runs(self, lr: float | None = None) -> list[str]:
        """The main prompt-tuning runs, one per seed: at ``lr`` (a rate of the explicit ``lrs`` grid;
        default its first), or without a grid with the rate chosen on validation data per seed."""
        comp, cfg = self.comp, self.comp.cfg
        lr = lr if lr is not None else (cfg.lrs[0] if cfg.lrs else None)
        at = "" if lr is None or len(cfg.lrs) < 2 or not comp.valid else f", lr {lr:g}"
        auto = "auto" if comp.valid and cfg.restarts == 1 else None  # --restarts: its own seed choice, no search
        return [soft_run(comp, self.main_tpl, self.main_init, s, label=f"{self.main_label}{at}, seed {s}", tag="main",
                         lr=auto if lr is None else lr, grid=lr is not None) for s in cfg.seeds]


def start_instruction(comp) -> str:
    """The instruction soft prompts start from: the chosen hard prompt's (``start_from_hard``),
    else the comparison's own."""
    if comp.cfg.start_from_hard and comp.start and comp.start.get("instruction") is not None:
        return comp.start["instruction"]
    return comp.instruction


def main_init(comp) -> str:
    """The main method's init: the user's, else text (from the chosen hard prompt's instruction)
    when starting from the hard prompt, else label words (text for generation tasks)."""
    if comp.cfg.init is not None:
        return comp.cfg.init
    if comp.generative:
        return "text"
    return "text" if comp.cfg.start_from_hard and start_instruction(comp) else "labels"


def plan(comp) -> list[Row]:
    """Every planner of the comparison's methods, in ``PLAN_ORDER``; returns the report rows
    (the runs are in ``comp.runs``)."""
    cfg, task = comp.cfg, comp.task
    missing = [m for m in PLAN_ORDER if m not in PLANNERS]
    if missing:  # pragma: no cover - a planner module was not imported (the runner imports them all)
        raise RuntimeError(f"no planner registered for {missing}")
    methods = set(cfg.methods)
    if comp.generative:
        skipped = sorted(methods & set(CLASSIFICATION_ONLY))
        if skipped:
            comp.log(f"{', '.join(skipped)} skipped: classification only ({task.name!r} is a generation task)")
        methods -= set(CLASSIFICATION_ONLY)
    init = main_init(comp)
    best_of = f", best of {cfg.restarts} runs" if cfg.restarts > 1 else ""
    lr_note = ", lr chosen on validation" if not cfg.lrs and comp.valid and cfg.restarts == 1 else ""
    init_name = ("text init from the chosen hard prompt" if init == "text" and comp.start and cfg.init is None
                 else f"{init} init")
    ctx = Plan(comp, methods, comp._chat_format if comp.chat else None,
               main_tpl=with_soft_length(task.template, cfg.prompt_length), main_init=init,
               main_label=f"prompt tuning ({_tokens(cfg.prompt_length)}, {init_name}{lr_note}{best_of})", best_of=best_of)
    rows: list[Row] = []
    for name in PLAN_ORDER:
        entry = PLANNERS[name]
        if methods & set(entry.when):
            rows += entry.fn(comp, ctx)
            for run in comp.runs.values():  # a run shared by several methods belongs to the first that planned it
                run.method = run.method or name
    return rows


# ----------------------------------------------------------------------------- adding runs
def add(comp, run: Run) -> str:
    """Add ``run`` to the comparison's plan (a run planned twice is kept once); returns its id."""
    comp.runs.setdefault(run.id, run)
    return run.id


def schedule(cfg, n: int) -> tuple[int, int, int | None]:
    """``(steps, eval_every, patience)`` of a run on ``n`` examples: the recipe's (at most
    ``max_steps``, validating at least 4 times so each rung of the search has a score, stopping on
    convergence), or with ``epochs`` a fixed schedule (at least ``min_steps``, no early stop)."""
    if cfg.epochs:
        steps = max(cfg.epochs, math.ceil(cfg.min_steps / math.ceil(n / cfg.batch_size))) * math.ceil(n / cfg.batch_size)
        steps = min(steps, cfg.max_steps or steps)
        return steps, math.ceil(steps / cfg.epochs), None
    steps = cfg.max_steps or DEFAULT_RECIPE.max_steps
    return steps, max(1, min(DEFAULT_RECIPE.eval_every, steps // 4)), DEFAULT_RECIPE.patience


def recipe_lr(comp, method: dict[str, Any] | None = None) -> float:
    """The recipe's absolute rate for the comparison's model and a run's method (prompt tuning
    through the residual MLP, or a ``method`` dict's; 6 significant digits, so that a spec planned
    on another device still matches)."""
    m = method or {}
    return float(f"{DEFAULT_RECIPE.default_lr(comp.model, m.get('method', 'prompt'), m.get('reparam')):.6g}")


def _method_args(method: dict[str, Any] | None) -> dict[str, Any]:
    m = method or {}
    return {"method": m.get("method", "prompt"), "reparam": m.get("reparam")}


def search_runs(steps: int, n_candidates: int = len(SEARCH_LRS) * 2) -> float:
    """What a successive-halving search costs, in full runs of ``steps`` (six candidates: 2.75)."""
    done, total = 0, 0
    for until, k in rung_steps(steps, n_candidates):
        total, done = total + (until - done) * k, until
    return total / steps


def soft_run(comp, template: str, init: str, seed: int, *, n_train: int = 0, label: str, tag: str,
             method: dict[str, Any] | None = None, lr: float | str | None = None, grid: bool = False) -> str:
    """Plan one prompt training with the recipe (``search.train_with_recipe``).  ``lr``: absolute,
    ``"auto"`` (chosen on validation data by successive halving), or None: ``cfg.lr``, else the
    recipe's.  ``grid``: a rate of the explicit ``lrs`` grid, named in the id.  ``method``:
    TrainConfig fields of P-tuning / prefix tuning."""
    cfg = comp.cfg
    train = comp._train_subset(n_train, seed)
    steps, eval_every, patience = schedule(cfg, len(train))
    lr = lr if lr is not None else (cfg.lr if cfg.lr is not None else recipe_lr(comp, method))
    init_text = start_instruction(comp) or B.hard_template(comp.task.template).render_text({})
    spec = {
        "kind": "soft", "template": template, "init": init, "init_text": init_text if init == "text" else None,
        "seed": seed, "n_train": len(train), "train_fp": fingerprint(train), "valid_fp": comp.fp["valid"],
        "test_fp": comp.fp["test"], "model": comp.fp["model"], "max_steps": steps, "lr": lr,
        "batch_size": cfg.batch_size, "warmup_steps": cfg.warmup_steps, "optimizer": cfg.optimizer,
        "verbalizer": comp.task.verbalizer, "eval_every": eval_every, "patience": patience,
    }
    if lr == "auto":
        spec["search"] = {"lrs": list(DEFAULT_RECIPE.search_lrs(comp.model, **_method_args(method))),
                          "seeds": cfg.search_seeds}
    if comp.generative:
        spec["max_new_tokens"] = cfg.max_new_tokens
    else:
        spec["calibrations"] = list(cfg.calibrations)
    spec.update(method or {})
    n_soft = (method or {}).get("prefix_tokens") or Template(template).n_soft
    run_id = f"soft/{tag}/len{n_soft}/{init}/n{len(train)}/seed{seed}" + (f"/lr{lr:g}" if grid else "")
    restarts = cfg.restarts
    if restarts > 1:  # only then in the spec and id
        spec["restarts"] = restarts
        run_id += f"/best-of-{restarts}"
    n_valid = (steps // eval_every) * len(comp.valid) if comp.valid else 0
    runs = search_runs(steps, len(SEARCH_LRS) * cfg.search_seeds) if lr == "auto" else 1.0
    cost = ((steps * cfg.batch_size * 3 + n_valid) * runs * restarts + len(comp.test)
            + 3 * cfg.latency_examples)
    return add(comp, Run(run_id, "soft", label, spec, cost))


def _eval_verbalizer(comp) -> dict[str, str]:
    """The eval task's own label words, keyed by (mapped) prompt labels in prompt-label order."""
    et = comp.eval_data.task
    words = {comp.cfg.eval_label_map.get(lab, lab): w for lab, w in (et.verbalizer or {}).items()}
    if set(words) != set(comp.task.labels):
        return dict(comp.task.verbalizer or {})
    return {lab: words[lab] for lab in comp.task.labels}


def hard_run(comp, run_id: str, template: str, label: str, *, on_eval: bool = False, extra: dict | None = None,
             verbalizer: dict | None = None) -> str:
    """Plan the scoring of one hand-written prompt (on the transfer task's test set with ``on_eval``)."""
    test = comp.eval_test if on_eval else comp.test
    verbalizer = verbalizer or (_eval_verbalizer(comp) if on_eval else comp.task.verbalizer)
    spec = {"kind": "hard", "template": template, "verbalizer": verbalizer, "test_fp": fingerprint(test),
            "model": comp.fp["model"], "on_eval": on_eval, **(extra or {})}
    if comp.generative:
        spec["max_new_tokens"] = comp.cfg.max_new_tokens
    elif not on_eval:  # scored under each calibration on validation and test (variants.py)
        spec.update({"calibrations": list(comp.cfg.calibrations), "valid_fp": comp.fp["valid"],
                     "instruction": spec.get("instruction", comp.instruction)})
    return add(comp, Run(run_id, "hard", label, spec, len(test) + 2 * comp.cfg.latency_examples))


# ----------------------------------------------------------------------------- hand-written prompts
@planner("zero_shot")
def plan_zero_shot(comp, p: Plan) -> list[Row]:
    zs = B.zero_shot_template(comp.task, comp.instruction)
    rows = []
    if p.chat:
        tpl, verb = p.chat(zs)
        rid = hard_run(comp, "zero_shot/chat", tpl, "zero-shot instruction (chat format)", verbalizer=verb)
        rows.append(Row("zero-shot instruction (chat format)", FAMILY_PE, "main", [rid]))
    name = "zero-shot instruction" + (" (plain format)" if p.chat else "")
    rows.append(Row(name, FAMILY_PE, "main", [hard_run(comp, "zero_shot", zs, name)]))
    return rows


@planner("few_shot")
def plan_few_shot(comp, p: Plan) -> list[Row]:
    cfg, task = comp.cfg, comp.task
    if not comp.generative and 0 < cfg.shots < len(task.labels):
        comp.log(f"few-shot: k={cfg.shots} demonstrations cannot show all {len(task.labels)} classes; "
                 f"consider --shots {len(task.labels)} or more")
    if cfg.shots <= 0:
        return []
    if cfg.shots > len(comp.demo_pool):
        raise ValueError(f"{cfg.shots} demonstrations requested but the pool has {len(comp.demo_pool)}")
    sampling = "random" if comp.generative else cfg.sampling
    rows = []
    for fmt in (("chat", "plain") if p.chat else (None,)):
        ids = []
        tag, name = (f"/{fmt}", f", {fmt} format") if fmt == "chat" else ("", ", plain format" if fmt else "")
        for s in cfg.fewshot_seeds:
            demos = B.sample_demos(comp.demo_pool, cfg.shots, sampling=sampling, seed=s, labels=task.labels)
            for o in range(cfg.fewshot_orders):
                ordered = B.order_demos(demos, o, seed=s)
                tpl = (few_shot_answer_template(task, ordered, comp.instruction) if comp.generative
                       else B.few_shot_template(task, ordered, comp.instruction))
                verb = None
                if fmt == "chat":
                    tpl, verb = p.chat(tpl)
                ids.append(hard_run(
                    comp, f"few_shot/k{cfg.shots}/{sampling}/seed{s}/order{o}{tag}", tpl,
                    f"few-shot k={cfg.shots} ({sampling}), seed {s}, order {o}{name}",
                    extra={"shots": cfg.shots, "sampling": sampling, "seed": s, "order": o}, verbalizer=verb))
        rows.append(Row(f"few-shot k={cfg.shots} ({sampling}, {_tokens(len(cfg.fewshot_seeds), 'seed')} x "
                        f"{_tokens(cfg.fewshot_orders, 'order')}{name})", FAMILY_PE, "main", ids))
    return rows


# ----------------------------------------------------------------------------- trained prompts
@planner("soft", when=("soft", "ensemble", "transfer"))
def plan_soft(comp, p: Plan) -> list[Row]:
    """The main prompt-tuning runs (one per seed); with an explicit ``lrs`` grid and validation
    data to pick with, one row per rate.  Their rows only when ``soft`` itself is a method."""
    cfg = comp.cfg
    lrs = tuple(dict.fromkeys(cfg.lrs))[: None if comp.valid else 1] or (None,)  # no validation: nothing to pick with
    p.main = p.main_runs(lrs[0])
    rows = []
    if "soft" in p.methods:
        for lr in lrs:
            ids = p.main if lr == lrs[0] else p.main_runs(lr)
            name = p.main_label + (f", lr {lr:g}" if len(lrs) > 1 else "")
            rows.append(Row(name, FAMILY_PT, "main", ids, x=cfg.prompt_length))
    return rows


@planner("ptuning")
def plan_ptuning(comp, p: Plan) -> list[Row]:
    cfg = comp.cfg
    enc = cfg.ptuning_encoder
    name = f"P-tuning ({_tokens(cfg.prompt_length, 'soft token')}, {enc} encoder{p.best_of})"
    spec = {"method": "ptuning", "encoder": enc, "encoder_hidden": ENCODER_HIDDEN}
    ids = [soft_run(comp, p.main_tpl, p.main_init, s, label=f"{name}, seed {s}", tag=f"ptuning-{enc}",
                    method=spec, lr=cfg.encoder_lr) for s in cfg.seeds]
    return [Row(name, FAMILY_PT, "main", ids, x=cfg.prompt_length)]


@planner("prefix")
def plan_prefix(comp, p: Plan) -> list[Row]:
    cfg = comp.cfg
    if not comp.family.supports("prefix"):
        comp.log(f"prefix skipped: {comp.unsupported('prefix')}")
        return []
    rp = cfg.prefix_reparam
    name = (f"prefix tuning ({cfg.prompt_length} key/value positions per layer"
            + (", MLP reparameterisation" if rp == "mlp" else "") + p.best_of + ")")
    spec = {"method": "prefix", "prefix_tokens": cfg.prompt_length, "reparam": rp}
    if rp != "none":
        spec["encoder_hidden"] = ENCODER_HIDDEN
    tpl = Template(comp.task.template).without_soft().text
    ids = [soft_run(comp, tpl, p.main_init, s, label=f"{name}, seed {s}",
                    tag="prefix" if rp == "none" else f"prefix-{rp}", method=spec,
                    lr=None if rp == "none" else cfg.encoder_lr) for s in cfg.seeds]
    return [Row(name, FAMILY_PT, "main", ids, x=cfg.prompt_length)]


@planner("length")
def plan_length(comp, p: Plan) -> list[Row]:
    cfg, rows = comp.cfg, []
    for n in cfg.lengths:
        if n == cfg.prompt_length:
            rows.append(Row(p.main_label, FAMILY_PT, "length", p.main or p.main_runs(), x=n,
                            in_table="soft" not in p.methods))
            continue
        ids = [soft_run(comp, with_soft_length(comp.task.template, n), p.main_init, s,
                        label=f"prompt tuning ({_tokens(n)}), seed {s}", tag="length") for s in cfg.sweep_seeds]
        rows.append(Row(f"prompt tuning ({_tokens(n)}, {p.main_init} init)", FAMILY_PT, "length", ids, x=n))
    return rows


@planner("init")
def plan_init(comp, p: Plan) -> list[Row]:
    cfg, rows = comp.cfg, []
    transfer = (TRANSFER_PREFIX + cfg.init_from,) if cfg.init_from else ()
    for init in (*cfg.inits, *transfer):
        if comp.generative and init == "labels":
            comp.log("init 'labels' skipped: a generation task has no label words")
            continue
        if init == p.main_init:
            rows.append(Row(p.main_label, FAMILY_PT, "init", p.main or p.main_runs(), x=init,
                            in_table="soft" not in p.methods and "length" not in p.methods))
            continue
        what = f"start from {Path(init[len(TRANSFER_PREFIX):]).name}" if init in transfer else f"{init} init"
        ids = [soft_run(comp, p.main_tpl, init, s, label=f"prompt tuning ({what}), seed {s}", tag="init")
               for s in cfg.sweep_seeds]
        rows.append(Row(f"prompt tuning ({_tokens(cfg.prompt_length)}, {what})", FAMILY_PT, "init", ids, x=init))
    return rows


HYBRID_NAMES = {"prefix": "before the instruction", "between": "after the first input field",
                "answer": "right before the answer"}


@planner("hybrid")
def plan_hybrid(comp, p: Plan) -> list[Row]:
    cfg, rows = comp.cfg, []
    for pos in cfg.positions:
        tpl = hybrid_template(comp.task, cfg.prompt_length, pos, start_instruction(comp))
        ids = [soft_run(comp, tpl, p.main_init, s, label=f"hybrid ({pos}), seed {s}", tag=f"hybrid-{pos}")
               for s in cfg.sweep_seeds]
        rows.append(Row(f"hybrid: instruction + {_tokens(cfg.prompt_length, 'soft token')} {HYBRID_NAMES[pos]}",
                        FAMILY_HY, "position", ids, x=pos))
    return rows


@planner("ensemble")
def plan_ensemble(comp, p: Plan) -> list[Row]:
    cfg, main = comp.cfg, p.main
    if not comp.family.supports("ensemble"):
        comp.log(f"ensemble skipped: {comp.unsupported('ensemble')}")
        return []
    if len(main) < 2:
        comp.log("ensemble skipped: it needs at least 2 seeds (--seeds)")
        return []
    spec = {"kind": "ensemble", "members": [comp.runs[r].spec for r in main], "test_fp": comp.fp["test"],
            "model": comp.fp["model"]}
    rid = add(comp, Run(f"ensemble/{len(main)}x{cfg.prompt_length}", "ensemble", f"ensemble of {len(main)} prompts",
                        spec, len(main) * (len(comp.test) + 2 * cfg.latency_examples), deps=list(main)))
    return [Row(f"ensemble of {len(main)} prompts (mean probability)", FAMILY_EN, "ensemble", [rid], variant="mean"),
            Row(f"ensemble of {len(main)} prompts (majority vote)", FAMILY_EN, "ensemble", [rid], variant="vote")]


@planner("curve")
def plan_curve(comp, p: Plan) -> list[Row]:
    cfg, rows = comp.cfg, []
    for n in cfg.train_sizes:
        if n <= 0 or n >= len(comp.pool):
            rows.append(Row(p.main_label, FAMILY_PT, "curve", p.main or p.main_runs(), x=len(comp.pool), in_table=False))
            continue
        ids = [soft_run(comp, p.main_tpl, p.main_init, s, n_train=n, label=f"prompt tuning, {n} examples, seed {s}",
                        tag="curve") for s in cfg.curve_seeds]
        rows.append(Row(f"prompt tuning, {n} training examples", FAMILY_PT, "curve", ids, x=n))
    return rows


@planner("transfer")
def plan_transfer(comp, p: Plan) -> list[Row]:
    cfg = comp.cfg
    if comp.eval_data is None:
        comp.log("transfer skipped: give --eval-task")
        return []
    et = comp.eval_data.task
    ids = []
    for r in p.main:
        spec = {"kind": "transfer", "source": comp.runs[r].spec, "eval_task": et.name,
                "test_fp": fingerprint(comp.eval_test), "label_map": cfg.eval_label_map, "model": comp.fp["model"]}
        ids.append(add(comp, Run(f"transfer/{et.name}/{r}", "transfer", f"transfer to {et.name}: {comp.runs[r].label}",
                                 spec, len(comp.eval_test) + 2 * cfg.latency_examples, deps=[r])))
    rid = hard_run(comp, f"transfer/{et.name}/zero_shot", B.zero_shot_template(et), f"zero-shot on {et.name}",
                   on_eval=True)
    return [Row(f"{p.main_label} trained on {comp.task.name}, scored on {et.name}", FAMILY_TR, "transfer", ids),
            Row(f"zero-shot instruction on {et.name} (reference)", FAMILY_TR, "transfer", [rid])]
