"""The report's PNG figures, drawn with matplotlib's Agg backend (no display needed).

Apart from ``report.py`` (tables and text) because only the figures need matplotlib; both
read the same summarized rows (``report.summarize``), so a plot shows the numbers of its
table: bars and lines are means, error bars the sample std over seeds or demonstration
orders, dots single runs.  The metric names per task kind live here, as the figures are
where they are first needed (``report.py`` re-exports them).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..core import atomic
from ..data.task import TaskKind

__all__ = ["FAMILY_COLORS", "METRICS", "PLOTS", "best_row", "draw_plots", "metric_names", "plot_names"]

PLOTS = ("accuracy_by_method.png", "accuracy_vs_length.png", "accuracy_vs_init.png", "learning_curve.png",
         "training_loss.png")
METRICS = {
    TaskKind.CLASSIFICATION: (("accuracy", "accuracy"), ("macro_f1", "macro-F1")),
    TaskKind.GENERATION: (("exact_match", "exact match"), ("f1", "F1")),
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
    kind = (results.get("task") or {}).get("kind") or TaskKind.CLASSIFICATION
    if kind not in METRICS:
        raise ValueError(f"no metrics defined for task kind {kind!r}; known kinds are {list(METRICS)}")
    return METRICS[kind]


def plot_names(results: dict[str, Any]) -> tuple[str, ...]:
    """File names of the plots: :data:`PLOTS` for classification; for generation the bar chart
    shows exact match and F1 and the other plots exact match."""
    if metric_names(results)[0][0] == "accuracy":
        return PLOTS
    return ("em_f1_by_method.png",) + tuple(n.replace("accuracy", "exact_match") for n in PLOTS[1:])




def best_row(rows: list[dict], families: set[str], sections: set[str]) -> dict | None:
    """The summarized row of the highest primary metric among ``families`` x ``sections``."""
    cands = [r for r in rows if r["family"] in families and r["section"] in sections and r["primary"]]
    return max(cands, key=lambda r: r["primary"]["mean"], default=None)


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
    pe = best_row(rows, {"prompt engineering"}, {"main"})
    if pe:
        line(pe["primary"]["mean"], color=FAMILY_COLORS["prompt engineering"], linestyle="--", linewidth=1.2,
             label=f"best hand-written: {pe['name'].split(' (')[0]} ({100 * pe['primary']['mean']:.1f}%)")


def _title(results: dict) -> str:
    d = results.get("data", {})
    return f"{results['task']['name']} | {results.get('model', '')} | test n={d.get('test', '?')}"


def _save(fig, path: Path) -> None:
    atomic.write_atomic(path, lambda tmp: fig.savefig(tmp, format=Path(path).suffix[1:] or "png", bbox_inches="tight",
                                                      dpi=110), mode=0o644)


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


def draw_plots(results: dict[str, Any], out_dir: str | os.PathLike, rows: list[dict]) -> list[tuple[str, str]]:
    """Write the PNGs that have data from the summarized ``rows``; returns (file name, caption) pairs."""
    plt = _plt()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
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

