"""One table over several comparisons: the decision block of each results.json, side by side.

    python benchmarks/summarize_reports.py runs/reports/raft runs/reports/sst2 ...

Per comparison: the task, test size, majority-class rate, the hard prompt and the soft prompt
each family chose on validation (with its calibration and test accuracy / macro-F1), the
paired difference on the selection metric with its bootstrap 95% interval and McNemar's p,
and what the comparison recommends.  Everything is read from results.json; nothing is rerun.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from softprompt.apps.compare.decision import from_results


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def row(folder: Path) -> list[str]:
    res = json.loads((folder / "results.json").read_text())
    d = res.get("decision") or from_results(res) or {}
    data = res.get("data") or {}
    out = [res["task"]["name"], str(d.get("n_test", len(data.get("test_gold") or []))), _pct(data.get("majority_accuracy"))]
    for side in ("hard", "soft"):
        c = d.get(side) or {}
        t = c.get("test") or {}
        flag = " (at/below majority)" if c.get("at_or_below_majority") else ""
        out += [f"{c.get('name', '-')} [{c.get('calibration', 'none')}]", f"{_pct(t.get('accuracy'))} / {_pct(t.get('macro_f1'))}{flag}"]
    diff = (d.get("difference") or {}).get(d.get("select_metric", "macro_f1")) or {}
    mc = d.get("mcnemar") or {}
    out.append("-" if not diff else f"{100 * diff['difference']:+.1f} [{100 * diff['low']:+.1f}, {100 * diff['high']:+.1f}]")
    out.append("-" if not mc else f"{mc['p_value']:.3g}")
    out.append(d.get("deploy") or "none")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path, help="comparison output folders (each with results.json)")
    args = ap.parse_args()
    head = ["task", "test n", "majority %", "hard prompt chosen on validation [calibration]", "hard acc / macro-F1 %",
            "soft prompt chosen on validation [calibration]", "soft acc / macro-F1 %",
            "soft - hard, macro-F1 points [95% CI]", "McNemar p", "deploy"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for f in args.folders:
        print("| " + " | ".join(row(f)) + " |")


if __name__ == "__main__":
    main()
