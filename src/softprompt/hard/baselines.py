"""Prompt-engineering baselines: zero-shot, few-shot and chain-of-thought prompts.

A hand-written prompt is simply a bank entry with no soft tokens, so every baseline is
scored by exactly the same code as a soft prompt (``scoring.classify``): same splits,
same verbalizer, same rank classification.

* **Zero-shot**: the task's instruction on its own line, then the task's template with
  its soft slots removed::

      Decide whether the tweet is a complaint ... Answer yes or no.
      Tweet: {text}
      Is this tweet a complaint? Answer:

* **Few-shot**: the instruction, then ``k`` demonstrations (training examples rendered
  with the same hard template and followed by their label word), then the query.  The
  demonstrations are literal text *before the first input field*, so they belong to the
  template's example-independent prefix: the bank computes their key/values once per
  prompt and every test example reuses them (``bank.py``).  Braces in demonstration text
  are escaped (``{`` -> ``{{``) so a tweet containing ``{text}`` stays text.
  Demonstrations are drawn class-balanced (default) or uniformly at random, for several
  sampling seeds and several orders, because few-shot accuracy is known to swing with
  the choice and order of the demonstrations (Zhao et al. 2021, Lu et al. 2022).

* **Chain-of-thought** (zero-shot CoT, Kojima et al. 2022): the instruction asks for
  reasoning followed by "The answer is <word>", the template's answer cue is followed by
  "Let's think step by step.", the model generates greedily, and :func:`parse_label`
  maps the text to a label.  Outputs that name no label (or several, with no explicit
  answer) are *unparseable*: they are counted, reported and scored as wrong, never
  dropped.

* **Two-stage chain-of-thought** (:func:`cot_two_stage`, as in Kojima et al. 2022's answer
  extraction): stage 1 generates the reasoning as above; stage 2 appends the reasoning and an
  answer cue to the prompt and rank-classifies the label words, so every example gets a label.
  The free-text parse of stage 1 stays as a diagnostic.

* **Nearest-neighbour demonstrations** (``demo_selection.py``): per query, the most similar
  training examples as its demonstrations (``demo_selection.select_demos_knn``).
"""
from __future__ import annotations

import random
import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from ..core.calibration import CALIBRATIONS, Calibration

from ..core.calibrate import fit_calibration
from ..core.conditioning import DEFAULT_MAX_BATCH_TOKENS
from ..core.scoring import classification_metrics, classify, generate
from ..data import Example, Task
from ..core.templates import Template, encode_text

__all__ = [
    "ANSWER_CUE",
    "COT_TRIGGER",
    "CotTwoStageResult",
    "cot_two_stage",
    "PARSE_RULE",
    "UNPARSEABLE",
    "CotResult",
    "cot_classify",
    "cot_template",
    "escape",
    "few_shot_template",
    "hard_template",
    "metrics_with_unparseable",
    "order_demos",
    "parse_label",
    "render_demo",
    "sample_demos",
    "template_overhead_tokens",
    "zero_shot_template",
]

#: The prediction recorded for a chain-of-thought answer that names no label.
UNPARSEABLE = "<unparseable>"
COT_TRIGGER = "Let's think step by step."


def escape(text: str) -> str:
    """Make ``text`` literal inside a template (``{`` -> ``{{``, ``}`` -> ``}}``)."""
    return text.replace("{", "{{").replace("}", "}}")


def hard_template(template: str | Template) -> Template:
    """The template with its soft slots removed (the task format a human prompt uses)."""
    t = template if isinstance(template, Template) else Template(template)
    return t.without_soft()


def _instruction(task: Task, instruction: str | None) -> str:
    text = instruction if instruction is not None else task.instruction
    return (text or "").strip()


def zero_shot_template(task: Task, instruction: str | None = None) -> str:
    """Instruction line + the hard template (the instruction is escaped, the template kept)."""
    instr = _instruction(task, instruction)
    hard = hard_template(task.template).text
    return f"{escape(instr)}\n{hard}" if instr else hard


def render_demo(template: str | Template, example: Example, verbalizer: dict[str, str]) -> str:
    """One demonstration as plain text: the hard template filled with the example's fields,
    followed by its label word (e.g. ``"Tweet: my order is late\\nIs this tweet a complaint?
    Answer: yes"``).  Field values are stripped, as when a query is rendered."""
    t = hard_template(template)
    if example.label is None:
        raise ValueError("a demonstration needs a labelled example")
    out = []
    for seg in t.segments:
        if seg.kind == "field":
            try:
                out.append(str(example.fields[seg.value]).strip())  # type: ignore[index]
            except KeyError:
                raise ValueError(f"demonstration lacks field {seg.value!r}; it has {sorted(example.fields)}") from None
        elif seg.kind == "text":
            out.append(seg.value)  # type: ignore[arg-type]
    text = "".join(out).rstrip(" ")
    word = verbalizer[example.label]
    return text + (word if word.startswith(" ") else " " + word)


def sample_demos(
    examples: list[Example], k: int, *, sampling: str = "balanced", seed: int = 0, labels: list[str] | None = None
) -> list[Example]:
    """Draw ``k`` demonstrations without replacement, in a seeded random order.

    ``balanced``: ``k // L`` per label (L labels, in ``labels`` order or order of first
    appearance), the ``k % L`` remaining slots go to labels picked at random; a label with
    too few examples gives all it has and the shortfall is filled from the other labels.
    ``random``: a uniform sample (label proportions follow the data).
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if k > len(examples):
        raise ValueError(f"asked for {k} demonstrations but only {len(examples)} training examples exist")
    rng = random.Random(seed)
    if sampling == "random":
        return rng.sample(list(examples), k)
    if sampling != "balanced":
        raise ValueError(f"unknown sampling {sampling!r}; use balanced or random")
    pools: dict[str, list[Example]] = defaultdict(list)
    for ex in examples:
        pools[ex.label].append(ex)  # type: ignore[index]
    order = [lab for lab in (labels or list(pools)) if pools.get(lab)]
    for lab in order:
        rng.shuffle(pools[lab])
    quota = {lab: k // len(order) for lab in order}
    for lab in rng.sample(order, k % len(order)):
        quota[lab] += 1
    chosen: list[Example] = []
    for lab in order:
        take = min(quota[lab], len(pools[lab]))
        chosen += pools[lab][:take]
        pools[lab] = pools[lab][take:]
    while len(chosen) < k:  # shortfall: round-robin over labels that still have examples
        for lab in order:
            if pools[lab] and len(chosen) < k:
                chosen.append(pools[lab].pop(0))
    rng.shuffle(chosen)
    return chosen


def order_demos(demos: list[Example], order: int, *, seed: int = 0) -> list[Example]:
    """Permutation number ``order`` of the demonstrations (0 = as sampled)."""
    if order == 0:
        return list(demos)
    out = list(demos)
    random.Random(f"order-{seed}-{order}").shuffle(out)
    return out


def few_shot_template(
    task: Task, demos: list[Example], instruction: str | None = None, separator: str = "\n\n"
) -> str:
    """Instruction, demonstrations and the hard template, as one template string.

    Everything before the query's first field is example-independent, so the whole block
    of demonstrations is part of the prefix the bank caches once per prompt."""
    instr = _instruction(task, instruction)
    head = f"{escape(instr)}\n" if instr else ""
    shots = "".join(escape(render_demo(task.template, d, task.verbalizer or {})) + separator for d in demos)
    return head + shots + hard_template(task.template).text


# ----------------------------------------------------------------------------- chain of thought
def cot_template(task: Task, instruction: str | None = None, trigger: str = COT_TRIGGER) -> str:
    """Zero-shot chain-of-thought: the instruction asks for reasoning and a final
    "The answer is <word>", and the answer cue is followed by ``trigger``."""
    instr = _instruction(task, instruction)
    words = ", ".join(w.strip() for w in (task.verbalizer or {}).values())
    ask = f"Think step by step, then finish with \"The answer is\" followed by one of: {words}."
    hard = hard_template(task.template).text.rstrip()
    return f"{escape((instr + ' ' + ask).strip())}\n{hard} {escape(trigger)}"


PARSE_RULE = (
    "1. If the text contains an answer marker ('answer is', 'answer:', 'answer would be', ...), the first "
    "label word starting within 40 characters after the LAST marker decides. "
    "2. Otherwise, if the text mentions the words of exactly one label (whole words, case-insensitive), that label. "
    "3. Otherwise the answer is unparseable: counted, reported, and scored as wrong."
)

_MARKER = re.compile(r"\banswer\s*(?:is|would be|should be|:|=|-)?\s*[:\-]?", re.IGNORECASE)


def _word_pattern(verbalizer: dict[str, str]) -> tuple[re.Pattern, dict[str, str]]:
    """One regex matching any label word as a whole word (longest words first)."""
    word_to_label: dict[str, str] = {}
    for lab, w in verbalizer.items():
        word_to_label.setdefault(w.strip().lower(), lab)
    words = sorted(word_to_label, key=len, reverse=True)
    alt = "|".join(re.escape(w) for w in words)
    return re.compile(rf"(?<![\w])({alt})(?![\w])", re.IGNORECASE), word_to_label


def parse_label(text: str, verbalizer: dict[str, str], *, window: int = 40) -> str | None:
    """Map a generated chain-of-thought to a label, or None when it cannot be read.

    The rule, in order:

    1. If the text contains an answer marker ("answer is", "answer:", "answer would be",
       ...), look after the *last* marker: the first label word starting within
       ``window`` characters of it decides.
    2. Otherwise (or if nothing follows the marker), if the whole text mentions the words
       of exactly one label (whole words, case-insensitive, longest words first), that
       label.
    3. Otherwise the answer is unparseable (None): no label word, or words of several
       labels with no explicit answer.

    Label words are the verbalizer's words (``" yes"`` -> ``yes``), not the label names.
    """
    pattern, word_to_label = _word_pattern(verbalizer)
    markers = list(_MARKER.finditer(text))
    if markers:
        tail = text[markers[-1].end():]
        m = pattern.search(tail)
        if m is not None and m.start() <= window:
            return word_to_label[m.group(1).lower()]
    found = {word_to_label[m.group(1).lower()] for m in pattern.finditer(text)}
    if len(found) == 1:
        return found.pop()
    return None


def metrics_with_unparseable(gold: list[str], pred: list[str | None], labels: list[str]) -> dict:
    """Classification metrics where an unparseable prediction (None) counts as wrong.

    ``accuracy`` and ``macro_f1`` are over all examples (macro-F1 averages the real labels
    only: an unparseable answer is a miss for its gold label, a false positive for none);
    ``n_unparseable``, ``unparseable_rate`` and ``accuracy_parsed`` (accuracy on the
    parseable answers) are added; the confusion matrix has an extra last column
    ``<unparseable>``."""
    preds = [p if p is not None else UNPARSEABLE for p in pred]
    m = classification_metrics(gold, preds, labels + [UNPARSEABLE])
    real = m["per_label_f1"]
    real.pop(UNPARSEABLE, None)
    m["per_label_f1"] = real
    m["macro_f1"] = sum(real.values()) / len(real)
    m["confusion"] = m["confusion"][: len(labels)]  # gold is never <unparseable>
    m["labels"] = labels
    n_bad = sum(p is None for p in pred)
    parsed = [(g, p) for g, p in zip(gold, pred) if p is not None]
    m["n_unparseable"] = n_bad
    m["unparseable_rate"] = n_bad / max(len(pred), 1)
    m["accuracy_parsed"] = (sum(g == p for g, p in parsed) / len(parsed)) if parsed else 0.0
    return m


@dataclass
class CotResult:
    texts: list[str]
    predictions: list[str | None]  # None = unparseable
    n_unparseable: int
    generated_tokens: float  # mean number of generated tokens per example
    metrics: dict = field(default_factory=dict)


@torch.no_grad()
def cot_classify(
    bank, entry, examples: list[Example], verbalizer: dict[str, str], *, max_new_tokens: int = 48,
    batch_size: int = 16, stop_at_newline: bool = False, progress: bool | str = False,
) -> CotResult:
    """Generate a chain of thought for each example with a generation entry and parse it
    (:func:`parse_label`).  Metrics (when examples carry labels) come from
    :func:`metrics_with_unparseable`."""
    gen = generate(bank, entry, examples, max_new_tokens=max_new_tokens, batch_size=batch_size,
                   stop_at_newline=stop_at_newline, progress=progress)
    preds = [parse_label(t, verbalizer) for t in gen.texts]
    n_tok = [len(encode_text(bank.tokenizer, t)) for t in gen.texts]
    res = CotResult(texts=gen.texts, predictions=preds, n_unparseable=sum(p is None for p in preds),
                    generated_tokens=sum(n_tok) / max(len(n_tok), 1))
    gold = [ex.label for ex in examples]
    if all(g is not None for g in gold):
        res.metrics = metrics_with_unparseable(gold, preds, list(verbalizer))  # type: ignore[arg-type]
    return res


ANSWER_CUE = "Therefore, the answer is"
REASONING_FIELD = "cot_reasoning"


def cot_answer_template(task: Task, instruction: str | None = None, trigger: str = COT_TRIGGER,
                        cue: str = ANSWER_CUE) -> str:
    """Stage 2 of two-stage CoT: the stage-1 prompt, its reasoning (field ``cot_reasoning``),
    then the answer cue; the label words continue the cue."""
    if REASONING_FIELD in Template(task.template).fields:
        raise ValueError(f"task template already uses the field {REASONING_FIELD!r}")
    return f"{cot_template(task, instruction, trigger)} {{{REASONING_FIELD}}}\n{escape(cue)}"


@dataclass
class CotTwoStageResult:
    texts: list[str]  # stage-1 reasoning
    predictions: list[str]  # stage-2 rank classification: always a label
    probabilities: torch.Tensor  # [N, n_labels] stage-2 (calibrated) label probabilities
    parsed: list[str | None]  # diagnostic: the stage-1 free-text parse (None = unparseable)
    n_unparseable: int  # diagnostic: stage-1 texts that name no label
    generated_tokens: float
    labels: list[str] = field(default_factory=list)
    calibration: str = "none"
    metrics: dict = field(default_factory=dict)
    raw_scores: torch.Tensor | None = None  # [N, n_labels] stage-2 label log-probs before calibration


@torch.no_grad()
def cot_two_stage(
    bank, task: Task, examples: list[Example], *, instruction: str | None = None, max_new_tokens: int = 48,
    batch_size: int = 16, calibration: str = "none", cue: str = ANSWER_CUE, progress: bool | str = False,
    class_prior=None,
) -> CotTwoStageResult:
    """Two-stage chain-of-thought that always answers: generate the reasoning (stage 1), then
    rank-classify the label words after reasoning + answer cue (stage 2, in batches of ``batch_size``),
    optionally calibrated
    (contextual/pmi on the stage-2 prompt, batch on these examples' stage-2 inputs, no labels).
    Metrics (when examples carry labels) are those of stage 2, plus the stage-1 parse's
    ``parse_accuracy``/``n_unparseable`` and ``parse_agreement`` (share where both agree)."""
    if calibration not in CALIBRATIONS:
        raise ValueError(f"unknown calibration {calibration!r}; choose one of {', '.join(CALIBRATIONS)}")
    verb = task.verbalizer or {}
    gen_name, cls_name = "__cot_stage1__", "__cot_stage2__"
    bank.add(gen_name, cot_template(task, instruction), kind="generation")
    bank.add(cls_name, cot_answer_template(task, instruction, cue=cue), verbalizer=verb)
    try:
        # generation in batches bounded by tokens, not by ``batch_size``: reasoning lengths differ a lot
        # (a row that ends at once next to one that runs to max_new_tokens), rows leave the batch as
        # they stop, and the long ones decode together
        gen = generate(bank, gen_name, examples, max_new_tokens=max_new_tokens, batch_size=max(len(examples), 1),
                       stop_at_newline=False, progress=progress, max_batch_tokens=DEFAULT_MAX_BATCH_TOKENS)
        stage2 = [Example({**ex.fields, REASONING_FIELD: t}, ex.label) for ex, t in zip(examples, gen.texts)]
        cal = fit_calibration(bank, cls_name, calibration, inputs=[Example(ex.fields) for ex in stage2],
                              batch_size=batch_size, class_prior=class_prior) if calibration != "none" else Calibration()
        res = classify(bank, cls_name, stage2, batch_size=batch_size, calibration=cal)
    finally:
        bank.remove(cls_name)
        bank.remove(gen_name)
    parsed = [parse_label(t, verb) for t in gen.texts]
    n_tok = [len(encode_text(bank.tokenizer, t)) for t in gen.texts]
    out = CotTwoStageResult(texts=gen.texts, predictions=res.predictions, probabilities=res.probabilities,
                            parsed=parsed, n_unparseable=sum(p is None for p in parsed),
                            generated_tokens=sum(n_tok) / max(len(n_tok), 1), labels=res.labels,
                            calibration=cal.method, raw_scores=res.raw_scores)
    if res.metrics:
        gold = [ex.label for ex in examples]
        diag = metrics_with_unparseable(gold, parsed, res.labels)  # type: ignore[arg-type]
        out.metrics = {**res.metrics, "parse_accuracy": diag["accuracy"], "n_unparseable": out.n_unparseable,
                       "unparseable_rate": diag["unparseable_rate"],
                       "parse_agreement": sum(p == q for p, q in zip(parsed, res.predictions)) / max(len(parsed), 1)}
    return out


def template_overhead_tokens(template: str | Template, tokenizer) -> int:
    """Tokens a template adds to every query: soft tokens plus literal text (instruction,
    demonstrations, field labels, answer cue), excluding BOS and the example's own field
    tokens.  Literals are tokenised on their own (``templates.py``), so this is a constant
    per template."""
    t = template if isinstance(template, Template) else Template(template)
    n = len(t.prefix_ids(tokenizer, add_bos=False))
    segs = t.segments
    for i in range(t.first_field, len(segs)):
        seg = segs[i]
        if seg.kind == "soft":
            n += seg.value  # type: ignore[operator]
        elif seg.kind == "text":
            text = seg.value
            nxt = segs[i + 1] if i + 1 < len(segs) else None
            if nxt is not None and nxt.kind == "field":
                text = text.rstrip(" ")  # type: ignore[union-attr]
            n += len(encode_text(tokenizer, text))  # type: ignore[arg-type]
    return n
