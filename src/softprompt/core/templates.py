"""Templates: hard text, input fields and soft-token slots, rendered to token ids.

A template such as ``"{soft:20} Tweet: {text}\\nIs this a complaint? Answer:"`` mixes
three kinds of segment: soft slots (``{soft:N}``, N trainable vectors), input fields
(``{name}``) and literal text (``{{`` and ``}}`` are literal braces).

Rendering produces plain token-id lists in which a *negative* id ``-(k + 1)`` stands for
soft token ``k`` of the prompt.  Keeping soft tokens inside the id list (rather than a
separate position list) lets the same collate, padding and batching code serve hard
prompts, soft prompts and hybrids alike.

The template is split in two at its first input field:

* the **prefix** (BOS, leading soft tokens, the instruction text) does not depend on the
  example, so its key/values are computed once per prompt and shared by every example
  (``bank.py``);
* the **suffix** (the fields and everything after them) is run per example.

Each literal and each field is tokenised on its own, so the prefix is the same token
sequence for every example.  A literal's trailing spaces are moved onto the following
field value ("Tweet: " + "hi" -> "Tweet:" + " hi"), which is how BPE tokenisers expect a
word after a space.  Special tokens are added explicitly (BOS first, when the tokenizer
has one) because tokenizers disagree across versions about adding them by default.

Field values are user text: they are tokenised with special-token parsing off, so an input
containing ``<|endoftext|>`` or ``<|im_start|>`` is plain text and cannot end the prompt or
open a chat turn.  The template's own text is the prompt author's and keeps its special
tokens (a chat template writes them on purpose).
"""
from __future__ import annotations

from functools import lru_cache

from ..data.grammar import Segment, TemplateError, parse  # noqa: F401 -- Segment, TemplateError: also this module's API


def soft_id(k: int) -> int:
    """The placeholder id of soft token ``k`` inside a rendered id list."""
    return -(k + 1)


class Template:
    """A parsed template bound to nothing; rendering takes the tokenizer explicitly."""

    def __init__(self, text: str):
        self.text = text
        self.segments = parse(text)
        self.fields = tuple(dict.fromkeys(s.value for s in self.segments if s.kind == "field"))  # type: ignore[misc]
        self.n_soft = sum(s.value for s in self.segments if s.kind == "soft")  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"Template({self.text!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Template) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)

    @property
    def first_field(self) -> int:
        """Index of the first field segment (len(segments) when there is none)."""
        for i, s in enumerate(self.segments):
            if s.kind == "field":
                return i
        return len(self.segments)

    def prefix_ids(self, tokenizer, *, add_bos: bool = True) -> list[int]:
        """Ids of the example-independent head: BOS, soft tokens and text before the first field."""
        ids: list[int] = []
        if add_bos and tokenizer.bos_token_id is not None:
            ids.append(tokenizer.bos_token_id)
        soft_k = 0
        head = self.segments[: self.first_field]
        for i, seg in enumerate(head):
            if seg.kind == "soft":
                ids.extend(soft_id(soft_k + j) for j in range(seg.value))  # type: ignore[arg-type]
                soft_k += seg.value  # type: ignore[operator]
            else:
                text = seg.value
                if i == len(head) - 1 and self.first_field < len(self.segments):
                    text = text.rstrip(" ")  # the space travels with the field
                ids.extend(_encode(tokenizer, text))  # type: ignore[arg-type]
        return ids

    def suffix_ids(self, tokenizer, fields: dict[str, str]) -> list[int]:
        """Ids of the example-dependent tail: fields and everything after the first one."""
        ids: list[int] = []
        soft_k = sum(s.value for s in self.segments[: self.first_field] if s.kind == "soft")  # type: ignore[misc]
        segs = self.segments
        for i in range(self.first_field, len(segs)):
            seg = segs[i]
            if seg.kind == "soft":
                ids.extend(soft_id(soft_k + j) for j in range(seg.value))  # type: ignore[arg-type]
                soft_k += seg.value  # type: ignore[operator]
            elif seg.kind == "field":
                try:
                    value = str(fields[seg.value]).strip()  # type: ignore[index]
                except KeyError:
                    raise TemplateError(
                        f"template {self.text!r} needs field {seg.value!r}; the example has {sorted(fields)}"
                    ) from None
                prev = segs[i - 1] if i > 0 else None
                if prev is not None and prev.kind == "text" and prev.value.endswith(" "):  # type: ignore[union-attr]
                    value = " " + value
                ids.extend(_encode(tokenizer, value, user=True))
            else:
                text = seg.value
                nxt = segs[i + 1] if i + 1 < len(segs) else None
                if nxt is not None and nxt.kind == "field":
                    text = text.rstrip(" ")  # type: ignore[union-attr]
                ids.extend(_encode(tokenizer, text))  # type: ignore[arg-type]
        return ids

    def render_text(self, fields: dict[str, str], soft_marker: str = "<soft>") -> str:
        """A human-readable rendering, soft tokens shown as markers (for logs and reports)."""
        out = []
        for seg in self.segments:
            if seg.kind == "soft":
                out.append(soft_marker * seg.value)  # type: ignore[operator]
            elif seg.kind == "field":
                out.append(str(fields.get(seg.value, "{" + seg.value + "}")))  # type: ignore[arg-type]
            else:
                out.append(seg.value)  # type: ignore[arg-type]
        return "".join(out)

    def without_soft(self) -> "Template":
        """The same template with every soft slot removed (the hard-prompt counterpart)."""
        out = []
        for seg in self.segments:
            if seg.kind == "soft":
                continue
            if seg.kind == "field":
                out.append("{" + seg.value + "}")  # type: ignore[operator]
            else:
                out.append(seg.value.replace("{", "{{").replace("}", "}}"))  # type: ignore[union-attr]
        return Template("".join(out).lstrip(" "))


def continue_with(template: str, words: str) -> str:
    """Label words as they continue ``template``'s text: a leading space after text ("Answer:
    yes"), none after a line break or a space (a chat template's "assistant\n" is followed by
    "yes", as the model writes it).  Words that already start with a space are kept as given."""
    if words.startswith(" ") or template.endswith(("\n", " ")):
        return words
    return " " + words


def _encode(tokenizer, text: str, *, user: bool = False) -> list[int]:
    """``user``: text from a request or a data set, never parsed for special tokens."""
    if not text:
        return []
    if _hashable(tokenizer):
        return list(_cached_encode(tokenizer, text, user))
    return _tokenize(tokenizer, text, user)


def _tokenize(tokenizer, text: str, user: bool) -> list[int]:
    kw = {"split_special_tokens": True} if user else {}
    return list(tokenizer(text, add_special_tokens=False, **kw).input_ids)


def _hashable(obj) -> bool:
    try:
        hash(obj)
        return True
    except TypeError:
        return False


@lru_cache(maxsize=65536)
def _cached_encode(tokenizer, text: str, user: bool = False) -> tuple[int, ...]:
    return tuple(_tokenize(tokenizer, text, user))


def encode_text(tokenizer, text: str) -> list[int]:
    """Tokenise plain text without special tokens (verbalizer words, targets)."""
    return _encode(tokenizer, text)
