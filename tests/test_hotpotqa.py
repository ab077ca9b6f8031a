"""HotpotQA context truncation (``softprompt.data.hotpot_context``) and the 500-question reader.

The rule is checked on hand-made paragraphs (word and token budgets, sentence marks, no
marks), then on the real file: every one of the 500 contexts must contain its supporting
paragraphs (or their marked sentences) and stay within the budget whenever the supporting
paragraphs alone fit.  Real-data tests skip when the shared data directory is absent.
"""
from __future__ import annotations

import json

import pytest

from softprompt.data import (
    HOTPOT_FILE,
    HOTPOT_MARKS_FILE,
    DataNotFoundError,
    data_root,
    hotpot_context,
    hotpotqa_examples,
)
from softprompt.testing import tiny_tokenizer


def para(title, text, supporting=False, **extra):
    return {"title": title, "paragraph_text": text, "is_supporting": supporting, **extra}


PARAS = [
    para("A", "one two three"),  # 4 words with its title
    para("B", "gold  text here", True),  # 4
    para("C", "w " * 20),  # 21: never fits a small budget
    para("D", "more gold", True),  # 3
    para("E", "short"),  # 2
]


def test_supporting_paragraphs_first_then_distractors_that_fit():
    # 7 words of support; A (4) fits in 11, C never does, E (2) would exceed 11 after A
    assert hotpot_context(PARAS, max_context_words=11).split("\n") == ["B: gold text here", "D: more gold",
                                                                       "A: one two three"]
    # a shorter distractor later in the file still fills a gap a longer one left
    assert hotpot_context(PARAS, max_context_words=10).split("\n") == ["B: gold text here", "D: more gold", "E: short"]
    assert hotpot_context(PARAS, max_context_words=100).split("\n")[:2] == ["B: gold text here", "D: more gold"]
    assert len(hotpot_context(PARAS, max_context_words=100).split("\n")) == 5


@pytest.mark.parametrize("budget", [0, 1, 6])
def test_supporting_paragraphs_are_kept_over_budget(budget):
    ctx = hotpot_context(PARAS, max_context_words=budget)
    assert ctx.split("\n") == ["B: gold text here", "D: more gold"]


def test_token_budget_counts_tokens_of_the_whole_context():
    tok = tiny_tokenizer()  # word-level: "B: gold text here" is 5 tokens (':' is its own)

    def n(s: str) -> int:
        return len(tok(s, add_special_tokens=False).input_ids)

    support = "B: gold text here\nD: more gold"
    for budget in range(n(support), n(support) + 12):
        ctx = hotpot_context(PARAS, tokenizer=tok, max_context_tokens=budget)
        assert ctx.startswith(support) and n(ctx) <= budget
    assert hotpot_context(PARAS, tokenizer=tok, max_context_tokens=0) == support
    with pytest.raises(ValueError, match="needs a tokenizer"):
        hotpot_context(PARAS, max_context_tokens=10)
    with pytest.raises(ValueError, match=">= 0"):
        hotpot_context(PARAS, max_context_words=-1)


SENTS = ["First is background.", "Second holds the answer.", "Third is noise.", "Fourth too."]


def test_marked_supporting_sentences_replace_a_paragraph_only_when_over_budget():
    marked = para("S", " ".join(SENTS), True, sentences=SENTS, supporting_sentences=[1, 3])
    paras = [para("X", "distractor words"), marked, para("T", "other gold", True)]
    # fits: the supporting paragraph is whole, and the distractor follows
    whole = hotpot_context(paras, max_context_words=50).split("\n")
    assert whole == ["S: " + " ".join(SENTS), "T: other gold", "X: distractor words"]
    # over budget: reduced to its marked sentences, in order; unmarked paragraphs stay whole
    cut = hotpot_context(paras, max_context_words=8).split("\n")
    assert cut == ["S: Second holds the answer. Fourth too.", "T: other gold"]
    # out-of-range marks (a HotpotQA quirk) are ignored; no usable mark keeps the paragraph whole
    bad = dict(marked, supporting_sentences=[7])
    assert hotpot_context([bad], max_context_words=1) == "S: " + " ".join(SENTS)
    odd = dict(marked, supporting_sentences=[3, 9, 1])
    assert hotpot_context([odd], max_context_words=1) == "S: Second holds the answer. Fourth too."


def test_without_marks_the_context_is_never_empty():
    paras = [para("Movie", "a b c d e f g h"), para("Short", "x y")]
    assert hotpot_context(paras, max_context_words=3) == "Short: x y"
    assert hotpot_context(paras[:1], max_context_words=3) == "Movie: a b"
    tok = tiny_tokenizer()
    assert hotpot_context(paras[:1], tokenizer=tok, max_context_tokens=3) == "movie : a"  # decoded word-level tokens


# --------------------------------------------------------------------------- the real file


def shared_root():
    try:
        root = data_root()
    except DataNotFoundError as e:
        pytest.skip(f"shared data directory not available (set SOFTPROMPT_DATA): {e}")
    if not (root / HOTPOT_FILE).exists():
        pytest.skip(f"{root / HOTPOT_FILE} not found")
    return root


def _rendered(p) -> str:
    return " ".join(f"{p['title']}: {p['paragraph_text']}".split())


def test_real_contexts_keep_supporting_paragraphs_within_budget():
    root = shared_root()
    rows = [json.loads(line) for line in (root / HOTPOT_FILE).read_text().splitlines() if line.strip()]
    budget = 120
    exs = hotpotqa_examples(root, max_context_words=budget)
    assert len(exs) == len(rows) == 500
    marks_file = (root / HOTPOT_MARKS_FILE).exists()
    official = {e["_id"]: e for e in json.loads((root / HOTPOT_MARKS_FILE).read_text())} if marks_file else {}
    reduced = over = 0
    for row, ex in zip(rows, exs):
        assert ex.fields["question"] == " ".join(row["question_text"].split())
        assert ex.target == row["answers_objects"][0]["spans"][0].strip()
        lines = ex.fields["context"].split("\n")
        support = [_rendered(p) for p in row["contexts"] if p["is_supporting"]]
        assert len(support) == 2 and len(lines) >= 2
        n_support = sum(len(s.split()) for s in support)
        words = len(ex.fields["context"].split())
        if n_support <= budget:
            assert lines[:2] == support and words <= budget
        elif lines[:2] == support:  # over budget without sentence marks: kept whole
            over += 1
            assert row["question_id"] not in official
        else:  # over budget, reduced to the officially marked supporting sentences
            reduced += 1
            entry = official[row["question_id"]]
            sents = {t: s for t, s in entry["context"]}
            for line, p in zip(lines[:2], [p for p in row["contexts"] if p["is_supporting"]]):
                idx = sorted({i for t, i in entry["supporting_facts"] if t == p["title"]})
                want = " ".join(sents[p["title"]][i].strip() for i in idx if i < len(sents[p["title"]]))
                assert line == " ".join(f"{p['title']}: {want}".split())
                assert len(line) < len(_rendered(p)) or len(idx) == len(sents[p["title"]])
        # distractors are whole paragraphs of this question
        others = {_rendered(p) for p in row["contexts"] if not p["is_supporting"]}
        assert set(lines[2:]) <= others
    assert over > 0
    assert reduced > 0 or not marks_file
