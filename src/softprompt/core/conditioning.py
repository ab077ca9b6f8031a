"""How a prompt reaches the frozen model, and how continuations are scored from it.

One forward pass per batch runs each example's *suffix* (its fields and the rest of the
template) on top of its prompt's prefix key/values (``bank.py``).  Continuations (label
words, generation targets, generated tokens) are then scored from that context's cache,
so an example's context is run once however many labels it has, and the LM head is
applied only at the positions a score or a loss needs.  All label words of one example are
scored in ONE extra sequence on top of its context (a tree-shaped attention mask keeps
them apart), never on a per-label copy of the context's key/values, and every such pass
holds at most ``max_batch_tokens`` tokens: scoring memory does not grow with the labels.

Padding is on the right everywhere, with explicit position ids and attention masks, so an
example's numbers do not depend on its batch-mates: no query row is ever fully masked and
padded key slots are masked out (and zeroed, so a NaN can never leak through).
"""
from __future__ import annotations

from collections.abc import Sequence, Set as AbstractSet
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .bank import PromptBank, pad_right
from .cache_api import cache_arg, cache_layers, make_cache, output_cache  # noqa: F401 (re-exported)
from .decoding import Row, Step, greedy_loop, take_token  # noqa: F401 (take_token re-exported)


@dataclass
class Context:
    """The result of running a batch's prefixes and suffixes: everything needed to score
    or generate continuations."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per-layer KV [B, kvh, P+S, hd]
    mask: torch.Tensor  # [B, P+S]
    next_pos: torch.Tensor  # [B] position id of the first continuation token
    last_hidden: torch.Tensor  # [B, d] final hidden state at each example's last real token
    entry_idx: torch.Tensor  # [B]

    def select(self, rows: torch.Tensor) -> "Context":
        return Context(
            layers=[(k.index_select(0, rows), v.index_select(0, rows)) for k, v in self.layers],
            mask=self.mask.index_select(0, rows),
            next_pos=self.next_pos.index_select(0, rows),
            last_hidden=self.last_hidden.index_select(0, rows),
            entry_idx=self.entry_idx.index_select(0, rows),
        )


def run_context(bank: PromptBank, entry_idx: torch.Tensor, suffixes: list[list[int]]) -> Context:
    """Run each example's suffix on top of its entry's prefix key/values."""
    model = bank.model
    device = bank.device
    entry_idx = entry_idx.to(device)
    prefix = bank.prefix_kv(entry_idx)
    ids, smask = pad_right(suffixes, device=device)
    if ids.shape[1] == 0:
        raise ValueError("every example rendered to an empty suffix; does the template name an input field?")
    slen = smask.sum(-1)
    if bool((slen + prefix.lengths == 0).any()):
        raise ValueError("an example rendered to no tokens at all (empty prompt and empty input)")
    embeds = bank.embed(ids, entry_idx)
    positions = prefix.lengths[:, None] + torch.arange(ids.shape[1], device=device)[None, :]
    mask = torch.cat([prefix.mask, smask], dim=1)
    out = model.base_model(
        inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
        **cache_arg(model.base_model, make_cache(prefix.layers)), use_cache=True,
    )
    hidden = out.last_hidden_state
    last = (slen - 1).clamp(min=0)
    last_hidden = hidden[torch.arange(hidden.shape[0], device=device), last]
    return Context(
        layers=cache_layers(output_cache(out)), mask=mask, next_pos=prefix.lengths + slen,
        last_hidden=last_hidden, entry_idx=entry_idx,
    )


# Per-forward-pass budget, counted as rows x (context + continuation) tokens.  8192 tokens of
# context key/values are 377 MB for SmolLM2-135M in fp32 (30 layers x 2 x 3 heads x 64 x 4 B each).
DEFAULT_MAX_BATCH_TOKENS = 8192
# LM-head outputs that exist at once while scoring: 2**24 floats = 64 MB (341 tokens of a 49k vocabulary).
LOGITS_CHUNK_ELEMENTS = 1 << 24
# attention implementations that take a custom 4D additive mask (what packed label lanes need)
TREE_MASK_ATTENTION = ("sdpa", "eager")
# how a batch's prompt + input run, in training and scoring alike (the same numbers to float rounding):
# run_context (cached), full_context (full), packing.py (packed); auto: each caller's measured default
CONTEXT_MODES = ("auto", "cached", "full", "packed")


def lm_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Apply the LM head to selected hidden states only (never to the whole sequence)."""
    return model.get_output_embeddings()(hidden).float()


def token_logprobs(model, hidden: torch.Tensor, at: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``log p(tokens[i] | hidden[at[i]])`` for every i, applying the LM head and the vocabulary
    log-softmax to a bounded number of hidden rows at a time (``LOGITS_CHUNK_ELEMENTS``), so
    scoring many tokens never holds tokens x vocabulary floats.  Differentiable."""
    head = model.get_output_embeddings()
    vocab = int(getattr(head, "out_features", 0) or head.weight.shape[0])
    step = max(1, LOGITS_CHUNK_ELEMENTS // max(vocab, 1))
    n = hidden.shape[0]
    if n <= step:
        return F.log_softmax(lm_logits(model, hidden), dim=-1)[at, tokens]
    pieces, where = [], []
    for a in range(0, n, step):
        sel = ((at >= a) & (at < a + step)).nonzero().squeeze(1)
        if sel.numel():
            lp = F.log_softmax(lm_logits(model, hidden[a : a + step]), dim=-1)
            pieces.append(lp[at[sel] - a, tokens[sel]])
            where.append(sel)
    return torch.cat(pieces)[torch.cat(where).argsort()]


def continuation_logprobs(
    bank: PromptBank, ctx: Context, rows: list[int], conts: list[list[int]], *,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
) -> torch.Tensor:
    """Sum of log-probs of each continuation ``conts[i]`` after context row ``rows[i]``.

    The first token of every continuation is scored from the context's last hidden state.
    The other tokens of all continuations of one context row run as ONE extra sequence (a
    *lane*) on top of that row's key/values: each continuation's tokens see the context and
    their own earlier tokens only (a tree-shaped 4D attention mask), and their positions
    restart where the context ends.  So a row's key/values serve all its labels at once and
    are never copied per label.  Lanes run in passes of at most ``max_batch_tokens`` tokens
    (lanes x (context + lane)).  Returns a [len(rows)] float tensor (differentiable when the
    context is).
    """
    model = bank.model
    device = ctx.last_hidden.device
    if any(len(c) == 0 for c in conts):
        raise ValueError("a continuation (label word or target) rendered to no tokens")
    if max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
    rows_t = torch.tensor(rows, device=device, dtype=torch.long)
    uniq, inv = rows_t.unique(return_inverse=True)
    first_tok = torch.tensor([c[0] for c in conts], device=device, dtype=torch.long)
    total = token_logprobs(model, ctx.last_hidden.index_select(0, uniq), inv, first_tok)
    multi = [i for i, c in enumerate(conts) if len(c) > 1]
    if not multi:
        return total
    tree = getattr(model.config, "_attn_implementation", None) in TREE_MASK_ATTENTION
    passes = _lane_passes(ctx.mask.shape[1], rows, conts, multi, max_batch_tokens, tree)
    extra = torch.cat([_lane_pass(model, ctx, lanes, conts, tree) for lanes in passes])
    order = torch.tensor([i for lanes in passes for _, pairs in lanes for i in pairs], device=device)
    return total.index_add(0, order, extra.to(total.dtype))


Lane = tuple[int, list[int]]  # (context row, indices of the continuations packed into it)


def budget_chunks(sizes: list[int], budget: int) -> list[list[int]]:
    """Indices 0..len(sizes)-1 in order, cut greedily into groups whose sizes sum to at most
    ``budget`` (a group always holds at least one, so an item over the budget stands alone)."""
    chunks: list[list[int]] = []
    used = 0
    for i, n in enumerate(sizes):
        if not chunks or used + n > budget:
            chunks.append([])
            used = 0
        chunks[-1].append(i)
        used += n
    return chunks


def _lane_passes(width: int, rows: list[int], conts: list[list[int]], multi: list[int], budget: int,
                 tree: bool) -> list[list[Lane]]:
    """Pack the continuations ``multi`` into lanes (one per context row, more when a row's
    continuations exceed what a pass can hold; one per continuation without ``tree``) and
    the lanes into passes of at most ``budget`` tokens (at least one lane each)."""
    longest = max(len(conts[i]) - 1 for i in multi)
    cap = max(longest, budget - width) if tree else 0
    by_row: dict[int, list[int]] = {}
    for i in multi:
        by_row.setdefault(rows[i], []).append(i)
    lanes: list[tuple[Lane, int]] = []
    for r, pairs in by_row.items():
        sizes = [len(conts[i]) - 1 for i in pairs]
        lanes += [((r, [pairs[j] for j in chunk]), sum(sizes[j] for j in chunk)) for chunk in budget_chunks(sizes, cap)]
    passes: list[list[Lane]] = []
    cur_pass: list[Lane] = []
    top = 0
    for lane, n in lanes:
        if cur_pass and (len(cur_pass) + 1) * (width + max(top, n)) > budget:
            passes.append(cur_pass)
            cur_pass, top = [], 0
        cur_pass.append(lane)
        top = max(top, n)
    passes.append(cur_pass)
    return passes


def tree_visibility(group: torch.Tensor, lane: torch.Tensor) -> torch.Tensor:
    """Which earlier tokens each token may attend to, [n, L, L] bool, from per-token ``group``
    and ``lane`` ids [n, L]: token i sees token j <= i of its own group (-1: padding) when j
    is shared by the group (lane -1) or in i's lane.  So one row holds several independent
    sequences (groups), each a context with label lanes branching off it (a tree).  A padded
    query sees only itself: no query row is ever fully masked."""
    L = group.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=group.device).tril()
    same = (group[:, :, None] == group[:, None, :]) & (group[:, None, :] >= 0)
    branch = (lane[:, None, :] < 0) | (lane[:, :, None] == lane[:, None, :])
    eye = torch.eye(L, dtype=torch.bool, device=group.device) & (group < 0)[:, :, None]
    return (same & branch & causal) | eye


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``allowed`` [n, Q, K] as the 4D additive mask [n, 1, Q, K] both sdpa and eager attention take."""
    zeros = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return zeros.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def _lane_pass(model, ctx: Context, lanes: list[Lane], conts: list[list[int]], tree: bool) -> torch.Tensor:
    """One forward pass of ``lanes`` on top of their rows' context key/values; returns the
    summed log-probs of tokens 2.. of each continuation, in lane order."""
    device = ctx.mask.device
    lane_rows = torch.tensor([r for r, _ in lanes], device=device, dtype=torch.long)
    cmask = ctx.mask.index_select(0, lane_rows)
    width = int(cmask.any(0).nonzero().max()) + 1  # key slots past every lane row's context are dropped
    cmask = cmask[:, :width]
    r0 = lanes[0][0]
    if [r for r, _ in lanes] == list(range(r0, r0 + len(lanes))):  # consecutive rows: views, no copy
        layers = [(k[r0 : r0 + len(lanes), :, :width], v[r0 : r0 + len(lanes), :, :width]) for k, v in ctx.layers]
    else:
        layers = [(k[:, :, :width].index_select(0, lane_rows), v[:, :, :width].index_select(0, lane_rows))
                  for k, v in ctx.layers]
    ids_l, tgt_l, off_l, seg_l = [], [], [], []
    q = 0
    for _, pairs in lanes:
        ids, tgt, off, seg = [], [], [], []
        for i in pairs:
            c = conts[i]
            ids += c[:-1]
            tgt += c[1:]
            off += range(len(c) - 1)
            seg += [q] * (len(c) - 1)
            q += 1
        ids_l.append(ids), tgt_l.append(tgt), off_l.append(off), seg_l.append(seg)
    ids, real = pad_right(ids_l, device=device)
    tgt, _ = pad_right(tgt_l, device=device)
    off, _ = pad_right(off_l, device=device)
    seg, _ = pad_right(seg_l, pad=-1, device=device)
    real = real.bool()
    positions = ctx.next_pos.index_select(0, lane_rows)[:, None] + off
    if tree:
        n, L = ids.shape
        own = tree_visibility(seg, torch.full_like(seg, -1))  # own earlier tokens only
        allowed = torch.cat([cmask.bool()[:, None, :].expand(n, L, width), own], dim=-1)
        mask = additive_mask(allowed, ctx.layers[0][0].dtype)  # a padded query still sees its context
    else:  # one continuation per lane: the ordinary causal mask does it
        mask = torch.cat([cmask, real.long()], dim=1)
    out = model.base_model(
        input_ids=ids, attention_mask=mask, position_ids=positions,
        **cache_arg(model.base_model, make_cache(layers)), use_cache=False,
    )
    hidden = out.last_hidden_state[real]
    tok_lp = token_logprobs(model, hidden, torch.arange(hidden.shape[0], device=device), tgt[real])
    return torch.zeros(q, device=device, dtype=tok_lp.dtype).index_add(0, seg[real], tok_lp)


def label_logprobs(bank: PromptBank, ctx: Context, *, max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS
                   ) -> list[torch.Tensor]:
    """Per example, the log-prob of each of its entry's label words: a list of [n_labels] tensors
    (entries in one batch may have different label sets).  ``max_batch_tokens``: see
    :func:`continuation_logprobs`."""
    return scores_per_label(bank, ctx.entry_idx, lambda rows, conts: continuation_logprobs(
        bank, ctx, rows, conts, max_batch_tokens=max_batch_tokens))


def scores_per_label(bank: PromptBank, entry_idx: torch.Tensor, score, max_pairs: int | None = None
                     ) -> list[torch.Tensor]:
    """Pair every example with each of its entry's label words, score the pairs with
    ``score(rows, continuations) -> [n_pairs]`` (all in one call, or in calls of at most
    ``max_pairs`` pairs), and group the scores back per example.  Shared by the decoder-only
    and the encoder-decoder scorers, which differ only in ``score``."""
    rows, conts = [], []
    for b, e in enumerate(entry_idx.tolist()):
        for ids in bank.entries[e].label_ids:
            rows.append(b)
            conts.append(ids)
    step = len(rows) if not max_pairs else max(1, max_pairs)
    scores = torch.cat([score(rows[a : a + step], conts[a : a + step]) for a in range(0, len(rows), step)])
    out: list[list[torch.Tensor]] = [[] for _ in range(entry_idx.shape[0])]
    for s, b in zip(scores.unbind(0), rows):
        out[b].append(s)
    return [torch.stack(x) for x in out]


def newline_ids(tokenizer) -> set[int]:
    """Token ids that are a line break (plain, or byte-level BPE's ``Ċ`` / ``ĊĊ``) in this
    tokenizer's vocabulary: the stops of short answers."""
    ids = (tokenizer.convert_tokens_to_ids(t) for t in ("\n", "Ċ", "ĊĊ"))
    return {i for i in ids if isinstance(i, int) and i != tokenizer.unk_token_id}


@torch.no_grad()
def greedy_generate(
    bank: PromptBank, ctx: Context, *, max_new_tokens: int = 32, stop_ids: set[int] | None = None,
    skip_leading: AbstractSet[int] = frozenset(),
) -> list[list[int]]:
    """Greedy decoding from each context row; stops at EOS (or any of ``stop_ids``) per row.
    ``skip_leading``: see :func:`take_token` (decode steps spent on them count towards
    ``max_new_tokens``).

    A row that stops leaves the batch (its key/values are dropped), so the remaining steps cost
    what the rows still generating need, not the whole batch: answers of very different lengths
    (a chain of thought that ends at once next to one that runs to ``max_new_tokens``) batch well.
    The loop is ``decoding.greedy_loop``, shared with the encoder-decoder family and the server."""
    stops = set(stop_ids or ())
    if bank.tokenizer.eos_token_id is not None:
        stops.add(bank.tokenizer.eos_token_id)
    rows = [Row(max_new_tokens, stops, skip_leading) for _ in range(ctx.last_hidden.shape[0])]
    greedy_loop(*context_steps(bank.model, ctx), rows)
    return [r.tokens for r in rows]


def context_steps(model, ctx: Context, decode=None) -> tuple[torch.Tensor, Step]:
    """The decoder-only family's hook for ``decoding.greedy_loop``: the first next-token logits
    of ``ctx``'s rows, and the step that feeds one token per row on top of their key/values
    (rows that leave drop theirs).  ``decode``: the step function, :func:`decode_step` unless a
    caller (the server, whose tests time it) passes its own."""
    decode = decode or decode_step
    layers, cache, mask, pos = ctx.layers, None, ctx.mask, ctx.next_pos.clone()

    def step(tokens: torch.Tensor, keep: list[int] | None) -> torch.Tensor:
        nonlocal layers, cache, mask, pos
        if keep is not None:  # drop the rows that left
            rows = torch.tensor(keep, device=tokens.device)
            layers = [(k.index_select(0, rows), v.index_select(0, rows))
                      for k, v in (cache_layers(cache) if cache is not None else layers)]
            cache = None
            mask, pos = mask.index_select(0, rows), pos.index_select(0, rows)
        if cache is None:
            cache = make_cache(layers)
        logits, cache, mask, pos = decode(model, tokens, cache, mask, pos)
        return logits

    return lm_logits(model, ctx.last_hidden), step


def decode_step(model, tokens: torch.Tensor, cache, mask: torch.Tensor, pos: torch.Tensor):
    """Feed one token per row on top of ``cache``; returns (next-token logits, cache, mask, pos)
    advanced by one position. The model side of :func:`context_steps`."""
    mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=mask.dtype, device=mask.device)], dim=1)
    out = model.base_model(
        input_ids=tokens[:, None], attention_mask=mask, position_ids=pos[:, None],
        **cache_arg(model.base_model, cache), use_cache=True,
    )
    return lm_logits(model, out.last_hidden_state[:, -1]), output_cache(out), mask, pos + 1


def full_context(bank: PromptBank, entry_idx: torch.Tensor, suffixes: list[list[int]], *, compile: bool = False
                 ) -> Context:
    """Run each row's whole prompt + input sequence in one pass.

    The alternative to :func:`run_context`: the same kind of :class:`Context` (so scoring,
    training losses and decoding are shared), but the prompt's key/values are recomputed for
    every row.  That is more arithmetic and fewer passes, which is what a GPU wants: a small
    model there is bound by kernel launches, not by arithmetic.  Prefix-tuned entries have
    learned key/values that no forward pass can recompute, so a batch with any of them runs
    through :func:`run_context`.  ``compile``: run the frozen model through ``compiled.py`` (bucketed
    lengths, bf16 autocast on CUDA); the same numbers to float rounding.
    """
    from .compiled import full_forward

    model = bank.model
    device = bank.device
    entry_idx = entry_idx.to(device)
    if any(bank.entries[e].kv is not None for e in set(entry_idx.tolist())):
        return run_context(bank, entry_idx, suffixes)
    seqs = [bank.entries[e].prefix_ids + s for e, s in zip(entry_idx.tolist(), suffixes)]
    ids, mask = pad_right(seqs, device=device)
    lengths = mask.sum(-1)
    if bool((lengths == 0).any()):
        raise ValueError("an example rendered to no tokens at all")
    embeds = bank.embed(ids, entry_idx)
    positions = torch.arange(ids.shape[1], device=device)[None, :].expand(ids.shape[0], -1)
    hidden, layers, mask = full_forward(model, embeds, mask, positions, compile=compile)
    last_hidden = hidden[torch.arange(hidden.shape[0], device=device), lengths - 1]
    return Context(
        layers=layers, mask=mask, next_pos=lengths,
        last_hidden=last_hidden, entry_idx=entry_idx,
    )


def concat_contexts(parts: Sequence[Context]) -> Context:
    """Stack contexts of different lengths into one batch (for decoding them together).

    Shorter contexts' key/values and masks are right-padded with masked zeros; positions
    are explicit (``next_pos``), so a row's numbers do not depend on the padding: the same
    argument as for the gap between a short prefix and its suffix in ``run_context``."""
    if len(parts) == 1:
        return parts[0]
    width = max(c.mask.shape[1] for c in parts)

    def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
        extra = width - t.shape[dim]
        if not extra:
            return t
        shape = list(t.shape)
        shape[dim] = extra
        return torch.cat([t, t.new_zeros(shape)], dim=dim)

    layers = [
        (torch.cat([pad(c.layers[i][0], -2) for c in parts]), torch.cat([pad(c.layers[i][1], -2) for c in parts]))
        for i in range(len(parts[0].layers))
    ]
    return Context(
        layers=layers,
        mask=torch.cat([pad(c.mask, 1) for c in parts]),
        next_pos=torch.cat([c.next_pos for c in parts]),
        last_hidden=torch.cat([c.last_hidden for c in parts]),
        entry_idx=torch.cat([c.entry_idx for c in parts]),
    )
