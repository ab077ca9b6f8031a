"""Render a comparison's ``results.json`` into ``report.md``, ``report.html`` and PNG plots.

The report is a pure function of ``results.json`` (``write_report(load_results(path),
folder)``), so it can be regenerated or restyled without rerunning anything.  The HTML
file is self-contained: the plots are embedded as base64 PNGs.  Plots use matplotlib's
Agg backend (no display needed).

Rows aggregate their runs (seeds, demonstration orders) as mean +/- sample standard
deviation and min..max; the plots draw the same numbers (error bars = std, dots = runs).

Metrics follow the task's kind (:data:`METRICS`): accuracy and macro-F1 for
classification, exact match and token F1 for generation (question answering).  Rows carry
them under their own names and as ``primary``/``secondary``, which the tables and plots use.
An optional ``notes`` list in ``results.json`` (plain paragraphs, e.g. how a benchmark
prepared its data) is rendered under "Setup".
"""
from __future__ import annotations

import base64
import html
import json
import math
import os
import re
from pathlib import Path
from typing import Any

from .decision_report import calibration_blocks, decision_blocks

__all__ = ["METRICS", "PLOTS", "load_results", "make_plots", "metric_names", "plot_names", "summarize", "write_report"]

PLOTS = ("accuracy_by_method.png", "accuracy_vs_length.png", "accuracy_vs_init.png", "learning_curve.png",
         "training_loss.png")
METRICS = {
    "classification": (("accuracy", "accuracy"), ("macro_f1", "macro-F1")),
    "generation": (("exact_match", "exact match"), ("f1", "F1")),
}
"""Task kind -> ((key, label) of the primary metric, (key, label) of the secondary one)."""
FAMILY_COLORS = {
    "prompt engineering": "#d95f02",
    "prompt tuning": "#1b9e77",
    "hybrid": "#7570b3",
    "ensemble": "#e7298a",
    "transfer": "#666666",
}


def metric_names(results: dict[str, Any]) -> tuple[tuple[str, str], tuple[str, str]]:
    """The (key, label) pairs of the primary and secondary metric for this comparison's task kind."""
    kind = (results.get("task") or {}).get("kind") or "classification"
    if kind not in METRICS:
        raise ValueError(f"no metrics defined for task kind {kind!r}; known kinds are {list(METRICS)}")
    return METRICS[kind]


def plot_names(results: dict[str, Any]) -> tuple[str, ...]:
    """File names of the plots: :data:`PLOTS` for classification; for generation the bar chart
    shows exact match and F1 and the other plots exact match."""
    if metric_names(results)[0][0] == "accuracy":
        return PLOTS
    return ("em_f1_by_method.png",) + tuple(n.replace("accuracy", "exact_match") for n in PLOTS[1:])


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    return json.loads(p.read_text())


# ----------------------------------------------------------------------------- numbers
def _agg(values: list[float]) -> dict[str, Any] | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    n = len(vals)
    mean = sum(vals) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(vals), "max": max(vals), "n": n, "values": vals}


def _metrics(rec: dict, variant: str | None) -> dict:
    if variant and rec.get("ensemble"):
        return rec["ensemble"]["variants"][variant]
    return rec["metrics"]


def summarize(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One dict per report row: aggregated metrics and costs of its finished runs."""
    runs = results.get("runs", {})
    (k1, _), (k2, _) = metric_names(results)
    majority = (results.get("data") or {}).get("majority_accuracy")
    select = (results.get("config") or {}).get("select_metric") if k1 == "accuracy" else None
    out = []
    for row in results.get("rows", []):
        recs = [runs[r] for r in row["runs"] if r in runs and runs[r].get("status") == "done"]
        ms = [_metrics(r, row.get("variant")) for r in recs]
        lat = [r.get("latency") or {} for r in recs]
        tr = [r.get("train") or {} for r in recs]
        primary, secondary = _agg([m[k1] for m in ms]), _agg([m[k2] for m in ms])
        out.append({
            **row,
            "n_done": len(recs), "n_planned": len(row["runs"]),
            k1: primary, k2: secondary, "primary": primary, "secondary": secondary,
            "trainable_params": _agg([r.get("trainable_params") for r in recs]),
            "artifact_bytes": _agg([r.get("artifact_bytes") for r in recs]),
            "tokens_added": _agg([r.get("tokens_added") for r in recs]),
            "latency_b1": _agg([x.get("batch1_ms") for x in lat]),
            "latency_batched": _agg([x.get("batched_ms") for x in lat]),
            "latency_batch_size": max((x.get("batch_size") or 0 for x in lat), default=0),
            "train_s": _agg([t.get("wall_s") for t in tr]),
            "n_unparseable": _agg([m.get("n_unparseable") for m in ms]) if any("n_unparseable" in m for m in ms) else None,
            "n_test": ms[0]["n"] if ms else None,
            "valid": _agg([(r.get("valid_metrics") or {}).get(select) for r in recs]) if select else None,
            "calibrations": sorted({r["calibration"] for r in recs if r.get("calibration")}),
            "at_or_below_majority": bool(primary and majority is not None and k1 == "accuracy"
                                         and primary["mean"] <= majority + 1e-9),
        })
    return out


def _pct(a: dict | None, spread: bool = True) -> str:
    if a is None:
        return "not run"
    s = f"{100 * a['mean']:.1f}"
    if a["n"] > 1 and spread:
        s += f" ± {100 * a['std']:.1f} ({100 * a['min']:.1f}..{100 * a['max']:.1f})"
    return s


def _runs(a: dict) -> str:
    return f"{a['n']} run" + ("" if a["n"] == 1 else "s")


def _num(a: dict | None, fmt: str = "{:,.0f}") -> str:
    return "–" if a is None else fmt.format(a["mean"])


def _bytes(a: dict | None) -> str:
    if a is None:
        return "–"
    b = a["mean"]
    if b < 1024:
        return f"{b:.0f} B"
    if b < 1024 ** 2:
        return f"{b / 1024:.1f} KiB"
    return f"{b / 1024 ** 2:.1f} MiB"


def _best(rows: list[dict], families: set[str], sections: set[str]) -> dict | None:
    cands = [r for r in rows if r["family"] in families and r["section"] in sections and r["primary"]]
    return max(cands, key=lambda r: r["primary"]["mean"], default=None)


def headline(rows: list[dict]) -> dict[str, Any] | None:
    """Best soft-prompt method (prompt tuning, hybrid, ensemble; full training set) vs best
    prompt-engineering method, in points of the primary metric (accuracy or exact match)."""
    pe = _best(rows, {"prompt engineering"}, {"main"})
    soft = _best(rows, {"prompt tuning", "hybrid", "ensemble"}, {"main", "length", "init", "position", "ensemble"})
    if not pe or not soft:
        return None
    d = 100 * (soft["primary"]["mean"] - pe["primary"]["mean"])
    spread = 100 * math.sqrt(soft["primary"]["std"] ** 2 + pe["primary"]["std"] ** 2)
    return {"best_soft": soft["name"], "best_soft_acc": soft["primary"], "best_pe": pe["name"],
            "best_pe_acc": pe["primary"], "difference_points": d, "combined_std_points": spread}


# ----------------------------------------------------------------------------- plots
def _plt():
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the report's plots need matplotlib: pip install 'softprompt[report]'") from e

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "figure.dpi": 110})
    return plt


def _wrap(s: str, width: int = 48) -> str:
    words, lines, cur = s.split(), [], ""
    for w in words:
        if cur and len(cur) + 1 + len(w) > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    if cur:
        lines.append(cur)
    return "\n".join(lines)


def _ref_lines(ax, rows: list[dict], results: dict, horizontal: bool = True) -> None:
    line = ax.axhline if horizontal else ax.axvline
    maj = results.get("data", {}).get("majority_accuracy")
    if maj is not None:
        line(maj, color="#999999", linestyle=":", linewidth=1.2, label=f"majority class ({100 * maj:.1f}%)")
    chosen = ((results.get("decision") or {}).get("hard") or {})
    if chosen.get("test"):  # the hard prompt chosen on validation, not the best on test
        acc = chosen["test"]["accuracy"]
        line(acc, color=FAMILY_COLORS["prompt engineering"], linestyle="--", linewidth=1.2,
             label=f"hard prompt chosen on validation ({100 * acc:.1f}%)")
        return
    pe = _best(rows, {"prompt engineering"}, {"main"})
    if pe:
        line(pe["primary"]["mean"], color=FAMILY_COLORS["prompt engineering"], linestyle="--", linewidth=1.2,
             label=f"best hand-written: {pe['name'].split(' (')[0]} ({100 * pe['primary']['mean']:.1f}%)")


def _title(results: dict) -> str:
    d = results.get("data", {})
    return f"{results['task']['name']} | {results.get('model', '')} | test n={d.get('test', '?')}"


def _save(fig, path: Path) -> None:
    fig.savefig(path, bbox_inches="tight", dpi=110)


def _plot_by_method(plt, rows, results, path: Path) -> bool:
    """Horizontal bars per method: the primary metric; for generation also the secondary
    one (exact match and F1 side by side, F1 hatched)."""
    rs = [r for r in rows if r["in_table"] and r["section"] != "transfer" and r["primary"]]
    if not rs:
        return False
    (_, lab1), (_, lab2) = metric_names(results)
    both = lab1 != "accuracy"
    bars = [("primary", 0.0, 0.65, None)] if not both else [("primary", 0.19, 0.36, None), ("secondary", -0.19, 0.36, "//")]
    fig, ax = plt.subplots(figsize=(8.5, (0.62 if both else 0.42) * len(rs) + 2.2), layout="constrained")
    ys = list(range(len(rs)))[::-1]
    for y, r in zip(ys, rs):
        c = FAMILY_COLORS.get(r["family"], "#444444")
        for key, dy, height, hatch in bars:
            a = r[key]
            if a is None:
                continue
            ax.barh(y + dy, a["mean"], color=c, alpha=0.75 if hatch is None else 0.35, height=height, hatch=hatch,
                    edgecolor=c if hatch else None)
            right = a["mean"]
            if a["n"] > 1:
                ax.errorbar(a["mean"], y + dy, xerr=a["std"], color="black", capsize=3, linewidth=1)
                ax.scatter(a["values"], [y + dy] * a["n"], color="black", s=9, zorder=3)
                right = max(a["mean"] + a["std"], a["max"])
            ax.text(min(right + 0.015, 1.0), y + dy, f"{100 * a['mean']:.1f}", va="center", fontsize=8)
    ax.set_yticks(ys)
    ax.set_yticklabels([_wrap(r["name"], 52) for r in rs], fontsize=8.5)
    ax.set_xlim(0, 1.08)
    ax.set_ylim(-0.7, len(rs) - 0.3)
    what = f"{lab1} and {lab2}" if both else lab1
    ax.set_xlabel(f"test {what} (bar = mean; error bar = std over seeds/orders; dots = single runs)")
    ax.grid(axis="x", alpha=0.3)
    _ref_lines(ax, rows, results, horizontal=False)
    from matplotlib.patches import Patch

    fams = list(dict.fromkeys(r["family"] for r in rs))
    handles = [Patch(color=FAMILY_COLORS.get(f, "#444444"), alpha=0.75, label=f) for f in fams]
    if both:
        handles += [Patch(facecolor="#888888", alpha=0.75, label=f"{lab1} (solid)"),
                    Patch(facecolor="#cccccc", edgecolor="#888888", hatch="//", label=f"{lab2} (hatched)")]
    h2, l2 = ax.get_legend_handles_labels()
    fig.legend(handles + h2, [h.get_label() for h in handles] + l2, loc="outside lower center", ncol=3,
               fontsize=8, frameon=False)
    ax.set_title(f"{what[0].upper() + what[1:]} by method\n{_title(results)}")
    _save(fig, path)
    plt.close(fig)
    return True


def _xy(rows: list[dict]):
    rs = sorted([r for r in rows if r["primary"]], key=lambda r: r["x"])
    return rs, [r["x"] for r in rs], [r["primary"]["mean"] for r in rs], [r["primary"]["std"] for r in rs]


def _plot_line(plt, rows, results, path: Path, section: str, xlabel: str, title: str, log2: bool = False,
               fewshot: bool = False) -> bool:
    rs, xs, ys, es = _xy([r for r in rows if r["section"] == section])
    if len(rs) < 2:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.6), layout="constrained")
    c = FAMILY_COLORS["prompt tuning"]
    ax.errorbar(xs, ys, yerr=es, marker="o", color=c, capsize=4, linewidth=1.5, label="prompt tuning (mean ± std)")
    for r in rs:
        if r["primary"]["n"] > 1:
            ax.scatter([r["x"]] * r["primary"]["n"], r["primary"]["values"], color=c, s=10, alpha=0.6)
    _ref_lines(ax, rows, results)
    ticks = list(xs)
    fs = [r for r in rows if r["family"] == "prompt engineering" and r["name"].startswith("few-shot") and r["primary"]]
    if fewshot and fs:
        k = int(results.get("config", {}).get("shots") or 0)
        a = fs[0]["primary"]
        if k > 0:
            ax.errorbar([k], [a["mean"]], yerr=[a["std"]], marker="s", color=FAMILY_COLORS["prompt engineering"],
                        capsize=4, linestyle="none", label=f"few-shot, k={k} demonstrations (mean ± std)")
            ticks = sorted(set(ticks) | {k})
            ys = ys + [a["mean"] - a["std"]]
    ax.set_xscale("log", base=2 if log2 else 10)
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(x) for x in ticks])
    ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"test {metric_names(results)[0][1]}")
    maj = results.get("data", {}).get("majority_accuracy")
    lo = min(min(ys) - max(es + [0]), maj if maj is not None else 1) - 0.05
    ax.set_ylim(max(0.0, lo), 1.0)
    ax.grid(alpha=0.3)
    fig.legend(fontsize=8, loc="outside lower center", ncol=1, frameon=False)
    ax.set_title(f"{title}\n{_title(results)}")
    _save(fig, path)
    plt.close(fig)
    return True


def _plot_init(plt, rows, results, path: Path) -> bool:
    rs = [r for r in rows if r["section"] == "init" and r["primary"]]
    if len(rs) < 2:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.6), layout="constrained")
    xs = list(range(len(rs)))
    c = FAMILY_COLORS["prompt tuning"]
    for x, r in zip(xs, rs):
        a = r["primary"]
        ax.bar(x, a["mean"], color=c, alpha=0.75, width=0.6)
        if a["n"] > 1:
            ax.errorbar(x, a["mean"], yerr=a["std"], color="black", capsize=4)
            ax.scatter([x] * a["n"], a["values"], color="black", s=10, zorder=3)
        ax.text(x, a["mean"] + (a["std"] if a["n"] > 1 else 0) + 0.015, f"{100 * a['mean']:.1f}", ha="center", fontsize=8)
    _ref_lines(ax, rows, results)
    ax.set_xticks(xs)
    ax.set_xticklabels([str(r["x"]) for r in rs])
    ax.set_xlabel("initialisation of the soft tokens")
    ax.set_ylabel(f"test {metric_names(results)[0][1]}")
    ax.set_ylim(0, 1.12)
    fig.legend(fontsize=8, loc="outside lower center", ncol=1, frameon=False)
    ax.set_title(f"{metric_names(results)[0][1].capitalize()} vs initialisation\n{_title(results)}")
    _save(fig, path)
    plt.close(fig)
    return True


def _ema(values: list[float], alpha: float) -> list[float]:
    out, cur = [], None
    for v in values:
        cur = v if cur is None else (1 - alpha) * cur + alpha * v
        out.append(cur)
    return out


def _plot_loss(plt, results, path: Path) -> bool:
    recs = [r for r in results.get("runs", {}).values()
            if r.get("status") == "done" and r.get("kind") == "soft" and (r.get("train") or {}).get("loss")]
    if not recs:
        return False
    fig, ax = plt.subplots(figsize=(9, 4.8), layout="constrained")
    cmap = plt.get_cmap("tab10" if len(recs) <= 10 else "tab20")
    for i, r in enumerate(recs):
        steps = [p[0] for p in r["train"]["loss"]]
        loss = [p[1] for p in r["train"]["loss"]]
        alpha = min(1.0, 8.0 / max(len(loss), 8))
        ax.plot(steps, _ema(loss, alpha), color=cmap(i % cmap.N), linewidth=1.3, label=_wrap(r["label"], 40))
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss (exponential moving average)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_title(f"Training loss\n{_title(results)}")
    _save(fig, path)
    plt.close(fig)
    return True


def make_plots(results: dict[str, Any], out_dir: str | os.PathLike) -> list[tuple[str, str]]:
    """Write the PNGs that have data; returns (file name, caption) pairs."""
    plt = _plt()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = summarize(results)
    names = plot_names(results)
    (_, lab1), (_, lab2) = metric_names(results)
    what = lab1 if lab1 == "accuracy" else f"{lab1} and {lab2}"
    Lab1 = lab1[0].upper() + lab1[1:]
    made = []
    if _plot_by_method(plt, rows, results, out / names[0]):
        made.append((names[0], (f"{what[0].upper() + what[1:]} by method (bars: mean, error bars: std over seeds or "
                                "demonstration orders, dots: single runs).")))
    if _plot_line(plt, rows, results, out / names[1], "length", "soft-prompt length (tokens, log scale)",
                  f"{Lab1} vs prompt length"):
        made.append((names[1], f"{Lab1} vs number of soft tokens."))
    if _plot_init(plt, rows, results, out / names[2]):
        made.append((names[2], f"{Lab1} vs initialisation of the soft tokens."))
    if _plot_line(plt, rows, results, out / names[3], "curve", "labelled training examples (log scale)",
                  "Learning curve (data efficiency)", log2=True, fewshot=True):
        made.append((names[3], f"{Lab1} vs number of labelled training examples."))
    if _plot_loss(plt, results, out / names[4]):
        made.append((names[4], "Training loss of every trained prompt (smoothed)."))
    return made


# ----------------------------------------------------------------------------- documents
TABLE_HEAD = ["method", "accuracy %", "macro-F1 %", "trainable params", "artifact", "tokens added / query",
              "latency ms (batch 1)", "latency ms (batched)", "training time s", "runs"]


def _integral(a: dict | None) -> bool:
    return a is None or abs(a["mean"] - round(a["mean"])) < 1e-9


def _table_head(results: dict[str, Any]) -> list[str]:
    (_, lab1), (_, lab2) = metric_names(results)
    head = ["method", f"{lab1} %", f"{lab2} %", *TABLE_HEAD[3:]]
    sel = (results.get("config") or {}).get("select_metric")
    if sel and any(r.get("valid_metrics") for r in results.get("runs", {}).values()):
        from .decision import METRIC_NAMES

        head += [f"validation {METRIC_NAMES.get(sel, sel)} %", "calibration"]
    return head


def _table_row(r: dict, width: int | None = None) -> list[str]:
    acc = _pct(r["primary"])
    if r.get("n_unparseable"):
        acc += f" [{r['n_unparseable']['mean']:.0f} unparseable]"
    if r.get("at_or_below_majority"):
        acc += " (≤ majority)"
    lat_b = _num(r["latency_batched"], "{:,.1f}")
    if r["latency_batched"] is not None and r.get("latency_batch_size"):
        lat_b += f" (b={r['latency_batch_size']})"
    return [r["name"], acc, _pct(r["secondary"]), _num(r["trainable_params"]), _bytes(r["artifact_bytes"]),
            _num(r["tokens_added"], "{:,.0f}" if _integral(r["tokens_added"]) else "{:,.1f}"),
            _num(r["latency_b1"], "{:,.1f}"), lat_b, _num(r["train_s"], "{:,.1f}"),
            f"{r['n_done']}" + (f"/{r['n_planned']}" if r["n_done"] != r["n_planned"] else "")] + (
        [] if width is None or width <= len(TABLE_HEAD) else
        [_pct(r.get("valid")) if r.get("valid") else "–", ", ".join(r.get("calibrations") or []) or "–"])


def _blocks(results: dict[str, Any], plots: list[tuple[str, str]]) -> list[tuple]:
    rows = summarize(results)
    d, cfg, task = results.get("data", {}), results.get("config", {}), results["task"]
    env = results.get("environment", {})
    (k1, lab1), (k2, lab2) = metric_names(results)
    head = _table_head(results)
    generative = k1 != "accuracy"
    b: list[tuple] = [("h", 1, f"Hard prompts vs soft prompts: {task['name']} on {results.get('model', '')}")]
    if generative:
        scorer = (f"greedy generation of at most {cfg.get('max_new_tokens')} new tokens, stopping at a newline, scored "
                  "by SQuAD-normalised exact match and token F1 against every gold answer")
        base = (f"Demonstrations for few-shot prompts are drawn from a pool of {d.get('demonstration_pool')} training "
                "examples. ")
    else:
        scorer = f"rank classification over the verbalizer words {json.dumps(task.get('verbalizer'))}"
        base = f"Majority-class accuracy: {100 * (d.get('majority_accuracy') or 0):.1f}%. "
    b.append(("p", (f"Every method is scored by the same code ({scorer}) on the same {d.get('test')} test examples "
                    f"(a seeded sample of {d.get('test_total')}); prompts are trained on a pool of "
                    f"{d.get('train_pool')} labelled examples (of {d.get('train_total')}), validated on "
                    f"{d.get('valid')}" + (f" ({d['valid_source']})" if d.get("valid_source") else "") + f". {base}"
                    f"Device: {env.get('cuda') or env.get('device')} ({env.get('threads')} threads), torch {env.get('torch')}.")))
    notes = list(results.get("notes") or [])
    if results.get("command"):
        notes.insert(0, f"Command: `{results['command']}`")
    if notes:  # set by whoever ran the comparison (e.g. a benchmark script): data preparation, commands
        b.append(("h", 2, "Setup"))
        b += [("p", str(n)) for n in notes]
    h = None if results.get("decision") else headline(rows)
    b += decision_blocks(results)
    if h:
        diff = h["difference_points"]
        verb = "beats" if diff > 0 else "does not beat"
        by = f", by **{diff:+.1f} {lab1} points**" if diff > 0 else f": difference **{diff:+.1f} {lab1} points**"
        single = h["best_soft_acc"]["n"] == 1 and h["best_pe_acc"]["n"] == 1
        spread = ("one run each, so no spread over seeds or orders is measured" if single
                  else f"combined std {h['combined_std_points']:.1f} points")
        b.append(("p", (f"**Headline.** The best soft-prompt method, *{h['best_soft']}* "
                        f"({_pct(h['best_soft_acc'])}%, {_runs(h['best_soft_acc'])}), {verb} the best prompt-engineering "
                        f"method, *{h['best_pe']}* ({_pct(h['best_pe_acc'])}%, {_runs(h['best_pe_acc'])}){by} "
                        f"({spread}). Both are picked by test {lab1} among the rows below (the learning curve excluded), "
                        "which flatters the family with more rows; the per-seed spread is in the table and the plot.")))
    b.append(("h", 2, "Results"))
    table = [_table_row(r, len(head)) for r in rows if r["in_table"] and r["section"] != "transfer"]
    b.append(("table", head, table))
    b.append(("p", (f"{lab1[0].upper() + lab1[1:]} and {lab2}: mean ± sample std over runs (seeds, or demonstration sampling seeds x "
                    "orders), with min..max. *Artifact*: the saved `.safetensors` prompt for soft prompts, the UTF-8 "
                    "prompt text for hand-written ones (an ensemble counts all its members). *Trainable params*: what the "
                    "optimizer updates (for P-tuning, the prompt encoder network). *Tokens added / query*: soft "
                    "tokens (for prefix tuning, its key/value positions) plus instruction/demonstration/format text "
                    "around each input (BOS and the input itself excluded); for chain-of-thought it includes the mean number of generated tokens. "
                    + (f"*Latency*: wall time per query on {cfg.get('latency_examples')} test examples after a warm-up: "
                       "the median over queries sent one at a time (batch 1), and the best of two passes with all of "
                       "them in one batch (per query), with each prompt's prefix key/values cached as when serving. "
                       if cfg.get("latency_examples") else "*Latency*: not measured in this run. ")
                    + "*Training time*: wall time of the training loop per prompt (an ensemble: all members; with "
                    "restarts: every candidate run). "
                    + ("*(≤ majority)*: test accuracy at or below always answering the majority class. "
                       "*Validation*: the score each prompt is chosen on (mean over the row's runs); *calibration*: "
                       "the one each run kept on validation (see Calibration)." if len(head) > len(TABLE_HEAD) else ""))))
    tr = [r for r in rows if r["section"] == "transfer"]
    if tr:
        b.append(("h", 2, "Transfer"))
        et = results.get("eval_task") or {}
        lm = cfg.get("eval_label_map") or {}
        b.append(("p", f"Prompts trained on {task['name']}, scored on {d.get('eval_test')} examples of {et.get('name')}"
                       + (f" (labels mapped: {json.dumps(lm)})" if lm else "") + "."))
        b.append(("table", head, [_table_row(r, len(head)) for r in tr]))
    for name, caption in plots:
        b.append(("img", name, caption))
    b += calibration_blocks(results)
    runs = results.get("runs", {})
    cot = [r for r in runs.values() if r.get("kind") == "cot" and r.get("status") == "done"]
    for r in cot:
        m, c = r["metrics"], r["cot"]
        b.append(("h", 2, "Chain-of-thought"))
        if c.get("two_stage"):
            pa = c.get("parse_accuracy")
            b.append(("p", (f"Two stages: the model writes its reasoning (at most {results['config'].get('cot_max_new_tokens')} "
                            f"tokens; mean {c['generated_tokens']:.1f}), then the label words are ranked after the reasoning "
                            f"and the cue \"{c.get('cue', '')}\", so every one of the {c.get('n', m['n'])} examples gets a label "
                            f"(accuracy {100 * m['accuracy']:.1f}%). Diagnostic only: parsing the reasoning's free text "
                            f"would leave {c['n_unparseable']} answers unreadable"
                            + (f" and score {100 * pa:.1f}%" if pa is not None else "")
                            + (f"; it agrees with the ranked answer on {100 * c['parse_agreement']:.1f}% of examples"
                               if c.get("parse_agreement") is not None else "") + f". Parsing rule: {c['rule']}")))
            samples = [[s["gold"], s["answer"], s["parsed"] or "unparseable", s["text"][:160].replace("\n", " ")]
                       for s in c["samples"][:5]]
            b.append(("table", ["gold", "ranked answer", "parsed (diagnostic)", "reasoning (first 160 characters)"],
                      samples, "llll"))
            continue
        b.append(("p", (f"{c['n_unparseable']} of {m['n']} generated answers ({100 * m['unparseable_rate']:.1f}%) named no "
                        f"label and are scored as wrong; accuracy on the parseable ones: {100 * m['accuracy_parsed']:.1f}%. "
                        f"Mean generated tokens: {c['generated_tokens']:.1f} (max {results['config'].get('cot_max_new_tokens')}). "
                        f"Parsing rule: {c['rule']}")))
        samples = [[s["gold"], s["parsed"] or "unparseable", s["text"][:160].replace("\n", " ")] for s in c["samples"][:5]]
        b.append(("table", ["gold", "parsed", "generated text (first 160 characters)"], samples, "lll"))
    if generative:
        b += _sample_blocks(rows, runs)
    b += _restart_blocks(runs)
    b.append(("h", 2, "Every run"))
    detail = []
    for rid, r in runs.items():
        if r.get("status") != "done":
            continue
        m = r["metrics"]
        tr_ = r.get("train") or {}
        detail.append([rid, f"{100 * m[k1]:.1f}", f"{100 * m[k2]:.1f}",
                       f"{tr_['wall_s']:.1f}" if tr_.get("wall_s") is not None else "–",
                       str(tr_.get("steps", "–")), str(tr_.get("n_train", "–"))])
    b.append(("table", ["run", f"{lab1} %", f"{lab2} %", "training s", "steps", "train examples"], detail))
    b.append(("h", 2, "Configuration"))
    b.append(("pre", "\n".join(f"{k}: {json.dumps(v)}" for k, v in cfg.items())))
    b.append(("p", f"Zero-shot instruction: `{results.get('instruction', '')}`. All numbers are in `results.json`."))
    return b


def _restart_blocks(runs: dict[str, Any]) -> list[tuple]:
    """``--restarts``: which seed each run kept and how every candidate fitted, so the choice
    (made without test data) can be checked."""
    table = []
    for rid, r in runs.items():
        for c in (r.get("train") or {}).get("restarts") or []:
            fit = (f"{100 * c['accuracy']:.1f}" if "accuracy" in c else f"{100 * c.get('f1', 0):.1f} (F1)")
            table.append([rid, str(c["seed"]), c["judged_on"], fit, f"{c['loss']:.3f}" if "loss" in c else "–",
                          "kept" if c["chosen"] else ""])
    if not table:
        return []
    return [("h", 2, "Restarts"),
            ("p", ("Each soft-prompt run trained several seeds and kept the prompt that scored best on the validation "
                   "examples, or on its own training examples when there were none (macro-F1 first, then accuracy, "
                   "then lower loss); only the kept prompt is scored on the test set.")),
            ("table", ["run", "seed", "judged on", "fit %", "fit loss", ""], table, "lrlrrl")]


def _sample_blocks(rows: list[dict], runs: dict[str, Any], n: int = 6) -> list[tuple]:
    """Generation: the first test questions with their gold answers and each table row's
    answer (its first run), so the scores can be read against real outputs."""
    cols = []
    for r in rows:
        rec = next((runs[x] for x in r["runs"] if runs.get(x, {}).get("samples")), None)
        if r["in_table"] and r["section"] == "main" and rec is not None:
            cols.append((r["name"].split(" (")[0], rec["samples"]))
    if not cols:
        return []
    first = cols[0][1]
    table = []
    for i, s in enumerate(first[:n]):
        q = s["question"] if len(s["question"]) <= 90 else s["question"][:87] + "..."
        table.append([q, " / ".join(s["gold"])] + [(c[i]["answer"] if i < len(c) else "") or "(empty)" for _, c in cols])
    return [("h", 2, "Sample answers"),
            ("p", (f"The first {len(table)} test questions, the gold answers and each method's greedy answer "
                   "(first run of each row).")),
            ("table", ["question", "gold", *[name for name, _ in cols]], table, "l" * (2 + len(cols)))]


_INLINE = [(re.compile(r"\*\*(.+?)\*\*"), r"<strong>\1</strong>"), (re.compile(r"\*(.+?)\*"), r"<em>\1</em>"),
           (re.compile(r"`(.+?)`"), r"<code>\1</code>")]


def _html_inline(text: str) -> str:
    s = html.escape(text, quote=False)
    for pat, rep in _INLINE:
        s = pat.sub(rep, s)
    return s


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: list[tuple]) -> str:
    out = []
    for blk in blocks:
        if blk[0] == "h":
            out.append("#" * blk[1] + " " + blk[2])
        elif blk[0] == "p":
            out.append(blk[1])
        elif blk[0] == "table":
            head, rows = blk[1], blk[2]
            align = blk[3] if len(blk) > 3 else "l" + "r" * (len(head) - 1)
            out.append("| " + " | ".join(head) + " |")
            out.append("|" + "|".join("---:" if a == "r" else "---" for a in align) + "|")
            out += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
        elif blk[0] == "img":
            out.append(f"![{blk[2]}]({blk[1]})\n\n*{blk[2]}*")
        elif blk[0] == "pre":
            out.append("```\n" + blk[1] + "\n```")
        out.append("")
    return "\n".join(out)


CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
       "table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 7px}"
       "th{background:#f3f3f3}img{max-width:100%}"
       "pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:12px}figcaption{color:#555;font-size:13px}")


def render_html(blocks: list[tuple], folder: Path, title: str) -> str:
    out = [(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>")]
    for blk in blocks:
        if blk[0] == "h":
            out.append(f"<h{blk[1]}>{html.escape(blk[2])}</h{blk[1]}>")
        elif blk[0] == "p":
            out.append(f"<p>{_html_inline(blk[1])}</p>")
        elif blk[0] == "table":
            align = blk[3] if len(blk) > 3 else "l" + "r" * (len(blk[1]) - 1)
            out.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in blk[1]) + "</tr>")
            for r in blk[2]:
                out.append("<tr>" + "".join(
                    f"<td style='text-align:{'right' if a == 'r' else 'left'}'>{html.escape(c)}</td>"
                    for c, a in zip(r, align)) + "</tr>")
            out.append("</table>")
        elif blk[0] == "img":
            data = base64.b64encode((folder / blk[1]).read_bytes()).decode()
            out.append(f"<figure><img alt='{html.escape(blk[2])}' src='data:image/png;base64,{data}'>"
                       f"<figcaption>{html.escape(blk[2])}</figcaption></figure>")
        elif blk[0] == "pre":
            out.append(f"<pre>{html.escape(blk[1])}</pre>")
    out.append("</body></html>")
    return "\n".join(out)


def write_report(results: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write the plots, ``report.md`` and ``report.html`` into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = make_plots(results, out)
    blocks = _blocks(results, plots)
    md, hp = out / "report.md", out / "report.html"
    md.write_text(render_markdown(blocks), encoding="utf-8")
    hp.write_text(render_html(blocks, out, f"softprompt compare: {results['task']['name']}"), encoding="utf-8")
    paths = {"markdown": md, "html": hp}
    paths.update({name: out / name for name, _ in plots})
    return paths
