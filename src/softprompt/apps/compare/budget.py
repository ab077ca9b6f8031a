"""``compare --budget``: which methods fit a time budget, and the plan shown before anything runs.

Why: the default comparison runs every method, which can take hours on a CPU.  Given a budget,
:func:`fit` keeps the plan's decision-relevant core (:data:`CORE`: the calibrated zero-shot and
few-shot prompts, the main soft prompt with the recipe's automatic learning rate) and then adds
the other methods in :data:`EXTRAS` order while the estimate (``estimate.py``) still fits.  When
even the core does not fit it is cut step by step (:data:`SHRINKS`: seeds, search candidates,
steps) and nothing else is added.  It is a filter over the planners' plan: it chooses the
comparison's config (methods, seeds, steps) and the runner runs that plan as always.  The test
set is never subsampled to fit; when even the smallest core is over budget the plan says so and
names ``--test-limit`` as the user's choice.  Without a budget the plan and its estimate are
shown all the same.
"""
from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from ...training.recipe import DEFAULT_RECIPE
from .config import PLAN_ORDER, RESULTS, CompareConfig
from .estimate import Throughput, annotate, measure

__all__ = ["CORE", "EXTRAS", "SHRINKS", "BudgetPlan", "fit", "format_duration", "parse_duration", "plan_blocks",
           "record_times", "start", "why_not_run"]

CORE = ("zero_shot", "few_shot", "soft")
"""What a decision needs: the best calibrated hand-written prompts and the main soft prompt."""
EXTRAS = ("knn", "search", "ensemble", "init", "length", "hybrid", "curve", "transfer", "cot", "ptuning", "prefix")
"""The rest, most decision-relevant first: stronger hard candidates, then sweeps, curve, slow or opt-in methods."""
RESERVE_S = 10.0  # the decision's checks and writing the report (plots, HTML) after the last run
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds of a duration such as ``90s``, ``15m``, ``2h``, ``1.5h`` or ``1h30m``."""
    s = str(text).strip().lower().replace(" ", "")
    parts = re.findall(r"(\d+(?:\.\d+)?)([smhd])", s)
    if not s or "".join(n + u for n, u in parts) != s:
        raise ValueError(f"budget {text!r}: expected a duration with a unit, e.g. 90s, 15m, 2h or 1h30m")
    seconds = sum(float(n) * UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError(f"budget {text!r}: must be longer than zero")
    return seconds


def format_duration(seconds: float) -> str:
    if seconds < 9.95:
        return f"{max(seconds, 0.0):.1f}s"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


# ----------------------------------------------------------------------------- shrinking the core
def _fewer_seeds(comp, c: CompareConfig):
    return (replace(c, seeds=c.seeds[:1]), f"main soft prompt: 1 seed instead of {len(c.seeds)}") \
        if len(c.seeds) > 1 else None


def _fewer_fewshot(comp, c: CompareConfig):
    return (replace(c, fewshot_seeds=c.fewshot_seeds[:1]),
            f"few-shot: 1 demonstration sample instead of {len(c.fewshot_seeds)}") if len(c.fewshot_seeds) > 1 else None


def _one_format(comp, c: CompareConfig):
    return (replace(c, chat="off"), "hand-written prompts in the plain format only, not also in the chat format") \
        if comp.chat_for(c) else None


def _smaller_search(comp, c: CompareConfig):
    return (replace(c, search_seeds=1), f"learning-rate search: 1 seed per rate instead of {c.search_seeds} "
            "(3 candidates, 1.75 run-equivalents)") if c.search_seeds > 1 and not c.lrs else None


def _fewer_restarts(comp, c: CompareConfig):
    return (replace(c, restarts=1), f"1 training per prompt instead of best of {c.restarts}") if c.restarts > 1 else None


def _fewer_steps(comp, c: CompareConfig):
    steps = c.max_steps or DEFAULT_RECIPE.max_steps
    if steps <= 30:
        return None
    new = max(30, steps // 2)
    return replace(c, max_steps=new), f"at most {new} training steps per prompt instead of {steps}"


SHRINKS: tuple[Callable[[Any, CompareConfig], Any], ...] = (_fewer_seeds, _fewer_fewshot, _one_format, _smaller_search,
                                                       _fewer_restarts, _fewer_steps, _fewer_steps)
"""Cuts to the core when it alone is over budget, in the order tried (each keeps the ones before)."""


# ----------------------------------------------------------------------------- the plan
@dataclass
class BudgetPlan:
    """What will run, what each method is estimated to take, and what the budget left out."""

    budget_s: float | None
    available_s: float | None  # the budget less what already passed (loading, measuring) and RESERVE_S
    methods: dict[str, dict[str, Any]]  # method -> {"runs", "estimate_s"} (runs still to do), in plan order
    left_out: dict[str, float] = field(default_factory=dict)  # method -> what it would have added
    shrunk: list[str] = field(default_factory=list)  # cuts to the core, in words
    over_budget: bool = False  # even the smallest core is estimated over the budget
    throughput: dict[str, Any] = field(default_factory=dict)
    done_runs: int = 0  # runs already finished in results.json (skipped, not estimated)

    @property
    def total_s(self) -> float:
        return sum(m["estimate_s"] for m in self.methods.values())

    def lines(self) -> list[str]:
        tp = self.throughput
        head = (f"Plan: estimated {format_duration(self.total_s)}"
                + (f" of a {format_duration(self.budget_s)} budget ({format_duration(self.available_s or 0)} "
                   "left for runs)" if self.budget_s else "")
                + f"; measured {tp.get('tokens_per_s', 0):,.0f} input tokens/s scoring, "
                f"{tp.get('step_s', 0):.2f}s per training step")
        out = [head]
        for name, m in self.methods.items():
            out.append(f"  {name:<10} {m['runs']:>3} run{'s' if m['runs'] != 1 else ' '}  "
                       f"{format_duration(m['estimate_s']):>8}")
        if self.done_runs:
            out.append(f"  ({self.done_runs} runs already done in {RESULTS}: not counted)")
        if self.shrunk:
            out.append("Cut to fit the budget: " + "; ".join(self.shrunk))
        if self.left_out:
            out.append("Left out for the budget: " + ", ".join(f"{m} (~{format_duration(s)})"
                                                              for m, s in self.left_out.items()))
        if self.over_budget:
            out.append("Even the smallest plan is estimated over the budget; running it anyway. To fit, score "
                       "fewer test examples (--test-limit N, said in the report) or give a larger --budget.")
        out.append("Training estimates assume every prompt trains to its max_steps; most stop earlier.")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"budget_s": self.budget_s, "available_s": self.available_s, "estimate_s": self.total_s,
                "methods": self.methods, "left_out": self.left_out, "shrunk": self.shrunk,
                "over_budget": self.over_budget, "throughput": self.throughput, "done_runs": self.done_runs}


def _finished(comp) -> set[str]:
    """Ids of planned runs already done in OUT/results.json (the runner skips them)."""
    path = comp.out / RESULTS
    if not path.exists():
        return set()
    try:
        old = json.loads(path.read_text()).get("runs", {})
    except (json.JSONDecodeError, OSError):
        return set()
    saved, comp.results = comp.results, {"runs": old}
    try:
        return {rid for rid, run in comp.runs.items() if comp._done(run)}
    finally:
        comp.results = saved


def _estimate(comp, cfg: CompareConfig, tp: Throughput, quiet: bool = True) -> tuple[dict[str, dict], int]:
    """Plan ``cfg`` on ``comp`` and sum its pending runs' estimates per method."""
    comp.cfg, comp.runs, comp.rows = cfg, {}, []
    comp.chat = comp.chat_for(cfg)
    log = comp.log
    if quiet:
        comp.log = lambda s: None
    try:
        comp.plan()
    finally:
        comp.log = log
    annotate(comp, tp)
    done = _finished(comp)
    per: dict[str, dict] = {}
    for rid, run in comp.runs.items():
        if rid in done:
            continue
        m = per.setdefault(run.method, {"runs": 0, "estimate_s": 0.0})
        m["runs"] += 1
        m["estimate_s"] += run.estimate_s or 0.0
    order = {m: i for i, m in enumerate(PLAN_ORDER)}
    return {k: per[k] for k in sorted(per, key=lambda k: order.get(k, len(order)))}, len(done)


def _total(per: dict[str, dict]) -> float:
    return sum(m["estimate_s"] for m in per.values())


def fit(comp, budget_s: float | None = None, *, started: float | None = None,
        throughput: Throughput | None = None) -> BudgetPlan:
    """Measure (unless ``throughput`` is given), choose what to run within ``budget_s`` seconds
    counted from ``started`` (a ``time.time()``; default: now), set ``comp``'s config and plan to
    it, and return the plan.  Without a budget every planned method stays."""
    tp = throughput or measure(comp)
    comp.throughput = tp
    original = comp.cfg
    shrunk: list[str] = []
    left: dict[str, float] = {}
    over = False
    available = None
    if budget_s is None:
        cfg = original
    else:
        spent = time.time() - started if started is not None else 0.0
        available = budget_s - spent - RESERVE_S
        wanted = list(original.methods)
        core = [m for m in wanted if m in CORE] or [min(wanted, key=lambda m: EXTRAS.index(m))]
        cfg = replace(original, methods=tuple(core))
        per, _ = _estimate(comp, cfg, tp)
        for cut in SHRINKS:
            if _total(per) <= available:
                break
            step = cut(comp, cfg)
            if step is None:
                continue
            cfg, why = step
            shrunk.append(why)
            per, _ = _estimate(comp, cfg, tp)
        over = _total(per) > available
        for m in sorted((m for m in wanted if m not in core), key=EXTRAS.index):
            trial = replace(cfg, methods=tuple(x for x in wanted if x in cfg.methods or x == m))
            per_m, _ = _estimate(comp, trial, tp)
            if _total(per_m) <= available and not shrunk:  # a cut core gets the time before any extra
                cfg, per = trial, per_m
            elif sum(v["runs"] for v in per_m.values()) > sum(v["runs"] for v in per.values()):
                left[m] = _total(per_m) - _total(per)  # (a method whose planner adds nothing is not named)
    per, done = _estimate(comp, cfg, tp, quiet=False)  # the plan that runs (its skip messages shown once)
    return BudgetPlan(budget_s=budget_s, available_s=available, methods=per, left_out=left, shrunk=shrunk,
                      over_budget=over, throughput=tp.to_dict(), done_runs=done)


def start(comp, budget_s: float | None, *, started: float | None = None,
          throughput: Throughput | None = None) -> BudgetPlan:
    """Before a comparison runs: :func:`fit`, print the plan (``comp.log``), keep it for
    ``results.json`` and, with a budget, set the deadline past which :func:`why_not_run` holds
    runs outside the core back."""
    comp.started = started if started is not None else time.time()
    plan = fit(comp, budget_s, started=comp.started, throughput=throughput)
    for line in plan.lines():
        comp.log(line)
    comp.budget_plan = plan.to_dict()
    if budget_s is not None:
        comp.deadline = comp.started + budget_s - RESERVE_S
    return plan


def why_not_run(comp, run) -> str | None:
    """Why the runner does not start ``run``: the deadline would pass (runs outside :data:`CORE`
    only: a decision needs the core), or a run it needs did not run."""
    missing = [d for d in run.deps if d not in comp.results["runs"]]
    if missing:
        return f"needs {missing[0]}, which did not run"
    if comp.deadline is None or run.method in CORE:
        return None
    if time.time() + (run.estimate_s or 0.0) > comp.deadline:
        return "the budget would run out"
    return None


def record_times(comp) -> None:
    """After the runs: actual seconds per method (runs executed now), next to the plan's estimates."""
    actual: dict[str, float] = {}
    for rid in comp.executed:
        rec = comp.results["runs"][rid]
        m = rec.get("method") or "other"
        actual[m] = actual.get(m, 0.0) + rec["run_wall_s"]
    plan = comp.results["plan"]
    plan["actual_s"] = actual
    plan["skipped"] = list(comp.skipped)
    if comp.started is not None:
        plan["wall_s"] = time.time() - comp.started  # the report is written after this


# ----------------------------------------------------------------------------- the report
def plan_blocks(results: dict[str, Any]) -> list[tuple]:
    """The report's "Time: estimated vs actual" table (per method), when the plan was recorded."""
    plan = results.get("plan")
    if not plan:
        return []
    actual = plan.get("actual_s") or {}
    rows = [[m, str(v["runs"]), format_duration(v["estimate_s"]),
             format_duration(actual[m]) if m in actual else "–",
             f"{actual[m] / v['estimate_s']:.2f}" if m in actual and v["estimate_s"] > 0 else "–"]
            for m, v in plan["methods"].items()]
    total_actual = sum(actual.values())
    rows.append(["total", str(sum(v["runs"] for v in plan["methods"].values())), format_duration(plan["estimate_s"]),
                 format_duration(total_actual) if actual else "–",
                 f"{total_actual / plan['estimate_s']:.2f}" if actual and plan["estimate_s"] > 0 else "–"])
    b: list[tuple] = [("h", 3, "Time: estimated vs actual"), ("table", ["method", "runs", "estimated", "actual",
                                                                       "actual / estimated"], rows, "lrrrr")]
    words = []
    if plan.get("budget_s"):
        words.append(f"Budget {format_duration(plan['budget_s'])}" + (
            f"; the whole command took {format_duration(plan['wall_s'])}" if plan.get("wall_s") else "") + ".")
    if plan.get("shrunk"):
        words.append("Cut to fit: " + "; ".join(plan["shrunk"]) + ".")
    if plan.get("left_out"):
        words.append("Left out for the budget: " + ", ".join(
            f"{m} (estimated {format_duration(s)})" for m, s in plan["left_out"].items()) + ".")
    if plan.get("skipped"):
        words.append("Not run because the budget ran out: " + ", ".join(plan["skipped"]) + ".")
    if plan.get("over_budget"):
        words.append("Even the smallest plan was estimated over the budget.")
    tp = plan.get("throughput") or {}
    words.append(f"Estimates from this machine's measured speed ({tp.get('tokens_per_s', 0):,.0f} input tokens/s "
                 f"scoring, {tp.get('step_s', 0):.2f}s per training step, measured in {tp.get('probe_s', 0):.1f}s); "
                 "training is estimated at max_steps, actual times are the runs' wall times.")
    b.append(("p", " ".join(words)))
    return b
