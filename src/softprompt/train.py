"""Training a soft prompt against a frozen model.

The loop is plain PyTorch on top of ``accelerate`` (device placement, mixed precision,
``backward``), readable top to bottom:

    for step, batch in plan[start:]:
        loss = loss_fn(batch); backward; clip; optimizer.step()
        every `eval_every` steps: validate, keep the best prompt, maybe stop early
        every `checkpoint_every` steps: write a checkpoint atomically

Determinism is what makes ``resume`` exact: the whole batch plan is a function of the
seed, the frozen model has no dropout, and a checkpoint holds the prompt, the optimizer
state, the best prompt so far and the history.  A run killed with SIGKILL and resumed
ends with the same prompt as an uninterrupted run.  Checkpoints are single safetensors
files (tensors + JSON header, no pickle) written with ``os.replace``.

Only the prompt is trainable; the loss is computed only on target tokens (label words or
the answer), and the LM head only at those positions (``conditioning.py``).  P-tuning and
prefix tuning with ``reparam="mlp"`` train the prompt through a small network
(``reparam.py``): the checkpoint holds that network and its optimizer state, the saved
prompt only the network's output.

Under ``accelerate launch`` (or torchrun) the same loop runs data-parallel: each process
takes its shard of every global batch and the trainable tensors' gradients are summed over
processes (``distributed.py``); the batch plan, the checkpoint and the result do not depend
on the process count, so 2 processes end at the prompt 1 process reaches, to float rounding,
and a run can resume with another process count.  Only the main process writes files.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from tqdm.auto import tqdm

from .core import atomic
from .core.method import TRAINED, Method
from .bank import PromptBank
from .compiled import resolve_compile
from .distributed import DataParallel
from .prompts import ModelIdentity, SoftPrompt, init_embeddings
from .reparam import ENCODERS, PromptTensors
from .scoring import classification_metrics, classify, generate, qa_metrics
from .data import Task
from .templates import Template


DEFAULT_LR = 0.3
"""The one default learning rate of prompt tuning (``train``, ``compare`` and ``demo``): Lester et al.'s
0.3.  On 50-64 examples the best rate varies by task (0.03 vs 0.3 flipped a held-out task's verdict),
so ``compare`` also tries 0.03 and 0.1 and picks on validation data (``compare.LR_GRID``)."""


@dataclass
class TrainConfig:
    """Hyper-parameters of one prompt-training run (all plain data, saved with the prompt)."""

    method: str = "prompt"  # prompt: train the template's {soft:N} slots; ptuning: the same slots through an
    # encoder network (P-tuning); prefix: also per-layer key/values
    prefix_tokens: int = 10  # length of the learned key/value prefix (method "prefix")
    encoder: str = "lstm"  # ptuning's prompt encoder: lstm (bidirectional LSTM + MLP) | mlp
    encoder_hidden: int = 128  # width of the encoder network (ptuning, and prefix with reparam "mlp")
    reparam: str = "none"  # prefix: none (train key/values directly) | mlp (through an MLP, Li & Liang 2021)
    init: str = "labels"  # random | vocab | text | labels
    init_text: str | None = None
    epochs: int = 20
    max_steps: int | None = None
    batch_size: int = 8
    lr: float = DEFAULT_LR
    optimizer: str = "adamw"  # adamw | adafactor
    weight_decay: float = 1e-5
    warmup_steps: int = 10
    schedule: str = "linear"  # linear | cosine | constant (after warmup)
    grad_clip: float = 1.0
    loss: str = "rank"  # rank: cross-entropy over the label scores; lm: -log p(gold label words)
    balance: bool = False  # weight classes by inverse training frequency (classification)
    eval_every: int = 0  # steps between validations; 0 = once per epoch
    patience: int | None = None  # validations without improvement before stopping
    checkpoint_every: int = 0  # steps between checkpoints; 0 = at each validation
    eval_batch_size: int = 32
    max_new_tokens: int = 24
    seed: int = 0
    context: str = "auto"  # how a batch runs: "cached" (the prompt's key/values once, then each input on top:
    # least arithmetic, best on CPUs), "full" (prompt + input in one pass per row: fewest passes, best on
    # GPUs, where a small model is launch-bound), "auto" (cached on a CPU, full on a GPU)
    compile: str = "auto"  # the "full" step's frozen forward through torch.compile (compiled.py): on | off |
    # auto (on for CUDA, off on CPUs, where it was not faster); ignored by the cached step and a sharded model

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    prompt: SoftPrompt
    history: list[dict] = field(default_factory=list)
    best_step: int = 0
    steps: int = 0
    wall_time_s: float = 0.0
    tokens_per_s: float = 0.0
    stopped_early: bool = False
    # numbers the optimizer updated: for P-tuning / reparameterised prefix tuning the encoder
    # network's weights, which are more than the saved prompt holds (``prompt.n_params``)
    trainable_params: int | None = None


def batch_plan(n: int, batch_size: int, epochs: int, seed: int) -> list[tuple[int, list[int]]]:
    """(epoch, example indices) for every step: a fixed function of the seed, so resume is exact."""
    plan = []
    for epoch in range(epochs):
        order = list(range(n))
        random.Random(seed * 100003 + epoch).shuffle(order)
        for i in range(0, n, batch_size):
            plan.append((epoch, order[i : i + batch_size]))
    return plan


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Learning rate for 0-based ``step``: linear warmup, then linear/cosine decay or constant."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(total - cfg.warmup_steps, 1)
    frac = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * frac))
    return cfg.lr * (1 - frac)


def make_optimizer(params, cfg: TrainConfig):
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            params, lr=cfg.lr, weight_decay=cfg.weight_decay, scale_parameter=False, relative_step=False,
            warmup_init=False,
        )
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; use adamw or adafactor")


METHODS = tuple(m.short for m in TRAINED)  # "prompt", "ptuning", "prefix" (core.method)


def encoders_for(cfg: TrainConfig) -> dict[str, tuple[str, int]]:
    """Which trained tensors go through an encoder network: name -> (encoder, token axis)."""
    if cfg.method not in METHODS:
        raise ValueError(f"unknown method {cfg.method!r}; use one of {', '.join(METHODS)}")
    if cfg.reparam not in ("none", "mlp"):
        raise ValueError(f"unknown reparam {cfg.reparam!r}; use none or mlp")
    if cfg.reparam != "none" and cfg.method != "prefix":
        raise ValueError("reparam applies to method 'prefix' (the key/values); for soft tokens use method 'ptuning'")
    if cfg.method == "ptuning":
        if cfg.encoder not in ENCODERS:
            raise ValueError(f"unknown encoder {cfg.encoder!r}; use one of {', '.join(ENCODERS)}")
        return {"prompt": (cfg.encoder, 0)}
    if cfg.method == "prefix" and cfg.reparam == "mlp":
        return {"kv": ("mlp", 3)}  # kv is [layers, 2, kv_heads, positions, head_dim]
    return {}


def initial_prompt(model, tokenizer, task: Task, cfg: TrainConfig) -> torch.Tensor:
    n = Template(task.template).n_soft
    if n == 0:
        raise ValueError(
            f"template {task.template!r} has no soft tokens to train; add e.g. '{{soft:20}}' to it"
        )
    words = list(task.verbalizer.values()) if task.verbalizer else None
    text = cfg.init_text or task.instruction or None
    return init_embeddings(model, tokenizer, n, cfg.init, text=text, label_words=words, seed=cfg.seed)


def initial_prefix_kv(model, tokenizer, task: Task, cfg: TrainConfig) -> torch.Tensor:
    """Prefix-tuning start: the key/values the frozen model computes for real token embeddings
    chosen by ``cfg.init`` (activations of real words are a better start than noise, Li & Liang 2021)."""
    from .cache_api import cache_layers, output_cache

    words = list(task.verbalizer.values()) if task.verbalizer else None
    text = cfg.init_text or task.instruction or None
    method = cfg.init if cfg.init != "labels" or words else "vocab"
    emb = init_embeddings(model, tokenizer, cfg.prefix_tokens, method, text=text, label_words=words, seed=cfg.seed)
    weight = model.get_input_embeddings().weight
    with torch.no_grad():
        out = model.base_model(inputs_embeds=emb[None].to(weight.device, weight.dtype), use_cache=True)
    layers = cache_layers(output_cache(out))
    return torch.stack([torch.stack([k[0], v[0]]) for k, v in layers]).float()


# ----------------------------------------------------------------------------- loss
CONTEXT_MODES = ("auto", "cached", "full")


def resolve_context(mode: str, model) -> str:
    """``auto`` -> ``cached`` on a CPU, ``full`` elsewhere.  Measured on SmolLM2-135M: the cached
    step trains 1.85x faster than HF PEFT on 2 CPU cores but 0.43-0.51x on an H100, where it runs
    about twice as many kernels per step (docs/benchmarks.md, "On a GPU")."""
    if mode not in CONTEXT_MODES:
        raise ValueError(f"context must be one of {CONTEXT_MODES}, got {mode!r}")
    from .distributed import is_sharded

    if is_sharded(model):  # FSDP cannot backpropagate into a cache built by an earlier forward of a sharded layer
        if mode == "cached":
            raise ValueError("context 'cached' does not work with a sharded frozen model; use 'full' or 'auto'")
        return "full"
    if mode != "auto":
        return mode
    return "cached" if model.get_input_embeddings().weight.device.type == "cpu" else "full"


def batch_loss(
    bank: PromptBank, entry: int, examples, loss: str = "rank", class_weights: torch.Tensor | None = None,
    context: str = "cached", compile: bool = False,
) -> tuple[torch.Tensor, int]:
    """Mean loss over ``examples`` and the number of tokens run (for throughput).

    ``context`` (see :attr:`TrainConfig.context`) only changes how the numbers are computed,
    not the numbers: both modes give the same loss and gradients to float rounding; so does
    ``compile`` (the ``full`` step's frozen forward through ``compiled.py``)."""
    return bank.family.batch_loss(bank, entry, examples, loss, class_weights, context=context, compile=compile)


def loss_weight(task: Task, examples, class_weights: torch.Tensor | None = None) -> float:
    """The denominator of ``batch_loss``'s mean over ``examples``: their number, or their summed
    class weights.  A shard's mean times its weight over the global batch's weight, summed over
    processes, is the global batch's mean."""
    if class_weights is None or task.kind != "classification":
        return float(len(examples))
    return float(sum(float(class_weights[task.labels.index(ex.label)]) for ex in examples))


def sharded_loss(bank: PromptBank, entry: int, task: Task, batch, cfg: TrainConfig, class_weights, context: str,
                 dp: DataParallel) -> tuple[torch.Tensor, int]:
    """This rank's part of the global ``batch``'s mean loss (the parts sum to it over ranks) and
    its token count.  A rank whose shard is empty runs one example with weight 0: it adds
    nothing, and a sharded frozen model still sees every rank run the same forwards."""
    mine = dp.shard(batch)
    if not mine:
        loss, _ = batch_loss(bank, entry, batch[:1], cfg.loss, class_weights, context)
        return loss * 0.0, 0
    loss, n_tok = batch_loss(bank, entry, mine, cfg.loss, class_weights, context)
    return loss * (loss_weight(task, mine, class_weights) / loss_weight(task, batch, class_weights)), n_tok


def validate(bank: PromptBank, entry: int, examples, cfg: TrainConfig, dp: DataParallel | None = None) -> dict:
    """Validation metrics, plus a ``score`` tuple where larger is better (for model selection).

    With an active ``dp`` each process scores its shard and the results are gathered, so every
    rank gets the metrics of the whole set."""
    if dp is not None and dp.shards_evaluation:
        return _validate_sharded(bank, entry, list(examples), cfg, dp)
    e = bank.entries[entry]
    if e.kind == "classification":
        res = classify(bank, entry, examples, batch_size=cfg.eval_batch_size, compile=cfg.compile)
        gold = torch.tensor([res.labels.index(ex.label) for ex in examples])
        nll = float(F.cross_entropy(res.scores, gold))
        m = {"accuracy": res.metrics["accuracy"], "macro_f1": res.metrics["macro_f1"], "loss": nll}
        # macro-F1 first: a prompt stuck on the majority class can win accuracy, not macro-F1 (issue 14)
        m["score"] = (m["macro_f1"], m["accuracy"], -nll)
        return m
    res = generate(bank, entry, examples, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size)
    m = dict(res.metrics)
    m["score"] = (m["f1"], m["exact_match"])
    return m


def _validate_sharded(bank: PromptBank, entry: int, examples: list, cfg: TrainConfig, dp: DataParallel) -> dict:
    """:func:`validate` with each process scoring every ``world``-th example."""
    e = bank.entries[entry]
    mine = dp.shard(examples)
    if e.kind == "classification":
        local = classify(bank, entry, mine, batch_size=cfg.eval_batch_size).scores if mine else []
        scores = torch.stack(dp.gather(list(local), len(examples)))
        labels = list(e.labels)
        preds = [labels[j] for j in scores.argmax(-1).tolist()]
        metrics = classification_metrics([ex.label for ex in examples], preds, labels)
        gold = torch.tensor([labels.index(ex.label) for ex in examples])
        nll = float(F.cross_entropy(scores, gold))
        m = {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "loss": nll}
        m["score"] = (m["accuracy"], m["macro_f1"], -nll)
        return m
    local = generate(bank, entry, mine, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size).texts \
        if mine else []
    texts = dp.gather(local, len(examples))
    m = dict(qa_metrics(texts, [ex.answers or ((ex.target,) if ex.target is not None else ()) for ex in examples]))
    m["score"] = (m["f1"], m["exact_match"])
    return m


# ----------------------------------------------------------------------------- checkpoints
CHECKPOINT = "checkpoint.safetensors"


def _atomic_save(tensors: dict[str, torch.Tensor], meta: dict, path: Path) -> None:
    atomic.write_safetensors(path, {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                             metadata={"state": json.dumps(meta)})


def save_checkpoint(path: Path, *, params: dict, best: dict, optimizer, meta: dict) -> None:
    """Trainable tensors, their best values and optimizer state as tensors; everything else as JSON."""
    tensors = {**params, **{f"best.{k}": v for k, v in best.items()}}
    sd = optimizer.state_dict()
    opt_meta: dict[str, Any] = {"param_groups": sd["param_groups"], "state": {}}
    for pid, st in sd["state"].items():
        opt_meta["state"][str(pid)] = {}
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt.{pid}.{k}"] = v
                opt_meta["state"][str(pid)][k] = {"tensor": f"opt.{pid}.{k}"}
            else:
                opt_meta["state"][str(pid)][k] = {"value": v}
    _atomic_save(tensors, {**meta, "optimizer": opt_meta}, path)


@dataclass
class RunProgress:
    """Where a training run stands apart from its tensors: the history, the best validation score
    and its step, the validations since it last improved (early stopping), and the clock and token
    count behind tokens/s.  A checkpoint's metadata holds exactly this, so both training loops
    (decoder here, encoder in ``encoder.py``) save and restore it the same way and a resumed run
    continues all of it."""

    step: int = 0
    history: list[dict] = field(default_factory=list)
    best_score: tuple | None = None
    best_step: int = 0
    bad_evals: int = 0
    elapsed: float = 0.0  # training seconds so far, earlier runs of a resumed training included
    tokens_seen: int = 0
    _started: float = field(default=0.0, repr=False)

    @classmethod
    def from_meta(cls, meta: dict) -> "RunProgress":
        best = meta["best_score"]
        return cls(step=meta["step"], history=meta["history"], best_score=tuple(best) if best is not None else None,
                   best_step=meta["best_step"], bad_evals=meta["bad_evals"], elapsed=meta["elapsed"],
                   tokens_seen=meta["tokens_seen"])

    def meta(self, config: dict) -> dict:
        """The checkpoint metadata (JSON) for this point of the run."""
        return {"step": self.step, "history": self.history, "best_score": self.best_score,
                "best_step": self.best_step, "bad_evals": self.bad_evals, "elapsed": self.elapsed,
                "tokens_seen": self.tokens_seen, "config": config}

    def start_clock(self) -> None:
        """Start timing, continuing from the seconds already recorded."""
        self._started = time.perf_counter() - self.elapsed

    def tick(self) -> None:
        self.elapsed = time.perf_counter() - self._started

    def judge(self, score) -> bool:
        """Count a validation at the current step; True when ``score`` is the best so far (the
        caller then keeps the current prompt)."""
        if self.best_score is None or tuple(score) > self.best_score:
            self.best_score, self.best_step, self.bad_evals = tuple(score), self.step, 0
            return True
        self.bad_evals += 1
        return False

    def out_of_patience(self, patience: int | None) -> bool:
        return patience is not None and self.bad_evals >= patience

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_seen / max(self.elapsed, 1e-9)


def config_matches(saved: dict, current: dict) -> bool:
    """Whether a checkpoint's run config equals ``current``; TrainConfig fields added since the
    checkpoint was written take their defaults (so it still resumes)."""
    return {**json.loads(json.dumps(TrainConfig().to_dict())), **saved} == json.loads(json.dumps(current))


def checkpoint_to_resume(out: Path | None, resume: bool, run_config: dict) -> tuple[dict[str, torch.Tensor], dict] | None:
    """``out``'s checkpoint (tensors, meta) when resuming and there is one; an error when it was
    written with another config, since continuing it would train a mixture of two runs."""
    if not (resume and out is not None and (out / CHECKPOINT).exists()):
        return None
    tensors, meta = load_checkpoint(out / CHECKPOINT)
    if not config_matches(meta["config"], run_config):
        raise ValueError(f"{out / CHECKPOINT} was written with a different config; start a new out_dir or drop --resume")
    return tensors, meta


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["state"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, meta


def optimizer_state(tensors: dict[str, torch.Tensor], opt_meta: dict) -> dict:
    state = {}
    for pid, st in opt_meta["state"].items():
        state[int(pid)] = {k: tensors[v["tensor"]] if "tensor" in v else v["value"] for k, v in st.items()}
    return {"state": state, "param_groups": opt_meta["param_groups"]}


# ----------------------------------------------------------------------------- loop
def check_training_inputs(model, task: Task, train_examples, valid_examples) -> None:
    """Refuse, before any work, what no model family can train on: no examples, examples the
    task cannot use (unknown label, missing field), or a base model that is not frozen."""
    if not train_examples:
        raise ValueError("no training examples")
    task.check(train_examples, source="training examples")
    if valid_examples:
        task.check(valid_examples, source="validation examples")
    if any(p.requires_grad for p in model.parameters()):
        raise ValueError("the base model must be frozen (no parameter may require grad); use softprompt.models.freeze")


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
) -> TrainResult:
    """Train the soft tokens of ``task.template`` on ``train_examples``; the model stays frozen.

    With ``valid_examples`` the best prompt by validation score is kept (and early stopping
    applies); without, the last prompt is returned.  With ``out_dir`` checkpoints and the
    final ``prompt.safetensors`` are written there, and ``resume=True`` continues from the
    last checkpoint.
    """
    from accelerate import Accelerator

    cfg = config or TrainConfig()
    check_training_inputs(model, task, train_examples, valid_examples)
    from .families import family_for

    # BERT family: soft prompt + head in encoder.py's loop; the others: the method checked before any work
    separate = family_for(model).train_separately(model, tokenizer, task, train_examples, valid_examples, cfg,
                                                  out_dir=out_dir, resume=resume, progress=progress, init=init)
    if separate is not None:
        return separate
    encoders = encoders_for(cfg)
    from .distributed import is_sharded

    if is_sharded(model) and cfg.method != "prompt":
        raise ValueError(f"a sharded frozen model trains method 'prompt' only, not {cfg.method!r}")
    context = resolve_context(cfg.context, model)
    compile_full = (resolve_compile(cfg.compile, model.get_input_embeddings().weight.device)
                    and context == "full" and not is_sharded(model))
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    dp = DataParallel.current(model)
    torch.manual_seed(cfg.seed)
    weight = model.get_input_embeddings().weight
    bank = PromptBank(model, tokenizer)
    start_values: dict[str, torch.Tensor] = {}
    if Template(task.template).n_soft or cfg.method != "prefix":
        start_vals = init if init is not None else initial_prompt(model, tokenizer, task, cfg)
        start_values["prompt"] = start_vals.detach().to(weight.device, torch.float32)
    if cfg.method == "prefix":
        start_values["kv"] = initial_prefix_kv(model, tokenizer, task, cfg).to(weight.device)
    trained = PromptTensors(start_values, encoders, hidden=cfg.encoder_hidden, seed=cfg.seed)
    params = trained.parameters()
    dp.broadcast_(trained.state().values())  # every rank starts from the main process's tensors
    optimizer = accelerator.prepare(make_optimizer(list(params.values()), cfg))
    no_soft = torch.zeros(0, weight.shape[1], device=weight.device)

    def condition() -> dict[str, torch.Tensor]:
        """(Re)compute the prompt from the current parameters and put it in the bank.  For
        direct training these are the parameters themselves; through an encoder, its output
        (differentiable, so the bank recomputes the prompt's key/values on every call)."""
        vals = trained.values()
        bank.add(task.name, task.template, vals.get("prompt", no_soft), verbalizer=task.verbalizer, kind=task.kind,
                 kv=vals.get("kv"))
        return vals

    values = condition()
    entry = bank.index(task.name)

    class_weights = None
    if cfg.balance and task.kind == "classification":
        counts = torch.tensor([sum(ex.label == lab for ex in train_examples) for lab in task.labels], dtype=torch.float)
        class_weights = counts.sum() / (len(counts) * counts.clamp(min=1))
    plan = batch_plan(len(train_examples), cfg.batch_size, cfg.epochs, cfg.seed)
    if cfg.max_steps is not None:
        plan = plan[: cfg.max_steps]
    total = len(plan)
    steps_per_epoch = math.ceil(len(train_examples) / cfg.batch_size)
    eval_every = cfg.eval_every or steps_per_epoch
    ckpt_every = cfg.checkpoint_every or eval_every
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)

    run = RunProgress()
    best = {k: v.detach().clone() for k, v in values.items()}
    saved = checkpoint_to_resume(out, resume, cfg.to_dict())
    if saved is not None:
        tensors, meta = saved
        trained.load_state(tensors)
        best = {k: tensors[f"best.{k}"].clone() for k in values}
        optimizer.load_state_dict(optimizer_state(tensors, meta["optimizer"]))
        run = RunProgress.from_meta(meta)

    def checkpoint() -> None:
        if out is not None and dp.is_main:
            save_checkpoint(out / CHECKPOINT, params=trained.state(), best=best, optimizer=optimizer,
                            meta=run.meta(cfg.to_dict()))

    bar = tqdm(total=total, initial=run.step, desc=f"training {task.name}", disable=not (progress and dp.is_main),
               unit="step")
    stopped_early = False
    run.start_clock()
    running = None
    for step in range(run.step, total):
        epoch, idx = plan[step]
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, total, cfg)
        if trained.reparameterised:
            condition()
        optimizer.zero_grad(set_to_none=True)
        if dp.active:  # this rank's shard; its gradients and loss are summed over ranks below
            loss, n_tok = sharded_loss(bank, entry, task, [train_examples[i] for i in idx], cfg, class_weights, context,
                                       dp)
            accelerator.backward(loss)
            loss, n_tok = dp.sum_gradients(params.values(), [float(loss.detach()), n_tok])
            n_tok = round(n_tok)
        else:
            loss, n_tok = batch_loss(bank, entry, [train_examples[i] for i in idx], cfg.loss, class_weights, context,
                                     compile_full)
            accelerator.backward(loss)
        if cfg.grad_clip:
            accelerator.clip_grad_norm_(list(params.values()), cfg.grad_clip)
        optimizer.step()
        run.step = step + 1
        run.tokens_seen += n_tok
        run.tick()
        loss_value = float(loss.detach()) if torch.is_tensor(loss) else loss
        running = loss_value if running is None else 0.9 * running + 0.1 * loss_value
        record = {"step": step + 1, "epoch": epoch, "loss": loss_value, "lr": optimizer.param_groups[0]["lr"]}
        done = step + 1 == total
        if valid_examples and ((step + 1) % eval_every == 0 or done):
            values = condition() if trained.reparameterised else values
            m = dp.from_main(validate(bank, entry, valid_examples, cfg, dp))  # every rank judges the same numbers
            score = m.pop("score")
            record["valid"] = m
            if run.judge(score):
                best = {k: v.detach().clone() for k, v in values.items()}
            stopped_early = run.out_of_patience(cfg.patience)
        run.history.append(record)
        bar.update(1)
        bar.set_postfix(loss=f"{running:.4f}", tok_s=f"{run.tokens_per_s:.0f}",
                        **({"valid": f"{record['valid'].get('accuracy', record['valid'].get('f1', 0)):.3f}"}
                           if "valid" in record else {}))
        if (step + 1) % ckpt_every == 0 or done or stopped_early:
            checkpoint()
        if stopped_early:
            break
    bar.close()
    best_step = run.best_step if valid_examples else len(run.history)
    if valid_examples:
        final = best
    else:  # the last prompt; an encoder's output is materialised here, computed exactly as in
        # training (grad on: an LSTM's no-grad kernel differs in the last bit)
        final = {k: v.detach().clone() for k, v in trained.values().items()}
    prompt = SoftPrompt(
        embeddings=final.get("prompt", no_soft).detach().cpu().float(),
        kv=final["kv"].detach().cpu().float() if "kv" in final else None,
        method=(Method.PREFIX_TUNING if "kv" in final else Method.parse(cfg.method)).value,
        identity=ModelIdentity.of(model),
        template=task.template,
        verbalizer=task.verbalizer,
        task=task.name,
        kind=task.kind,
        init=cfg.init,
        training={**cfg.to_dict(), "reparameterised": trained.describe(), "train_examples": len(train_examples),
                  "best_step": best_step, "steps": len(run.history), "wall_time_s": round(run.elapsed, 2)},
    )
    result = TrainResult(
        prompt=prompt, history=run.history, best_step=best_step, steps=len(run.history), wall_time_s=run.elapsed,
        tokens_per_s=run.tokens_per_s, stopped_early=stopped_early,
        trainable_params=sum(p.numel() for p in params.values()),
    )
    if out is not None and dp.is_main:
        prompt.save(out / "prompt.safetensors")
        (out / "history.json").write_text(json.dumps(run.history, indent=1))
    dp.barrier()  # the files exist when any rank returns
    return result
