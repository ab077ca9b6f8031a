"""The report's decision sections, rendered from ``results.json`` (``decision`` block and run variants).

Kept apart from ``apps/report.py`` (tables and plots of every method) because this is what a
reader acts on: which prompt to deploy, chosen how, with what confidence and at what cost.
Blocks use ``apps/report.py``'s format: ``("h", level, text)``, ``("p", text)``,
``("table", head, rows[, align])``.
"""
from __future__ import annotations

from typing import Any

from .decision import METRIC_NAMES, SELECT_SECTIONS
from .distilled import distilled_block

__all__ = ["calibration_blocks", "check_lines", "decision_blocks"]


def _p(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _signed(x: float) -> str:
    return f"{100 * x:+.1f}"


def decision_blocks(results: dict[str, Any]) -> list[tuple]:
    """"Decision": the recommendation, the two chosen prompts (validation and test scores, cost),
    the paired differences with their 95% intervals and McNemar's test, and how the choice was made."""
    dec = results.get("decision")
    if not dec:
        return []
    metric = dec.get("select_metric", "macro_f1")
    mname = METRIC_NAMES.get(metric, metric)
    data = results.get("data") or {}
    out: list[tuple] = [("h", 2, "Decision"), ("p", f"**Recommendation.** {dec['recommendation']}")]
    rows = []
    for side, family in (("hard", "hard prompt (prompt engineering)"), ("soft", "soft prompt (trained)")):
        c = dec.get(side)
        if not c:
            continue
        t, v, cost = c.get("test") or {}, c.get("valid") or {}, c.get("cost") or {}
        flag = " (at or below the majority class)" if c.get("at_or_below_majority") else ""
        train = cost.get("train_s")
        rows.append([family, c["name"], c.get("calibration", "none"), _p(v.get(metric)), _p(t.get("accuracy")) + flag,
                     _p(t.get("macro_f1")), (f"{train:.0f}" if train >= 10 else f"{train:.1f}") if train else "0",
                     "–" if cost.get("tokens_added") is None else f"{cost['tokens_added']:.0f}",
                     "–" if cost.get("latency_ms") is None else f"{cost['latency_ms']:.1f}"])
    if rows:
        out.append(("table", ["family", "chosen prompt", "calibration", f"validation {mname} %", "test accuracy %",
                              "test macro-F1 %", "training s (whole search)", "tokens / query", "latency ms (batch 1)"],
                    rows, "lllrrrrrr"))
    out += distilled_block(dec)
    files = [f"{side}: `{dec[side]['artifact']}`" for side in ("hard", "soft") if (dec.get(side) or {}).get("artifact")]
    if files:
        out.append(("p", "Prompt files (in the report folder, for `softprompt eval`, `predict` and `serve`; the "
                         "calibration is saved in them): " + "; ".join(files) + "."))
    if dec.get("difference"):
        mc = dec["mcnemar"]
        drows = [[METRIC_NAMES.get(m, m), _p(d["a"]), _p(d["b"]), _signed(d["difference"]),
                  f"{_signed(d['low'])} to {_signed(d['high'])}"] for m, d in dec["difference"].items()]
        out.append(("table", ["metric", "hard %", "soft %", "soft - hard (points)", "95% CI (paired bootstrap)"],
                    drows, "lrrrr"))
        boot = dec.get("bootstrap") or {}
        out.append(("p", (f"Both prompts answered the same {dec['n_test']} test examples. The interval is a paired "
                          f"percentile bootstrap ({boot.get('resamples')} resamples of the test examples, seed "
                          f"{boot.get('seed')}). McNemar's exact test: {mc['b_only']} examples only the soft prompt "
                          f"gets right, {mc['a_only']} only the hard prompt, p = {mc['p_value']:.3g}.")))
    checks = check_lines(dec)
    if checks:
        out.append(("p", "**Checks on the choice.** " + " ".join(checks)))
    cands = dec.get("candidates") or {}
    src = data.get("valid_source", "validation split")
    maj = data.get("majority_accuracy")
    out.append(("p", (f"**How the prompts were chosen.** Each family's prompt is the best of its candidates by "
                      f"validation {mname}, never by a test score: {cands.get('hard', 0)} hard-prompt candidates "
                      f"(every hand-written prompt x calibration) and {cands.get('soft', 0)} soft-prompt candidates "
                      f"(every trained prompt x calibration: learning rates, seeds, lengths, inits, hybrids, ensembles; "
                      f"the learning curve excluded), on {data.get('valid')} validation examples ({src}). "
                      f"The soft prompt's training time counts every training the search ran. "
                      + _selection_text(dec, data)
                      + (f"Majority-class accuracy on test: {_p(maj)}%; a method at or below it is marked. "
                         if maj is not None else "")
                      + f"{mname[0].upper() + mname[1:]} is the selection metric because a constant answer cannot "
                      "win it (change it with --select-metric).")))
    start = results.get("start")
    if start:
        out.append(("p", (f"Soft prompts started from the chosen hard prompt *{start['name']}*: its instruction "
                          f"(`{start.get('instruction') or ''}`) as text initialisation and as the hybrids' text.")))
    return out


def _selection_text(dec: dict[str, Any], data: dict[str, Any]) -> str:
    """How many examples each family's choice read: a hand-written prompt trains nothing, so its
    candidates are also scored on the training-pool examples their text does not contain."""
    n = dec.get("selection_n") or {}
    if not n.get("hard") or n.get("hard") == data.get("valid"):
        return ""
    return (f"Selection n: the hand-written candidates were compared on {n['hard']} examples (validation plus the "
            f"training-pool examples their text does not contain: they train nothing), the trained ones on "
            f"{n.get('soft') or data.get('valid')} (validation only: they trained on the pool); the stability figure "
            f"resamples the validation examples alone. ")


def check_lines(dec: dict[str, Any]) -> list[str]:
    """One sentence per check of ``decision_checks``: the majority floor, stability under resampled
    validation data, the break-even query count, the latency limit."""
    mname = METRIC_NAMES.get(dec.get("select_metric", "macro_f1"), dec.get("select_metric"))
    lines = []
    floor = dec.get("floor")
    if floor:
        beat = [k for k in ("hard", "soft") if floor.get(f"{k}_beats")]
        lines.append(f"Majority floor: always answering *{floor['label']}* scores "
                     f"{_p(floor['valid'].get(dec.get('select_metric', 'macro_f1')))}% validation {mname}; "
                     + (f"beaten by the {' and the '.join(beat)} prompt." if beat else "neither chosen prompt beats it."))
    st = dec.get("stability")
    if st:
        split = ", ".join(f"{k} {v}" for k, v in st["counts"].items() if v)
        lines.append(f"Stability: the recommendation ({dec.get('deploy')}) comes out of {_p(st['agreement'])}% of "
                     f"{st['resamples']} bootstrap resamples of the validation examples, each rerunning both families' "
                     f"choice and the rule ({split}).")
    be = dec.get("break_even")
    if be:
        when = ("never (the soft prompt is not faster per query)" if be["queries"] is None
                else f"after {be['queries']:,} queries")
        lines.append(f"Break-even: {be['one_off_s']:.1f} s of extra one-off cost at {be['soft_ms']:.1f} vs "
                     f"{be['hard_ms']:.1f} ms per query is paid back {when}.")
    lim = dec.get("latency_limit")
    if lim:
        r = lim["ruled_out"]
        lines.append(f"Latency limit {lim['max_ms']:g} ms per query: {r['hard']} hard and {r['soft']} soft candidates "
                     "ruled out before choosing.")
    if dec.get("tests_agree") is False:
        lines.append("The paired bootstrap interval and McNemar's test disagree; the rule follows the interval.")
    return lines


def calibration_blocks(results: dict[str, Any]) -> list[tuple]:
    """"Calibration": every hand-written prompt (first run of each row) under each calibration,
    validation and test, so the effect of calibrating is visible next to the choice."""
    runs = results.get("runs", {})
    dec = results.get("decision") or {}
    metric = dec.get("select_metric") or (results.get("config") or {}).get("select_metric") or "macro_f1"
    mname = METRIC_NAMES.get(metric, metric)
    table = []
    for row in results.get("rows", []):
        if row["family"] != "prompt engineering" or row["section"] not in SELECT_SECTIONS:
            continue
        rec = next((runs[r] for r in row["runs"] if (runs.get(r) or {}).get("variants")), None)
        if rec is None:
            continue
        for cal, v in rec["variants"].items():
            table.append([rec.get("label", row["name"]), cal, _p((v.get("valid") or {}).get(metric)),
                          _p(v["test"]["accuracy"]), _p(v["test"]["macro_f1"]),
                          "kept" if rec.get("calibration") == cal else ""])
    if not table:
        return []
    return [("h", 2, "Calibration"),
            ("p", ("Rank classification of each hand-written prompt (its first run) under each calibration: none; "
                   "contextual (label probabilities of content-free inputs, Zhao et al. 2021); batch (mean label "
                   "probabilities over the unlabelled inputs being scored, Zhou et al. 2023); pmi (domain-conditional "
                   "PMI, Holtzman et al. 2021). None reads a label; each run keeps the one best on validation.")),
            ("table", ["prompt", "calibration", f"validation {mname} %", "test accuracy %", "test macro-F1 %", ""],
             table, "llrrrl")]
