"""The engine's model work: forward passes over formed batches, label scoring, greedy
streaming decode, and the ensemble vote.

Runs on the scheduler's worker thread only; see the engine module docstring for how a
batch is split into passes (``max_batch_tokens``, ``split_padding``) and why all passes'
generation rows are decoded together.
"""
from __future__ import annotations

from collections import Counter as _Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..core.bank import PromptBank
from ..core.conditioning import (
    Context, concat_contexts, context_steps, decode_step, full_context, label_logprobs, newline_ids, run_context,
)
from ..core.decoding import Row, greedy_loop
from .config import EngineConfig
from .spec import ClassifyResult, GenerateResult, Item, NonFiniteResultError, canonical_vote


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the first of ``stops``, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def vote_classify(it: Item, member_scores: list[torch.Tensor]) -> ClassifyResult:
    """Each member's calibrated label probabilities, and the ensemble's answer: the mean
    probability, or ensemble.py's ``"vote"`` (majority, mean-probability tie-break)."""
    spec = it.spec
    labels = list(spec.labels)
    raw = member_scores
    # each member's stored calibration (calibration.py), before its probabilities and the vote
    member_scores = [s if p.calibration is None else p.calibration.apply(s) for p, s in zip(spec.prompts, raw)] \
        if spec.prompts else raw
    probs_m, preds = [], []
    for name, labs, r, s in zip(spec.member_names, spec.member_labels, raw, member_scores):
        p = s.softmax(-1)
        if not bool(torch.isfinite(r).all() and torch.isfinite(s).all() and torch.isfinite(p).all()):
            raise NonFiniteResultError(  # JSON has no NaN: never answer null or NaN probabilities
                f"task {spec.name!r} prompt {name!r} gave non-finite label scores for this input; its values "
                "(or calibration) are out of the model's range")
        probs_m.append({lab: float(v) for lab, v in zip(labs, p.tolist())})
        preds.append(labs[int(s.argmax())])
    if not spec.ensemble:
        s = raw[0]  # summed label log-probs, before calibration
        return ClassifyResult(task=spec.name, version=spec.version, label=preds[0], probabilities=probs_m[0],
                              scores={lab: float(v) for lab, v in zip(spec.member_labels[0], s.tolist())})
    mean = {lab: sum(pm[lab] for pm in probs_m) / len(probs_m) for lab in labels}
    votes = {lab: 0 for lab in labels}
    for p in preds:
        votes[p] += 1
    vote = canonical_vote(it.vote or spec.vote)
    if vote == "vote":
        label = max(labels, key=lambda lab: (votes[lab], mean[lab]))
    else:
        label = max(labels, key=lambda lab: mean[lab])
    members = [{"name": n, "label": p, "probabilities": pm} for n, p, pm in zip(spec.member_names, preds, probs_m)]
    return ClassifyResult(task=spec.name, version=spec.version, label=label, probabilities=mean,
                          votes=votes, members=members)

def vote_generate(it: Item, outs: list[list[int]], finishes: list[str | None],
                  detokenize: Callable[[list[int]], str]) -> GenerateResult:
    """A generation answer; an ensemble answers its members' most common text."""
    spec = it.spec
    texts = []
    for ids in outs:
        text = detokenize(ids)
        if it.stop_strings:
            text = cut_at_stop(text, it.stop_strings)[0]
        texts.append(text.strip())
    prompt_tokens = spec.prefix_lens[0] + len(it.suffixes[0])
    if not spec.ensemble:
        return GenerateResult(task=spec.name, version=spec.version, text=texts[0], token_ids=outs[0],
                              finish_reason=finishes[0] or "length", prompt_tokens=prompt_tokens)
    winner_text = _Counter(texts).most_common(1)[0][0]
    w = texts.index(winner_text)
    members = [{"name": nm, "text": t} for nm, t in zip(spec.member_names, texts)]
    return GenerateResult(task=spec.name, version=spec.version, text=winner_text, token_ids=outs[w],
                          finish_reason=finishes[w] or "length", prompt_tokens=prompt_tokens, members=members)

class Runner:
    """Forward passes and decoding over one model and its :class:`PromptBank`.

    ``finish(item, result)`` delivers an answer (the scheduler's, which also counts it)."""

    def __init__(self, model, tokenizer, bank: PromptBank, config: EngineConfig, tokenizer_lock,
                 finish: Callable[[Item, Any], None]):
        self.model, self.tokenizer, self.bank = model, tokenizer, bank
        self.max_batch_tokens = config.max_batch_tokens
        self.prefix_cache = config.prefix_cache
        self.split_padding = config.split_padding
        self.tokenizer_lock = tokenizer_lock
        self.finish = finish
        newline = newline_ids(tokenizer)
        eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        self.stops_newline = frozenset(newline | eos)
        self.stops_eos = frozenset(eos)
        self.newlines = frozenset(newline - eos)  # skipped before an answer starts (decoding.take_token)
        self._gen_parts: list[tuple[Context, list[tuple[Item, int]]]] = []  # prefilled rows to decode

    def detokenize(self, ids: list[int]) -> str:
        with self.tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def vote_classify(self, it: Item, member_scores: list[torch.Tensor]) -> ClassifyResult:
        return vote_classify(it, member_scores)

    def vote_generate(self, it: Item, outs: list[list[int]], finishes: list[str | None]) -> GenerateResult:
        return vote_generate(it, outs, finishes, self.detokenize)

    def run(self, items: list[Item]) -> None:
        """Answer ``items`` (live, resolved to the task version that runs them): prefill passes
        that fit the budget, then the generation rows of every pass decoded together (a
        decode step reads all the weights for one token per row: batching pays most there)."""
        self._gen_parts = []
        try:
            for group in self.padding_groups(items):
                self.run_group(group)
            for parts in self.decode_groups(self._gen_parts):
                self.decode(concat_contexts([c for c, _ in parts]), [o for _, owners in parts for o in owners])
        finally:
            self._gen_parts = []

    def padding_groups(self, items: list[Item]) -> list[list[Item]]:
        """Split a batch into forward passes that fit ``max_batch_tokens`` and, when padding
        costs compute, of similar length.

        A pass holds at most ``max_batch_tokens`` tokens, counted as rows x (longest prompt
        head + longest input + most new tokens): the context key/values it makes, and the
        decoding that follows.  With ``split_padding``, items are sorted by length (longest
        first) and a new pass also starts whenever the padded tokens would exceed
        ``split_padding`` of the pass (``None``: padding is nearly free, as on GPUs).  An
        example's rows (ensemble members) always stay in one pass."""
        if len(items) < 2:
            return [items] if items else []

        def length(it: Item) -> int:
            extra = 0 if self.prefix_cache else max(it.spec.prefix_lens)
            return max(len(s) for s in it.suffixes) + extra

        groups: list[list[Item]] = []
        cur: list[Item] = []
        real = rows = top = 0
        head = tail = new = 0  # the current pass's longest prompt head, input, and generation
        order = items if self.split_padding is None else sorted(items, key=length, reverse=True)
        for it in order:
            n = length(it)
            h = max(p + k.n_prefix for p, k in zip(it.spec.prefix_lens, it.spec.prompts)) if it.spec.prompts \
                else max(it.spec.prefix_lens)
            t = max(len(s) for s in it.suffixes)
            too_many = (rows + it.rows) * (max(head, h) + max(tail, t) + max(new, it.max_new_tokens)) > self.max_batch_tokens
            padded = self.split_padding is not None and (real + n * it.rows) < (1 - self.split_padding) * top * (rows + it.rows)
            if cur and (too_many or padded):
                groups.append(cur)
                cur, real, rows, head, tail, new = [], 0, 0, 0, 0, 0
            if not cur:
                top = n
            cur.append(it)
            real += n * it.rows
            rows += it.rows
            head, tail, new = max(head, h), max(tail, t), max(new, it.max_new_tokens)
        groups.append(cur)
        return groups

    def decode_groups(self, parts: list[tuple[Context, list[tuple[Item, int]]]]) -> list[list]:
        """The passes' generation rows in decode batches of at most ``max_batch_tokens``
        (rows x (context + most new tokens)); a pass's rows stay together (it fits alone)."""
        groups: list[list] = []
        rows = width = new = 0
        for part in parts:
            ctx, owners = part
            w, m = ctx.mask.shape[1], max(it.max_new_tokens for it, _ in owners)
            if groups and (rows + len(owners)) * (max(width, w) + max(new, m)) > self.max_batch_tokens:
                groups.append([])
                rows = width = new = 0
            if not groups:
                groups.append([])
            groups[-1].append(part)
            rows, width, new = rows + len(owners), max(width, w), max(new, m)
        return groups

    def run_group(self, items: list[Item]) -> None:
        """One forward pass (plus label scoring / decoding) over the rows of ``items``."""
        bank = self.bank
        row_entry: list[int] = []
        row_suffix: list[list[int]] = []
        row_owner: list[tuple[Item, int]] = []
        for it in items:
            for k, (en, suf) in enumerate(zip(it.spec.members, it.suffixes)):
                row_entry.append(bank.index(en))
                row_suffix.append(suf)
                row_owner.append((it, k))
        if not row_entry:
            return
        entry_idx = torch.tensor(row_entry)
        ctx = run_context(bank, entry_idx, row_suffix) if self.prefix_cache else full_context(bank, entry_idx, row_suffix)
        cls_rows = [r for r, (it, _) in enumerate(row_owner) if it.op == "classify"]
        gen_rows = [r for r, (it, _) in enumerate(row_owner) if it.op == "generate"]
        if cls_rows:
            sub = ctx if len(cls_rows) == len(row_owner) else ctx.select(torch.tensor(cls_rows, device=ctx.mask.device))
            scores = label_logprobs(bank, sub, max_batch_tokens=self.max_batch_tokens)
            per_item: dict[int, list[torch.Tensor]] = {}
            order: list[Item] = []
            for r, s in zip(cls_rows, scores):
                it, _ = row_owner[r]
                if id(it) not in per_item:
                    per_item[id(it)] = []
                    order.append(it)
                per_item[id(it)].append(s.float().cpu())
            for it in order:
                try:
                    answer = self.vote_classify(it, per_item[id(it)])
                except NonFiniteResultError as e:  # this example alone fails; its batch-mates are answered
                    answer = e
                self.finish(it, answer)
        if gen_rows:  # decoded by run, together with the other passes' generation rows
            sub = ctx if len(gen_rows) == len(row_owner) else ctx.select(torch.tensor(gen_rows, device=ctx.mask.device))
            self._gen_parts.append((sub, [row_owner[r] for r in gen_rows]))


    def decode(self, ctx: Context, owners: list[tuple[Item, int]]) -> None:
        """Greedy decoding of every generation row at once (``decoding.greedy_loop``, as
        ``conditioning.greedy_generate``) with per-row limits, stops, stop strings and streaming; an
        example is answered as soon as all its rows are finished.  Finished rows leave the
        batch once they are a quarter of it (a row costs compute on every step it stays)."""
        rows = [Row(it.max_new_tokens, self.stops_newline if it.stop_at_newline else self.stops_eos,
                    self.newlines if it.stop_at_newline else frozenset()) for it, _ in owners]
        left: dict[int, int] = _Counter(id(it) for it, _ in owners)

        def on_token(i: int, row: Row) -> bool:
            it = owners[i][0]
            stopped = bool(it.stop_strings) and cut_at_stop(self.detokenize(row.tokens), it.stop_strings)[1]
            if it.on_token is not None and not it.spec.ensemble:
                try:
                    it.on_token(list(row.tokens))
                except Exception:  # noqa: BLE001 - a broken stream must not stop the batch
                    it.abandoned = True
            return stopped

        def on_finish(i: int) -> None:
            it = owners[i][0]
            left[id(it)] -= 1
            if left[id(it)] == 0:
                mine = [rows[r] for r, (o, _) in enumerate(owners) if o is it]
                self.finish(it, self.vote_generate(it, [r.tokens for r in mine], [r.finish for r in mine]))

        # decode_step read here, at call time: tests wrap the module's name to time or count steps
        greedy_loop(*context_steps(self.model, ctx, decode_step), rows, leave_at=0.25, on_token=on_token,
                    abandoned=lambda i: owners[i][0].abandoned, on_finish=on_finish)
