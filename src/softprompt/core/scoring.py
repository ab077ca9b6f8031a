"""Evaluation: rank classification, greedy generation, and their metrics.

Rank classification scores every label word as a continuation of the example's context
(sum of the label tokens' log-probs) and picks the best; the context is run once per
example and each label is scored from its cached key/values (``conditioning.py``).

Examples are batched in order of length, so batches carry little padding, and results are
put back in the caller's order.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .bank import PromptBank
from .conditioning import CONTEXT_MODES, DEFAULT_MAX_BATCH_TOKENS, newline_ids


def length_sorted_batches(lengths: list[int], batch_size: int, max_tokens: int | None = None,
                          extra: int = 0) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first, so memory peaks early),
    at most ``batch_size`` rows and, with ``max_tokens``, at most that many padded tokens
    (rows x (longest length + ``extra``)) per batch; a batch always holds at least one row."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        full = len(cur) >= batch_size or (
            max_tokens is not None and cur and (len(cur) + 1) * (lengths[cur[0]] + extra) > max_tokens)
        if full:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


@dataclass
class Classification:
    labels: list[str]
    predictions: list[str]
    probabilities: torch.Tensor  # [N, n_labels], softmax over the label scores
    scores: torch.Tensor  # [N, n_labels], summed label log-probs (minus the calibration's log-prior, if any)
    metrics: dict = field(default_factory=dict)
    raw_scores: torch.Tensor | None = None  # [N, n_labels], the uncalibrated scores
    calibration: str = "none"


def _entries_for(bank: PromptBank, entry: int | str | list[int], n: int) -> list[int]:
    if isinstance(entry, str):
        return [bank.index(entry)] * n
    if isinstance(entry, int):
        return [entry] * n
    if len(entry) != n:
        raise ValueError(f"{len(entry)} entry indices for {n} examples")
    return list(entry)


@torch.no_grad()
def classify(
    bank: PromptBank,
    entry: int | str | list[int],
    examples,
    *,
    batch_size: int = 32,
    progress: bool | str = False,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    calibration=None,
    compile: str | bool = "auto",
    context: str = "auto",
) -> Classification:
    """Label each example with its entry's verbalizer; metrics are filled when examples carry labels.

    Memory is bounded by ``max_batch_tokens``: a batch holds at most that many prompt + input
    tokens, and label words are scored in passes of that size (``conditioning.py``).
    ``calibration`` (a ``calibration.Calibration``) is subtracted from the label scores before
    the argmax and the softmax; the uncalibrated scores stay on the result as ``raw_scores``.
    ``context``: how a batch runs, the same scores to float rounding: ``cached`` (the prompt's
    key/values once, each input on top: the least arithmetic), ``full`` (prompt + input in one
    pass per row), ``packed`` (``full`` with several examples and their label words per row,
    ``core/packing.py``: the fewest passes and no padding), ``auto`` (``full`` when compiled,
    else ``cached``).  ``compile`` (on | off | auto: on for CUDA): the full and packed passes
    through ``compiled.py``."""
    use_compile, context = scoring_context(context, compile, bank.device)
    result = _classify_raw(bank, entry, examples, batch_size=batch_size, progress=progress,
                           max_batch_tokens=max_batch_tokens, compile=use_compile, context=context)
    result.raw_scores = result.scores
    if calibration is None or not calibration.active:
        return result
    scores = calibration.apply(result.scores)
    result.scores, result.probabilities = scores, scores.softmax(-1)
    result.predictions = [result.labels[j] for j in scores.argmax(-1).tolist()]
    result.calibration = calibration.method
    gold = [ex.label for ex in examples]
    if all(g is not None for g in gold):
        result.metrics = classification_metrics(gold, result.predictions, result.labels)
    return result


def scoring_context(context: str, compile: str | bool | None, device) -> tuple[bool, str]:
    """(compile?, context) for ``classify``; a compiled ``cached`` pass does not exist, so asking
    for both is an error rather than a silent eager run."""
    from .compiled import resolve_compile

    if context not in CONTEXT_MODES:
        raise ValueError(f"context must be one of {CONTEXT_MODES}, got {context!r}")
    use_compile = resolve_compile(compile, device)
    if context == "auto":
        return use_compile, "full" if use_compile else "cached"
    if context == "cached" and use_compile:
        if compile in ("on", True):
            raise ValueError("compile='on' applies to the full and packed passes; context 'cached' runs eagerly")
        use_compile = False
    return use_compile, context


def _classify_raw(bank: PromptBank, entry, examples, *, batch_size: int, progress: bool | str,
                  max_batch_tokens: int, compile: bool = False, context: str = "cached") -> Classification:
    if not bank.family.supports("rank_classification"):  # encoder models read classes with a head, not a verbalizer
        return bank.family.classify_with_head(bank, entry, examples, batch_size=batch_size, progress=progress)
    entries = _entries_for(bank, entry, len(examples))
    label_sets = {tuple(bank.entries[e].labels) for e in entries}
    if len(label_sets) != 1:
        raise ValueError("classify() needs entries that share one label set; score mixed tasks per task")
    labels = list(next(iter(label_sets)))
    suffixes = [bank.suffix_ids(e, ex.fields) for e, ex in zip(entries, examples)]
    scores = torch.empty(len(examples), len(labels))
    prefix = max(len(bank.entries[e].prefix_ids) + bank.entries[e].n_prefix for e in set(entries)) if entries else 0
    batches = length_sorted_batches([len(s) for s in suffixes], batch_size, max_batch_tokens, prefix)
    desc = progress if isinstance(progress, str) else "scoring"
    for idx in tqdm(batches, desc=desc, disable=not progress, unit="batch"):
        rows = _label_scores(bank, torch.tensor([entries[i] for i in idx]), [suffixes[i] for i in idx], max_batch_tokens,
                             compile, context)
        for i, s in zip(idx, rows):
            scores[i] = s.float().cpu()
    probs = scores.softmax(-1)
    preds = [labels[j] for j in scores.argmax(-1).tolist()]
    result = Classification(labels=labels, predictions=preds, probabilities=probs, scores=scores)
    gold = [ex.label for ex in examples]
    if all(g is not None for g in gold):
        result.metrics = classification_metrics(gold, preds, labels)
    return result


def _label_scores(bank: PromptBank, entry_idx: torch.Tensor, suffixes: list[list[int]],
                  max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS, compile: bool = False,
                  context: str = "cached") -> list[torch.Tensor]:
    """Label log-probs of a batch, by the bank's model family: decoder-only models score from the
    prompt's cached context (``conditioning.py``), a full pass or packed rows (``packing.py``),
    encoder-decoders (T5) as decoder targets (``seq2seq.py``)."""
    return bank.family.label_scores(bank, entry_idx, suffixes, max_batch_tokens, compile, context)


def _generated(bank: PromptBank, entry_idx: torch.Tensor, suffixes: list[list[int]], max_new_tokens: int,
               stop: set[int]) -> list[list[int]]:
    """Greedy token ids of a batch, per model family (see ``_label_scores``).  ``stop`` holds the
    newline tokens (EOS is added by the decoders); they end an answer only once it has started
    (``take_token``)."""
    leading = frozenset(stop - {bank.tokenizer.eos_token_id})
    return bank.family.generate(bank, entry_idx, suffixes, max_new_tokens=max_new_tokens, stop_ids=stop,
                                skip_leading=leading)


def classification_metrics(gold: list[str], pred: list[str], labels: list[str]) -> dict:
    """Accuracy, macro-F1 (mean of per-label F1, zero where a label is never right) and the
    confusion matrix (rows gold, columns predicted, in ``labels`` order)."""
    unknown = sorted(set(gold) - set(labels))
    if unknown:
        raise ValueError(f"gold labels {unknown} are not in the verbalizer {labels}")
    pos = {lab: i for i, lab in enumerate(labels)}
    conf = [[0] * len(labels) for _ in labels]
    for g, p in zip(gold, pred):
        conf[pos[g]][pos[p]] += 1
    f1s = []
    for i in range(len(labels)):
        tp = conf[i][i]
        fp = sum(conf[r][i] for r in range(len(labels))) - tp
        fn = sum(conf[i]) - tp
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    n = max(len(gold), 1)
    return {
        "accuracy": sum(g == p for g, p in zip(gold, pred)) / n,
        "macro_f1": sum(f1s) / len(f1s),
        "per_label_f1": dict(zip(labels, f1s)),
        "confusion": conf,
        "labels": labels,
        "n": len(gold),
    }


# ----------------------------------------------------------------------------- generation
@dataclass
class Generation:
    texts: list[str]
    metrics: dict = field(default_factory=dict)


@torch.no_grad()
def generate(
    bank: PromptBank,
    entry: int | str | list[int],
    examples,
    *,
    max_new_tokens: int = 24,
    batch_size: int = 16,
    stop_at_newline: bool = True,
    progress: bool | str = False,
    max_batch_tokens: int | None = None,
) -> Generation:
    """Greedy answers; exact match and token F1 (SQuAD normalisation) when gold answers are present.

    ``max_batch_tokens`` bounds a batch's rows x (prompt + input + ``max_new_tokens``) as well as
    ``batch_size`` its rows: rows leave the batch as they stop (``greedy_generate``), so a large
    batch costs little when answers differ in length, and the token bound keeps its memory fixed."""
    entries = _entries_for(bank, entry, len(examples))
    tok = bank.tokenizer
    stop = newline_ids(tok) if stop_at_newline else set()
    suffixes = [bank.suffix_ids(e, ex.fields) for e, ex in zip(entries, examples)]
    texts: list[str] = [""] * len(examples)
    prefix = max((len(bank.entries[e].prefix_ids) + bank.entries[e].n_prefix for e in set(entries)), default=0)
    batches = length_sorted_batches([len(s) for s in suffixes], batch_size, max_batch_tokens, prefix + max_new_tokens)
    desc = progress if isinstance(progress, str) else "generating"
    for idx in tqdm(batches, desc=desc, disable=not progress, unit="batch"):
        rows = _generated(bank, torch.tensor([entries[i] for i in idx]), [suffixes[i] for i in idx], max_new_tokens, stop)
        for i, ids in zip(idx, rows):
            texts[i] = tok.decode(ids, skip_special_tokens=True).strip()
    result = Generation(texts=texts)
    golds = [ex.answers or ((ex.target,) if ex.target is not None else ()) for ex in examples]
    if all(golds):
        result.metrics = qa_metrics(texts, golds)
    return result


def normalize_answer(s: str) -> str:
    """SQuAD v1.1 normalisation: lower case, no punctuation, no articles, single spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(pred: str, gold: str) -> float:
    return float(normalize_answer(pred) == normalize_answer(gold))


def token_f1(pred: str, gold: str) -> float:
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    common = Counter(p) & Counter(g)
    same = sum(common.values())
    if not p or not g:
        return float(p == g)
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def qa_metrics(preds: list[str], golds: list[tuple[str, ...]]) -> dict:
    """Mean over examples of the best EM and F1 against any gold answer."""
    em = [max(exact_match(p, g) for g in gs) for p, gs in zip(preds, golds)]
    f1 = [max(token_f1(p, g) for g in gs) for p, gs in zip(preds, golds)]
    n = max(len(preds), 1)
    return {"exact_match": sum(em) / n, "f1": sum(f1) / n, "n": len(preds)}
