"""Render a comparison's ``results.json`` into ``report.md``, ``report.html`` and PNG plots.

The report is a pure function of ``results.json`` (``write_report(load_results(path),
folder)``), so it can be regenerated or restyled without rerunning anything.  The HTML
file is ``report.md`` rendered by markdown-it-py (CommonMark with tables), self-contained:
the plots are embedded as base64 PNGs.  The plots are drawn in ``report_plots.py``.

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
from pathlib import Path
from typing import Any

from ..core import atomic
from .compare.budget import plan_blocks
from .compare.decision_report import calibration_blocks, decision_blocks
from .report_plots import METRICS, PLOTS, best_row, draw_plots, metric_names, plot_names

__all__ = ["METRICS", "PLOTS", "load_results", "make_plots", "metric_names", "plot_names", "render_html",
           "render_markdown", "summarize", "write_report"]


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



def headline(rows: list[dict]) -> dict[str, Any] | None:
    """Best soft-prompt method (prompt tuning, hybrid, ensemble; full training set) vs best
    prompt-engineering method, in points of the primary metric (accuracy or exact match)."""
    pe = best_row(rows, {"prompt engineering"}, {"main"})
    soft = best_row(rows, {"prompt tuning", "hybrid", "ensemble"}, {"main", "length", "init", "position", "ensemble"})
    if not pe or not soft:
        return None
    d = 100 * (soft["primary"]["mean"] - pe["primary"]["mean"])
    spread = 100 * math.sqrt(soft["primary"]["std"] ** 2 + pe["primary"]["std"] ** 2)
    return {"best_soft": soft["name"], "best_soft_acc": soft["primary"], "best_pe": pe["name"],
            "best_pe_acc": pe["primary"], "difference_points": d, "combined_std_points": spread}


# ----------------------------------------------------------------------------- plots
def make_plots(results: dict[str, Any], out_dir: str | os.PathLike) -> list[tuple[str, str]]:
    """Write the PNGs that have data (``report_plots``); returns (file name, caption) pairs."""
    return draw_plots(results, out_dir, summarize(results))


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
        from .compare.decision import METRIC_NAMES

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
                    "around each input (BOS and the input itself excluded); for chain-of-thought it includes the mean "
                    "number of generated tokens. "
                    + (f"*Latency*: wall time per query on {cfg.get('latency_examples')} test examples after a warm-up: "
                       "the median over queries sent one at a time (batch 1), and the best of two passes with all of "
                       "them in one batch (per query), with each prompt's prefix key/values cached as when serving. "
                       if cfg.get("latency_examples") else "*Latency*: not measured in this run. ")
                    + "*Training time*: wall time of the training loop per prompt (an ensemble: all members; with "
                    "a learning-rate search or restarts: every candidate run). "
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
    b += _lr_blocks(runs)
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
    b += plan_blocks(results)
    b.append(("p", f"Zero-shot instruction: `{results.get('instruction', '')}`. All numbers are in `results.json`."))
    return b


def _lr_blocks(runs: dict[str, Any]) -> list[tuple]:
    """Soft runs whose learning rate was chosen automatically: every candidate of the search, so the
    choice (made on validation data, never on test) can be checked."""
    table = []
    for rid, r in runs.items():
        for c in (r.get("train") or {}).get("lr_search") or []:
            scores = " → ".join(f"{100 * s[0]:.1f}" if s and math.isfinite(s[0]) else "–" for s in c["scores"])
            table.append([rid, f"{c['lr']:.3g}", str(c["seed"]), str(c["steps"]), scores, "chosen" if c["chosen"] else ""])
    if not table:
        return []
    return [("h", 2, "Learning rates"),
            ("p", ("Each run's learning rate (and seed) was chosen automatically on the validation data by successive "
                   "halving: every candidate trains a quarter of the schedule, the better half on to half of it, the "
                   "best to the end (validation score per stage, macro-F1 or token F1 %). The run's training time "
                   "counts every candidate.")),
            ("table", ["run", "lr", "seed", "steps", "validation by stage", ""], table, "lrrrll")]


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


def render_html(markdown: str, folder: Path, title: str) -> str:
    """``markdown`` (report.md) as one self-contained HTML page: CommonMark + tables by markdown-it-py
    (raw HTML in the text is escaped, not passed through), the CSS inline, and each PNG of ``folder``
    it shows embedded as base64 (any other image is shown as its alt text)."""
    try:
        from markdown_it import MarkdownIt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the HTML report needs markdown-it-py: pip install 'softprompt[report]'") from e

    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = md.parse(markdown)
    for tok in tokens:
        for child in tok.children or []:
            src = str(child.attrGet("src") or "") if child.type == "image" else ""
            if not src or src.startswith("data:"):
                continue
            if "/" not in src and (folder / src).is_file():
                child.attrSet("src", "data:image/png;base64," + base64.b64encode((folder / src).read_bytes()).decode())
            else:  # e.g. an image link in generated text: the page fetches nothing, so it shows its alt text
                child.type, child.tag, child.attrs, child.children = "text", "", {}, None
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>\n" + md.renderer.render(_figures(tokens), md.options, {})
            + "</body></html>\n")


def _figures(tokens: list) -> list:
    """A plot as report.md writes it (an image paragraph, then a paragraph ``*caption*`` with the
    image's alt text) becomes ``<figure><img><figcaption>caption</figcaption></figure>``."""
    out, i = [], 0
    while i < len(tokens):
        t = tokens[i:i + 6]
        kids = [c.type for c in (t[1].children or [])] if len(t) == 6 else []
        cap = [c.type for c in (t[4].children or [])] if len(t) == 6 else []
        if (kids == ["image"] and cap == ["em_open", "text", "em_close"] and t[0].type == t[3].type == "paragraph_open"
                and t[4].children[1].content == t[1].children[0].content):
            t[0].tag = t[5].tag = "figure"
            t[2].tag = t[3].tag = "figcaption"
            t[4].children = [t[4].children[1]]
            out += [t[0], t[1], t[3], t[4], t[2], t[5]]
            i += 6
            continue
        out.append(tokens[i])
        i += 1
    return out


def write_report(results: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write the plots, ``report.md`` and ``report.html`` into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = make_plots(results, out)
    text = render_markdown(_blocks(results, plots))
    md, hp = out / "report.md", out / "report.html"
    atomic.write_text(md, text, mode=0o644)
    atomic.write_text(hp, render_html(text, out, f"softprompt compare: {results['task']['name']}"), mode=0o644)
    paths = {"markdown": md, "html": hp}
    paths.update({name: out / name for name, _ in plots})
    return paths
