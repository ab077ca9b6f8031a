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

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .bank import NamedEntries, family_of
from .core.method import Method
from .prompts import ModelIdentity, SoftPrompt, init_embeddings
from .templates import Template

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
def _features(bank: EncoderBank, entry: int, examples, batch_size: int) -> torch.Tensor:
    """Pooled states of ``examples`` under ``entry``, without gradients (for a head-only run)."""
    with torch.no_grad():
        return torch.cat([bank.pooled([entry] * len(examples[i:i + batch_size]), examples[i:i + batch_size])
                          for i in range(0, len(examples), batch_size)])


def _features_sharded(bank: EncoderBank, entry: int, examples, batch_size: int, dp) -> torch.Tensor:
    """:func:`_features` with each process pooling its shard (``distributed.DataParallel``)."""
    if not dp.shards_evaluation:
        return _features(bank, entry, examples, batch_size)
    mine = dp.shard(examples)
    local = list(_features(bank, entry, mine, batch_size).cpu()) if mine else []
    return torch.stack(dp.gather(local, len(examples))).to(bank._device())


def fold_standardised(weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, std: torch.Tensor):
    """(W, b) applied to ``(x - mean) / std`` as an equal plain head on ``x``: (W / std, b - W @ (mean / std))."""
    w = weight / std
    return w, bias - w @ mean


def train_encoder_prompt(
    model,
    tokenizer,
    task,
    train_examples,
    valid_examples=None,
    config=None,
    *,
    n_tokens: int | None = None,
    pooling: str = "mean",
    head_lr: float | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    init: torch.Tensor | None = None,
):
    """Train soft tokens and a linear head on a frozen encoder; returns a ``train.TrainResult``.

    ``config`` is a :class:`~softprompt.train.TrainConfig` (``lr`` is the soft tokens' peak
    rate; the head uses ``head_lr``, same schedule).  ``n_tokens`` defaults to the number of
    soft tokens in ``task.template``; 0 trains the head alone (a linear probe, whose encoder
    features are then computed once instead of every step).  With ``valid_examples`` the best
    state by validation (accuracy, macro-F1, -loss) is kept.
    """
    from .train import (
        CHECKPOINT, RunProgress, TrainConfig, TrainResult, batch_plan, checkpoint_to_resume, lr_at, make_optimizer,
        optimizer_state, save_checkpoint,
    )

    cfg = config or TrainConfig()
    if task.kind != "classification":
        raise ValueError(f"task {task.name!r} is {task.kind}: encoder models only support classification "
                         "(they have no head to generate text with)")
    if cfg.method != "prompt":
        raise ValueError(f"method {cfg.method!r} is not supported for encoder models; use 'prompt'")
    if cfg.loss != "rank":
        raise ValueError(f"loss {cfg.loss!r}: encoder models are trained with cross-entropy over the head ('rank')")
    from .train import check_training_inputs

    check_training_inputs(model, task, train_examples, valid_examples)

    from .distributed import DataParallel

    dp = DataParallel.current(model)  # under accelerate launch: this process's shard of each batch
    torch.manual_seed(cfg.seed)
    n = Template(task.template).n_soft if n_tokens is None else int(n_tokens)
    if n < 0:
        raise ValueError(f"n_tokens must be >= 0, got {n}")
    bank = EncoderBank(model, tokenizer)
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
    params = {
        "prompt": torch.nn.Parameter(start.detach().clone().to(device, torch.float32), requires_grad=n > 0),
        "weight": torch.nn.Parameter(torch.zeros(len(labels), hidden, device=device)),
        "bias": torch.nn.Parameter(torch.zeros(len(labels), device=device)),
    }
    head_lr = DEFAULT_HEAD_LR if head_lr is None else head_lr
    groups = [{"params": [params["weight"], params["bias"]], "base_lr": head_lr}]
    if n:
        groups.insert(0, {"params": [params["prompt"]], "base_lr": cfg.lr})
    dp.broadcast_(params.values())  # every rank starts from the main process's tensors
    optimizer = make_optimizer(groups, cfg)
    entry = bank.add(task.name, labels, fields=task.input_fields, soft=params["prompt"], weight=params["weight"],
                     bias=params["bias"], pooling=pooling, verbalizer=task.verbalizer)

    class_weights = None
    if cfg.balance:
        counts = torch.tensor([sum(ex.label == lab for ex in train_examples) for lab in labels], dtype=torch.float)
        class_weights = (counts.sum() / (len(counts) * counts.clamp(min=1))).to(device)
    gold_all = torch.tensor([labels.index(ex.label) for ex in train_examples], device=device)
    run = RunProgress()  # history, best score, clock: what a checkpoint saves (train.py)
    run.start_clock()  # wall time includes the one-off feature pass of a head-only run
    feats = _features_sharded(bank, entry, train_examples, cfg.eval_batch_size, dp) if n == 0 else None
    sample = feats if feats is not None else _features_sharded(bank, entry, train_examples[:STANDARDISE_EXAMPLES],
                                                               cfg.eval_batch_size, dp)
    mean = sample.mean(0)
    std = sample.std(0).clamp(min=1e-4) if len(sample) > 1 else torch.ones(hidden, device=device)

    def sync_head() -> None:
        """Point the bank entry at the plain head equal to the trained standardised one."""
        e = bank.entries[entry]
        e.weight, e.bias = fold_standardised(params["weight"], params["bias"], mean, std)

    valid_feats = (_features_sharded(bank, entry, valid_examples, cfg.eval_batch_size, dp) if n == 0 and valid_examples
                   else None)

    plan = batch_plan(len(train_examples), cfg.batch_size, cfg.epochs, cfg.seed)
    if cfg.max_steps is not None:
        plan = plan[: cfg.max_steps]
    total = len(plan)
    eval_every = cfg.eval_every or math.ceil(len(train_examples) / cfg.batch_size)
    trainable = [p for p in params.values() if p.requires_grad]

    def evaluate() -> dict:
        sync_head()
        with torch.no_grad():
            if valid_feats is not None:
                logits = bank.head_logits([entry] * len(valid_examples), valid_feats).cpu()
                preds = [labels[j] for j in logits.argmax(-1).tolist()]
            elif dp.shards_evaluation:
                mine = dp.shard(valid_examples)
                local = list(classify(bank, entry, mine, batch_size=cfg.eval_batch_size).scores) if mine else []
                logits = torch.stack(dp.gather(local, len(valid_examples)))
                preds = [labels[j] for j in logits.argmax(-1).tolist()]
            else:
                res = classify(bank, entry, valid_examples, batch_size=cfg.eval_batch_size)
                logits, preds = res.scores, res.predictions
        from .scoring import classification_metrics

        m = classification_metrics([ex.label for ex in valid_examples], preds, labels)
        gold = torch.tensor([labels.index(ex.label) for ex in valid_examples])
        return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "loss": float(F.cross_entropy(logits, gold))}

    best = {k: p.detach().clone() for k, p in params.items()}
    stopped_early = False
    run_config = {**cfg.to_dict(), "n_tokens": n, "pooling": pooling, "head_lr": head_lr}
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    saved = checkpoint_to_resume(out, resume, run_config)  # as train.train_prompt does
    if saved is not None:
        tensors, meta = saved
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(tensors[k])
        best = {k: tensors[f"best.{k}"].to(device) for k in params}
        optimizer.load_state_dict(optimizer_state(tensors, meta["optimizer"]))
        run = RunProgress.from_meta(meta)
        run.start_clock()
    ckpt_every = cfg.checkpoint_every or eval_every

    def checkpoint() -> None:
        if out is not None and dp.is_main:
            run.tick()
            save_checkpoint(out / CHECKPOINT, params=dict(params), best=best, optimizer=optimizer,
                            meta=run.meta(run_config))

    bar = tqdm(total=total, initial=run.step, desc=f"training {task.name} ({'prompt + head' if n else 'head only'})",
               disable=not (progress and dp.is_main), unit="step")
    for step in range(run.step, total):
        epoch, idx = plan[step]
        lr_scale = lr_at(step, total, cfg) / cfg.lr if cfg.lr else 1.0
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * lr_scale
        sync_head()
        if feats is None:
            run.tokens_seen += sum(len(r[0]) for r in bank.encode(entry, [train_examples[i] for i in idx]))
        # data-parallel: this rank's shard; an empty one runs one example with weight 0 (distributed.py)
        mine = dp.shard(idx) if dp.active else idx
        rows = mine or idx[:1]
        if feats is not None:
            logits = bank.head_logits([entry] * len(rows), feats[rows])
        else:
            logits = bank.logits([entry] * len(rows), [train_examples[i] for i in rows])
        gold = gold_all[rows]
        per = F.cross_entropy(logits, gold, reduction="none")
        w = class_weights[gold] if class_weights is not None else torch.ones_like(per)
        if dp.active:  # this shard's part of the global batch's weighted mean; the parts sum to it
            total_weight = class_weights[gold_all[idx]].sum() if class_weights is not None else len(idx)
            loss = (per * w).sum() / total_weight * (1.0 if mine else 0.0)
        else:
            loss = (per * w).sum() / w.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        loss_value = float(loss.detach())
        if dp.active:
            (loss_value,) = dp.sum_gradients(trainable, [loss_value])
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        optimizer.step()
        run.step = step + 1
        record: dict[str, Any] = {"step": step + 1, "epoch": epoch, "loss": loss_value,
                                  "lr": optimizer.param_groups[0]["lr"]}
        if valid_examples and ((step + 1) % eval_every == 0 or step + 1 == total):
            m = dp.from_main(evaluate())  # every rank judges the same numbers
            record["valid"] = m
            if run.judge((m["accuracy"], m["macro_f1"], -m["loss"])):
                best = {k: p.detach().clone() for k, p in params.items()}
            stopped_early = run.out_of_patience(cfg.patience)
        run.history.append(record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}",
                        **({"valid": f"{record['valid']['accuracy']:.3f}"} if "valid" in record else {}))
        if (step + 1) % ckpt_every == 0 or step + 1 == total or stopped_early:
            checkpoint()
        if stopped_early:
            break
    bar.close()
    run.tick()
    final = best if valid_examples else {k: p.detach().clone() for k, p in params.items()}
    best_step = run.best_step if valid_examples else len(run.history)
    head_weight, head_bias = fold_standardised(final["weight"], final["bias"], mean, std)
    prompt = SoftPrompt(
        embeddings=final["prompt"].cpu().float(),
        identity=ModelIdentity.of(model),
        template=encoder_template(n, task.input_fields),
        verbalizer=task.verbalizer,
        task=task.name,
        kind="classification",
        method=METHOD_PROMPT if n else METHOD_HEAD_ONLY,
        init=cfg.init if n else "",
        training={**cfg.to_dict(), "n_tokens": n, "pooling": pooling, "head_lr": head_lr,
                  "train_examples": len(train_examples), "best_step": best_step, "steps": len(run.history),
                  "wall_time_s": round(run.elapsed, 2)},
        head={"weight": head_weight.detach().cpu().float(), "bias": head_bias.detach().cpu().float()},
        pooling=pooling,
    )
    result = TrainResult(prompt=prompt, history=run.history, best_step=best_step, steps=len(run.history),
                         wall_time_s=run.elapsed, tokens_per_s=run.tokens_per_s,
                         stopped_early=stopped_early, trainable_params=sum(p.numel() for p in trainable))
    if out is not None and dp.is_main:
        prompt.save(out / "prompt.safetensors")
        (out / "history.json").write_text(json.dumps(run.history, indent=1))
    dp.barrier()  # the files exist when any rank returns
    return result


__all__ = [
    "DEFAULT_HEAD_LR",
    "METHOD_HEAD_ONLY",
    "METHOD_PROMPT",
    "POOLINGS",
    "EncoderBank",
    "EncoderEntry",
    "classify",
    "encoder_template",
    "train_encoder_prompt",
]
