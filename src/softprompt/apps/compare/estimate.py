"""What each planned run will cost on this machine, in seconds.

Why: a comparison can run for minutes or for hours, and nothing else says which before it
starts.  :func:`measure` times this machine in a few seconds on the comparison's own data
(label scoring of a couple of real batches under a zero-shot and a few-shot prompt, one query
alone, one training step, and, when something generates, one decoding step); :func:`run_seconds`
turns a planned run's data sizes into seconds with those numbers: examples x passes x the
measured seconds per example (scaled by the prompt's length), and for training steps x the
measured step time x the learning-rate search's run-equivalents (``planners.search_runs``).
Estimates are upper bounds where the run's length is: every trained prompt is counted at its
``max_steps``, though most stop earlier on a validation plateau; a collapsed run's retraining
(``recipe.collapse_restarts``) is not counted.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

from ...core.scoring import classify, generate
from ...data import Example, Task
from ...hard import baselines as B
from ...training.search import rung_steps
from .config import Run
from .planners import search_runs
from .templates import few_shot_answer_template, with_soft_length

__all__ = ["Throughput", "annotate", "measure", "run_seconds"]

PROBE_BATCH = 32  # at most this many examples timed per scoring probe, in one batch of the comparison's
# eval_batch_size (after 2 that warm the prompt's cache up): per-example time falls with the batch size,
# so a smaller probe batch than the runs' overestimated scoring about 2x (SmolLM2-135M, batch 8 vs 32)
INDUCE_TOKENS = 32  # tokens the instruction search generates per induced instruction (induce_instructions)


@dataclass
class Throughput:
    """This machine's measured speeds on the comparison's data (all in seconds)."""

    score_s: float  # label scoring: seconds per example under the zero-shot prompt, batched
    score_prefix: int  # that prompt's tokens before the input (cached once per prompt)
    fewshot_s: float  # ... under a few-shot prompt (longer cached context)
    fewshot_prefix: int
    suffix_tokens: float  # mean tokens of an input (and the template text after it), training pool
    query_s: float  # one query scored alone (batch 1): latency measurements, generation at batch 1
    step_s: float  # one training step at the comparison's batch size, main template
    step_prefix: int  # that template's tokens besides the input (soft tokens included)
    step_overhead_s: float  # starting or continuing a training run (optimizer, checkpoint)
    decode_s: float  # one generated token for a whole batch
    probe_s: float = 0.0  # what measuring took
    test_tokens: float = 0.0  # mean input tokens of the test set and of the validation set (0: as the pool's)
    valid_tokens: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        """Input tokens scored per second (the prompt's cached part excluded)."""
        return self.suffix_tokens / self.score_s if self.score_s > 0 else 0.0

    def per_example(self, prefix: float) -> float:
        """Seconds to score one example under a prompt of ``prefix`` tokens: linear between the
        two measured prompts (the cached context costs attention, not a pass)."""
        span = self.fewshot_prefix - self.score_prefix
        slope = (self.fewshot_s - self.score_s) / span if span > 0 else 0.0
        return max(self.score_s + max(slope, 0.0) * (prefix - self.score_prefix), 0.5 * self.score_s)

    def examples(self, comp, *, test: bool = True, valid: bool = True) -> float:
        """The test and/or validation set in pool-length examples (scoring time is per token)."""
        def scaled(n: int, tokens: float) -> float:
            return n * (tokens / self.suffix_tokens if tokens and self.suffix_tokens else 1.0)
        return scaled(len(comp.test) if test else 0, self.test_tokens) + scaled(len(comp.valid) if valid else 0,
                                                                                 self.valid_tokens)

    def full_pass(self, tokens: float) -> float:
        """Seconds for one example whose whole prompt differs per input (nothing cached)."""
        return (tokens / max(self.suffix_tokens, 1.0)) * self.score_s

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s}


# ----------------------------------------------------------------------------- measuring
def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _probe_examples(comp, n: int) -> list[Example]:
    return [comp.pool[i % len(comp.pool)] for i in range(n)]


def _scoring_speed(comp, template: str, exs: list[Example]) -> tuple[float, int, float, dict[str, float]]:
    """(seconds per example, prefix tokens, mean suffix tokens, mean suffix tokens of test and
    validation) of label scoring under ``template`` (the first few examples warm the prompt's cache
    up; the rest are timed, in one batch).  Per example *without padding*: a run scores its examples
    sorted by length, so its batches are hardly padded, while the probe's one batch is padded to its
    longest input."""
    bank, name = comp.bank, "__estimate_probe__"
    idx = bank.add(name, template, verbalizer=comp.task.verbalizer, kind=comp.task.kind)
    try:
        warm, timed = exs[:2], exs[2:]
        run = ((lambda e: generate(bank, name, e, max_new_tokens=1, batch_size=len(e))) if comp.generative
               else (lambda e: classify(bank, name, e, batch_size=comp.cfg.eval_batch_size)))
        run(warm)
        lengths = [len(bank.suffix_ids(idx, ex.fields)) for ex in timed]
        suffix = sum(lengths) / len(lengths)
        seconds = _timed(lambda: run(timed)) / len(timed) * suffix / max(lengths)
        sets = {k: sum(len(bank.suffix_ids(idx, ex.fields)) for ex in exs) / len(exs)
                for k, exs in (("test", comp.test), ("valid", comp.valid)) if exs}
    finally:
        bank.remove(name)
    return seconds, B.template_overhead_tokens(template, comp.tok), suffix, sets


def _query_speed(comp, template: str, ex: Example) -> float:
    """Seconds for one query alone (median of five, after a warm-up)."""
    bank, name = comp.bank, "__estimate_probe__"
    bank.add(name, template, verbalizer=comp.task.verbalizer, kind=comp.task.kind)
    try:
        run = ((lambda: generate(bank, name, [ex], max_new_tokens=1, batch_size=1)) if comp.generative
               else (lambda: classify(bank, name, [ex], batch_size=1)))
        run()
        return sorted(_timed(run) for _ in range(5))[2]
    finally:
        bank.remove(name)


def _decode_speed(comp, template: str, exs: list[Example]) -> float:
    """Seconds per generated token for a batch: 3 tokens minus 1 token, over 2."""
    bank, name = comp.bank, "__estimate_probe__"
    bank.add(name, template, verbalizer=comp.task.verbalizer, kind=comp.task.kind)
    try:
        def gen(k: int) -> float:
            return _timed(lambda: generate(bank, name, exs, max_new_tokens=k, batch_size=len(exs),
                                           stop_at_newline=False))
        one, three = gen(1), gen(3)
    finally:
        bank.remove(name)
    return max((three - one) / 2, one / 3)


def _step_speed(comp, template: str) -> tuple[float, float]:
    """(seconds per training step, seconds to start a run): 1 step and 2 steps timed."""
    from ...training.prompt import train_prompt
    from ...training.recipe import DEFAULT_RECIPE

    cfg = comp.cfg
    task = Task(name=comp.task.name, kind=comp.task.kind, template=template, verbalizer=comp.task.verbalizer,
                instruction=comp.instruction)
    train = _probe_examples(comp, cfg.batch_size * 2)

    def steps(n: int) -> float:
        tcfg = DEFAULT_RECIPE.config(comp.model, init="random", max_steps=n, batch_size=cfg.batch_size,
                                     warmup_steps=1, eval_every=10_000, patience=None, optimizer=cfg.optimizer,
                                     epochs=0)
        return _timed(lambda: train_prompt(comp.model, comp.tok, task, train, None, tcfg, progress=False))

    one, two = steps(1), steps(2)
    step = max(two - one, two / 4)
    return step, max(one - step, 0.0)


def measure(comp) -> Throughput:
    """Time this machine on the comparison's training pool (never its test set): a few seconds."""
    t0 = time.perf_counter()
    cfg, task, methods = comp.cfg, comp.task, set(comp.cfg.methods)
    exs = _probe_examples(comp, 2 + min(cfg.eval_batch_size, PROBE_BATCH))
    zs = B.zero_shot_template(task, comp.instruction)
    score_s, p0, suffix, sets = _scoring_speed(comp, zs, exs)
    fewshot_s, p1 = score_s, p0
    if cfg.shots > 0 and methods & {"few_shot", "knn"} and len(comp.demo_pool) >= cfg.shots:
        demos = B.sample_demos(comp.demo_pool, cfg.shots, sampling="random" if comp.generative else cfg.sampling,
                               seed=0, labels=task.labels)
        fs = (B.few_shot_template(task, demos, comp.instruction) if not comp.generative
              else few_shot_answer_template(task, demos, comp.instruction))
        fewshot_s, p1, _, _ = _scoring_speed(comp, fs, exs)
    query_s = _query_speed(comp, zs, exs[0])
    trains = methods & {"soft", "length", "init", "hybrid", "ensemble", "curve", "transfer", "ptuning", "prefix"}
    main_tpl = with_soft_length(task.template, cfg.prompt_length)
    step_s, overhead = _step_speed(comp, main_tpl) if trains else (0.0, 0.0)
    step_prefix = B.template_overhead_tokens(main_tpl, comp.tok)
    if comp.generative or methods & {"cot"} or ("search" in methods and cfg.induce):
        decode_s = _decode_speed(comp, zs, exs[: min(max(cfg.eval_batch_size // 2, 1), 8)])
    else:
        decode_s = query_s
    return Throughput(score_s=score_s, score_prefix=p0, fewshot_s=fewshot_s, fewshot_prefix=p1, suffix_tokens=suffix,
                      query_s=query_s, step_s=step_s, step_prefix=step_prefix, step_overhead_s=overhead,
                      decode_s=decode_s, probe_s=time.perf_counter() - t0, test_tokens=sets.get("test", 0.0),
                      valid_tokens=sets.get("valid", 0.0))


# ----------------------------------------------------------------------------- estimating
def _prefix(comp, template: str | None, extra: int = 0) -> int:
    return (B.template_overhead_tokens(template, comp.tok) if template else 0) + extra


def _score(comp, tp: Throughput, n: float, prefix: float, calibrations=()) -> float:
    """Scoring ``n`` examples once: label scores (plus the calibrations' few extra passes), or
    greedy answers of at most ``max_new_tokens``."""
    if n <= 0:
        return 0.0
    s = n * tp.per_example(prefix)
    if comp.generative:
        bs = max(comp.cfg.eval_batch_size // 2, 1)
        s += math.ceil(n / bs) * comp.cfg.max_new_tokens * tp.decode_s
    return s + 2 * tp.query_s * sum(c in ("contextual", "pmi") for c in calibrations)


def _latency(comp, tp: Throughput, prefix: float, n_prompts: int = 1) -> float:
    """``measure.latency``: a warm-up, each example alone, all of them twice in one batch."""
    n = min(comp.cfg.latency_examples, len(comp.test))
    if n <= 0:
        return 0.0
    per_query = tp.query_s * (comp.cfg.max_new_tokens if comp.generative else 1)
    return n_prompts * ((n + 1) * per_query + 2 * n * tp.per_example(prefix))


def _soft(comp, tp: Throughput, spec: dict) -> float:
    cfg = comp.cfg
    steps, n_train = spec["max_steps"], spec["n_train"]
    prefix = _prefix(comp, spec["template"], spec.get("prefix_tokens", 0))
    search = spec.get("search")
    cands = len(search["lrs"]) * search["seeds"] if search else 1
    runs = search_runs(steps, cands) if cands > 1 else 1.0
    starts = sum(k for _, k in rung_steps(steps, cands)) if cands > 1 else 1
    restarts = spec.get("restarts", 1)
    b = min(cfg.batch_size, max(n_train, 1))
    step = tp.step_s * (b * tp.suffix_tokens + prefix) / max(cfg.batch_size * tp.suffix_tokens + tp.step_prefix, 1)
    evals = (steps // spec["eval_every"]) if comp.valid else 0
    train = (steps * step + evals * _score(comp, tp, tp.examples(comp, test=False), prefix)) * runs + starts * tp.step_overhead_s
    cals = spec.get("calibrations") or ()
    return (train * restarts + _score(comp, tp, tp.examples(comp), prefix, cals)
            + _latency(comp, tp, prefix))


def _hard(comp, tp: Throughput, spec: dict) -> float:
    prefix = _prefix(comp, spec["template"])
    if spec.get("on_eval"):
        return _score(comp, tp, len(comp.eval_test), prefix) + _latency(comp, tp, prefix)
    n = tp.examples(comp)
    return _score(comp, tp, n, prefix, spec.get("calibrations") or ()) + _latency(comp, tp, prefix)


def _knn(comp, tp: Throughput, spec: dict) -> float:
    """Every query has its own demonstrations, so nothing is cached: full passes (twice with
    contextual calibration), plus one pass per example for the similarities."""
    tokens = tp.fewshot_prefix + tp.suffix_tokens
    n = tp.examples(comp)
    passes = 2 if "contextual" in spec.get("calibrations", ()) else 1
    lat = min(comp.cfg.latency_examples, len(comp.test))
    return (n * passes + 3 * lat) * tp.full_pass(tokens) + (len(comp.demo_pool) + n) * tp.score_s


def _search(comp, tp: Throughput, spec: dict) -> float:
    from ...hard.instruction_search import instruction_candidates

    cands = len(instruction_candidates(comp.task, user_instructions=spec["user_instructions"])) + spec["induce"]
    per_candidate = _score(comp, tp, len(comp.pool), tp.score_prefix, (spec["calibration"],))
    induce = spec["induce"] * INDUCE_TOKENS * tp.decode_s if spec["induce"] else 0.0
    prefix = tp.score_prefix
    return (cands * per_candidate + induce
            + _score(comp, tp, tp.examples(comp), prefix, spec["calibrations"])
            + _latency(comp, tp, prefix))


def _cot(comp, tp: Throughput, spec: dict) -> float:
    """Two stages: greedy reasoning of at most ``max_new_tokens``, then the labels ranked after it."""
    cfg = comp.cfg
    test = comp.test[: cfg.cot_limit] if cfg.cot_limit else comp.test
    n = len(test) + (len(comp.valid) if len(test) == len(comp.test) else 0)
    mnt, bs = spec["max_new_tokens"], max(cfg.eval_batch_size // 2, 1)
    prefix = _prefix(comp, spec["template"])
    stage1 = n * tp.per_example(prefix) + math.ceil(n / bs) * mnt * tp.decode_s
    stage2 = n * tp.per_example(prefix) * (tp.suffix_tokens + mnt) / max(tp.suffix_tokens, 1)
    lat = min(cfg.latency_examples, 8, len(test))
    return stage1 + stage2 + (3 * lat + 2) * (mnt * tp.query_s + tp.per_example(prefix))


def _ensemble(comp, tp: Throughput, spec: dict) -> float:
    m = len(spec["members"])
    prefix = _prefix(comp, spec["members"][0]["template"]) if m else 0
    return m * _score(comp, tp, tp.examples(comp), prefix) + _latency(comp, tp, prefix, m)


def _transfer(comp, tp: Throughput, spec: dict) -> float:
    prefix = _prefix(comp, spec["source"]["template"])
    return _score(comp, tp, len(comp.eval_test), prefix) + _latency(comp, tp, prefix)


def _search_plain(comp, tp: Throughput, spec: dict) -> float:
    n = tp.examples(comp)
    return _score(comp, tp, n, tp.score_prefix, spec["calibrations"]) + _latency(comp, tp, tp.score_prefix)


KINDS = {"soft": _soft, "hard": _hard, "knn": _knn, "search": _search, "search_plain": _search_plain, "cot": _cot,
         "ensemble": _ensemble, "transfer": _transfer}


def run_seconds(comp, run: Run, tp: Throughput) -> float:
    """Estimated seconds of one planned run (its kind's cost model; unknown kinds: from ``run.cost``,
    the planner's example-pass units)."""
    fn = KINDS.get(run.kind)
    return fn(comp, tp, run.spec) if fn else run.cost * tp.score_s


def annotate(comp, tp: Throughput) -> None:
    """Set every planned run's ``estimate_s``."""
    for run in comp.runs.values():
        run.estimate_s = run_seconds(comp, run, tp)
