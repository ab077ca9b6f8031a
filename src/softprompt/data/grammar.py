"""The one template grammar: ``{soft:N}`` soft slots, ``{name}`` input fields, ``{{``/``}}`` literal braces.

It lives at the bottom layer because a task's template is data: :class:`~softprompt.data.Task`
reads its input fields with :func:`parse`, and :mod:`softprompt.core.templates` renders the same
segments to token ids.  Anything else inside braces (``{soft: 5}``, ``{two words}``) is an error.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Segment", "TemplateError", "parse"]

_TOKEN = re.compile(r"\{\{|\}\}|\{soft:(\d+)\}|\{([A-Za-z_][A-Za-z0-9_]*)\}|\{|\}")


class TemplateError(ValueError):
    """A template string that cannot be parsed or rendered."""


@dataclass(frozen=True)
class Segment:
    kind: str  # "text" | "field" | "soft"
    value: str | int  # the text, the field name, or the number of soft tokens


def parse(template: str) -> tuple[Segment, ...]:
    """Split a template string into segments, merging adjacent literal text."""
    segments: list[Segment] = []
    pos = 0

    def add_text(text: str) -> None:
        if not text:
            return
        if segments and segments[-1].kind == "text":
            segments[-1] = Segment("text", segments[-1].value + text)  # type: ignore[operator]
        else:
            segments.append(Segment("text", text))

    for m in _TOKEN.finditer(template):
        add_text(template[pos : m.start()])
        pos = m.end()
        tok = m.group(0)
        if tok == "{{":
            add_text("{")
        elif tok == "}}":
            add_text("}")
        elif m.group(1) is not None:
            n = int(m.group(1))
            if n <= 0:
                raise TemplateError(f"{template!r}: a soft slot needs at least one token, got {{soft:{n}}}")
            segments.append(Segment("soft", n))
        elif m.group(2) is not None:
            segments.append(Segment("field", m.group(2)))
        else:
            raise TemplateError(
                f"{template!r}: stray {tok!r} at character {m.start()}; write {{{{ or }}}} for a literal brace, "
                "{soft:N} for N soft tokens, {name} for an input field"
            )
    add_text(template[pos:])
    return tuple(segments)
