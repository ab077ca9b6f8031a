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
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .bank import NamedEntries, family_of
from .core.method import Method
from .distributed import DataParallel
from .losses import balancing_weights
from .prompts import ModelIdentity, SoftPrompt, init_embeddings
from .templates import Template
from .training.config import TrainConfig
from .training.loop import Trainable, check_training_inputs, fit

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
    kind: str = "classification"

    @property
    def n_soft(self) -> int:
        return int(self.soft.shape[0])

    @property
    def template(self) -> Template:
        return Template(encoder_template(self.n_soft, self.fields))


class EncoderBank(NamedEntries):
    """Prompts (soft tokens + head) for one frozen encoder, selected per example by index."""

    is_encoder = True

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
        device = self._device()
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
        device = self._device()
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
        device = self._device()
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
    from .scoring import Classification, classification_metrics, length_sorted_batches

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
        return torch.stack(dp.gather(local, len(examples))).to(bank._device())
    with torch.no_grad():
        return torch.cat([bank.pooled([entry] * len(examples[i:i + batch_size]), examples[i:i + batch_size])
                          for i in range(0, len(examples), batch_size)])


def fold_standardised(weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, std: torch.Tensor):
    """(W, b) applied to ``(x - mean) / std`` as an equal plain head on ``x``: (W / std, b - W @ (mean / std))."""
    w = weight / std
    return w, bias - w @ mean


class EncoderTrainable(Trainable):
    """Soft tokens and a linear head on a frozen encoder (an :class:`EncoderBank` entry); with
    no soft tokens, the head alone (a linear probe, whose features are computed once in
    :meth:`prepare` instead of every step).  The head is trained on standardised features
    (module docstring) and saved folded into a plain head."""

    def __init__(self, model, tokenizer, task, train_examples, cfg, n: int, *, pooling: str, head_lr: float,
                 init: torch.Tensor | None = None):
        self.dp = DataParallel.current(model)  # under accelerate launch: this process's shard of each batch
        torch.manual_seed(cfg.seed)
        self.model, self.task, self.cfg, self.n, self.pooling, self.head_lr = model, task, cfg, n, pooling, head_lr
        self.train_examples = train_examples
        self.description = f"training {task.name} ({'prompt + head' if n else 'head only'})"
        self.bank = bank = EncoderBank(model, tokenizer)
        device, hidden, labels = bank._device(), bank.identity.hidden_size, task.labels
        if init is not None:
            start = init
        elif n:
            words = [w.strip() for w in (task.verbalizer or {}).values()]
            start = init_embeddings(model, tokenizer, n, cfg.init, text=cfg.init_text or task.instruction or None,
                                    label_words=words, seed=cfg.seed)
        else:
            start = torch.zeros(0, hidden)
        if tuple(start.shape) != (n, hidden):
            raise ValueError(f"init of shape {tuple(start.shape)}; expected ({n}, {hidden})")
        self.params = {
            "prompt": torch.nn.Parameter(start.detach().clone().to(device, torch.float32), requires_grad=n > 0),
            "weight": torch.nn.Parameter(torch.zeros(len(labels), hidden, device=device)),
            "bias": torch.nn.Parameter(torch.zeros(len(labels), device=device)),
        }
        self.class_weights = balancing_weights(labels, train_examples).to(device) if cfg.balance else None
        self.gold = torch.tensor([labels.index(ex.label) for ex in train_examples], device=device)
        self.entry, self.feats, self.valid_feats = -1, None, None  # set by prepare() and validate()

    def param_groups(self) -> list[dict]:
        groups = [{"params": [self.params["weight"], self.params["bias"]], "base_lr": self.head_lr}]
        if self.n:
            groups.insert(0, {"params": [self.params["prompt"]], "base_lr": self.cfg.lr})
        return groups

    def state(self) -> dict[str, torch.Tensor]:
        return dict(self.params)

    @torch.no_grad()
    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        for k, p in self.params.items():
            p.copy_(tensors[k])

    def run_config(self, cfg) -> dict:
        return {**cfg.to_dict(), "n_tokens": self.n, "pooling": self.pooling, "head_lr": self.head_lr}

    def prepare(self) -> None:
        """Add the entry, and measure the feature standardisation under the initial prompt
        (a head-only run keeps all training features: they never change)."""
        bank, p, cfg, train = self.bank, self.params, self.cfg, self.train_examples
        self.entry = bank.add(self.task.name, self.task.labels, fields=self.task.input_fields, soft=p["prompt"],
                              weight=p["weight"], bias=p["bias"], pooling=self.pooling,
                              verbalizer=self.task.verbalizer)
        self.feats = _features(bank, self.entry, train, cfg.eval_batch_size, self.dp) if not self.n else None
        sample = self.feats if self.feats is not None else _features(
            bank, self.entry, train[:STANDARDISE_EXAMPLES], cfg.eval_batch_size, self.dp)
        self.mean = sample.mean(0)
        self.std = sample.std(0).clamp(min=1e-4) if len(sample) > 1 else torch.ones_like(self.mean)

    def condition(self) -> None:
        """Point the bank entry at the plain head equal to the trained standardised one."""
        e = self.bank.entries[self.entry]
        e.weight, e.bias = fold_standardised(self.params["weight"], self.params["bias"], self.mean, self.std)

    def loss(self, examples: list, index: list[int]) -> tuple[torch.Tensor, int]:
        dp, cw = self.dp, self.class_weights
        # data-parallel: this rank's shard; an empty one runs one example with weight 0 (distributed.py)
        mine = dp.shard(index) if dp.active else index
        rows = mine or index[:1]
        if self.feats is not None:
            logits, n_tok = self.bank.head_logits([self.entry] * len(rows), self.feats[rows]), 0
        else:
            batch = [self.train_examples[i] for i in rows]
            n_tok = sum(len(r[0]) for r in self.bank.encode(self.entry, batch)) if mine else 0
            logits = self.bank.logits([self.entry] * len(rows), batch)
        gold = self.gold[rows]
        per = F.cross_entropy(logits, gold, reduction="none")
        w = cw[gold] if cw is not None else torch.ones_like(per)
        if dp.active:  # this shard's part of the global batch's weighted mean; the parts sum to it
            total_weight = cw[self.gold[index]].sum() if cw is not None else len(index)
            return (per * w).sum() / total_weight * (1.0 if mine else 0.0), n_tok
        return (per * w).sum() / w.sum(), n_tok

    def validate(self, examples) -> dict:
        dp, labels, bs = self.dp, self.task.labels, self.cfg.eval_batch_size
        with torch.no_grad():
            if self.feats is not None:
                if self.valid_feats is None:  # a head-only run pools the validation set once
                    self.valid_feats = _features(self.bank, self.entry, examples, bs, dp)
                logits = self.bank.head_logits([self.entry] * len(examples), self.valid_feats).cpu()
            elif dp.shards_evaluation:
                mine = dp.shard(examples)
                local = list(classify(self.bank, self.entry, mine, batch_size=bs).scores) if mine else []
                logits = torch.stack(dp.gather(local, len(examples)))
            else:
                logits = classify(self.bank, self.entry, examples, batch_size=bs).scores
        preds = [labels[j] for j in logits.argmax(-1).tolist()]  # as classify() predicts
        from .scoring import classification_metrics

        m = classification_metrics([ex.label for ex in examples], preds, labels)
        gold = torch.tensor([labels.index(ex.label) for ex in examples])
        loss = float(F.cross_entropy(logits, gold))
        return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "loss": loss,
                "score": (m["accuracy"], m["macro_f1"], -loss)}

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {k: p.detach().clone() for k, p in self.params.items()}

    def finish(self, final: dict[str, torch.Tensor], summary: dict) -> SoftPrompt:
        cfg, n, device = self.cfg, self.n, self.mean.device
        final = {k: v.to(device) for k, v in final.items()}
        head_weight, head_bias = fold_standardised(final["weight"], final["bias"], self.mean, self.std)
        return SoftPrompt(
            embeddings=final["prompt"].cpu().float(),
            identity=ModelIdentity.of(self.model),
            template=encoder_template(n, self.task.input_fields),
            verbalizer=self.task.verbalizer,
            task=self.task.name,
            kind="classification",
            method=METHOD_PROMPT if n else METHOD_HEAD_ONLY,
            init=cfg.init if n else "",
            training={**cfg.to_dict(), "n_tokens": n, "pooling": self.pooling, "head_lr": self.head_lr, **summary},
            head={"weight": head_weight.detach().cpu().float(), "bias": head_bias.detach().cpu().float()},
            pooling=self.pooling,
        )


def train_encoder_prompt(
    model, tokenizer, task, train_examples, valid_examples=None, config=None, *, n_tokens: int | None = None,
    pooling: str = "mean", head_lr: float | None = None, out_dir: str | Path | None = None, resume: bool = False,
    progress: bool = True, init: torch.Tensor | None = None,
):
    """Train soft tokens and a linear head on a frozen encoder; returns a ``TrainResult``.

    ``config`` is a :class:`~softprompt.training.config.TrainConfig` (``lr`` is the soft tokens'
    peak rate; the head uses ``head_lr``, same schedule).  ``n_tokens`` defaults to the number of
    soft tokens in ``task.template``; 0 trains the head alone (a linear probe).  With
    ``valid_examples`` the best state by validation (accuracy, macro-F1, -loss) is kept.
    """
    cfg = config or TrainConfig()
    if task.kind != "classification":
        raise ValueError(f"task {task.name!r} is {task.kind}: encoder models only support classification "
                         "(they have no head to generate text with)")
    if cfg.method != "prompt":
        raise ValueError(f"method {cfg.method!r} is not supported for encoder models; use 'prompt'")
    if cfg.loss != "rank":
        raise ValueError(f"loss {cfg.loss!r}: encoder models are trained with cross-entropy over the head ('rank')")
    check_training_inputs(model, task, train_examples, valid_examples)
    n = Template(task.template).n_soft if n_tokens is None else int(n_tokens)
    if n < 0:
        raise ValueError(f"n_tokens must be >= 0, got {n}")
    head_lr = DEFAULT_HEAD_LR if head_lr is None else head_lr
    trainable = EncoderTrainable(model, tokenizer, task, train_examples, cfg, n, pooling=pooling, head_lr=head_lr,
                                 init=init)
    return fit(trainable, train_examples, valid_examples, cfg, out_dir=out_dir, resume=resume, progress=progress)


__all__ = ["DEFAULT_HEAD_LR", "METHOD_HEAD_ONLY", "METHOD_PROMPT", "POOLINGS", "EncoderBank", "EncoderEntry",
           "EncoderTrainable", "classify", "encoder_template",
           "train_encoder_prompt"]
