"""Training a soft prompt against a frozen decoder or T5 model: the family-specific parts
(batch loss, validation, the trained tensors) as a :class:`PromptTrainable` that the one
training loop (``training/loop.py``) drives; checkpoints are ``training/checkpoint.py``'s.

Only the prompt is trainable; the loss is computed only on target tokens (label words or
the answer), and the LM head only at those positions (``conditioning.py``).  P-tuning and
prefix tuning with ``reparam="mlp"`` train the prompt through a small network
(``reparam.py``): the checkpoint holds that network and its optimizer state, the saved
prompt only the network's output.

Under ``accelerate launch`` (or torchrun) each process computes the loss of its shard of
every global batch (:func:`sharded_loss`) and validates its shard of the examples; the loop
sums gradients and takes metrics from the main process (``distributed.py``), so 2 processes
end at the prompt 1 process reaches, to float rounding.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..core.bank import PromptBank
from ..core.method import TRAINED, Method
from ..core.compiled import resolve_compile
from ..core.conditioning import CONTEXT_MODES
from .distributed import DataParallel
from ..core.losses import balancing_weights
from ..core.prompts import ModelIdentity, SoftPrompt, init_embeddings
from ..core.reparam import ENCODERS, PromptTensors
from ..core.scoring import classification_metrics, classify, generate, qa_metrics
from ..data import Task, TaskKind
from ..core.templates import Template
from .config import TrainConfig, TrainResult
from .selection import classification_score, generation_score, prediction_shares
from .loop import Trainable, check_training_inputs, fit


METHODS = tuple(m.short for m in TRAINED)  # "prompt", "ptuning", "prefix" (core.method)


def encoders_for(cfg: TrainConfig) -> dict[str, tuple[str, int]]:
    """Which trained tensors go through an encoder network: name -> (encoder, token axis)."""
    if cfg.method not in METHODS:
        raise ValueError(f"unknown method {cfg.method!r}; use one of {', '.join(METHODS)}")
    if cfg.method == "ptuning":
        if cfg.encoder not in ENCODERS:
            raise ValueError(f"unknown encoder {cfg.encoder!r}; use one of {', '.join(ENCODERS)}")
        return {"prompt": (cfg.encoder, 0)}
    if cfg.method == "prefix" and cfg.reparam == "mlp":
        return {"kv": ("mlp", 3)}  # kv is [layers, 2, kv_heads, positions, head_dim]
    if cfg.method == "prompt" and cfg.reparam == "mlp":  # residual reparameterisation: init + MLP(z)
        return {"prompt": ("mlp", 0)}
    return {}


def initial_prompt(model, tokenizer, task: Task, cfg: TrainConfig) -> torch.Tensor:
    n = Template(task.template).n_soft
    if n == 0:
        raise ValueError(
            f"template {task.template!r} has no soft tokens to train; add e.g. '{{soft:20}}' to it"
        )
    words = list(task.verbalizer.values()) if task.verbalizer else None
    text = cfg.init_text or task.instruction or None
    return init_embeddings(model, tokenizer, n, _init_method(cfg.init, words, text), text=text, label_words=words,
                           seed=cfg.seed)


def _init_method(init: str, words, text) -> str:
    """``init``, except that "labels" (the recipe's default) on a task without label words (generation)
    starts from the instruction's text, or sampled vocabulary without one."""
    if init != "labels" or words:
        return init
    return "text" if text else "vocab"


def initial_prefix_kv(model, tokenizer, task: Task, cfg: TrainConfig) -> torch.Tensor:
    """Prefix-tuning start: the key/values the frozen model computes for real token embeddings
    chosen by ``cfg.init`` (activations of real words are a better start than noise, Li & Liang 2021)."""
    from ..core.cache_api import cache_layers, output_cache

    words = list(task.verbalizer.values()) if task.verbalizer else None
    text = cfg.init_text or task.instruction or None
    emb = init_embeddings(model, tokenizer, cfg.prefix_tokens, _init_method(cfg.init, words, text), text=text,
                          label_words=words, seed=cfg.seed)
    weight = model.get_input_embeddings().weight
    with torch.no_grad():
        out = model.base_model(inputs_embeds=emb[None].to(weight.device, weight.dtype), use_cache=True)
    layers = cache_layers(output_cache(out))
    return torch.stack([torch.stack([k[0], v[0]]) for k, v in layers]).float()


# ----------------------------------------------------------------------------- loss
def resolve_context(mode: str, model) -> str:
    """``auto`` -> ``cached`` on a CPU, ``full`` elsewhere.  Measured on SmolLM2-135M: the cached
    step trains 1.85x faster than HF PEFT on 2 CPU cores but 0.43-0.51x on an H100, where it runs
    about twice as many kernels per step (docs/benchmarks.md, "On a GPU").  ``packed`` (``full``
    with several examples per row, ``core/packing.py``) is opt-in: ``auto`` stays unchanged until
    it is measured on a GPU."""
    if mode not in CONTEXT_MODES:
        raise ValueError(f"context must be one of {CONTEXT_MODES}, got {mode!r}")
    from .distributed import is_sharded

    if is_sharded(model):  # FSDP cannot backpropagate into a cache built by an earlier forward of a sharded layer
        if mode == "cached":
            raise ValueError("context 'cached' does not work with a sharded frozen model; use 'full' or 'auto'")
        return "packed" if mode == "packed" else "full"
    if mode != "auto":
        return mode
    return "cached" if model.get_input_embeddings().weight.device.type == "cpu" else "full"


def batch_loss(
    bank: PromptBank, entry: int, examples, loss: str = "rank", class_weights: torch.Tensor | None = None,
    context: str = "cached", compile: bool = False, pack_tokens: int | None = None,
) -> tuple[torch.Tensor, int]:
    """Mean loss over ``examples`` and the number of tokens run (for throughput).

    ``context`` (see :attr:`TrainConfig.context`) only changes how the numbers are computed,
    not the numbers: both modes give the same loss and gradients to float rounding; so does
    ``compile`` (the ``full`` step's frozen forward through ``compiled.py``) and ``pack_tokens``
    (the row budget of ``context="packed"``: ``core/packing.py``)."""
    return bank.family.batch_loss(bank, entry, examples, loss, class_weights, context=context, compile=compile,
                                  pack_tokens=pack_tokens)


def loss_weight(task: Task, examples, class_weights: torch.Tensor | None = None) -> float:
    """The denominator of ``batch_loss``'s mean over ``examples``: their number, or their summed
    class weights.  A shard's mean times its weight over the global batch's weight, summed over
    processes, is the global batch's mean."""
    if class_weights is None or task.kind != TaskKind.CLASSIFICATION:
        return float(len(examples))
    return float(sum(float(class_weights[task.labels.index(ex.label)]) for ex in examples))


def sharded_loss(bank: PromptBank, entry: int, task: Task, batch, cfg: TrainConfig, class_weights, context: str,
                 dp: DataParallel) -> tuple[torch.Tensor, int]:
    """This rank's part of the global ``batch``'s mean loss (the parts sum to it over ranks) and
    its token count.  A rank whose shard is empty runs one example with weight 0: it adds
    nothing, and a sharded frozen model still sees every rank run the same forwards."""
    mine = dp.shard(batch)
    if not mine:
        loss, _ = batch_loss(bank, entry, batch[:1], cfg.loss, class_weights, context, pack_tokens=cfg.pack_tokens)
        return loss * 0.0, 0
    loss, n_tok = batch_loss(bank, entry, mine, cfg.loss, class_weights, context, pack_tokens=cfg.pack_tokens)
    return loss * (loss_weight(task, mine, class_weights) / loss_weight(task, batch, class_weights)), n_tok


def validate(bank: PromptBank, entry: int, examples, cfg: TrainConfig, dp: DataParallel | None = None) -> dict:
    """Validation metrics, plus a ``score`` tuple where larger is better (for model selection).

    With an active ``dp`` each process scores its shard and the results are gathered, so every
    rank gets the metrics of the whole set."""
    if dp is not None and dp.shards_evaluation:
        return _validate_sharded(bank, entry, list(examples), cfg, dp)
    e = bank.entries[entry]
    if e.kind == TaskKind.CLASSIFICATION:
        res = classify(bank, entry, examples, batch_size=cfg.eval_batch_size, compile=cfg.compile)
        gold = torch.tensor([res.labels.index(ex.label) for ex in examples])
        nll = float(F.cross_entropy(res.scores, gold))
        m = {"accuracy": res.metrics["accuracy"], "macro_f1": res.metrics["macro_f1"], "loss": nll,
             **prediction_shares(res.scores.argmax(-1), gold)}
        m["score"] = classification_score(m)
        return m
    res = generate(bank, entry, examples, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size)
    m = dict(res.metrics)
    m["score"] = generation_score(m)
    return m


def _validate_sharded(bank: PromptBank, entry: int, examples: list, cfg: TrainConfig, dp: DataParallel) -> dict:
    """:func:`validate` with each process scoring every ``world``-th example."""
    e = bank.entries[entry]
    mine = dp.shard(examples)
    if e.kind == TaskKind.CLASSIFICATION:
        local = classify(bank, entry, mine, batch_size=cfg.eval_batch_size).scores if mine else []
        scores = torch.stack(dp.gather(list(local), len(examples)))
        labels = list(e.labels)
        preds = [labels[j] for j in scores.argmax(-1).tolist()]
        metrics = classification_metrics([ex.label for ex in examples], preds, labels)
        gold = torch.tensor([labels.index(ex.label) for ex in examples])
        nll = float(F.cross_entropy(scores, gold))
        m = {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "loss": nll,
             **prediction_shares(scores.argmax(-1), gold)}
        m["score"] = classification_score(m)  # the single-process rule: N processes keep the same prompt
        return m
    local = generate(bank, entry, mine, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size).texts \
        if mine else []
    texts = dp.gather(local, len(examples))
    m = dict(qa_metrics(texts, [ex.answers or ((ex.target,) if ex.target is not None else ()) for ex in examples]))
    m["score"] = generation_score(m)
    return m


# ----------------------------------------------------------------------------- the trainable
class PromptTrainable(Trainable):
    """Soft tokens (prompt tuning), the same through an encoder network (P-tuning) or per-layer
    key/values (prefix tuning) of one task on a frozen decoder or T5 model, in a ``PromptBank``.

    The loss is :func:`batch_loss` (:func:`sharded_loss` data-parallel), validation is
    :func:`validate`; the kept values are what the bank is conditioned on (an encoder's output,
    not its weights), and the artifact is a :class:`~softprompt.core.prompts.SoftPrompt`."""

    def __init__(self, model, tokenizer, task: Task, train_examples, cfg: TrainConfig, encoders: dict, *,
                 init: torch.Tensor | None = None):
        from .distributed import is_sharded

        self.model, self.task, self.cfg = model, task, cfg
        self.description = f"training {task.name}"
        self.context = resolve_context(cfg.context, model)
        self.compile_full = (resolve_compile(cfg.compile, model.get_input_embeddings().weight.device)
                             and self.context in ("full", "packed") and not is_sharded(model))
        if self.context == "packed" and cfg.method == "prefix":
            raise ValueError("context 'packed' cannot train prefix tuning (learned per-layer key/values that no "
                             "forward pass recomputes); use context 'cached' or 'full'")
        self.dp = DataParallel.current(model)
        torch.manual_seed(cfg.seed)
        weight = model.get_input_embeddings().weight
        self.bank = PromptBank(model, tokenizer)
        start_values: dict[str, torch.Tensor] = {}
        if Template(task.template).n_soft or cfg.method != "prefix":
            start_vals = init if init is not None else initial_prompt(model, tokenizer, task, cfg)
            start_values["prompt"] = start_vals.detach().to(weight.device, torch.float32)
        if cfg.method == "prefix":
            start_values["kv"] = initial_prefix_kv(model, tokenizer, task, cfg).to(weight.device)
        self.trained = PromptTensors(start_values, encoders, hidden=cfg.encoder_hidden, seed=cfg.seed)
        self.no_soft = torch.zeros(0, weight.shape[1], device=weight.device)
        self.class_weights = (balancing_weights(task.labels, train_examples)
                              if cfg.balance and task.kind == TaskKind.CLASSIFICATION else None)
        self.values: dict[str, torch.Tensor] = {}
        self.entry = -1

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.trained.parameters().values())}]

    def state(self) -> dict[str, torch.Tensor]:
        return self.trained.state()

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.trained.load_state(tensors)

    def prepare(self) -> None:
        self._put()

    def _put(self) -> None:
        """(Re)compute the prompt from the current parameters and put it in the bank.  For
        direct training these are the parameters themselves; through an encoder, its output
        (differentiable, so the bank recomputes the prompt's key/values on every call)."""
        vals = self.trained.values()
        self.bank.add(self.task.name, self.task.template, vals.get("prompt", self.no_soft),
                      verbalizer=self.task.verbalizer, kind=self.task.kind, kv=vals.get("kv"))
        self.values, self.entry = vals, self.bank.index(self.task.name)

    def condition(self) -> None:
        if self.trained.reparameterised:  # directly trained tensors are in the bank already
            self._put()

    def loss(self, examples: list, index: list[int]) -> tuple[torch.Tensor, int]:
        if self.dp.active:  # this rank's shard; the loop sums gradients and loss over ranks
            return sharded_loss(self.bank, self.entry, self.task, examples, self.cfg, self.class_weights,
                                self.context, self.dp)
        return batch_loss(self.bank, self.entry, examples, self.cfg.loss, self.class_weights, self.context,
                          self.compile_full, self.cfg.pack_tokens)

    def validate(self, examples) -> dict:
        return validate(self.bank, self.entry, examples, self.cfg, self.dp)

    def snapshot(self) -> dict[str, torch.Tensor]:
        # an encoder's output as computed in training (grad on: an LSTM's no-grad kernel differs in the last bit)
        return {k: v.detach().clone() for k, v in self.values.items()}

    def finish(self, final: dict[str, torch.Tensor], summary: dict) -> SoftPrompt:
        cfg, task = self.cfg, self.task
        return SoftPrompt(
            embeddings=final.get("prompt", self.no_soft).detach().cpu().float(),
            kv=final["kv"].detach().cpu().float() if "kv" in final else None,
            method=(Method.PREFIX_TUNING if "kv" in final else Method.parse(cfg.method)).value,
            identity=ModelIdentity.of(self.model),
            template=task.template,
            verbalizer=task.verbalizer,
            task=task.name,
            kind=task.kind,
            init=cfg.init,
            training={**cfg.to_dict(), "reparameterised": self.trained.describe(), **summary},
        )


def train_prompt(
    model,
    tokenizer,
    task: Task,
    train_examples,
    valid_examples=None,
    config: TrainConfig | None = None,
    *,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    init: torch.Tensor | None = None,
    until_step: int | None = None,
) -> TrainResult:
    """Train the soft tokens of ``task.template`` on ``train_examples``; the model stays frozen.

    With ``valid_examples`` the best prompt by validation score is kept (and early stopping
    applies); without, the last prompt is returned.  With ``out_dir`` checkpoints and the
    final ``prompt.safetensors`` are written there, and ``resume=True`` continues from the
    last checkpoint.  ``until_step`` pauses after that step (see :func:`~softprompt.training.loop.fit`).
    """
    cfg = config or TrainConfig()
    check_training_inputs(model, task, train_examples, valid_examples)
    from ..families import family_for
    from .encoder_head import train_encoder_prompt

    family = family_for(model)
    family.check_method(cfg.method)  # before any work: e.g. prefix tuning has no encoder-decoder form
    if cfg.method == "prompt" and cfg.reparam != "none":
        family.require("reparam")  # an encoder classifier trains its soft tokens directly
    if family.trainable != "prompt":  # the family's own trainable (the BERT family: soft prompt + head)
        trainer = {"encoder_head": train_encoder_prompt}[family.trainable]
        return trainer(model, tokenizer, task, train_examples, valid_examples, cfg, out_dir=out_dir, resume=resume,
                       progress=progress, init=init, until_step=until_step)
    encoders = encoders_for(cfg)
    from .distributed import is_sharded

    if is_sharded(model) and cfg.method != "prompt":
        raise ValueError(f"a sharded frozen model trains method 'prompt' only, not {cfg.method!r}")
    trainable = PromptTrainable(model, tokenizer, task, train_examples, cfg, encoders, init=init)
    return fit(trainable, train_examples, valid_examples, cfg, out_dir=out_dir, resume=resume, progress=progress,
               until_step=until_step)
