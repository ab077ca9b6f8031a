"""A third deployable option in a comparison: the chosen hard prompt distilled into a soft prompt.

Why here: with unlabelled inputs (``--unlabeled-file``) a user can have the hard prompt's answers at
a soft prompt's cost per query without more labels.  Only the decision's chosen hard prompt is
the teacher (its saved artifact, with its calibration), so no label is used beyond those the hard
side already used; the student trains with the one recipe on the inputs alone (``apps/distill.py``)
and is scored on the same test examples as the two chosen prompts, beside them in the decision
block (``decision["distilled"]``: test metrics, agreement with the teacher, the paired interval of
student - teacher, cost).  It is an option shown with its cost, not part of the hard-vs-soft rule.
"""
from __future__ import annotations

from typing import Any

from ..distill import Teacher, compare_to_teacher, distil

NAME = "soft prompt distilled from the chosen hard prompt"


def distil_chosen_hard(comp) -> None:
    """Run the distillation when the comparison has unlabelled inputs and its chosen hard prompt
    has an artifact; record it (or why not) as ``decision["distilled"]``."""
    inputs = getattr(comp, "unlabeled", None)
    dec = comp.results.get("decision")
    if not inputs or not dec:
        return
    art = (dec.get("hard") or {}).get("artifact")
    if not art:
        dec["distilled"] = {"name": NAME, "skipped": "the chosen hard prompt differs per input (no prompt file "
                                                     "to distil)"}
        comp.log(f"distillation skipped: {dec['distilled']['skipped']}")
        return
    teacher = Teacher.from_artifact(comp.out / art, comp.model)
    d = distil(comp.model, comp.tok, comp.task, teacher, inputs, n_tokens=comp.cfg.prompt_length, seed=0,
               out_dir=comp.out / "distilled", resume=True, progress=comp.progress)
    cmp = compare_to_teacher(comp.model, comp.tok, comp.task, d, comp.test,
                             latency_examples=comp.cfg.latency_examples, batch_size=comp.cfg.eval_batch_size)
    dec["distilled"] = record(d, cmp, art="distilled/prompt.safetensors", n_inputs=len(inputs))
    comp.log(f"{NAME}: test accuracy {cmp['student']['accuracy']:.3f} (teacher {cmp['teacher']['accuracy']:.3f}), "
             f"agreement {cmp['agreement']:.3f}")


def record(d, cmp: dict[str, Any], *, art: str, n_inputs: int) -> dict[str, Any]:
    return {
        "name": NAME, "artifact": art, "n_inputs": n_inputs, "n_valid": d.n_valid, "tokens": d.prompt.n_tokens,
        "agreement_valid": d.agreement_valid, "agreement_test": cmp["agreement"],
        "test": cmp.get("student"), "teacher_test": cmp.get("teacher"), "difference": cmp.get("difference"),
        "cost": {"train_s": round(d.teacher_seconds + d.result.wall_time_s, 1),
                 "tokens_per_query": cmp["student_tokens_per_query"],
                 "teacher_tokens_per_query": cmp["teacher_tokens_per_query"],
                 "latency_ms": cmp["student_ms_batch1"], "teacher_latency_ms": cmp["teacher_ms_batch1"]},
    }


def distilled_block(dec: dict[str, Any]) -> list[tuple]:
    """The report's paragraph on the distilled option (decision_report.py)."""
    d = dec.get("distilled")
    if not d:
        return []
    if d.get("skipped"):
        return [("p", f"**Distilled option.** Not made: {d['skipped']}.")]
    t, c = d.get("test") or {}, d["cost"]
    diff = (d.get("difference") or {}).get("accuracy") or {}
    ci = (f"; student - teacher accuracy {100 * diff['difference']:+.1f} points [{100 * diff['low']:+.1f}, "
          f"{100 * diff['high']:+.1f}] (paired bootstrap 95%)") if diff else ""
    return [("p", f"**Distilled option** (`{d['artifact']}`, {d['n_inputs']} unlabelled inputs, no labels beyond the "
                  f"hard side's): the chosen hard prompt taught to {d['tokens']} soft tokens scores "
                  f"{100 * t.get('accuracy', 0):.1f}% accuracy / {100 * t.get('macro_f1', 0):.1f} macro-F1 on the same "
                  f"test examples, agreeing with it on {100 * d['agreement_test']:.1f}%{ci}; "
                  f"{c['tokens_per_query']:.0f} tokens and {c['latency_ms']:.1f} ms per query at batch 1 (the hard "
                  f"prompt: {c['teacher_tokens_per_query']:.0f} and {c['teacher_latency_ms']:.1f}), "
                  f"{c['train_s']:.0f} s to make.")]


__all__ = ["NAME", "distil_chosen_hard", "distilled_block", "record"]
