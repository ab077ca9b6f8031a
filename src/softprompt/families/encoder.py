"""Soft prompts for frozen encoder-only models (the BERT family), read out by a small head.

A decoder reads a class from its next-token distribution through a verbalizer (``bank.py``).
An encoder such as BERT or all-MiniLM-L6-v2 has no such distribution (sentence-embedding
checkpoints ship no masked-LM head at all), so here the class is read by a linear head on
the pooled last hidden state, trained together with the soft prompt.  The encoder itself is
never changed: only the soft tokens and the head are trainable, and both travel in one
:class:`~softprompt.prompts.SoftPrompt` artifact (``head.weight`` / ``head.bias`` tensors).
With no soft tokens the same code is a linear probe, the natural baseline.

Training standardises the pooled features (mean and std per dimension, measured once on
training examples under the initial prompt) in front of the head.  Pooled states share a
large common component (all-MiniLM: per-example norm ~3.9 against a spread of ~0.18 per
dimension), and Adam, which steps every coordinate by about the same amount, then moves
the logits mostly along that component and oscillates instead of learning.  The saved head
is the same map folded into a plain ``weight`` / ``bias`` on the raw pooled state.

Input layout, per example::

    [CLS] soft_1 ... soft_N  field_1 tokens [SEP] (field_2 tokens [SEP])

The tokenizer adds its family's own special tokens (and truncates); the soft tokens are
inserted right after the first one, so the [CLS] position that ``cls`` pooling reads stays
at 0.  Rows are right-padded and absolute positions count from 0 in every row, so padding
never changes a row's result.  ``mean`` pooling (what sentence-transformers models such as
all-MiniLM were trained with) averages every non-padding position, soft tokens included.

As in :class:`~softprompt.bank.PromptBank`, every batch row carries the index of its bank
entry, and each entry has its own soft tokens, head and pooling, so one batch can mix tasks.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.bank import NamedEntries, family_of
from ..core.method import Method
from ..core.prompts import ModelIdentity, SoftPrompt
from ..core.templates import Template
from ..data.task import TaskKind
from .base import FamilyBase, UnsupportedError

POOLINGS = ("mean", "cls")
#: ``SoftPrompt.method`` of encoder artifacts: with soft tokens, and head only.
METHOD_PROMPT = Method.ENCODER_PROMPT_TUNING.value
METHOD_HEAD_ONLY = Method.ENCODER_LINEAR_PROBE.value
#: Head learning rate when none is given (on standardised features; bench_encoder.py).
DEFAULT_HEAD_LR = 1e-2
#: Training examples whose pooled states set the feature standardisation.
STANDARDISE_EXAMPLES = 512


def encoder_template(n_tokens: int, fields: Sequence[str]) -> str:
    """The template string stored with an encoder prompt: the soft slot, then the fields.

    Encoders take no literal prompt text here; the template only records how many soft
    tokens there are and which fields form the input, in order.
    """
    if not fields:
        raise ValueError("an encoder prompt needs at least one input field")
    parts = ([f"{{soft:{n_tokens}}}"] if n_tokens else []) + [f"{{{f}}}" for f in fields]
    return " ".join(parts)


@dataclass
class EncoderEntry:
    name: str
    fields: tuple[str, ...]
    soft: torch.Tensor  # [n_soft, hidden]; may require grad
    weight: torch.Tensor  # [n_labels, hidden]
    bias: torch.Tensor  # [n_labels]
    labels: list[str]
    pooling: str = "mean"
    verbalizer: dict[str, str] | None = None  # only the label order matters for encoders
    kind: str = TaskKind.CLASSIFICATION

    @property
    def n_soft(self) -> int:
        return int(self.soft.shape[0])

    @property
    def template(self) -> Template:
        return Template(encoder_template(self.n_soft, self.fields))


class EncoderBank(NamedEntries):
    """Prompts (soft tokens + head) for one frozen encoder, selected per example by index."""

    def __init__(self, model, tokenizer, *, max_length: int | None = None):
        self.family = family_of(model)
        if not self.family.supports("head_classification"):
            raise ValueError(
                f"{type(model).__name__} (model_type {getattr(model.config, 'model_type', '?')!r}) is not an "
                "encoder-only model; use softprompt.PromptBank for decoder models"
            )
        self.model = model
        self.encoder = getattr(model, "base_model", model)  # BertForX -> BertModel
        self.tokenizer = tokenizer
        self.identity = ModelIdentity.of(model)
        limit = getattr(tokenizer, "model_max_length", None)
        if not limit or limit > 100_000:  # tokenizers without a limit say ~1e30
            limit = getattr(model.config, "max_position_embeddings", 512)
        self.max_length = int(max_length or limit)
        self.use_token_types = getattr(model.config, "type_vocab_size", 0) > 1
        self.entries: list[EncoderEntry] = []
        self._index: dict[str, int] = {}

    def add(
        self,
        name: str,
        labels: Sequence[str],
        *,
        fields: Sequence[str] = ("text",),
        soft: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        pooling: str = "mean",
        verbalizer: dict[str, str] | None = None,
    ) -> int:
        """Add (or replace, by name) an entry; returns its index.

        ``soft`` [n_soft, hidden] (default: none, a linear probe), ``weight`` [n_labels, hidden]
        and ``bias`` [n_labels] (default: zeros) may require grad; they are used as given.
        """
        hidden = self.identity.hidden_size
        labels = list(labels)
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise ValueError(f"prompt {name!r}: needs at least two distinct labels, got {labels}")
        if pooling not in POOLINGS:
            raise ValueError(f"prompt {name!r}: pooling must be one of {POOLINGS}, got {pooling!r}")
        if not fields:
            raise ValueError(f"prompt {name!r}: needs at least one input field")
        device = self.device
        soft = torch.zeros(0, hidden, device=device) if soft is None else soft
        weight = torch.zeros(len(labels), hidden, device=device) if weight is None else weight
        bias = torch.zeros(len(labels), device=device) if bias is None else bias
        if soft.ndim != 2 or soft.shape[1] != hidden:
            raise ValueError(f"prompt {name!r}: soft tokens of shape {tuple(soft.shape)} do not fit hidden size {hidden}")
        if tuple(weight.shape) != (len(labels), hidden) or tuple(bias.shape) != (len(labels),):
            raise ValueError(
                f"prompt {name!r}: head of shape {tuple(weight.shape)} + {tuple(bias.shape)} does not fit "
                f"{len(labels)} labels x hidden size {hidden}"
            )
        if self.max_length - soft.shape[0] < 3:
            raise ValueError(f"prompt {name!r}: {soft.shape[0]} soft tokens leave no room in {self.max_length} positions")
        soft, weight, bias = (t.to(device) for t in (soft, weight, bias))  # no-ops when already there
        entry = EncoderEntry(name=name, fields=tuple(fields), soft=soft, weight=weight, bias=bias, labels=labels,
                             pooling=pooling, verbalizer=dict(verbalizer) if verbalizer else None)
        if name in self._index:
            self.entries[self._index[name]] = entry
        else:
            self._index[name] = len(self.entries)
            self.entries.append(entry)
        return self._index[name]

    def add_prompt(self, prompt: SoftPrompt, name: str | None = None) -> int:
        """Add a saved encoder artifact after checking it was trained for this bank's model."""
        prompt.identity.check(self.identity, what=f"prompt {name or prompt.task!r}")
        if prompt.head is None:
            raise ValueError(
                f"prompt {name or prompt.task!r} has no classification head: it was trained for a decoder "
                "model, not for an encoder"
            )
        device = self.device
        fields = Template(prompt.template).fields
        return self.add(
            name or prompt.task, prompt.labels, fields=fields, soft=prompt.embeddings.to(device),
            weight=prompt.head["weight"].to(device), bias=prompt.head["bias"].to(device),
            pooling=prompt.pooling or "mean", verbalizer=prompt.verbalizer,
        )

    # ------------------------------------------------------------------ inputs
    def encode(self, entry: int, examples) -> list[tuple[list[int], list[int]]]:
        """Token ids (soft token k as id ``-(k+1)``) and token types of ``examples`` for ``entry``."""
        e = self.entries[entry]
        texts: list[list[str]] = []
        for ex in examples:
            try:
                parts = [str(ex.fields[f]).strip() for f in e.fields]
            except KeyError as err:
                raise ValueError(
                    f"prompt {e.name!r} needs fields {list(e.fields)}; an example has {sorted(ex.fields)}"
                ) from err
            texts.append(parts)
        first = [t[0] for t in texts]
        # more than two fields: the rest go, separator-joined, into the second segment
        sep = f" {self.tokenizer.sep_token} " if getattr(self.tokenizer, "sep_token", None) else " "
        second = [sep.join(t[1:]) for t in texts] if len(e.fields) > 1 else None
        enc = self.tokenizer(first, second, truncation=True, max_length=self.max_length - e.n_soft,
                             return_token_type_ids=True, add_special_tokens=True)
        specials = set(self.tokenizer.all_special_ids)
        soft = [-(k + 1) for k in range(e.n_soft)]
        all_types = enc.get("token_type_ids")
        out = []
        for i, ids in enumerate(enc["input_ids"]):
            types = list(all_types[i]) if all_types is not None else [0] * len(ids)
            at = 1 if ids and ids[0] in specials else 0  # after [CLS] / <s>
            out.append((ids[:at] + soft + ids[at:], types[:at] + [0] * len(soft) + types[at:]))
        return out

    def pooled(self, entry_idx: Sequence[int] | torch.Tensor, examples) -> torch.Tensor:
        """Pooled last hidden states [B, hidden] of ``examples``, each under its own entry."""
        entries = [int(e) for e in (entry_idx.tolist() if torch.is_tensor(entry_idx) else entry_idx)]
        if len(entries) != len(examples):
            raise ValueError(f"{len(entries)} entry indices for {len(examples)} examples")
        rows: list[tuple[list[int], list[int]]] = [([], [])] * len(examples)
        for e in dict.fromkeys(entries):
            pos = [i for i, x in enumerate(entries) if x == e]
            for i, r in zip(pos, self.encode(e, [examples[i] for i in pos])):
                rows[i] = r
        device = self.device
        width = max(len(ids) for ids, _ in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        types = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, (r, t) in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            types[i, : len(t)] = torch.tensor(t)
            mask[i, : len(r)] = 1
        ids, types, mask = ids.to(device), types.to(device), mask.to(device)
        row_entry = torch.tensor(entries, device=device)
        kwargs = {"token_type_ids": types} if self.use_token_types else {}
        hidden = self.encoder(inputs_embeds=self.embed(ids, row_entry), attention_mask=mask, **kwargs).last_hidden_state
        m = mask[..., None].to(hidden.dtype)
        mean = (hidden * m).sum(1) / m.sum(1)
        use_cls = torch.tensor([self.entries[e].pooling == "cls" for e in entries], device=device)
        return torch.where(use_cls[:, None], hidden[:, 0], mean).float()

    def head_logits(self, entry_idx: Sequence[int] | torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """Each row's head applied to its pooled state: [B, max n_labels]; entries with fewer
        labels get -inf in the unused columns (zero probability)."""
        entries = [int(e) for e in (entry_idx.tolist() if torch.is_tensor(entry_idx) else entry_idx)]
        uniq = list(dict.fromkeys(entries))
        width = max(len(self.entries[e].labels) for e in uniq)
        weights, biases = [], []
        for e in uniq:
            w, b = self.entries[e].weight, self.entries[e].bias
            extra = width - w.shape[0]
            weights.append(F.pad(w, (0, 0, 0, extra)))
            biases.append(F.pad(b, (0, extra), value=-math.inf))
        pick = torch.tensor([uniq.index(e) for e in entries], device=pooled.device)
        w = torch.stack(weights).to(pooled)[pick]  # [B, L, H]
        b = torch.stack(biases).to(pooled)[pick]
        return torch.einsum("bh,blh->bl", pooled, w) + b

    def logits(self, entry_idx: Sequence[int] | torch.Tensor, examples) -> torch.Tensor:
        """Class logits [B, max n_labels] of ``examples`` (see :meth:`head_logits`)."""
        return self.head_logits(entry_idx, self.pooled(entry_idx, examples))


# ----------------------------------------------------------------------------- scoring
@torch.no_grad()
def classify(bank: EncoderBank, entry: int | str | list[int], examples, *, batch_size: int = 32,
             progress: bool | str = False):
    """Label each example with its entry's head (the encoder counterpart of ``scoring.classify``)."""
    from ..core.scoring import Classification, classification_metrics, length_sorted_batches

    n = len(examples)
    entries = ([bank.index(entry)] * n if isinstance(entry, str) else [entry] * n if isinstance(entry, int)
               else list(entry))
    if len(entries) != n:
        raise ValueError(f"{len(entries)} entry indices for {n} examples")
    label_sets = {tuple(bank.entries[e].labels) for e in entries}
    if len(label_sets) > 1:
        raise ValueError("classify() needs entries that share one label set; score mixed tasks per task")
    labels = list(next(iter(label_sets))) if label_sets else []
    scores = torch.empty(n, len(labels))
    sizes = [sum(len(str(v)) for v in ex.fields.values()) for ex in examples]
    desc = progress if isinstance(progress, str) else "scoring"
    for idx in tqdm(length_sorted_batches(sizes, batch_size), desc=desc, disable=not progress, unit="batch"):
        scores[idx] = bank.logits([entries[i] for i in idx], [examples[i] for i in idx]).float().cpu()
    preds = [labels[j] for j in scores.argmax(-1).tolist()]
    result = Classification(labels=labels, predictions=preds, probabilities=scores.softmax(-1), scores=scores)
    gold = [ex.label for ex in examples]
    if n and all(g is not None for g in gold):
        result.metrics = classification_metrics(gold, preds, labels)
    return result


# ----------------------------------------------------------------------------- training
def _features(bank: EncoderBank, entry: int, examples, batch_size: int, dp=None) -> torch.Tensor:
    """Pooled states of ``examples`` under ``entry``, without gradients (for a head-only run);
    with a data-parallel ``dp`` each process pools its shard (``distributed.DataParallel``)."""
    if dp is not None and dp.shards_evaluation:
        mine = dp.shard(examples)
        local = list(_features(bank, entry, mine, batch_size).cpu()) if mine else []
        return torch.stack(dp.gather(local, len(examples))).to(bank.device)
    with torch.no_grad():
        return torch.cat([bank.pooled([entry] * len(examples[i:i + batch_size]), examples[i:i + batch_size])
                          for i in range(0, len(examples), batch_size)])


def fold_standardised(weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, std: torch.Tensor):
    """(W, b) applied to ``(x - mean) / std`` as an equal plain head on ``x``: (W / std, b - W @ (mean / std))."""
    w = weight / std
    return w, bias - w @ mean


__all__ = ["DEFAULT_HEAD_LR", "METHOD_HEAD_ONLY", "METHOD_PROMPT", "POOLINGS", "EncoderBank", "EncoderEntry",
           "EncoderFamily", "classify", "encoder_template", "fold_standardised"]


class EncoderFamily(FamilyBase):
    name = "encoder"
    examples = "bert, roberta, distilbert, ..."
    trainable = "encoder_head"  # soft prompt + head (training/encoder_head.py), not the shared PromptTrainable

    def auto_class(self):
        """The bare encoder: checkpoints such as all-MiniLM ship no masked-LM head, and the
        class is read by the head trained with the prompt."""
        from transformers import AutoModel

        return AutoModel

    def make_bank(self, model, tokenizer):
        return EncoderBank(model, tokenizer)

    def classify_with_head(self, bank, entry, examples, *, batch_size: int = 32, progress: bool | str = False):
        return classify(bank, entry, examples, batch_size=batch_size, progress=progress)

    def batch_loss(self, bank, entry, examples, loss="rank", class_weights=None, context="cached", compile=False,
                   pack_tokens=None):
        raise UnsupportedError(self.name, "rank_classification", "encoder prompts train with their head, in "
                               "softprompt.training.encoder_head.train_encoder_prompt, not through "
                               "softprompt.training.prompt.batch_loss")

    def label_scores(self, bank, entry_idx, suffixes, max_batch_tokens, compile=False, context="cached"):
        self.require("rank_classification")

    def generate(self, bank, entry_idx, suffixes, *, max_new_tokens, stop_ids, skip_leading=frozenset()):
        self.require("generation")
