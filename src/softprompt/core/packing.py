"""Padding-free packing for the ``full`` step: several short examples in one row.

``full_context`` pads every row to the batch's longest prompt + input, and its label words then
run in a second (also padded) lane pass.  A *packed* row instead holds several examples one
after another, each its prompt's tokens, its input and the label lanes (tokens 2.. of each
continuation), so ONE forward pass gives every label score.  Rows are filled first-fit
(longest example first) up to a token budget (``pack_tokens``, default 256 tokens) and then
evened out, which leaves little padding (8 training batches of 8 RAFT tweets under a 20-token
prompt: 239 padded slots in 21 rows instead of 1,096 in 64); the attention mask is block
diagonal (``conditioning.tree_visibility``: the same tree mask as the label lanes, with one
group per example) and position ids restart at 0 in every example, so each example's
numbers are the unpacked ones to float rounding.

Limits (refused, with a reason): prefix-tuned entries (learned key/values that no forward pass
recomputes; their step is ``cached``) and attention kernels that take no 4D mask (flash).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import compiled
from .bank import PromptBank, pad_right
from .conditioning import TREE_MASK_ATTENTION, additive_mask, budget_chunks, token_logprobs, tree_visibility


# default row budget.  A longer row cuts more padding, but attention over it is dense (the masked
# part is computed too) and grows with the row's square: SmolLM2-135M, RAFT batches of 8, 1 CPU
# thread: steps 12% faster than unpacked at 256 tokens, 4% at 512 (where attention took 0.51 s, not 0.16)
DEFAULT_PACK_TOKENS = 256


def pack_rows(lengths: list[int], budget: int) -> list[list[int]]:
    """Item indices per row, each row at most ``budget`` tokens (an item longer than the budget
    gets a row of its own).  First-fit, longest first, decides the number of rows; the items
    are then spread over that many rows longest first onto the least-filled row, when that
    keeps every row within the budget, so rows end up about equally long (padding is the gap
    to the longest row).  Deterministic; a row lists its items in index order."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    used: list[int] = []
    for i in order:
        for r, u in enumerate(used):
            if u + lengths[i] <= budget:
                rows[r].append(i)
                used[r] += lengths[i]
                break
        else:
            rows.append([i])
            used.append(lengths[i])
    even: list[list[int]] = [[] for _ in rows]
    load = [0] * len(rows)
    for i in order:
        r = min(range(len(rows)), key=lambda r: (load[r], r))
        even[r].append(i)
        load[r] += lengths[i]
    if max(load) < max(used) and max(load) <= budget:
        rows = even
    return [sorted(r) for r in rows]


def packed_size(n_context: int, conts: list[list[int]]) -> int:
    """Tokens an example takes in a packed row: its context, then each continuation's tokens but
    its last (the context's last token predicts a continuation's first, each fed token the next)."""
    return n_context + sum(len(c) - 1 for c in conts)


@dataclass
class PackedBatch:
    """The packed rows of a batch and where its scores come from."""

    source: torch.Tensor  # [R, T] slot -> index into the examples' flat real tokens (N = padding)
    mask: torch.Tensor  # [R, 1, T, T] additive block-diagonal tree mask
    positions: torch.Tensor  # [R, T] position ids, restarting at 0 in each example
    score_at: torch.Tensor  # [S] flat slot (row * T + column) whose hidden state predicts ...
    score_tok: torch.Tensor  # [S] ... this token
    score_cont: torch.Tensor  # [S] of this continuation (index over all examples' continuations)
    n_conts: list[int]  # continuations per example
    rows: list[list[int]]  # example indices per row
    real_tokens: int

    @property
    def padding(self) -> int:
        """Padded slots in the packed rows (what packing saves)."""
        return self.source.numel() - self.real_tokens


def pack_batch(seqs: list[list[int]], conts: list[list[list[int]]], *, pack_tokens: int | None = None,
               bucket: int = 0, dtype: torch.dtype = torch.float32, device=None) -> PackedBatch:
    """Lay out examples ``seqs[k]`` (prompt + input ids) with their continuations ``conts[k]``
    in packed rows.  Example k's tokens are ``seqs[k]`` followed by ``c[:-1]`` of each of its
    continuations ``c`` with two tokens or more (the first token of every continuation is
    predicted by the example's last token); ``pack_tokens``: the row budget (default:
    ``DEFAULT_PACK_TOKENS``, or the longest example if longer); row width is rounded up to
    ``bucket`` if set."""
    if any(len(s) == 0 for s in seqs):
        raise ValueError("an example rendered to no tokens at all")
    if any(len(c) == 0 for cs in conts for c in cs):
        raise ValueError("a continuation (label word or target) rendered to no tokens")
    sizes = [packed_size(len(s), cs) for s, cs in zip(seqs, conts)]
    budget = max(max(sizes), DEFAULT_PACK_TOKENS) if pack_tokens is None else pack_tokens
    rows = pack_rows(sizes, budget)
    width = max(sum(sizes[k] for k in r) for r in rows)
    width = compiled.bucketed(width, bucket) if bucket else width
    n_real = sum(sizes)
    source = torch.full((len(rows), width), n_real, dtype=torch.long)
    group = torch.full((len(rows), width), -1, dtype=torch.long)
    lane = torch.full((len(rows), width), -1, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    first = [0]  # each example's first token in the flat real tokens (example-major)
    for n in sizes:
        first.append(first[-1] + n)
    cont0 = [0]  # each example's first continuation index
    for cs in conts:
        cont0.append(cont0[-1] + len(cs))
    at, tok, cont = [], [], []
    for r, members in enumerate(rows):
        col = 0
        for k in members:
            n, ctx = sizes[k], len(seqs[k])
            source[r, col : col + n] = torch.arange(first[k], first[k] + n)
            group[r, col : col + n] = k
            positions[r, col : col + ctx] = torch.arange(ctx)
            last = r * width + col + ctx - 1
            q = col + ctx
            for j, c in enumerate(conts[k]):
                at.append(last), tok.append(c[0]), cont.append(cont0[k] + j)
                m = len(c) - 1
                lane[r, q : q + m] = cont0[k] + j
                positions[r, q : q + m] = torch.arange(ctx, ctx + m)
                at.extend(range(r * width + q, r * width + q + m))
                tok.extend(c[1:])
                cont.extend([cont0[k] + j] * m)
                q += m
            col += n
    mask = additive_mask(tree_visibility(group.to(device), lane.to(device)), dtype)  # built where it is used
    as_t = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    return PackedBatch(
        source=source.to(device), mask=mask, positions=positions.to(device),
        score_at=as_t(at), score_tok=as_t(tok), score_cont=as_t(cont),
        n_conts=[len(cs) for cs in conts], rows=rows, real_tokens=n_real,
    )


def check_packable(bank: PromptBank, entries) -> None:
    """Raise ValueError (with the reason) when these entries cannot run packed."""
    if any(bank.entries[e].kv is not None for e in set(entries)):
        raise ValueError("packed rows cannot hold prefix-tuned prompts (learned per-layer key/values that "
                         "no forward pass recomputes); use context 'cached' or 'full'")
    impl = getattr(bank.model.config, "_attn_implementation", None)
    if impl not in TREE_MASK_ATTENTION:
        raise ValueError(f"packed rows need an attention kernel that takes a 4D mask ({', '.join(TREE_MASK_ATTENTION)}), "
                         f"not {impl!r}; use context 'full' or load the model with attn_implementation='sdpa'")


def packed_logprobs(bank: PromptBank, entry_idx: torch.Tensor, suffixes: list[list[int]],
                    conts: list[list[list[int]]], *, compile: bool = False, pack_tokens: int | None = None
                    ) -> list[torch.Tensor]:
    """Per example k (entry ``entry_idx[k]``, input ``suffixes[k]``), the summed log-probs of
    each of its continuations ``conts[k]``: a list of [len(conts[k])] tensors, equal to
    ``continuation_logprobs`` on a ``full_context`` to float rounding, from one packed pass
    (differentiable in the entries' soft tokens).  ``compile``: the frozen forward through
    ``compiled.py`` (row width bucketed to ``compiled.DEFAULT_BUCKET``)."""
    model, device = bank.model, bank.device
    idx = entry_idx.tolist()
    check_packable(bank, idx)
    seqs = [bank.entries[e].prefix_ids + s for e, s in zip(idx, suffixes)]
    weight = model.get_input_embeddings().weight
    pb = pack_batch(seqs, conts, pack_tokens=pack_tokens, bucket=compiled.DEFAULT_BUCKET if compile else 0,
                    dtype=weight.dtype, device=device)
    # embed each example once (soft tokens are per entry), then gather its tokens into the rows
    full = [s + [t for c in cs for t in c[:-1]] for s, cs in zip(seqs, conts)]
    ids, real = pad_right(full, device=device)
    flat = bank.embed(ids, entry_idx)[real.bool()]
    flat = torch.cat([flat, flat.new_zeros(1, flat.shape[1])])  # the last row feeds padding slots
    embeds = flat[pb.source]
    hidden, _, _ = compiled.full_forward(model, embeds, pb.mask, pb.positions, compile=compile, bucket=0)
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, pb.score_at)
    tok_lp = token_logprobs(model, hidden, torch.arange(hidden.shape[0], device=device), pb.score_tok)
    total = torch.zeros(sum(pb.n_conts), device=device, dtype=tok_lp.dtype).index_add(0, pb.score_cont, tok_lp)
    return list(total.split(pb.n_conts))


def packed_label_scores(bank: PromptBank, entry_idx: torch.Tensor, suffixes: list[list[int]], max_batch_tokens: int,
                        *, compile: bool = False) -> list[torch.Tensor]:
    """Rank-classification scores of a batch from packed rows: per row, its entry's label words'
    summed log-probs (``label_logprobs`` on a ``full_context`` to float rounding).  Memory stays
    bounded by ``max_batch_tokens``: the batch runs in passes of at most that many packed tokens
    (prompt + input + label lanes; at least one example each), in rows of at most that many."""
    if max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
    idx = entry_idx.tolist()
    conts = [bank.entries[e].label_ids for e in idx]
    sizes = [packed_size(len(bank.entries[e].prefix_ids) + len(s), cs) for e, s, cs in zip(idx, suffixes, conts)]
    budget = min(DEFAULT_PACK_TOKENS, max_batch_tokens)
    out: list[torch.Tensor] = []
    for ks in budget_chunks(sizes, max_batch_tokens):
        out += packed_logprobs(bank, entry_idx[ks], [suffixes[k] for k in ks], [conts[k] for k in ks],
                               compile=compile, pack_tokens=budget)
    return out


__all__ = ["DEFAULT_PACK_TOKENS", "PackedBatch", "check_packable", "pack_batch", "pack_rows", "packed_label_scores",
           "packed_logprobs", "packed_size"]
