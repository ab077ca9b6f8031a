"""Greedy decoding: the one loop that library generation, evaluation and the server share.

A model family supplies only the model side, as a *step* hook: given the next token of every
row still in the batch, it returns the logits that follow (the decoder-only family feeds them
on top of the context's key/values, ``conditioning.context_steps``; the encoder-decoder family
runs its decoder, ``seq2seq.decoder_steps``).  Everything about a row's answer lives here, so
the library, evaluation and the server cannot drift apart: its token budget, its stop tokens,
line breaks skipped before the answer starts (:func:`take_token`), stop strings and streaming
(caller hooks), abandonment, and when a finished row leaves the batch.
"""
from __future__ import annotations

from collections.abc import Callable, Set as AbstractSet
from dataclasses import dataclass, field

import torch

Step = Callable[[torch.Tensor, "list[int] | None"], torch.Tensor]
"""``step(tokens, keep) -> logits``: feed one token per batch row and return the next logits.
``keep`` (batch positions, before ``tokens`` were selected) names the rows that stay when some
left since the last step, so the hook drops the others' state first; ``None`` when none left."""


@dataclass
class Row:
    """One row's answer so far and the rules that end it."""

    max_new_tokens: int
    stops: AbstractSet[int]  # token ids that end the answer (EOS among them)
    leading: AbstractSet[int] = frozenset()  # dropped while the answer is empty (take_token)
    tokens: list[int] = field(default_factory=list)
    used: int = 0  # decode steps taken; skipped leading tokens count towards max_new_tokens
    finish: str | None = None  # "stop", "length" or "abandoned" once the row is finished


def take_token(t: int, out: list[int], stops: AbstractSet[int], leading: AbstractSet[int] = frozenset()) -> bool:
    """Apply one greedy token to a row's answer ``out``; True when the row stops here.

    Tokens in ``leading`` are dropped while the answer is still empty instead of stopping it:
    with a newline as the stop, an instruction-tuned model that opens its answer with a line
    break would otherwise answer with nothing at all."""
    if not out and t in leading:
        return False
    if t in stops:
        return True
    out.append(t)
    return False


@torch.no_grad()
def greedy_loop(
    logits: torch.Tensor, step: Step, rows: list[Row], *, leave_at: float | None = 0.0,
    on_token: Callable[[int, Row], bool] | None = None, abandoned: Callable[[int], bool] | None = None,
    on_finish: Callable[[int], None] | None = None,
) -> list[Row]:
    """Greedy decoding of ``rows`` from their first next-token ``logits`` ([n, vocab]).

    ``leave_at``: finished rows leave the batch once they are at least this share of it (0: at
    once; the server waits for a quarter, a row costs compute on every step it stays), ``None``:
    never (the step then always sees every row).  ``on_token(i, row)`` runs when row ``i``'s answer
    gains a token (streaming, stop strings): True ends it as ``"stop"``.  ``abandoned(i)`` is asked
    before each of row ``i``'s steps; ``on_finish(i)`` runs once, when row ``i`` finishes.
    Rows never see each other, so each row's tokens are those it would get alone."""
    def end(i: int, how: str) -> None:
        rows[i].finish = how
        if on_finish is not None:
            on_finish(i)

    for i, row in enumerate(rows):
        if row.max_new_tokens <= 0:
            end(i, "length")
    live = list(range(len(rows)))  # the row of each batch position
    while any(rows[i].finish is None for i in live):
        nxt = logits.argmax(-1)
        for i, t in zip(live, nxt.tolist()):  # one device sync per step, not one per row
            row = rows[i]
            if row.finish is not None:
                continue
            if abandoned is not None and abandoned(i):
                end(i, "abandoned")
                continue
            row.used += 1
            before = len(row.tokens)
            if take_token(t, row.tokens, row.stops, row.leading):
                end(i, "stop")
            elif len(row.tokens) > before and on_token is not None and on_token(i, row):
                end(i, "stop")  # a stop string
            elif row.used >= row.max_new_tokens:
                end(i, "length")
        keep = [j for j, i in enumerate(live) if rows[i].finish is None]
        gone = len(live) - len(keep)
        if not keep:
            break
        if leave_at is not None and gone and gone >= leave_at * len(live):
            nxt = nxt.index_select(0, torch.tensor(keep, device=nxt.device))
            live = [live[j] for j in keep]
            logits = step(nxt, keep)
        else:
            logits = step(nxt, None)
    return rows
