"""The templates a comparison builds from the task's own: soft tokens resized, an instruction
with soft tokens at a position (hybrid), a prompt moved to another task (transfer), and
few-shot prompts whose demonstrations end with their answer (generation tasks).

Pure functions of templates and tasks (no model), so they are tested on their own.
"""
from __future__ import annotations

from ...hard import baselines as B
from ...core.prompts import SoftPrompt
from ...data import Example, Task
from ...core.templates import Segment, Template
from .config import POSITIONS

__all__ = ["few_shot_answer_template", "hybrid_template", "transfer_template", "with_soft_length"]


def _segments_text(segments) -> str:
    out = []
    for seg in segments:
        if seg.kind == "soft":
            out.append(f"{{soft:{seg.value}}}")
        elif seg.kind == "field":
            out.append("{" + seg.value + "}")
        else:
            out.append(B.escape(seg.value))
    return "".join(out)


def with_soft_length(template: str, n: int) -> str:
    """The template with its soft tokens resized to ``n`` (one slot, where the first slot was;
    prepended when the template has none)."""
    segs = Template(template).segments
    if not any(s.kind == "soft" for s in segs):
        return f"{{soft:{n}}} " + template
    out, done = [], False
    for s in segs:
        if s.kind == "soft":
            if not done:
                out.append(Segment("soft", n))
                done = True
            continue
        out.append(s)
    return _segments_text(out)


def hybrid_template(task: Task, n: int, position: str, instruction: str | None = None) -> str:
    """Instruction + hard template with ``n`` soft tokens at ``position``:
    ``prefix`` (before everything), ``between`` (right after the first input field),
    ``answer`` (at the very end, right before the answer word)."""
    instr = (instruction if instruction is not None else task.instruction or "").strip()
    head = B.escape(instr) + "\n" if instr else ""
    hard = B.hard_template(task.template)
    soft = f"{{soft:{n}}}"
    if position == "prefix":
        return f"{soft} {head}{hard.text}"
    if position == "answer":
        return f"{head}{hard.text}{soft}"
    if position == "between":
        segs = list(hard.segments)
        i = hard.first_field
        if i >= len(segs):
            raise ValueError(f"template {task.template!r} has no input field")
        return head + _segments_text(segs[: i + 1] + [Segment("soft", n)] + segs[i + 1:])
    raise ValueError(f"unknown position {position!r}; choose from {', '.join(POSITIONS)}")


def transfer_template(prompt: SoftPrompt, eval_task: Task) -> str:
    """The prompt's own template when the eval task has its fields, else the eval task's
    template with its soft slot resized to the prompt's length."""
    own = Template(prompt.template)
    if set(own.fields) <= set(eval_task.input_fields):
        return prompt.template
    if sum(1 for s in own.segments if s.kind == "soft") != 1:
        raise ValueError("transfer to a task with other fields needs a prompt with one block of soft tokens")
    return with_soft_length(eval_task.template, prompt.n_tokens)


def few_shot_answer_template(task: Task, demos: list[Example], instruction: str | None = None,
                             separator: str = "\n\n") -> str:
    """Few-shot prompt for a generation task: as ``baselines.few_shot_template``, but each
    demonstration ends with its gold answer (``target``) instead of a label word."""
    instr = (instruction if instruction is not None else task.instruction or "").strip()
    head = f"{B.escape(instr)}\n" if instr else ""
    shots = []
    for d in demos:
        if not d.target:
            raise ValueError("a generation demonstration needs a target answer")
        text = B.render_demo(task.template, Example(d.fields, label="answer"), {"answer": " " + d.target.strip()})
        shots.append(B.escape(text) + separator)
    return head + "".join(shots) + B.hard_template(task.template).text

