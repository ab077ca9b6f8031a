"""`compare --budget` (issue 24): durations, the plan chosen for a budget (core first, sweeps while they
fit, the core cut down when even it does not fit), the plan printed before anything runs, and the
report's estimated vs actual time per method."""
import json
import time

import pytest
from typer.testing import CliRunner

from softprompt.apps import compare as C
from softprompt.apps.compare.budget import CORE, RESERVE_S, fit, format_duration, parse_duration
from softprompt.apps.compare.estimate import Throughput
from softprompt.apps.report import load_results
from softprompt.cli import app
from softprompt.testing import tiny_causal_lm, tiny_tokenizer
from test_compare import tiny_config, toy_data, user_files

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

SWEEPS = ("length", "init", "hybrid", "curve")


def stub(step_s: float = 1.0) -> Throughput:
    """Made-up speeds: training dominates, as on a CPU."""
    return Throughput(score_s=0.001, score_prefix=10, fewshot_s=0.002, fewshot_prefix=60, suffix_tokens=8,
                      query_s=0.002, step_s=step_s, step_prefix=12, step_overhead_s=0.0, decode_s=0.002)


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("15m", 900), ("2h", 7200), ("1h30m", 5400), ("1.5h", 5400),
                                          (" 15M ", 900), ("1d", 86400)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text,why", [("15", "with a unit"), ("", "with a unit"), ("fast", "with a unit"),
                                      ("15 minutes", "with a unit"), ("-5m", "with a unit"), ("m15", "with a unit"),
                                      ("0m", "longer than zero")])
def test_parse_duration_rejects_bad_input(text, why):
    with pytest.raises(ValueError, match=why):
        parse_duration(text)


def test_format_duration():
    assert [format_duration(s) for s in (0.04, 9.9, 42, 125, 3725)] == ["0.0s", "9.9s", "42s", "2m05s", "1h02m"]


def comparison(tmp_path, **kw):
    cfg = tiny_config(**{"methods": C.DEFAULT_METHODS, **kw})
    return C.Comparison(cfg, toy_data(), tiny_causal_lm(), tiny_tokenizer(), tmp_path / "out",
                        eval_data=toy_data(seed=1, name="toy2"), progress=False, log=lambda s: None)


def test_budget_keeps_the_core_and_drops_sweeps_that_do_not_fit(tmp_path):
    tp = stub()
    every = fit(comparison(tmp_path), None, throughput=tp)
    assert set(every.methods) == set(C.DEFAULT_METHODS) and not every.left_out and every.budget_s is None
    core = fit(comparison(tmp_path, methods=CORE), None, throughput=tp)
    sweeps = min(every.methods[m]["estimate_s"] for m in SWEEPS)
    assert sweeps > 1  # each sweep trains at least one prompt (4 steps of 1 s)

    comp = comparison(tmp_path)
    small = fit(comp, core.total_s + RESERVE_S + sweeps / 2, started=time.time(), throughput=tp)
    assert set(CORE) <= set(small.methods) and not small.shrunk and not small.over_budget
    assert set(SWEEPS) <= set(small.left_out) and not set(SWEEPS) & set(comp.cfg.methods)
    assert small.total_s <= small.available_s
    assert comp.cfg.seeds == (0, 1) and comp.cfg.max_steps == 4  # the core as configured
    assert {r.method for r in comp.runs.values()} == set(small.methods)  # the comparison runs this plan

    comp = comparison(tmp_path)
    large = fit(comp, every.total_s + RESERVE_S + 60, started=time.time(), throughput=tp)
    assert set(large.methods) == set(C.DEFAULT_METHODS) and not large.left_out and not large.shrunk
    assert comp.cfg.methods == C.DEFAULT_METHODS
    assert large.total_s == pytest.approx(every.total_s)


def test_budget_below_the_core_cuts_it_and_says_so(tmp_path):
    comp = comparison(tmp_path, max_steps=None, methods=("zero_shot", "few_shot", "soft", "length"),
                      fewshot_seeds=(0, 1))
    n_test = len(comp.test)
    full = fit(comparison(tmp_path, max_steps=None, methods=CORE, fewshot_seeds=(0, 1)), None, throughput=stub())
    plan = fit(comp, full.total_s / 4 + RESERVE_S, started=time.time(), throughput=stub())
    assert plan.shrunk and plan.shrunk[0].startswith("main soft prompt: 1 seed instead of 2")
    assert comp.cfg.seeds == (0,) and comp.cfg.fewshot_seeds == (0,) and comp.cfg.search_seeds == 1
    assert comp.cfg.max_steps is not None and comp.cfg.max_steps < 120
    assert set(plan.left_out) == {"length"} and set(plan.methods) == set(CORE)
    assert not any("chat format" in cut for cut in plan.shrunk)  # the tiny tokenizer has no chat format to drop
    assert len(comp.test) == n_test  # never a smaller test set
    text = "\n".join(plan.lines())
    assert "Cut to fit the budget: main soft prompt: 1 seed instead of 2" in text and "Left out for the budget: length" in text
    soft = next(r for r in comp.runs.values() if r.kind == "soft")
    assert soft.spec["search"]["seeds"] == 1 and soft.spec["max_steps"] == comp.cfg.max_steps
    tiny = fit(comparison(tmp_path, max_steps=None, methods=CORE), 1.0 + RESERVE_S, started=time.time(),
               throughput=stub())
    assert tiny.over_budget and "Even the smallest plan is estimated over the budget" in "\n".join(tiny.lines())


def test_runs_past_the_deadline_are_skipped_outside_the_core(tmp_path):
    comp = comparison(tmp_path, methods=("zero_shot", "soft", "length"), seeds=(0,))
    plan = fit(comp, 10_000, started=time.time(), throughput=stub(0.0))
    assert set(plan.methods) == {"zero_shot", "soft", "length"}
    comp.budget_plan, comp.deadline = plan.to_dict(), time.time() - 1  # the budget is already spent
    res = comp.run()
    length = [rid for rid, r in comp.runs.items() if r.method == "length"]
    assert length and res["plan"]["skipped"] == length and not set(length) & set(res["runs"])
    assert {r["method"] for r in res["runs"].values()} == {"zero_shot", "soft"}


def test_cli_prints_the_plan_and_the_report_has_estimated_and_actual_times(tmp_path):
    folder = user_files(tmp_path, toy_data(), "text,label", lambda e: f"{e.fields['text']},{e.label}")
    out = tmp_path / "rep"
    args = ["compare", "--model", str(folder), "--train-file", str(tmp_path / "train.csv"),
            "--test-file", str(tmp_path / "test.csv"), "--template", "{soft:2} review : {text} label :",
            "--verbalizer", "neg=no", "--verbalizer", "pos=yes", "--methods", "zero_shot,soft,length", "--seeds", "0",
            "--lengths", "1,20", "--max-steps", "4", "--latency-examples", "1", "--no-progress", "--out", str(out)]
    r = CliRunner().invoke(app, args + ["--budget", "10"])
    assert r.exit_code == 2 and "--budget '10': expected a duration with a unit" in r.output
    r = CliRunner().invoke(app, args + ["--budget", "10m"])
    assert r.exit_code == 0, r.output
    printed = r.output[: r.output.index("zero-shot instruction:")]  # before the first run's result line
    assert "Plan: estimated" in printed and "of a 10m00s budget" in printed
    for m in ("zero_shot", "soft", "length"):
        assert f"  {m} " in printed
    res = load_results(out)
    plan = res["plan"]
    assert plan["budget_s"] == 600 and set(plan["methods"]) == {"zero_shot", "soft", "length"}
    assert set(plan["actual_s"]) == set(plan["methods"]) and plan["wall_s"] > 0
    assert all(plan["methods"][m]["estimate_s"] > 0 for m in plan["methods"])
    for rec in res["runs"].values():
        assert rec["method"] in plan["methods"] and rec["estimate_s"] > 0
    assert plan["throughput"]["tokens_per_s"] > 0 and plan["throughput"]["step_s"] > 0
    md = (out / "report.md").read_text()
    assert "### Time: estimated vs actual" in md
    assert md.count("| soft |") == 1 and "| total |" in md and "Budget 10m00s" in md
    # without a budget: the plan and its estimate are printed too
    r = CliRunner().invoke(app, args[:-2] + ["--out", str(tmp_path / "again"), "--methods", "zero_shot"])
    assert r.exit_code == 0, r.output
    assert "Plan: estimated" in r.output and "budget" not in r.output.split("\n")[0]
    assert json.loads((tmp_path / "again" / "results.json").read_text())["plan"]["budget_s"] is None


def test_generation_task_is_measured_and_estimated(tmp_path):
    """A generation task's probes generate (no label scoring) and its plan has an estimate per method."""
    from test_compare import qa_data

    cfg = tiny_config(methods=("zero_shot", "few_shot", "soft"), eval_task=None, init=None, shots=2, seeds=(0,),
                      max_new_tokens=3)
    comp = C.Comparison(cfg, qa_data(), tiny_causal_lm(), tiny_tokenizer(), tmp_path, progress=False,
                        log=lambda s: None)
    plan = fit(comp, None)
    tp = plan.throughput
    assert tp["score_s"] > 0 and tp["decode_s"] > 0 and tp["step_s"] > 0 and tp["fewshot_prefix"] > tp["score_prefix"]
    assert set(plan.methods) == {"zero_shot", "few_shot", "soft"}
    assert all(m["estimate_s"] > 0 for m in plan.methods.values())
