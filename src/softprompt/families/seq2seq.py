"""Soft prompts on encoder-decoder models (the T5 family): encode, score, generate, train.

Prompt tuning was introduced on T5 (Lester et al. 2021): the soft tokens go into the
*encoder* input and the answer is produced by the decoder.  This module is the
encoder-decoder counterpart of ``conditioning.py``; the rest of the package (templates,
``PromptBank``, the ``SoftPrompt`` artifact, the training loop, metrics) is shared, and
the encoder-decoder family (``families/seq2seq.py``) hands over to the functions here.

What differs from the decoder-only path, and why:

* **No per-prompt prefix cache.**  The encoder attends in both directions, so the
  template's head (soft tokens, instruction) is changed by every example's input and
  cannot be computed once per prompt.  Each example runs its whole rendered input
  (template head + fields + the rest of the template) through the encoder.
* **The encoder input ends with EOS** (when the tokenizer has one), as T5's tokenizer
  adds it and the models were pre-trained that way.
* **Continuations are decoder targets.**  A label word or an answer is scored as the
  decoder's output after the model's decoder start token; the encoder runs once per
  example however many labels are scored.  Label scores are the summed log-probs of the
  label words (no EOS), the same score as the decoder-only path so numbers compare;
  generation targets end with EOS so the model learns to stop.
* **Prefix tuning is not supported**: a key/value prefix would have to be defined for the
  encoder's self-attention, the decoder's self-attention and the cross-attention.  Only
  input soft tokens (prompt tuning, soft tokens anywhere in the template) are.

Padding is on the right with attention masks for both stacks (T5's position information
is a relative bias, so right padding moves nothing), and masked keys get exactly zero
weight, so an example's numbers do not depend on its batch-mates, and a batch may mix
prompts: row ``b`` uses the bank entry ``entry_idx[b]``.

Logits come from the model's own forward (which applies T5's output scaling, or BART's
final bias), computed only over the short decoder sequences (label words, targets).
"""
from __future__ import annotations

from collections.abc import Set as AbstractSet
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.bank import PromptBank
from ..core.cache_api import cache_arg, output_cache
from ..core.conditioning import DEFAULT_MAX_BATCH_TOKENS, scores_per_label
from ..core.decoding import Row, Step, greedy_loop
from ..core.losses import answer_loss, answer_targets, classification_loss, label_targets
from ..data.task import TaskKind
from .base import PREFIX_UNSUPPORTED, FamilyBase

def decoder_start_id(model) -> int:
    """The token the decoder starts from (T5: the pad token), from the config or generation config."""
    for source in (model.config, getattr(model, "generation_config", None)):
        value = getattr(source, "decoder_start_token_id", None) if source is not None else None
        if value is not None:
            return int(value)
    pad = getattr(model.config, "pad_token_id", None)
    if pad is None:
        raise ValueError(
            f"{type(model).__name__} has no decoder_start_token_id (nor a pad_token_id to start from); "
            "set model.config.decoder_start_token_id"
        )
    return int(pad)


@dataclass
class Encoded:
    """Encoder outputs of a batch: what every continuation is scored against."""

    hidden: torch.Tensor  # [B, S, d] last encoder hidden states
    mask: torch.Tensor  # [B, S] long, 1 = real input token
    entry_idx: torch.Tensor  # [B] bank entry of each row

    def select(self, rows: torch.Tensor) -> Encoded:
        return Encoded(self.hidden.index_select(0, rows), self.mask.index_select(0, rows), self.entry_idx.index_select(0, rows))


def encoder_inputs(bank: PromptBank, entry_idx: list[int], suffixes: list[list[int]]) -> list[list[int]]:
    """Whole rendered inputs: each entry's head (soft tokens as negative ids), the example's
    suffix, then EOS when the tokenizer has one."""
    eos = bank.tokenizer.eos_token_id
    tail = [eos] if eos is not None else []
    return [bank.entries[e].prefix_ids + list(s) + tail for e, s in zip(entry_idx, suffixes)]


def encode(bank: PromptBank, entry_idx: torch.Tensor, suffixes: list[list[int]]) -> Encoded:
    """Run each example's full input, soft tokens included, through the encoder.

    ``suffixes`` are the same per-example ids the decoder-only path uses
    (``bank.suffix_ids``); the entry's head and EOS are added here."""
    from ..core.conditioning import pad_right

    device = bank.device
    entries = [int(e) for e in entry_idx.tolist()]
    for e in set(entries):
        if bank.entries[e].kv is not None:
            raise ValueError(f"prompt {bank.entries[e].name!r}: {PREFIX_UNSUPPORTED}")
    inputs = encoder_inputs(bank, entries, suffixes)
    if any(not ids for ids in inputs):
        raise ValueError("an example rendered to no tokens at all (empty prompt and empty input)")
    ids, mask = pad_right(inputs, device=device)
    entry_idx = torch.tensor(entries, device=device)
    embeds = bank.embed(ids, entry_idx)
    out = bank.model.get_encoder()(inputs_embeds=embeds, attention_mask=mask, return_dict=True)
    return Encoded(hidden=out.last_hidden_state, mask=mask, entry_idx=entry_idx)


def _decode(model, enc: Encoded, decoder_ids: torch.Tensor, decoder_mask: torch.Tensor | None = None, **kw):
    from transformers.modeling_outputs import BaseModelOutput

    return model(
        encoder_outputs=BaseModelOutput(last_hidden_state=enc.hidden), attention_mask=enc.mask,
        decoder_input_ids=decoder_ids, decoder_attention_mask=decoder_mask, return_dict=True, **kw,
    )


def continuation_logprobs(bank: PromptBank, enc: Encoded, rows: list[int], conts: list[list[int]]) -> torch.Tensor:
    """Sum of log-probs of each decoder target ``conts[i]`` given encoded row ``rows[i]``.

    All (row, target) pairs run through the decoder in one right-padded batch (teacher
    forcing: decoder start + target[:-1] in, target out).  Returns a [len(rows)] tensor,
    differentiable when the encoder outputs are."""
    if any(len(c) == 0 for c in conts):
        raise ValueError("a continuation (label word or target) rendered to no tokens")
    from ..core.conditioning import pad_right

    model = bank.model
    device = enc.hidden.device
    start = decoder_start_id(model)
    dec_in, dmask = pad_right([[start] + c[:-1] for c in conts], pad=start, device=device)
    tgt, _ = pad_right(conts, device=device)
    sub = enc.select(torch.tensor(rows, device=device))
    logits = _decode(model, sub, dec_in, dmask, use_cache=False).logits
    sel = dmask.bool()
    lp = F.log_softmax(logits[sel].float(), dim=-1)
    tok_lp = lp.gather(-1, tgt[sel][:, None]).squeeze(-1)
    row_of = torch.arange(len(conts), device=device)[:, None].expand_as(sel)[sel]
    return torch.zeros(len(conts), device=device, dtype=tok_lp.dtype).index_add(0, row_of, tok_lp)


def label_logprobs(bank: PromptBank, enc: Encoded, *, max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS
                   ) -> list[torch.Tensor]:
    """Per example, the log-prob of each of its entry's label words as decoder output: a list
    of [n_labels] tensors (entries in one batch may have different label sets).  Every
    (example, label) pair decodes over its own copy of the encoder states, so the pairs run
    in passes of at most ``max_batch_tokens`` (pairs x (input + label word) tokens)."""
    longest = max((len(ids) for e in set(enc.entry_idx.tolist()) for ids in bank.entries[e].label_ids), default=1)
    max_pairs = max(1, max_batch_tokens // (enc.hidden.shape[1] + longest))
    return scores_per_label(bank, enc.entry_idx, lambda rows, conts: continuation_logprobs(bank, enc, rows, conts),
                            max_pairs=max_pairs)


@torch.no_grad()
def greedy_generate(
    bank: PromptBank,
    enc: Encoded,
    *,
    max_new_tokens: int = 32,
    stop_ids: set[int] | None = None,
    use_cache: bool = True,
    skip_leading: AbstractSet[int] = frozenset(),
) -> list[list[int]]:
    """Greedy decoding for each encoded row; stops at EOS (or any of ``stop_ids``) per row.
    The loop is ``decoding.greedy_loop``; :func:`decoder_steps` is this family's step."""
    stops = set(stop_ids or ())
    for eos in (bank.tokenizer.eos_token_id, getattr(bank.model.config, "eos_token_id", None)):
        if isinstance(eos, int):
            stops.add(eos)
    rows = [Row(max_new_tokens, stops, skip_leading) for _ in range(enc.hidden.shape[0])]
    greedy_loop(*decoder_steps(bank.model, enc, use_cache=use_cache), rows, leave_at=None)
    return [r.tokens for r in rows]


def decoder_steps(model, enc: Encoded, *, use_cache: bool = True) -> tuple[torch.Tensor, Step]:
    """The encoder-decoder family's hook for ``decoding.greedy_loop``: the decoder's first logits
    after its start token, and the step that feeds one token per row.  Every row stays in the
    batch (``leave_at=None``): the decoder's cache holds self- and cross-attention key/values.

    With ``use_cache`` each step feeds one token on top of the decoder's key/value cache
    (cross-attention key/values are computed once); without, the whole decoded sequence is
    re-run every step (the reference the cache is tested against)."""
    seq = torch.full((enc.hidden.shape[0], 1), decoder_start_id(model), dtype=torch.long, device=enc.hidden.device)
    out = _decode(model, enc, seq, use_cache=use_cache)

    def step(tokens: torch.Tensor, keep: list[int] | None) -> torch.Tensor:
        nonlocal seq, out  # keep is always None: every row stays
        seq = torch.cat([seq, tokens[:, None]], dim=1)
        if use_cache:
            out = _decode(model, enc, tokens[:, None], **cache_arg(model, output_cache(out)), use_cache=True)
        else:
            out = _decode(model, enc, seq, use_cache=False)
        return out.logits[:, -1]

    return out.logits[:, -1], step


def batch_loss(
    bank: PromptBank, entry: int, examples, loss: str = "rank", class_weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, int]:
    """Mean loss over ``examples`` and the number of tokens run, as ``training.prompt.batch_loss``:
    classification uses the label words as decoder targets (``rank``: cross-entropy over the
    label scores; ``lm``: -log p(gold words)); generation uses the answer + EOS, the loss
    being the mean per-token negative log-likelihood of the target tokens only."""
    e = bank.entries[entry]
    suffixes = [bank.suffix_ids(entry, ex.fields) for ex in examples]
    enc = encode(bank, torch.full((len(examples),), entry), suffixes)
    n_tokens = int(enc.mask.sum())
    if e.kind == TaskKind.CLASSIFICATION:
        scores = torch.stack(label_logprobs(bank, enc))  # [B, n_labels]
        gold, soft = label_targets(examples, e.labels, scores.device)
        n_tokens += sum(len(ids) for ids in e.label_ids) * len(examples)
        return classification_loss(scores, gold, loss, class_weights, soft), n_tokens
    targets = answer_targets(bank.tokenizer, examples)
    lp = continuation_logprobs(bank, enc, list(range(len(examples))), targets)
    n_tokens += sum(len(t) for t in targets)
    return answer_loss(lp, targets), n_tokens


class Seq2SeqFamily(FamilyBase):
    """A ``PromptBank`` and the shared training loop, as decoders; the forward passes differ."""

    name = "seq2seq"
    examples = "t5, bart, ..."

    def auto_class(self):
        from transformers import AutoModelForSeq2SeqLM

        return AutoModelForSeq2SeqLM

    def batch_loss(self, bank: PromptBank, entry: int, examples, loss: str = "rank",
                   class_weights: torch.Tensor | None = None, context: str = "cached", compile: bool = False,
                   pack_tokens: int | None = None) -> tuple[torch.Tensor, int]:
        """Encoder once per example, label words or answer + EOS as decoder targets; ``context``,
        ``compile`` and ``pack_tokens`` have no encoder-decoder form and are ignored."""
        return batch_loss(bank, entry, examples, loss, class_weights)

    def label_scores(self, bank: PromptBank, entry_idx: torch.Tensor, suffixes: list[list[int]],
                     max_batch_tokens: int, compile: bool = False, context: str = "cached") -> list[torch.Tensor]:
        """The encoder once per row, the label words as decoder targets (``compile`` and ``context``
        have no encoder-decoder form and are ignored, as in training)."""
        return label_logprobs(bank, encode(bank, entry_idx, suffixes), max_batch_tokens=max_batch_tokens)

    def generate(self, bank: PromptBank, entry_idx: torch.Tensor, suffixes: list[list[int]], *, max_new_tokens: int,
                 stop_ids: set[int], skip_leading: AbstractSet[int] = frozenset()) -> list[list[int]]:
        enc = encode(bank, entry_idx, suffixes)
        return greedy_generate(bank, enc, max_new_tokens=max_new_tokens, stop_ids=stop_ids, skip_leading=skip_leading)
