"""HotpotQA: the context truncation rule (:func:`hotpot_context`) and the 500-question reader.

The built-in ``hotpotqa`` task (:mod:`softprompt.data.builtin`) splits these questions by
position; benchmarks read them unsplit with :func:`hotpotqa_examples`.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .loaders import data_root, read_text
from .task import DataError, Example

__all__ = ["HOTPOT_FILE", "HOTPOT_MARKS_FILE", "hotpot_context", "hotpotqa_examples", "iter_hotpotqa"]

HOTPOT_FILE = Path("hotpotqa_ircot_dev500") / "dev_subsampled.jsonl"
HOTPOT_MARKS_FILE = Path("hotpotqa_distractor_dev100") / "hotpot_dev_distractor_v1_100.json"


def _words(s: str) -> int:
    return len(s.split())


def _render_paragraph(title: Any, text: Any) -> str:
    return " ".join(f"{title or ''}: {text or ''}".split())


def _marked_sentences(p: Mapping[str, Any]) -> str | None:
    """The paragraph cut to its marked supporting sentences, or None without usable marks.

    Marks are ``sentences`` (the paragraph's sentences) plus ``supporting_sentences``
    (0-based indices into them, HotpotQA's ``supporting_facts``).  Out-of-range indices,
    a known quirk of a few HotpotQA entries, are ignored."""
    sentences = p.get("sentences")
    marks = p.get("supporting_sentences")
    if not sentences or not marks:
        return None
    keep = sorted({i for i in marks if isinstance(i, int) and 0 <= i < len(sentences)})
    if not keep:
        return None
    return _render_paragraph(p.get("title"), " ".join(str(sentences[i]).strip() for i in keep))


def hotpot_context(
    paragraphs: Sequence[Mapping[str, Any]],
    max_context_words: int = 150,
    *,
    tokenizer: Any = None,
    max_context_tokens: int | None = None,
) -> str:
    """Build one HotpotQA context string from its paragraphs, within a length budget.

    HotpotQA questions come with about ten paragraphs (1,400 tokens on average), more than
    a small model's prompt should carry, so the context is truncated by this rule:

    * **Budget.** ``max_context_words`` whitespace-separated words of the whole context
      (titles included); or, with ``tokenizer`` and ``max_context_tokens``, that many
      tokens of the context string encoded on its own (no special tokens).
    * **Format.** Each paragraph is written ``"Title: text"`` with whitespace collapsed;
      paragraphs are joined by newlines.  No paragraph is ever cut mid-sentence.
    * **Supporting paragraphs first, always kept.** Paragraphs marked ``is_supporting``
      come first, in file order, and are never dropped: without them the question cannot
      be answered, so when they alone exceed the budget the context exceeds it too.
    * **Supporting sentences, when marked.** If the supporting paragraphs alone exceed the
      budget, each one that carries sentence marks (``sentences`` and
      ``supporting_sentences`` indices) is reduced to its marked sentences, in order.
    * **Distractors fill the rest.** The other paragraphs are then taken in file order,
      each added whole only if the context stays within the budget; one that does not
      fit is skipped and a later, shorter one may still fit.
    * **No marks at all.** Only then may a paragraph be cut: if not even the first
      paragraph fits, its first words (or tokens) up to the budget are kept, so the
      context is never empty.

    Putting the supporting paragraphs first makes the task easier than HotpotQA's
    shuffled distractor setting; every method in a comparison sees the same contexts.
    """
    if max_context_tokens is not None:
        if tokenizer is None:
            raise ValueError("max_context_tokens needs a tokenizer to count tokens with")
        if max_context_tokens < 0:
            raise ValueError(f"max_context_tokens must be >= 0, got {max_context_tokens}")
        budget = max_context_tokens

        def length(s: str) -> int:
            return len(tokenizer(s, add_special_tokens=False).input_ids)

        def cut(s: str, n: int) -> str:
            return tokenizer.decode(tokenizer(s, add_special_tokens=False).input_ids[:n]).strip()
    else:
        if max_context_words < 0:
            raise ValueError(f"max_context_words must be >= 0, got {max_context_words}")
        budget, length = max_context_words, _words

        def cut(s: str, n: int) -> str:
            return " ".join(s.split()[:n])

    support = [p for p in paragraphs if p.get("is_supporting")]
    others = [p for p in paragraphs if not p.get("is_supporting")]
    chosen = [_render_paragraph(p.get("title"), p.get("paragraph_text")) for p in support]
    if chosen and length("\n".join(chosen)) > budget:
        chosen = [_marked_sentences(p) or full for p, full in zip(support, chosen)]
    for p in others:
        text = _render_paragraph(p.get("title"), p.get("paragraph_text"))
        if length("\n".join(chosen + [text])) <= budget:
            chosen.append(text)
    if not chosen and others:
        chosen = [cut(_render_paragraph(others[0].get("title"), others[0].get("paragraph_text")), budget)]
    return "\n".join(chosen)


def _hotpot_answers(objs: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
    out: list[str] = []
    for o in objs:
        cands = list(o.get("spans") or [])
        if not cands and o.get("number"):
            cands = [str(o["number"])]
        if not cands and any((o.get("date") or {}).values()):
            dt = o["date"]
            cands = [" ".join(str(dt[k]) for k in ("day", "month", "year") if dt.get(k))]
        for c in cands:
            c = " ".join(str(c).split())
            if c and c not in out:
                out.append(c)
    return tuple(out)


def _hotpot_sentence_marks(root: Path) -> dict[str, dict[str, tuple[list[str], list[int]]]]:
    """Question id -> supporting title -> (its sentences, supporting sentence indices), from
    the official distractor-format file (the first 103 dev questions, all of which are in
    the 500-question file).  Empty when that file is absent: marks are optional."""
    path = root / HOTPOT_MARKS_FILE
    if not path.exists():
        return {}
    try:
        data = json.loads(read_text(path, "utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno}: {e.msg}") from None
    marks: dict[str, dict[str, tuple[list[str], list[int]]]] = {}
    for i, entry in enumerate(data):
        try:
            sentences = {str(title): list(sents) for title, sents in entry["context"]}
            ids: dict[str, list[int]] = {}
            for title, idx in entry["supporting_facts"]:
                ids.setdefault(str(title), []).append(int(idx))
            marks[str(entry["_id"])] = {t: (sentences[t], v) for t, v in ids.items() if t in sentences}
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{path}: entry {i}: unexpected structure ({e!r})") from None
    return marks


def iter_hotpotqa(root: Path, **context_kw: Any):
    """Examples of the 500-question file in file order, contexts per :func:`hotpot_context`
    (supporting paragraphs carry sentence marks where the official file has them)."""
    path = root / HOTPOT_FILE
    text = read_text(path, "utf-8")
    marks = _hotpot_sentence_marks(root)
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}: line {lineno}"
        try:
            obj = json.loads(line)
            question = " ".join(obj["question_text"].split())
            answers = _hotpot_answers(obj["answers_objects"])
            qmarks = marks.get(str(obj.get("question_id")), {})
            paragraphs = []
            for p in obj["contexts"]:
                m = qmarks.get(str(p["title"])) if p.get("is_supporting") else None
                paragraphs.append({**p, "sentences": m[0], "supporting_sentences": m[1]} if m else p)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: malformed JSON: {e.msg}") from None
        except (KeyError, TypeError, AttributeError) as e:
            raise DataError(f"{where}: unexpected structure ({e!r})") from None
        if not question or not answers:
            raise DataError(f"{where}: empty question or no gold answer")
        context = hotpot_context(paragraphs, **context_kw)
        yield Example({"context": context, "question": question}, target=answers[0], answers=answers)


def hotpotqa_examples(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    limit: int | None = None,
    max_context_words: int = 150,
    tokenizer: Any = None,
    max_context_tokens: int | None = None,
) -> list[Example]:
    """All 500 HotpotQA questions (or the first ``limit``), in file order, unsplit, with
    contexts built by :func:`hotpot_context` under a word budget or, with ``tokenizer``
    and ``max_context_tokens``, a token budget.  For benchmarks that split the questions
    their own way; the built-in ``hotpotqa`` task splits them by position."""
    root = data_root(data_dir)
    out: list[Example] = []
    for ex in iter_hotpotqa(root, max_context_words=max_context_words, tokenizer=tokenizer,
                             max_context_tokens=max_context_tokens):
        if limit is not None and len(out) >= limit:
            break
        out.append(ex)
    return out

