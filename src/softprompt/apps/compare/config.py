"""What a comparison is, as plain data: its options (:class:`CompareConfig`), the method names,
its units of work (:class:`Run`), its report rows (:class:`Row`) and the data fingerprints
that go into every run's spec.

Why a module of its own: the planners, the runner and the report all read these, and none
of them should have to import the others to get them (``planners`` and ``runner`` both
import this module; it imports neither).
"""
from __future__ import annotations

from pathlib import Path

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field
from typing import Any

from ...core.calibration import CALIBRATIONS
from ...core.reparam import ENCODERS
from ...data import Example
from .decision import SELECT_METRICS

__all__ = [
    "ALL_METHODS",
    "CLASSIFICATION_ONLY",
    "DEFAULT_METHODS",
    "PLAN_ORDER",
    "POSITIONS",
    "RESULTS",
    "CompareConfig",
    "Row",
    "Run",
    "fingerprint",
]

DEFAULT_METHODS = ("zero_shot", "few_shot", "knn", "search", "cot", "soft", "length", "init", "hybrid", "ensemble", "curve",
                   "transfer")
ALL_METHODS = (*DEFAULT_METHODS, "ptuning", "prefix")  # the last two are opt-in (see the package docstring)
PLAN_ORDER = ("zero_shot", "few_shot", "knn", "search", "cot", "soft", "ptuning", "prefix", "length", "init", "hybrid",
              "ensemble", "curve", "transfer")
"""The order the planners run in (``planners.plan``): the order of the report's rows and of the
runs in ``results.json``.  Every name of :data:`ALL_METHODS`, once."""
POSITIONS = ("prefix", "between", "answer")
RESULTS = "results.json"
FORMAT = 1
CLASSIFICATION_ONLY = ("cot", "ensemble", "transfer", "search", "knn")  # methods that need label words
HARD_KINDS = ("hard", "cot", "search", "search_plain", "knn")  # run first: the hard prompt chosen among them is where soft prompts start
ENCODER_HIDDEN = 128  # width of the P-tuning encoder / prefix MLP (TrainConfig.encoder_hidden)

FAMILY_PE = "prompt engineering"
FAMILY_PT = "prompt tuning"
FAMILY_HY = "hybrid"
FAMILY_EN = "ensemble"
FAMILY_TR = "transfer"


@dataclass
class CompareConfig:
    """Everything that decides what a comparison runs (plain data; saved in results.json)."""

    methods: tuple[str, ...] = DEFAULT_METHODS
    instruction: str | None = None  # default: the task's own instruction
    # data (limits: None = all); samples are seeded with data_seed and shared by all methods
    train_limit: int | None = 256
    valid_limit: int = 64  # 0 = no validation (the last prompt is kept)
    test_limit: int | None = 1000
    data_seed: int = 0
    # few-shot
    shots: int = 4
    sampling: str = "balanced"  # balanced | random
    fewshot_seeds: tuple[int, ...] = (0, 1, 2)
    fewshot_orders: int = 2
    # instruction search (method search; instruction_search.py): candidates scored on the training pool only
    instructions: tuple[str, ...] = ()  # the user's candidate instructions (--instructions-file)
    induce: int = 3  # instructions the frozen model writes from labelled examples (APE-style)
    search_calibration: str = "contextual"
    # chain-of-thought (two stages: reasoning, then the labels ranked after an answer cue)
    cot_max_new_tokens: int = 48
    cot_limit: int | None = None  # score CoT on the first N test examples only (generation is slow)
    # prompt tuning
    prompt_length: int = 20
    init: str | None = None  # None: text init from the chosen hard prompt (start_from_hard), else labels
    seeds: tuple[int, ...] = (0, 1, 2)
    sweep_seeds: tuple[int, ...] = (0,)
    lengths: tuple[int, ...] = (1, 5, 20, 100)
    inits: tuple[str, ...] = ("random", "vocab", "text", "labels")
    init_from: str | None = None  # a saved prompt: the init sweep also starts from it ("prompt:PATH", transfer)
    positions: tuple[str, ...] = POSITIONS
    # the schedule: the training recipe's (training/recipe.py: at most max_steps, stop on convergence)
    # unless epochs is given (a fixed schedule of that many epochs, at least min_steps steps, no early stop)
    max_steps: int | None = None  # None: the recipe's
    epochs: int | None = None
    min_steps: int = 0  # with epochs: small training sets get more epochs, so every run takes >= this many steps
    lr: float | None = None  # absolute rate of the sweeps (length, init, hybrid, curve); None: the recipe's
    lrs: tuple[float, ...] = ()  # main method: () = chosen per seed on validation (search.py); else an absolute grid
    search_seeds: int = 2  # seeds per learning rate in that search (2: six candidates, 2.75 runs; 1: three, 1.75)
    batch_size: int = 8
    warmup_steps: int = 10
    optimizer: str = "adamw"
    # P-tuning and prefix tuning (methods ptuning, prefix)
    ptuning_encoder: str = "lstm"  # lstm | mlp
    prefix_reparam: str = "none"  # none: key/values trained directly (at lr) | mlp: through an MLP
    encoder_lr: float = 1e-3  # lr of anything trained through an encoder network (see reparam.py)
    # every trained prompt: train this many seeds and keep the best fit (softprompt.training.restarts)
    restarts: int = 1
    # data efficiency
    train_sizes: tuple[int, ...] = (8, 16, 32, 0)  # 0 = all
    curve_seeds: tuple[int, ...] = (0,)
    # transfer
    eval_task: str | None = None
    eval_label_map: dict[str, str] = field(default_factory=dict)  # eval-task label -> prompt label
    # generation tasks: greedy answers of at most this many tokens
    max_new_tokens: int = 16
    # choosing (decision.py): every rank-classified prompt is scored under each calibration;
    # each family's best is chosen on validation data by select_metric, never on test
    calibrations: tuple[str, ...] = CALIBRATIONS
    select_metric: str = "macro_f1"
    max_latency_ms: float | None = None  # candidates slower than this per query (batch 1) are ruled out first
    valid_fraction: float = 0.25  # without a validation split: this share of the pool is held out (stratified)
    start_from_hard: bool = True  # soft prompts start from the chosen hard prompt (instruction, calibration)
    chat: str = "auto"  # hand-written prompts in the model's chat format: auto (when it has one) | on | off
    # measurement
    eval_batch_size: int = 32
    latency_examples: int = 16

    def __post_init__(self) -> None:
        if self.init_from is not None and not Path(self.init_from).is_file():
            raise ValueError(f"--init-from: no prompt file at {self.init_from}")
        unknown = [m for m in self.methods if m not in ALL_METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; choose from {', '.join(ALL_METHODS)}")
        bad = [p for p in self.positions if p not in POSITIONS]
        if bad:
            raise ValueError(f"unknown positions {bad}; choose from {', '.join(POSITIONS)}")
        if self.sampling not in ("balanced", "random"):
            raise ValueError(f"sampling must be balanced or random, got {self.sampling!r}")
        if not self.seeds:
            raise ValueError("give at least one seed")
        if any(n <= 0 for n in (*self.lengths, self.prompt_length)):
            raise ValueError("prompt lengths must be positive")
        if self.ptuning_encoder not in ENCODERS:
            raise ValueError(f"unknown P-tuning encoder {self.ptuning_encoder!r}; choose from {', '.join(ENCODERS)}")
        if self.prefix_reparam not in ("none", "mlp"):
            raise ValueError(f"prefix_reparam must be none or mlp, got {self.prefix_reparam!r}")
        if not self.encoder_lr > 0:
            raise ValueError(f"encoder_lr must be positive, got {self.encoder_lr}")
        if self.search_seeds < 1:
            raise ValueError(f"search_seeds must be at least 1, got {self.search_seeds}")
        if self.restarts < 1:
            raise ValueError(f"restarts must be at least 1, got {self.restarts}")
        if self.max_latency_ms is not None and not self.max_latency_ms > 0:
            raise ValueError(f"max_latency_ms must be positive, got {self.max_latency_ms}")
        if self.select_metric not in SELECT_METRICS:
            raise ValueError(f"unknown selection metric {self.select_metric!r}; choose from {', '.join(SELECT_METRICS)}")
        bad = [c for c in self.calibrations if c not in CALIBRATIONS]
        if bad or not self.calibrations:
            raise ValueError(f"unknown calibrations {bad}; choose from {', '.join(CALIBRATIONS)}")
        if any(not lr > 0 for lr in (*self.lrs, *([] if self.lr is None else [self.lr]))):
            raise ValueError("learning rates must be positive")
        if any(n is not None and n < 1 for n in (self.max_steps, self.epochs)):
            raise ValueError("max_steps and epochs must be at least 1 when given")
        if self.chat not in ("auto", "on", "off"):
            raise ValueError(f"chat must be auto, on or off, got {self.chat!r}")
        if not 0 <= self.valid_fraction < 1:
            raise ValueError(f"valid_fraction must be in [0, 1), got {self.valid_fraction}")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))


@dataclass
class Run:
    """One unit of work (a training + scoring, or a scoring); finished runs are skipped."""

    id: str
    kind: str  # hard | cot | search | search_plain | knn | soft | ensemble | transfer
    label: str
    spec: dict[str, Any]
    cost: float = 1.0
    deps: list[str] = field(default_factory=list)
    method: str = ""  # the method whose planner added it (planners.plan): its time is that method's
    estimate_s: float | None = None  # estimated seconds on this machine (estimate.py), once measured


@dataclass
class Row:
    """One line of the report table: runs aggregated as mean/std/min/max."""

    name: str
    family: str
    section: str  # main | length | init | position | ensemble | curve | transfer
    runs: list[str]
    x: Any = None  # plot coordinate: prompt length, init name, position, training examples
    variant: str | None = None  # ensemble combine method
    in_table: bool = True


def fingerprint(examples: list[Example]) -> str:
    """Hash of the examples' fields and gold (label; for generation examples, the answers)."""
    h = hashlib.blake2b(digest_size=8)
    for ex in examples:
        gold: list = [ex.label]
        if ex.label is None and ex.target is not None:
            gold.append(list(ex.answers) or [ex.target])
        h.update(json.dumps([sorted(ex.fields.items()), *gold], ensure_ascii=False).encode())
    return h.hexdigest()


def _sample(examples: list[Example], limit: int | None, seed: int) -> list[Example]:
    """The seeded sample every method shares (all of them when ``limit`` is None, 0 or too large)."""
    if limit is None or limit <= 0 or limit >= len(examples):
        return list(examples)
    return random.Random(seed).sample(list(examples), limit)
