"""Hard prompts vs soft prompts on one task: every method, same splits, same scorer.

``run_compare`` turns a :class:`CompareConfig` into a *plan* of runs, executes the ones
not already finished, and writes ``results.json`` after every run (atomically), so a
crash loses at most the run in progress and calling it again skips finished runs
(a run is finished when ``results.json`` holds a record with the same *spec*: template,
data fingerprints, budgets, seed, model).  ``report.write_report`` then renders
``report.md``, ``report.html`` and the plots from ``results.json`` alone.

Methods (``--methods``), all scored by ``scoring.classify`` on the SAME test sample:

==============  ==========================================================================
zero_shot       the task instruction + hard template (``baselines.zero_shot_template``); for a
                model with a chat template in its format (``chat.py``) and plain as a 2nd row
few_shot        k demonstrations, class-balanced or random, several sampling seeds x
                several orders (reported as mean +/- std and min..max)
knn             few-shot with each input's k nearest training examples (``demo_selection``)
search          the best instruction found on the training pool (``instruction_search``)
cot             two-stage chain-of-thought: reasoning, then the labels ranked after it
                (``baselines.cot_two_stage``); the free-text parse is a diagnostic
soft            prompt tuning with the task template, ``prompt_length`` tokens,
                ``init``, one run per learning rate in ``lrs`` x seed in ``seeds``
length          prompt tuning at each of ``lengths`` (seeds ``sweep_seeds``)
init            prompt tuning with each of ``inits``
hybrid          instruction text + soft tokens at each of ``positions``: ``prefix``
                (before the instruction), ``between`` (right after the first input field:
                between fields for multi-field tasks), ``answer`` (right before the answer)
ensemble        the ``soft`` prompts (one per seed) as an ensemble, one batched pass,
                mean-probability and majority-vote rows
curve           data efficiency: prompt tuning on ``train_sizes`` labelled examples
                (class-balanced subsets), ``0`` meaning all
transfer        the ``soft`` prompts scored on ``eval_task`` (same labels, or mapped with
                ``eval_label_map``), next to a zero-shot reference on that task
ptuning         P-tuning: the ``soft`` template's ``prompt_length`` tokens trained through a
                prompt encoder (``ptuning_encoder``: lstm | mlp, width 128) at ``encoder_lr``,
                one run per seed in ``seeds`` (opt-in: not in ``DEFAULT_METHODS``)
prefix          prefix tuning: ``prompt_length`` learned key/value positions at every layer,
                on the task template without its soft slots; directly at ``lr``
                (``prefix_reparam`` none) or through an MLP at ``encoder_lr`` (mlp); one run
                per seed in ``seeds`` (opt-in; not for encoder-decoder models)
==============  ==========================================================================

**Choosing** (issue 14; ``decision.py``).  Every classification prompt is scored under each
of ``calibrations`` on validation and test (``variants.py``); validation is the task's split or,
without one, a stratified ``valid_fraction`` of the training pool (``splits.py``).  Hard runs
go first; the hard prompt best on validation (``select_metric``, default macro-F1) is where
soft prompts start (``start_from_hard``: its instruction as text init and hybrid text).  At the
end ``results["decision"]`` holds each family's prompt chosen on validation, their paired
bootstrap interval and McNemar test on the test set, and the recommendation.

``DEFAULT_METHODS`` (what the CLI's ``--methods all`` means) is every method except
``ptuning`` and ``prefix``: each adds one training per seed, and a default comparison
rerun over an old ``results.json`` should not start training new prompts.  A
P-tuning run's ``trainable_params`` counts the encoder network it trains (its saved prompt,
the network's output, is ``artifact_params``); a prefix run's counts the key/values, and its
``tokens_added`` includes the prefix positions, which each query attends to as it does to
cached soft tokens.

**Generation tasks** (question answering, e.g. HotpotQA) run the methods that make sense
for free text: ``zero_shot``, ``few_shot`` (demonstrations end with their gold answer and
are drawn at random; from the data's ``demonstrations`` split when it has one, e.g. the
training questions with shortened contexts), ``soft``, ``length``, ``init`` (not
``labels``, which needs label words), ``hybrid``, ``curve``, ``ptuning`` and ``prefix``.  Answers are generated
greedily (``max_new_tokens``, stopping at a newline) by ``scoring.generate`` and scored by
SQuAD exact match and token F1 against every gold answer; chain-of-thought, ensembles and
transfer are classification-only and are skipped with a message.

Every run records accuracy, macro-F1 (and the confusion matrix) or exact match and F1, trainable parameters,
artifact bytes (the ``.safetensors`` file for soft prompts; the UTF-8 template text for
hard prompts), tokens added to each query (``baselines.template_overhead_tokens``; for
chain-of-thought plus the mean number of generated tokens), latency per query at batch 1
and batched (measured on ``latency_examples`` test examples after a warm-up, with each
prompt's prefix key/values cached as when serving), training wall time and the loss
history.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import random
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import baselines as B
from .bank import PromptBank
from .calibration import CALIBRATIONS
from .prompts import ModelIdentity, SoftPrompt
from .scoring import classify, generate
from .tasks import Example, Task, TaskData
from .templates import Segment, Template
from .training.config import DEFAULT_LR  # the one default learning rate (train, compare, demo)

__all__ = [
    "ALL_METHODS",
    "CLASSIFICATION_ONLY",
    "DEFAULT_METHODS",
    "POSITIONS",
    "RESULTS",
    "CompareConfig",
    "Comparison",
    "Row",
    "Run",
    "few_shot_answer_template",
    "hybrid_template",
    "run_compare",
    "with_soft_length",
]

DEFAULT_METHODS = ("zero_shot", "few_shot", "knn", "search", "cot", "soft", "length", "init", "hybrid", "ensemble", "curve",
                   "transfer")
ALL_METHODS = (*DEFAULT_METHODS, "ptuning", "prefix")  # the last two are opt-in (see the module docstring)
POSITIONS = ("prefix", "between", "answer")
RESULTS = "results.json"
FORMAT = 1
CLASSIFICATION_ONLY = ("cot", "ensemble", "transfer", "search", "knn")  # methods that need label words
HARD_KINDS = ("hard", "cot", "search", "search_plain", "knn")  # run first: the hard prompt chosen among them is where soft prompts start
ENCODER_HIDDEN = 128  # width of the P-tuning encoder / prefix MLP (TrainConfig.encoder_hidden)
LR_GRID = (0.03, 0.1, 0.3)  # the main method's learning rates; validation data picks among them

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
    positions: tuple[str, ...] = POSITIONS
    epochs: int = 15
    min_steps: int = 60  # small training sets get more epochs, so every run takes >= this many steps
    lr: float = DEFAULT_LR  # sweeps (length, init, hybrid, curve, ensemble members) train at this lr
    lrs: tuple[float, ...] = LR_GRID  # the main method trains at each, and validation picks (decision.py)
    batch_size: int = 8
    warmup_steps: int = 10
    optimizer: str = "adamw"
    # P-tuning and prefix tuning (methods ptuning, prefix)
    ptuning_encoder: str = "lstm"  # lstm | mlp
    prefix_reparam: str = "none"  # none: key/values trained directly (at lr) | mlp: through an MLP
    encoder_lr: float = 1e-3  # lr of anything trained through an encoder network (see reparam.py)
    # every trained prompt: train this many seeds and keep the best fit (softprompt.restarts)
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
    valid_fraction: float = 0.25  # without a validation split: this share of the pool is held out (stratified)
    start_from_hard: bool = True  # soft prompts start from the chosen hard prompt (instruction, calibration)
    chat: str = "auto"  # hand-written prompts in the model's chat format: auto (when it has one) | on | off
    # measurement
    eval_batch_size: int = 32
    latency_examples: int = 16

    def __post_init__(self) -> None:
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
        from .reparam import ENCODERS

        if self.ptuning_encoder not in ENCODERS:
            raise ValueError(f"unknown P-tuning encoder {self.ptuning_encoder!r}; choose from {', '.join(ENCODERS)}")
        if self.prefix_reparam not in ("none", "mlp"):
            raise ValueError(f"prefix_reparam must be none or mlp, got {self.prefix_reparam!r}")
        if not self.encoder_lr > 0:
            raise ValueError(f"encoder_lr must be positive, got {self.encoder_lr}")
        if self.restarts < 1:
            raise ValueError(f"restarts must be at least 1, got {self.restarts}")
        from .decision import SELECT_METRICS

        if self.select_metric not in SELECT_METRICS:
            raise ValueError(f"unknown selection metric {self.select_metric!r}; choose from {', '.join(SELECT_METRICS)}")
        bad = [c for c in self.calibrations if c not in CALIBRATIONS]
        if bad or not self.calibrations:
            raise ValueError(f"unknown calibrations {bad}; choose from {', '.join(CALIBRATIONS)}")
        if not self.lrs or any(not lr > 0 for lr in (*self.lrs, self.lr)):
            raise ValueError("learning rates must be positive (and --lrs needs at least one)")
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
    kind: str  # hard | cot | soft | ensemble | transfer
    label: str
    spec: dict[str, Any]
    cost: float = 1.0
    deps: list[str] = field(default_factory=list)


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


# ----------------------------------------------------------------------------- templates
def _segments_text(segments) -> str:
    out = []
    for seg in segments:
        if seg.kind == "soft":
            out.append(f"{{soft:{seg.value}}}")
        elif seg.kind == "field":
            out.append("{" + seg.value + "}")
        else:
            out.append(B.escape(seg.value))
    return "".join(out)


def with_soft_length(template: str, n: int) -> str:
    """The template with its soft tokens resized to ``n`` (one slot, where the first slot was;
    prepended when the template has none)."""
    segs = Template(template).segments
    if not any(s.kind == "soft" for s in segs):
        return f"{{soft:{n}}} " + template
    out, done = [], False
    for s in segs:
        if s.kind == "soft":
            if not done:
                out.append(Segment("soft", n))
                done = True
            continue
        out.append(s)
    return _segments_text(out)


def hybrid_template(task: Task, n: int, position: str, instruction: str | None = None) -> str:
    """Instruction + hard template with ``n`` soft tokens at ``position``:
    ``prefix`` (before everything), ``between`` (right after the first input field),
    ``answer`` (at the very end, right before the answer word)."""
    instr = (instruction if instruction is not None else task.instruction or "").strip()
    head = B.escape(instr) + "\n" if instr else ""
    hard = B.hard_template(task.template)
    soft = f"{{soft:{n}}}"
    if position == "prefix":
        return f"{soft} {head}{hard.text}"
    if position == "answer":
        return f"{head}{hard.text}{soft}"
    if position == "between":
        segs = list(hard.segments)
        i = hard.first_field
        if i >= len(segs):
            raise ValueError(f"template {task.template!r} has no input field")
        return head + _segments_text(segs[: i + 1] + [Segment("soft", n)] + segs[i + 1:])
    raise ValueError(f"unknown position {position!r}; choose from {', '.join(POSITIONS)}")


def transfer_template(prompt: SoftPrompt, eval_task: Task) -> str:
    """The prompt's own template when the eval task has its fields, else the eval task's
    template with its soft slot resized to the prompt's length."""
    own = Template(prompt.template)
    if set(own.fields) <= set(eval_task.input_fields):
        return prompt.template
    if sum(1 for s in own.segments if s.kind == "soft") != 1:
        raise ValueError("transfer to a task with other fields needs a prompt with one block of soft tokens")
    return with_soft_length(eval_task.template, prompt.n_tokens)


def few_shot_answer_template(task: Task, demos: list[Example], instruction: str | None = None,
                             separator: str = "\n\n") -> str:
    """Few-shot prompt for a generation task: as ``baselines.few_shot_template``, but each
    demonstration ends with its gold answer (``target``) instead of a label word."""
    instr = (instruction if instruction is not None else task.instruction or "").strip()
    head = f"{B.escape(instr)}\n" if instr else ""
    shots = []
    for d in demos:
        if not d.target:
            raise ValueError("a generation demonstration needs a target answer")
        text = B.render_demo(task.template, Example(d.fields, label="answer"), {"answer": " " + d.target.strip()})
        shots.append(B.escape(text) + separator)
    return head + "".join(shots) + B.hard_template(task.template).text


# ----------------------------------------------------------------------------- data helpers
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
    if limit is None or limit <= 0 or limit >= len(examples):
        return list(examples)
    return random.Random(seed).sample(list(examples), limit)


def _tokens(n: int, word: str = "token") -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _safe(run_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", run_id)


def _stats_line(m: dict) -> str:
    if "exact_match" in m:
        return f"EM {m['exact_match']:.3f}  F1 {m['f1']:.3f}"
    s = f"acc {m['accuracy']:.3f}  macro-F1 {m['macro_f1']:.3f}"
    if "n_unparseable" in m:
        s += f"  unparseable {m['n_unparseable']}/{m['n']}"
    return s


# ----------------------------------------------------------------------------- comparison
class Comparison:
    """Plans and executes the runs of one comparison; see the module docstring."""

    def __init__(
        self,
        config: CompareConfig,
        data: TaskData,
        model,
        tokenizer,
        out_dir: str | os.PathLike,
        *,
        eval_data: TaskData | None = None,
        model_name: str | None = None,
        progress: bool = True,
        log: Callable[[str], None] | None = None,
    ):
        self.cfg = config
        self.command: str | None = None  # the command line that ran it, kept for the report
        self.data = data
        self.task = data.task
        self.generative = self.task.kind == "generation"
        if self.generative and config.init == "labels":
            raise ValueError("init 'labels' needs label words; for a generation task use init text, vocab or random")
        self.model, self.tok = model, tokenizer
        self.out = Path(out_dir)
        self.progress = progress
        self.log = log or print
        self.model_name = model_name or ModelIdentity.of(model).name
        self.identity = ModelIdentity.of(model)
        self.instruction = (config.instruction if config.instruction is not None else self.task.instruction or "").strip()
        if "train" not in data.splits or "test" not in data.splits:
            raise ValueError(f"task {self.task.name!r} needs train and test splits; it has {list(data.splits)}")
        self.pool = _sample(data["train"], config.train_limit, config.data_seed)
        valid = data.splits.get("validation") or []
        self.valid, self.valid_source = [], "none"
        if valid and config.valid_limit:
            self.valid, self.valid_source = _sample(valid, config.valid_limit, config.data_seed), "validation split"
        elif config.valid_limit and config.valid_fraction and not self.generative:
            from .splits import holdout_split

            self.pool, self.valid = holdout_split(self.pool, self.task.labels, config.valid_fraction,
                                                  config.valid_limit, config.data_seed)
            self.valid_source = "held out from the training pool" if self.valid else "none"
        self.test = _sample(data["test"], config.test_limit, config.data_seed)
        self.demo_pool = data.splits.get("demonstrations") or self.pool
        if not self.pool or not self.test:
            raise ValueError("empty training pool or test set")
        self.fp = {"train": fingerprint(self.pool), "valid": fingerprint(self.valid), "test": fingerprint(self.test),
                   "model": self.identity.embedding_fingerprint[:16]}
        self.eval_data = eval_data
        self.eval_test: list[Example] = []
        if "transfer" in config.methods and eval_data is not None:
            self.eval_test = self._mapped_eval_test(eval_data)
        self.bank = PromptBank(model, tokenizer)
        from .seq2seq import is_encoder_decoder

        self._seq2seq = is_encoder_decoder(model)
        self.start: dict[str, Any] | None = None  # the chosen hard prompt soft prompts start from (run())
        from .chat import has_chat_template

        self.chat = not self.generative and (config.chat == "on" or (config.chat == "auto" and has_chat_template(tokenizer)))
        self.notes: list[str] = []  # shown under "Setup" in the report (e.g. how the instruction was made)
        self.runs: dict[str, Run] = {}
        self.rows: list[Row] = []
        self.results: dict[str, Any] = {}
        self.executed: list[str] = []  # run ids executed by the last call of run()

    # ------------------------------------------------------------------ data
    def _mapped_eval_test(self, eval_data: TaskData) -> list[Example]:
        labels = set(self.task.labels)
        mapping = dict(self.cfg.eval_label_map)
        exs = []
        for ex in _sample(eval_data["test"], self.cfg.test_limit, self.cfg.data_seed):
            lab = mapping.get(ex.label, ex.label)
            exs.append(Example(dict(ex.fields), label=lab))
        unknown = sorted({ex.label for ex in exs} - labels)
        if unknown:
            raise ValueError(
                f"eval task {eval_data.task.name!r} has labels {unknown} that task {self.task.name!r} does not "
                f"({sorted(labels)}); map them with eval_label_map (--eval-label-map EVAL=PROMPT)"
            )
        return exs

    def _eval_verbalizer(self) -> dict[str, str]:
        """The eval task's own label words, keyed by (mapped) prompt labels in prompt-label order."""
        et = self.eval_data.task  # type: ignore[union-attr]
        words = {self.cfg.eval_label_map.get(lab, lab): w for lab, w in (et.verbalizer or {}).items()}
        if set(words) != set(self.task.labels):
            return dict(self.task.verbalizer or {})
        return {lab: words[lab] for lab in self.task.labels}

    def _epochs_for(self, n: int) -> int:
        steps_per_epoch = math.ceil(n / self.cfg.batch_size)
        return max(self.cfg.epochs, math.ceil(self.cfg.min_steps / steps_per_epoch))

    def _train_subset(self, n: int, seed: int) -> list[Example]:
        if n <= 0 or n >= len(self.pool):
            return list(self.pool)
        return B.sample_demos(self.pool, n, sampling="random" if self.generative else "balanced", seed=seed,
                              labels=self.task.labels)

    # ------------------------------------------------------------------ the hard prompt soft prompts start from
    def _start_instruction(self) -> str:
        """The instruction soft prompts start from: the chosen hard prompt's (``start_from_hard``),
        else the comparison's own."""
        if self.cfg.start_from_hard and self.start and self.start.get("instruction") is not None:
            return self.start["instruction"]
        return self.instruction

    def _main_init(self) -> str:
        """The main method's init: the user's, else text (from the chosen hard prompt's instruction)
        when starting from the hard prompt, else label words (text for generation tasks)."""
        if self.cfg.init is not None:
            return self.cfg.init
        if self.generative:
            return "text"
        return "text" if self.cfg.start_from_hard and self._start_instruction() else "labels"

    def _chat_format(self, plain: str) -> tuple[str, dict[str, str]]:
        from .chat import chat_template, chat_verbalizer

        tpl = chat_template(self.tok, plain)
        return tpl, chat_verbalizer(self.task.verbalizer or {}, tpl)

    def _choose_start(self) -> dict[str, Any] | None:
        """The hard prompt chosen on validation among the finished hard runs (decision.select)."""
        from .decision import candidates, select

        hard, _ = candidates({"rows": [asdict(r) for r in self.rows], "runs": self.results.get("runs", {})})
        best = select(hard, self.cfg.select_metric)
        if best is None:
            return None
        return {"name": best["name"], "run": best["run"], "instruction": best.get("instruction"),
                "calibration": best["calibration"], "valid": best["valid"]}

    # ------------------------------------------------------------------ plan
    def _add(self, run: Run) -> str:
        self.runs.setdefault(run.id, run)
        return run.id

    def _soft_run(self, template: str, init: str, seed: int, *, n_train: int = 0, label: str, tag: str,
                  method: dict[str, Any] | None = None, lr: float | None = None, grid: bool = False) -> str:
        """Plan one prompt training.  ``method``: TrainConfig fields of P-tuning / prefix tuning,
        added to the spec only for those runs, so prompt-tuning specs and ids stay as they were
        (and old ``results.json`` files still resume)."""
        train = self._train_subset(n_train, seed)
        epochs = self._epochs_for(len(train))
        steps = epochs * math.ceil(len(train) / self.cfg.batch_size)
        # validate as often as `epochs` nominal epochs, however many epochs small sets get
        eval_every = math.ceil(steps / self.cfg.epochs) if self.valid else 0
        init_text = self._start_instruction() or B.hard_template(self.task.template).render_text({})
        spec = {
            "kind": "soft", "template": template, "init": init, "init_text": init_text if init == "text" else None,
            "seed": seed, "n_train": len(train), "train_fp": fingerprint(train), "valid_fp": self.fp["valid"],
            "test_fp": self.fp["test"], "model": self.fp["model"], "epochs": epochs,
            "lr": self.cfg.lr if lr is None else lr,
            "batch_size": self.cfg.batch_size, "warmup_steps": self.cfg.warmup_steps, "optimizer": self.cfg.optimizer,
            "verbalizer": self.task.verbalizer, "eval_every": eval_every,
        }
        if self.generative:
            spec["max_new_tokens"] = self.cfg.max_new_tokens
        else:
            spec["calibrations"] = list(self.cfg.calibrations)
        spec.update(method or {})
        n_soft = (method or {}).get("prefix_tokens") or Template(template).n_soft
        run_id = f"soft/{tag}/len{n_soft}/{init}/n{len(train)}/seed{seed}"
        if grid and spec["lr"] != self.cfg.lr:  # the lr grid: only other rates are named, so default ids stay as they were
            run_id += f"/lr{spec['lr']:g}"
        restarts = self.cfg.restarts
        if restarts > 1:  # only then in the spec and id: single-run specs and ids stay as they were
            spec["restarts"] = restarts
            run_id += f"/best-of-{restarts}"
        n_valid = (steps // eval_every) * len(self.valid) if eval_every else 0
        cost = ((steps * self.cfg.batch_size * 3 + n_valid) * restarts + len(self.test)
                + 3 * self.cfg.latency_examples)
        return self._add(Run(run_id, "soft", label, spec, cost))

    def _hard_run(self, run_id: str, template: str, label: str, *, on_eval: bool = False, extra: dict | None = None,
                  verbalizer: dict | None = None) -> str:
        test = self.eval_test if on_eval else self.test
        verbalizer = verbalizer or (self._eval_verbalizer() if on_eval else self.task.verbalizer)
        spec = {"kind": "hard", "template": template, "verbalizer": verbalizer, "test_fp": fingerprint(test),
                "model": self.fp["model"], "on_eval": on_eval, **(extra or {})}
        if self.generative:
            spec["max_new_tokens"] = self.cfg.max_new_tokens
        elif not on_eval:  # scored under each calibration on validation and test (variants.py)
            spec.update({"calibrations": list(self.cfg.calibrations), "valid_fp": self.fp["valid"],
                         "instruction": spec.get("instruction", self.instruction)})
        return self._add(Run(run_id, "hard", label, spec, len(test) + 2 * self.cfg.latency_examples))

    def plan(self) -> tuple[dict[str, Run], list[Row]]:
        cfg, task = self.cfg, self.task
        methods = set(cfg.methods)
        if self.generative:
            skipped = sorted(methods & set(CLASSIFICATION_ONLY))
            if skipped:
                self.log(f"{', '.join(skipped)} skipped: classification only ({task.name!r} is a generation task)")
            methods -= set(CLASSIFICATION_ONLY)
        rows: list[Row] = []
        main_tpl = with_soft_length(task.template, cfg.prompt_length)
        best_of = f", best of {cfg.restarts} runs" if cfg.restarts > 1 else ""
        main_init = self._main_init()
        init_name = ("text init from the chosen hard prompt" if main_init == "text" and self.start and cfg.init is None
                     else f"{main_init} init")
        main_label = f"prompt tuning ({_tokens(cfg.prompt_length)}, {init_name}{best_of})"

        def main_runs(lr: float | None = None) -> list[str]:
            lr = cfg.lr if lr is None else lr
            at = f", lr {lr:g}" if "soft" in methods and len(cfg.lrs) > 1 and self.valid else ""
            return [self._soft_run(main_tpl, main_init, s, label=f"{main_label}{at}, seed {s}", tag="main", lr=lr,
                                   grid=True) for s in cfg.seeds]

        chat = self._chat_format if self.chat else None
        if "few_shot" in methods and not self.generative and 0 < cfg.shots < len(task.labels):
            self.log(f"few-shot: k={cfg.shots} demonstrations cannot show all {len(task.labels)} classes; "
                     f"consider --shots {len(task.labels)} or more")
        if "zero_shot" in methods:
            zs = B.zero_shot_template(task, self.instruction)
            if chat:
                tpl, verb = chat(zs)
                rid = self._hard_run("zero_shot/chat", tpl, "zero-shot instruction (chat format)", verbalizer=verb)
                rows.append(Row("zero-shot instruction (chat format)", FAMILY_PE, "main", [rid]))
            rid = self._hard_run("zero_shot", zs, "zero-shot instruction" + (" (plain format)" if chat else ""))
            rows.append(Row("zero-shot instruction" + (" (plain format)" if chat else ""), FAMILY_PE, "main", [rid]))
        if "few_shot" in methods and cfg.shots > 0:
            if cfg.shots > len(self.demo_pool):
                raise ValueError(f"{cfg.shots} demonstrations requested but the pool has {len(self.demo_pool)}")
            sampling = "random" if self.generative else cfg.sampling
            for fmt in (("chat", "plain") if chat else (None,)):
                ids = []
                tag, name = (f"/{fmt}", f", {fmt} format") if fmt == "chat" else ("", ", plain format" if fmt else "")
                for s in cfg.fewshot_seeds:
                    demos = B.sample_demos(self.demo_pool, cfg.shots, sampling=sampling, seed=s, labels=task.labels)
                    for o in range(cfg.fewshot_orders):
                        ordered = B.order_demos(demos, o, seed=s)
                        tpl = (few_shot_answer_template(task, ordered, self.instruction) if self.generative
                               else B.few_shot_template(task, ordered, self.instruction))
                        verb = None
                        if fmt == "chat":
                            tpl, verb = chat(tpl)
                        ids.append(self._hard_run(
                            f"few_shot/k{cfg.shots}/{sampling}/seed{s}/order{o}{tag}", tpl,
                            f"few-shot k={cfg.shots} ({sampling}), seed {s}, order {o}{name}",
                            extra={"shots": cfg.shots, "sampling": sampling, "seed": s, "order": o}, verbalizer=verb))
                rows.append(Row(f"few-shot k={cfg.shots} ({sampling}, {_tokens(len(cfg.fewshot_seeds), 'seed')} x "
                                f"{_tokens(cfg.fewshot_orders, 'order')}{name})", FAMILY_PE, "main", ids))
        from .hard_runs import plan_hard_extras

        rows += plan_hard_extras(self, methods, chat)
        main: list[str] = []
        if methods & {"soft", "ensemble", "transfer"}:
            main = main_runs()
            lrs = tuple(dict.fromkeys(cfg.lrs)) if self.valid else (cfg.lr,)  # no validation data: nothing to pick with
            if "soft" in methods:
                for lr in lrs:
                    ids = main if lr == cfg.lr else main_runs(lr)
                    name = main_label + (f", lr {lr:g}" if len(lrs) > 1 else "")
                    rows.append(Row(name, FAMILY_PT, "main", ids, x=cfg.prompt_length))
        if "ptuning" in methods:
            enc = cfg.ptuning_encoder
            name = f"P-tuning ({_tokens(cfg.prompt_length, 'soft token')}, {enc} encoder{best_of})"
            spec = {"method": "ptuning", "encoder": enc, "encoder_hidden": ENCODER_HIDDEN}
            ids = [self._soft_run(main_tpl, main_init, s, label=f"{name}, seed {s}", tag=f"ptuning-{enc}",
                                  method=spec, lr=cfg.encoder_lr) for s in cfg.seeds]
            rows.append(Row(name, FAMILY_PT, "main", ids, x=cfg.prompt_length))
        if "prefix" in methods and self._seq2seq:
            from .seq2seq import PREFIX_UNSUPPORTED

            self.log(f"prefix skipped: {PREFIX_UNSUPPORTED}")
        elif "prefix" in methods:
            rp = cfg.prefix_reparam
            name = (f"prefix tuning ({cfg.prompt_length} key/value positions per layer"
                    + (", MLP reparameterisation" if rp == "mlp" else "") + best_of + ")")
            spec = {"method": "prefix", "prefix_tokens": cfg.prompt_length, "reparam": rp}
            if rp != "none":
                spec["encoder_hidden"] = ENCODER_HIDDEN
            tpl = Template(task.template).without_soft().text
            ids = [self._soft_run(tpl, main_init, s, label=f"{name}, seed {s}",
                                  tag="prefix" if rp == "none" else f"prefix-{rp}", method=spec,
                                  lr=cfg.lr if rp == "none" else cfg.encoder_lr) for s in cfg.seeds]
            rows.append(Row(name, FAMILY_PT, "main", ids, x=cfg.prompt_length))
        if "length" in methods:
            for n in cfg.lengths:
                if n == cfg.prompt_length:
                    rows.append(Row(main_label, FAMILY_PT, "length", main or main_runs(), x=n, in_table="soft" not in methods))
                    continue
                ids = [self._soft_run(with_soft_length(task.template, n), main_init, s,
                                      label=f"prompt tuning ({_tokens(n)}), seed {s}", tag="length") for s in cfg.sweep_seeds]
                rows.append(Row(f"prompt tuning ({_tokens(n)}, {main_init} init)", FAMILY_PT, "length", ids, x=n))
        if "init" in methods:
            for init in cfg.inits:
                if self.generative and init == "labels":
                    self.log("init 'labels' skipped: a generation task has no label words")
                    continue
                if init == main_init:
                    rows.append(Row(main_label, FAMILY_PT, "init", main or main_runs(), x=init,
                                    in_table="soft" not in methods and "length" not in methods))
                    continue
                ids = [self._soft_run(main_tpl, init, s, label=f"prompt tuning ({init} init), seed {s}", tag="init")
                       for s in cfg.sweep_seeds]
                rows.append(Row(f"prompt tuning ({_tokens(cfg.prompt_length)}, {init} init)", FAMILY_PT, "init", ids, x=init))
        if "hybrid" in methods:
            names = {"prefix": "before the instruction", "between": "after the first input field",
                     "answer": "right before the answer"}
            for pos in cfg.positions:
                tpl = hybrid_template(task, cfg.prompt_length, pos, self._start_instruction())
                ids = [self._soft_run(tpl, main_init, s, label=f"hybrid ({pos}), seed {s}", tag=f"hybrid-{pos}")
                       for s in cfg.sweep_seeds]
                rows.append(Row(f"hybrid: instruction + {_tokens(cfg.prompt_length, 'soft token')} {names[pos]}", FAMILY_HY,
                                "position", ids, x=pos))
        if "ensemble" in methods and len(main) >= 2:
            spec = {"kind": "ensemble", "members": [self.runs[r].spec for r in main], "test_fp": self.fp["test"],
                    "model": self.fp["model"]}
            rid = self._add(Run(f"ensemble/{len(main)}x{cfg.prompt_length}", "ensemble",
                                f"ensemble of {len(main)} prompts", spec,
                                len(main) * (len(self.test) + 2 * cfg.latency_examples), deps=list(main)))
            rows.append(Row(f"ensemble of {len(main)} prompts (mean probability)", FAMILY_EN, "ensemble", [rid], variant="mean"))
            rows.append(Row(f"ensemble of {len(main)} prompts (majority vote)", FAMILY_EN, "ensemble", [rid], variant="vote"))
        elif "ensemble" in methods:
            self.log("ensemble skipped: it needs at least 2 seeds (--seeds)")
        if "curve" in methods:
            for n in cfg.train_sizes:
                if n <= 0 or n >= len(self.pool):
                    rows.append(Row(main_label, FAMILY_PT, "curve", main or main_runs(), x=len(self.pool), in_table=False))
                    continue
                ids = [self._soft_run(main_tpl, main_init, s, n_train=n, label=f"prompt tuning, {n} examples, seed {s}",
                                      tag="curve") for s in cfg.curve_seeds]
                rows.append(Row(f"prompt tuning, {n} training examples", FAMILY_PT, "curve", ids, x=n))
        if "transfer" in methods:
            if self.eval_data is None:
                self.log("transfer skipped: give --eval-task")
            else:
                et = self.eval_data.task
                ids = []
                for r in main:
                    spec = {"kind": "transfer", "source": self.runs[r].spec, "eval_task": et.name,
                            "test_fp": fingerprint(self.eval_test), "label_map": cfg.eval_label_map, "model": self.fp["model"]}
                    ids.append(self._add(Run(f"transfer/{et.name}/{r}", "transfer",
                                             f"transfer to {et.name}: {self.runs[r].label}", spec,
                                             len(self.eval_test) + 2 * cfg.latency_examples, deps=[r])))
                rows.append(Row(f"{main_label} trained on {task.name}, scored on {et.name}", FAMILY_TR, "transfer", ids))
                rid = self._hard_run(f"transfer/{et.name}/zero_shot", B.zero_shot_template(et),
                                     f"zero-shot on {et.name}", on_eval=True)
                rows.append(Row(f"zero-shot instruction on {et.name} (reference)", FAMILY_TR, "transfer", [rid]))
        self.rows = rows
        return self.runs, rows

    # ------------------------------------------------------------------ persistence
    def _load(self) -> dict[str, Any]:
        path = self.out / RESULTS
        if path.exists():
            try:
                res = json.loads(path.read_text())
                if res.get("format") == FORMAT:
                    return res
            except json.JSONDecodeError:
                pass
            path.replace(self.out / (RESULTS + ".corrupt"))
        return {"runs": {}}

    def save(self) -> None:
        self.results["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.results["rows"] = [asdict(r) for r in self.rows]
        path = self.out / RESULTS
        fd, tmp = tempfile.mkstemp(prefix=".results.", suffix=".tmp", dir=self.out)
        with os.fdopen(fd, "w") as f:
            json.dump(self.results, f, indent=1, default=str)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)

    def _done(self, run: Run) -> bool:
        rec = self.results["runs"].get(run.id)
        if not rec or rec.get("status") != "done":
            return False
        if rec.get("spec") != json.loads(json.dumps(run.spec)):
            return False
        art = rec.get("artifact")
        return art is None or (self.out / art).exists()

    # ------------------------------------------------------------------ execution
    def run(self) -> dict[str, Any]:
        if not self.runs:
            self.plan()
        self.out.mkdir(parents=True, exist_ok=True)
        old = self._load()
        counts = {lab: sum(ex.label == lab for ex in self.test) for lab in self.task.labels}
        majority = max(counts.values()) / len(self.test) if counts else None
        self.results = {
            "format": FORMAT,
            "task": self.task.to_dict(),
            "eval_task": self.eval_data.task.to_dict() if self.eval_data else None,
            "model": self.model_name,
            "model_identity": asdict(self.identity),
            "config": self.cfg.to_dict(),
            "instruction": self.instruction,
            "data": {
                "train_pool": len(self.pool), "train_total": len(self.data["train"]), "valid": len(self.valid),
                "test": len(self.test), "test_total": len(self.data["test"]), "test_label_counts": counts,
                "majority_accuracy": majority, "fingerprints": self.fp,
                "demonstration_pool": len(self.demo_pool),
                "eval_test": len(self.eval_test),
            },
            "environment": {
                "torch": torch.__version__, "device": str(self.bank._device()), "threads": torch.get_num_threads(),
                "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                "platform": platform.platform(), "python": platform.python_version(),
            },
            "command": self.command or old.get("command"),
            "started": old.get("started") or time.strftime("%Y-%m-%dT%H:%M:%S"),
            "runs": dict(old.get("runs", {})),
        }
        if not self.generative:
            pos = {lab: i for i, lab in enumerate(self.task.labels)}
            self.results["data"].update({
                "test_gold": [pos[ex.label] for ex in self.test], "valid_source": self.valid_source,
                "valid_label_counts": {lab: sum(ex.label == lab for ex in self.valid) for lab in self.task.labels}})
        if self.notes:
            self.results["notes"] = list(self.notes)
        pending = [r for r in self.runs.values() if not self._done(r)]
        skipped = len(self.runs) - len(pending)
        if skipped:
            self.log(f"{skipped} of {len(self.runs)} runs already in {self.out / RESULTS}; skipping them")
        self.save()
        self.executed = []
        # phase 1: hand-written prompts; the one chosen on validation is where soft prompts start
        self._run_pending([r for r in pending if r.kind in HARD_KINDS])
        if self.cfg.start_from_hard and not self.generative:
            start = self._choose_start()
            if start is not None and start != self.start:
                self.start = start
                self.runs, self.rows = {}, []
                self.plan()  # hard runs keep their ids and specs; soft runs now start from `start`
            self.results["start"] = self.start
            self.save()
        self._run_pending([r for r in self.runs.values() if not self._done(r)])
        if not self.generative:
            from .decision import from_results

            self.results["decision"] = from_results(self.results)
            from .hard_runs import save_chosen_hard_prompt

            save_chosen_hard_prompt(self)
            self.save()
        return self.results

    def _run_pending(self, pending: list[Run]) -> None:
        from tqdm.auto import tqdm

        if not pending:
            return
        total = sum(r.cost for r in pending)
        bar = tqdm(total=total, disable=not self.progress, unit="u", dynamic_ncols=True,
                   bar_format="{desc} {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]")
        try:
            for i, run in enumerate(pending, 1):
                bar.set_description_str(f"[{i}/{len(pending)}] {run.label}")
                t0 = time.perf_counter()
                rec = self._execute(run)
                rec.update({"id": run.id, "kind": run.kind, "label": run.label, "spec": json.loads(json.dumps(run.spec)),
                            "status": "done", "run_wall_s": time.perf_counter() - t0,
                            "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
                self.results["runs"][run.id] = rec
                self.save()
                self._cleanup(run)
                self.executed.append(run.id)
                bar.update(run.cost)
                msg = f"{run.label}: {_stats_line(rec['metrics'])}  ({rec['run_wall_s']:.1f}s)"
                (bar.write if self.progress else self.log)(msg)
        finally:
            bar.close()

    def _cleanup(self, run: Run) -> None:
        if run.kind == "soft":
            (self.out / "prompts" / _safe(run.id) / "checkpoint.safetensors").unlink(missing_ok=True)

    def _execute(self, run: Run) -> dict[str, Any]:
        if run.kind == "hard":
            return self._exec_hard(run)
        if run.kind == "cot":
            from .hard_runs import exec_cot_two_stage

            return exec_cot_two_stage(self, run)
        if run.kind == "search":
            from .hard_runs import exec_search

            return exec_search(self, run)
        if run.kind == "search_plain":
            from .hard_runs import exec_search_plain

            return exec_search_plain(self, run)
        if run.kind == "knn":
            from .hard_runs import exec_knn

            return exec_knn(self, run)
        if run.kind == "soft":
            return self._exec_soft(run)
        if run.kind == "ensemble":
            return self._exec_ensemble(run)
        if run.kind == "transfer":
            return self._exec_transfer(run)
        raise ValueError(f"unknown run kind {run.kind!r}")  # pragma: no cover

    # ------------------------------------------------------------------ measurement helpers
    def _latency(self, fn: Callable[[list[Example], int], Any], examples: list[Example], n: int | None = None) -> dict:
        """ms per query at batch 1 and with all ``n`` examples in one batch (after a warm-up)."""
        n = min(n or self.cfg.latency_examples, len(examples))
        if n <= 0:
            return {"batch1_ms": None, "batched_ms": None, "batch_size": 0}
        exs = examples[:n]
        fn(exs[:2], 2)  # warm-up: caches the prompt's prefix key/values
        single = []
        for ex in exs:
            t = time.perf_counter()
            fn([ex], 1)
            single.append((time.perf_counter() - t) * 1000)
        batched = []
        for _ in range(2):
            t = time.perf_counter()
            fn(exs, n)
            batched.append((time.perf_counter() - t) * 1000 / n)
        single.sort()
        return {"batch1_ms": single[len(single) // 2], "batched_ms": min(batched), "batch_size": n,
                "batch1_mean_ms": sum(single) / n}

    def _classify_entry(self, name: str, examples: list[Example]) -> tuple[dict, dict, float]:
        t = time.perf_counter()
        res = classify(self.bank, name, examples, batch_size=self.cfg.eval_batch_size)
        wall = time.perf_counter() - t
        lat = self._latency(lambda exs, bs: classify(self.bank, name, exs, batch_size=bs), examples)
        return res.metrics, lat, wall

    def _generate_entry(self, name: str, examples: list[Example]) -> tuple[dict, dict, float, list[dict]]:
        """Greedy answers: EM/F1 metrics, latency, wall time and the first answers as samples."""
        mnt, bs = self.cfg.max_new_tokens, max(self.cfg.eval_batch_size // 2, 1)
        t = time.perf_counter()
        res = generate(self.bank, name, examples, max_new_tokens=mnt, batch_size=bs)
        wall = time.perf_counter() - t
        lat = self._latency(lambda exs, b: generate(self.bank, name, exs, max_new_tokens=mnt, batch_size=b), examples)
        samples = [{"question": ex.fields.get("question", ""), "gold": list(ex.answers or (ex.target,)), "answer": txt}
                   for ex, txt in list(zip(examples, res.texts))[:12]]
        return res.metrics, lat, wall, samples

    def _score_calibrated(self, name: str, calibrations) -> dict[str, Any]:
        from .variants import score_calibrated

        return score_calibrated(self, name, calibrations)

    def _score_entry(self, name: str, examples: list[Example]) -> dict[str, Any]:
        """Score a bank entry the task's way; the record fields shared by every run kind."""
        if self.generative:
            metrics, lat, wall, samples = self._generate_entry(name, examples)
            return {"metrics": metrics, "latency": lat, "eval_wall_s": wall, "samples": samples}
        metrics, lat, wall = self._classify_entry(name, examples)
        return {"metrics": metrics, "latency": lat, "eval_wall_s": wall}

    # ------------------------------------------------------------------ run kinds
    def _exec_hard(self, run: Run) -> dict[str, Any]:
        tpl = run.spec["template"]
        test = self.eval_test if run.spec.get("on_eval") else self.test
        name = f"run:{run.id}"
        self.bank.add(name, tpl, verbalizer=run.spec["verbalizer"], kind=self.task.kind)
        try:
            if run.spec.get("calibrations"):
                scored = self._score_calibrated(name, run.spec["calibrations"])
                scored["instruction"] = run.spec.get("instruction")
            else:
                scored = self._score_entry(name, test)
        finally:
            self.bank.remove(name)
        return {**scored, "template": tpl, "trainable_params": 0,
                "artifact_bytes": len(tpl.encode("utf-8")), "artifact": None,
                "tokens_added": B.template_overhead_tokens(tpl, self.tok), "train": None}

    def _exec_soft(self, run: Run) -> dict[str, Any]:
        from .restarts import train_with_restarts
        from .train import TrainConfig

        sp = run.spec
        task = Task(name=self.task.name, kind=self.task.kind, template=sp["template"], verbalizer=self.task.verbalizer,
                    instruction=self.instruction)
        seed = sp["seed"]
        train = self._train_subset(sp["n_train"] if sp["n_train"] < len(self.pool) else 0, seed)
        cfg = TrainConfig(init=sp["init"], init_text=sp["init_text"], epochs=sp["epochs"], batch_size=sp["batch_size"],
                          lr=sp["lr"], warmup_steps=sp["warmup_steps"], optimizer=sp["optimizer"], seed=seed,
                          eval_every=sp["eval_every"], eval_batch_size=self.cfg.eval_batch_size,
                          max_new_tokens=sp.get("max_new_tokens", TrainConfig.max_new_tokens),
                          **{k: sp[k] for k in ("method", "encoder", "encoder_hidden", "reparam", "prefix_tokens")
                             if k in sp})
        run_dir = self.out / "prompts" / _safe(run.id)
        restarts = sp.get("restarts", 1)
        try:
            res = train_with_restarts(self.model, self.tok, task, train, self.valid or None, cfg, restarts,
                                      out_dir=run_dir, resume=True, progress=self.progress)
        except ValueError as e:
            if "different config" not in str(e):
                raise
            for stale in run_dir.rglob("checkpoint.safetensors"):  # each restart keeps its own
                stale.unlink()
            res = train_with_restarts(self.model, self.tok, task, train, self.valid or None, cfg, restarts,
                                      out_dir=run_dir, progress=self.progress)
        name = f"run:{run.id}"
        self.bank.add_prompt(res.prompt, name)
        try:
            if sp.get("calibrations"):
                from .calibration import Calibration

                scored = self._score_calibrated(name, sp["calibrations"])
                res.prompt.calibration = Calibration.from_dict(scored["variants"][scored["calibration"]]["calibration"])
            else:
                scored = self._score_entry(name, self.test)
        finally:
            self.bank.remove(name)
        metrics = scored["metrics"]
        res.prompt.metrics = {"test": {k: v for k, v in metrics.items() if k != "confusion"}}
        size = res.prompt.save(run_dir / "prompt.safetensors")
        hist = res.history
        stride = max(1, math.ceil(len(hist) / 2000))
        extra: dict[str, Any] = {}
        if "method" in sp:  # P-tuning / prefix tuning: what was trained is not what was saved
            extra = {"method": sp["method"], "artifact_params": res.prompt.n_params,
                     "prefix_positions": res.prompt.n_prefix}
        return {
            **scored, **extra, "template": sp["template"],
            "trainable_params": res.trainable_params if "method" in sp else res.prompt.embeddings.numel(),
            "artifact_bytes": size, "artifact": str((run_dir / "prompt.safetensors").relative_to(self.out)),
            "tokens_added": B.template_overhead_tokens(sp["template"], self.tok) + res.prompt.n_prefix,
            "train": {
                "wall_s": res.wall_time_s, "steps": res.steps, "epochs": sp["epochs"], "n_train": len(train),
                "best_step": res.best_step, "tokens_per_s": res.tokens_per_s, "stopped_early": res.stopped_early,
                "loss": [[h["step"], h["loss"]] for h in hist[::stride]],
                **({"restarts": res.prompt.training["restarts"]} if restarts > 1 else {}),
                "valid": [[h["step"], h["valid"].get("accuracy", h["valid"].get("f1"))] for h in hist if "valid" in h],
            },
        }

    def _load_member(self, run_id: str) -> SoftPrompt:
        rec = self.results["runs"][run_id]
        return SoftPrompt.load(self.out / rec["artifact"], model=self.model)

    def _exec_ensemble(self, run: Run) -> dict[str, Any]:
        from .ensemble import ensemble_classify

        names = []
        for r in run.deps:
            names.append(f"run:{r}")
            self.bank.add_prompt(self._load_member(r), names[-1])
        m = len(names)
        try:
            t = time.perf_counter()
            res = ensemble_classify(self.bank, names, self.test, batch_size=self.cfg.eval_batch_size * m)
            wall = time.perf_counter() - t
            lat = self._latency(lambda exs, bs: ensemble_classify(self.bank, names, exs, batch_size=bs * m), self.test)
            variants, valid_s = self._ensemble_variants(names, res)
        finally:
            for n in names:
                self.bank.remove(n)
        members = [self.results["runs"][r] for r in run.deps]
        return {
            "metrics": res.metrics["mean"], "template": None,
            "trainable_params": sum(x["trainable_params"] for x in members),
            "artifact_bytes": sum(x["artifact_bytes"] for x in members), "artifact": None,
            "tokens_added": sum(x["tokens_added"] for x in members), "latency": lat, "eval_wall_s": wall,
            "variants": variants, "valid_wall_s": valid_s,
            "valid_metrics": (variants.get("none") or {}).get("valid"),
            "train": {"wall_s": sum(x["train"]["wall_s"] for x in members), "members": run.deps},
            "ensemble": {"members": run.deps, "variants": {c: res.metrics[c] for c in ("mean", "vote")},
                         "member_accuracy": [x["accuracy"] for x in res.metrics["members"]],
                         "context_passes": res.n_batches},
        }

    def _ensemble_variants(self, names: list[str], res) -> tuple[dict, float]:
        from .variants import ensemble_variants

        return ensemble_variants(self, names, res)

    def _exec_transfer(self, run: Run) -> dict[str, Any]:
        src = self._load_member(run.deps[0])
        et = self.eval_data.task  # type: ignore[union-attr]
        tpl = transfer_template(src, et)
        name = f"run:{run.id}"
        self.bank.add(name, tpl, src.embeddings.to(self.bank._device(), self.bank._dtype()), verbalizer=src.verbalizer)
        try:
            metrics, lat, wall = self._classify_entry(name, self.eval_test)
        finally:
            self.bank.remove(name)
        rec = self.results["runs"][run.deps[0]]
        return {"metrics": metrics, "template": tpl, "trainable_params": rec["trainable_params"],
                "artifact_bytes": rec["artifact_bytes"], "artifact": None,
                "tokens_added": B.template_overhead_tokens(tpl, self.tok), "latency": lat, "eval_wall_s": wall,
                "train": {"wall_s": rec["train"]["wall_s"], "source": run.deps[0]}}


def run_compare(
    config: CompareConfig,
    data: TaskData,
    model,
    tokenizer,
    out_dir: str | os.PathLike,
    *,
    eval_data: TaskData | None = None,
    model_name: str | None = None,
    progress: bool = True,
    report: bool = True,
    log: Callable[[str], None] | None = None,
    command: str | None = None,
    notes: list[str] | None = None,
) -> dict[str, Any]:
    """Plan, run (skipping finished runs) and, with ``report``, write the report folder.
    ``command`` (the command line that ran it) is kept in ``results.json`` and shown in the
    report, so that a reader can rerun it.  Returns the results dict (as in ``results.json``)."""
    comp = Comparison(config, data, model, tokenizer, out_dir, eval_data=eval_data, model_name=model_name,
                      progress=progress, log=log)
    comp.command = command
    comp.notes = list(notes or [])
    comp.plan()
    results = comp.run()
    if report:
        from .report import write_report

        write_report(results, out_dir)
    return results
