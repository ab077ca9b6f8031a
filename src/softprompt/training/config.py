"""What one training run is configured with (:class:`TrainConfig`) and what it returns
(:class:`TrainResult`): plain data shared by the loop, its checkpoints and every trainable."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..core.compiled import COMPILE_MODES
from ..core.conditioning import CONTEXT_MODES
from ..core.method import TRAINED, Method
from ..core.reparam import ENCODERS

REPARAMS = ("none", "mlp")


@dataclass
class TrainConfig:
    """Hyper-parameters of one prompt-training run (all plain data, saved with the prompt)."""

    method: str = "prompt"  # prompt: train the template's {soft:N} slots; ptuning: the same slots through an
    # encoder network (P-tuning); prefix: also per-layer key/values
    prefix_tokens: int = 10  # length of the learned key/value prefix (method "prefix")
    encoder: str = "lstm"  # ptuning's prompt encoder: lstm (bidirectional LSTM + MLP) | mlp
    encoder_hidden: int = 128  # width of the encoder network (ptuning, and prefix with reparam "mlp")
    reparam: str = "none"  # none: train the tensors directly | mlp: through an MLP whose output is added to their start
    # (prompt: residual reparameterisation, Razdaibiedina et al. 2023; prefix: Li & Liang 2021); not for ptuning
    init: str = "labels"  # random | vocab | text | labels
    init_text: str | None = None
    epochs: int = 20
    max_steps: int | None = None
    batch_size: int = 8
    lr: float = 0.3  # absolute; the library's default rate is the recipe's (recipe.py: Recipe.config(model))
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
    # GPUs, where a small model is launch-bound), "packed" (full, with several examples and their label words
    # in one row under a block-diagonal mask: less padding, the same numbers; not prefix tuning), "auto"
    # (cached on a CPU, full on a GPU)
    pack_tokens: int | None = None  # context "packed": the most tokens per row (None: 256, or the batch's longest
    # example if longer); smaller means shorter rows (less attention arithmetic), more of them, more padding
    compile: str = "auto"  # the "full" and "packed" steps' frozen forward through torch.compile (compiled.py): on | off |
    # auto (on for CUDA, off on CPUs, where it was not faster); ignored by the cached step and a sharded model

    def __post_init__(self) -> None:
        """Refuse a bad value when the run is configured, before any data or model loads (the CLI,
        the library and compare's run specs alike); any spelling of a method becomes its training one."""
        try:
            method = Method.parse(self.method)
        except ValueError:
            method = None
        if method not in TRAINED:
            raise ValueError(f"unknown method {self.method!r}; use one of {', '.join(m.short for m in TRAINED)}")
        self.method = method.short
        if self.encoder not in ENCODERS:
            raise ValueError(f"unknown encoder {self.encoder!r}; use one of {', '.join(ENCODERS)}")
        if self.reparam not in REPARAMS:
            raise ValueError(f"unknown reparam {self.reparam!r}; use one of {', '.join(REPARAMS)}")
        if self.reparam != "none" and self.method == "ptuning":
            raise ValueError("method 'ptuning' trains through its own encoder (--encoder); reparam applies to methods "
                             "'prompt' and 'prefix'")
        if self.context not in CONTEXT_MODES:
            raise ValueError(f"context must be one of {', '.join(CONTEXT_MODES)}, got {self.context!r}")
        if self.context == "packed" and self.method == "prefix":
            raise ValueError("context 'packed' cannot train prefix tuning (learned per-layer key/values that no "
                             "forward pass recomputes); use context 'cached' or 'full'")
        if not isinstance(self.compile, bool) and self.compile not in COMPILE_MODES:  # compiled.resolve_compile's
            raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {self.compile!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    prompt: Any  # the trained artifact (a ``prompts.SoftPrompt`` for every trainable in this package)
    history: list[dict] = field(default_factory=list)
    best_step: int = 0
    steps: int = 0
    wall_time_s: float = 0.0
    tokens_per_s: float = 0.0
    stopped_early: bool = False
    # numbers the optimizer updated: for P-tuning / reparameterised prefix tuning the encoder
    # network's weights, which are more than the saved prompt holds (``prompt.n_params``)
    trainable_params: int | None = None
    # why training ended: max_steps | epochs | validation_plateau | loss_plateau | paused (search.py)
    stop_reason: str = "max_steps"


__all__ = ["TrainConfig", "TrainResult"]
