"""The encoder family's trainable: soft tokens and a linear head on a frozen BERT-style encoder,
driven by the one training loop (``loop.fit``).  The bank, features and head scoring are the
family's (``families/encoder.py``, whose docstring says why the head trains on standardised
features)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..core.losses import balancing_weights
from ..core.prompts import ModelIdentity, SoftPrompt, init_embeddings
from ..core.templates import Template
from ..families.encoder import (
    DEFAULT_HEAD_LR, METHOD_HEAD_ONLY, METHOD_PROMPT, STANDARDISE_EXAMPLES, EncoderBank, _features, classify,
    encoder_template, fold_standardised,
)
from .selection import classification_score, prediction_shares
from .config import TrainConfig
from .distributed import DataParallel
from .loop import Trainable, check_training_inputs, fit
from ..data.task import TaskKind

__all__ = ["EncoderTrainable", "train_encoder_prompt"]


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
        device, hidden, labels = bank.device, bank.identity.hidden_size, task.labels
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
        from ..core.scoring import classification_metrics

        m = classification_metrics([ex.label for ex in examples], preds, labels)
        gold = torch.tensor([labels.index(ex.label) for ex in examples])
        loss = float(F.cross_entropy(logits, gold))
        out = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "loss": loss,
               **prediction_shares(logits.argmax(-1), gold)}
        return {**out, "score": classification_score(out)}  # the one rule (selection.py), as prompt training

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
            kind=TaskKind.CLASSIFICATION,
            method=METHOD_PROMPT if n else METHOD_HEAD_ONLY,
            init=cfg.init if n else "",
            training={**cfg.to_dict(), "n_tokens": n, "pooling": self.pooling, "head_lr": self.head_lr, **summary},
            head={"weight": head_weight.detach().cpu().float(), "bias": head_bias.detach().cpu().float()},
            pooling=self.pooling,
        )


def train_encoder_prompt(
    model, tokenizer, task, train_examples, valid_examples=None, config=None, *, n_tokens: int | None = None,
    pooling: str = "mean", head_lr: float | None = None, out_dir: str | Path | None = None, resume: bool = False,
    progress: bool = True, init: torch.Tensor | None = None, until_step: int | None = None,
):
    """Train soft tokens and a linear head on a frozen encoder; returns a ``TrainResult``.

    ``config`` is a :class:`~softprompt.training.config.TrainConfig` (``lr`` is the soft tokens'
    peak rate; the head uses ``head_lr``, same schedule).  ``n_tokens`` defaults to the number of
    soft tokens in ``task.template``; 0 trains the head alone (a linear probe).  With
    ``valid_examples`` the best state by validation (the one rule of ``selection.py``) is kept.
    """
    cfg = config or TrainConfig()
    if task.kind != TaskKind.CLASSIFICATION:
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
    return fit(trainable, train_examples, valid_examples, cfg, out_dir=out_dir, resume=resume, progress=progress,
               until_step=until_step)


