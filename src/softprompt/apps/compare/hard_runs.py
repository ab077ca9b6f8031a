"""The stronger hand-written side of a comparison: searched instructions, nearest-neighbour
few-shot and two-stage chain-of-thought, each planned (``@planner``) and executed
(``@executor``) here for the runner's :class:`~.runner.Comparison`.

Why a module of its own: these runs wrap the hard-prompt methods (``instruction_search``,
``demo_selection``, ``baselines.cot_two_stage``) into comparison records with the same
fields as every other classification run (validation and test metrics under each
calibration, per-example test predictions, cost), so that ``decision`` can choose among
them on validation data.  Each executor takes the comparison and the run and returns the
record; each planner adds its runs and returns its report rows (see ``planners``).
"""
from __future__ import annotations

import time
from typing import Any

from ...hard import baselines as B
from ...core.calibration import Calibration, batch_calibration
from ...data import Task
from .config import FAMILY_PE, Row, Run, fingerprint
from .planners import Plan, add, executor, planner
from .variants import variants_from_scores

__all__ = ["exec_cot_two_stage", "exec_knn", "exec_search", "exec_search_plain", "plan_cot", "plan_knn", "plan_search",
           "save_chosen_hard_prompt"]


def _task(comp, instruction: str | None = None) -> Task:
    t = comp.task
    return Task(name=t.name, kind=t.kind, template=t.template, verbalizer=t.verbalizer,
                instruction=comp.instruction if instruction is None else instruction)


@executor("search")
def exec_search(comp, run) -> dict[str, Any]:
    """Instruction search on the training pool only (never validation or test), then the best
    instruction's zero-shot prompt (in the chat format when the comparison uses it) scored like
    every hand-written prompt.  The search's seconds and forward passes are its cost."""
    from ...hard.instruction_search import search_instructions

    sp = run.spec
    res = search_instructions(comp.model, comp.tok, _task(comp), comp.pool, calibration=sp["calibration"],
                              induce=sp["induce"], metric=sp["metric"], seed=comp.cfg.data_seed,
                              batch_size=comp.cfg.eval_batch_size, user_instructions=sp["user_instructions"])
    plain = B.zero_shot_template(comp.task, res.best)
    tpl, verb = comp._chat_format(plain) if sp["chat"] else (plain, comp.task.verbalizer)
    name = f"run:{run.id}"
    comp.bank.add(name, tpl, verbalizer=verb)
    try:
        scored = comp._score_calibrated(name, sp["calibrations"])
    finally:
        comp.bank.remove(name)
    return {**scored, "template": tpl, "verbalizer": verb, "instruction": res.best, "trainable_params": 0,
            "artifact_bytes": len(tpl.encode("utf-8")), "artifact": None,
            "tokens_added": B.template_overhead_tokens(tpl, comp.tok), "train": None, "search": res.to_dict()}


@executor("search_plain")
def exec_search_plain(comp, run) -> dict[str, Any]:
    """The instruction the search found (its run, ``run.deps[0]``), in the plain format."""
    instr = comp.results["runs"][run.deps[0]]["instruction"]
    tpl = B.zero_shot_template(comp.task, instr)
    name = f"run:{run.id}"
    comp.bank.add(name, tpl, verbalizer=comp.task.verbalizer)
    try:
        scored = comp._score_calibrated(name, run.spec["calibrations"])
    finally:
        comp.bank.remove(name)
    return {**scored, "template": tpl, "verbalizer": comp.task.verbalizer, "instruction": instr, "trainable_params": 0,
            "artifact_bytes": len(tpl.encode("utf-8")), "artifact": None,
            "tokens_added": B.template_overhead_tokens(tpl, comp.tok), "train": None,
            "search": {"source": run.deps[0]}}


@executor("knn")
def exec_knn(comp, run) -> dict[str, Any]:
    """Few-shot with each input's nearest training examples as demonstrations (similarity of the
    frozen model's mean-pooled hidden states): uncalibrated, contextual (per query's prompt) and batch
    calibration, all from one scoring pass per split, on validation and test; the pool's embeddings
    come from the comparison's cache."""
    from ...hard.demo_selection import knn_few_shot_classify

    sp = run.spec
    k, task = sp["shots"], _task(comp)
    cals = [c for c in sp["calibrations"] if c in ("none", "contextual", "batch")] or ["none"]  # no pmi for kNN

    def knn(exs, bs, calibrations=()):
        return knn_few_shot_classify(comp.bank, task, exs, comp.demo_pool, k, instruction=comp.instruction,
                                     calibrations=calibrations, batch_size=bs, pool_cache=comp.demo_embeddings)

    t = time.perf_counter()
    res_t = knn(comp.test, comp.cfg.eval_batch_size, cals)
    wall = time.perf_counter() - t
    t = time.perf_counter()
    res_v = knn(comp.valid, comp.cfg.eval_batch_size, cals) if comp.valid else None
    valid_s = time.perf_counter() - t
    sv = variants_from_scores(comp.task.labels, comp.valid, comp.test, res_v.by_calibration if res_v else None,
                              res_t.by_calibration, cals, comp.cfg.select_metric)
    lat = comp._latency(lambda exs, bs: knn(exs, bs), comp.test)
    demos = getattr(res_t, "demos", [])[:32]
    overhead = [B.template_overhead_tokens(B.few_shot_template(task, [comp.demo_pool[j] for j in d], comp.instruction),
                                           comp.tok) for d in demos]
    return {**sv, "latency": lat, "eval_wall_s": wall, "valid_wall_s": valid_s, "template": None,
            "instruction": comp.instruction, "trainable_params": 0, "artifact_bytes": 0, "artifact": None,
            "tokens_added": sum(overhead) / max(len(overhead), 1), "train": None,
            "knn": {"shots": k, "similarity": "mean-pooled hidden states of the frozen model",
                    "demo_pool": len(comp.demo_pool)}}


@executor("cot")
def exec_cot_two_stage(comp, run) -> dict[str, Any]:
    """Chain-of-thought that always answers: generate the reasoning, then rank-classify the labels
    after it and an answer cue.  The free-text parse of the reasoning stays as a diagnostic.
    Scored on validation too (and so a candidate of the decision) when it covers the whole test set."""
    sp = run.spec
    test = comp.test[: comp.cfg.cot_limit] if comp.cfg.cot_limit else comp.test
    full = len(test) == len(comp.test)
    bs, mnt, task = max(comp.cfg.eval_batch_size // 2, 1), sp["max_new_tokens"], _task(comp)

    def two_stage(exs):
        return B.cot_two_stage(comp.bank, task, exs, instruction=comp.instruction, max_new_tokens=mnt, batch_size=bs)

    t = time.perf_counter()
    r_test = two_stage(test)
    wall = time.perf_counter() - t
    lat = comp._latency(lambda exs, b: two_stage(exs), test, min(comp.cfg.latency_examples, 8))
    t = time.perf_counter()
    r_valid = two_stage(comp.valid) if full and comp.valid else None
    valid_s = time.perf_counter() - t

    def scores(r):
        raw = r.probabilities.clamp_min(1e-30).log()  # log-softmax of the raw scores: same argmax and priors
        out = {"none": raw}
        if "batch" in sp["calibrations"]:
            out["batch"] = batch_calibration(raw).apply(raw)
        return out

    cals = [c for c in sp["calibrations"] if c in ("none", "batch")] or ["none"]
    sv = variants_from_scores(comp.task.labels, comp.valid if r_valid else [], test,
                              scores(r_valid) if r_valid else None, scores(r_test), cals, comp.cfg.select_metric)
    if not full:  # scored on part of the test set only: shown, but not a candidate of the paired decision
        sv.pop("variants")
    stage2 = B.cot_answer_template(task, comp.instruction)
    overhead = B.template_overhead_tokens(stage2, comp.tok)
    m = r_test.metrics
    samples = [{"gold": ex.label, "parsed": p, "answer": a, "text": txt}
               for ex, p, a, txt in list(zip(test, r_test.parsed, r_test.predictions, r_test.texts))[:8]]
    return {**sv, "template": stage2, "trainable_params": 0, "artifact_bytes": len(stage2.encode("utf-8")),
            "artifact": None, "tokens_added": overhead + r_test.generated_tokens, "latency": lat,
            "eval_wall_s": wall, "valid_wall_s": valid_s, "train": None, "instruction": comp.instruction,
            "cot": {"two_stage": True, "n_unparseable": r_test.n_unparseable, "generated_tokens": r_test.generated_tokens,
                    "parse_accuracy": m.get("parse_accuracy"), "parse_agreement": m.get("parse_agreement"),
                    "template_tokens": overhead, "samples": samples, "rule": B.PARSE_RULE, "n": len(test),
                    "cue": B.ANSWER_CUE}}


@planner("knn")
def plan_knn(comp, p: Plan) -> list[Row]:
    """Few-shot with nearest-neighbour demonstrations per input (one run: test and validation)."""
    cfg = comp.cfg
    if cfg.shots <= 0:
        return []
    spec = {"kind": "knn", "shots": cfg.shots, "demo_fp": fingerprint(comp.demo_pool),
            "valid_fp": comp.fp["valid"], "test_fp": comp.fp["test"], "model": comp.fp["model"], "instruction": comp.instruction,
            "calibrations": list(cfg.calibrations)}
    cost = (len(comp.test) + len(comp.valid)) * (2 + cfg.shots) + 2 * cfg.latency_examples
    rid = add(comp, Run(f"knn/k{cfg.shots}", "knn", f"few-shot k={cfg.shots} (nearest neighbours)", spec, cost))
    return [Row(f"few-shot k={cfg.shots} (nearest-neighbour demonstrations per input)", FAMILY_PE, "main", [rid])]


@planner("search")
def plan_search(comp, p: Plan) -> list[Row]:
    """The instruction searched on the training pool; with the chat format, also in the plain one."""
    cfg, chat = comp.cfg, p.chat
    metric = cfg.select_metric if cfg.select_metric in ("macro_f1", "accuracy") else "macro_f1"
    spec = {"kind": "search", "train_fp": comp.fp["train"], "valid_fp": comp.fp["valid"], "test_fp": comp.fp["test"],
            "model": comp.fp["model"], "instruction": comp.instruction, "calibration": cfg.search_calibration,
            "induce": cfg.induce, "metric": metric, "user_instructions": list(cfg.instructions),
            "chat": bool(chat), "calibrations": list(cfg.calibrations)}
    cost = ((12 + len(cfg.instructions) + cfg.induce) * len(comp.pool) + 8 * cfg.induce + len(comp.test)
            + len(comp.valid))
    rid = add(comp, Run("search", "search", "searched instruction" + (" (chat format)" if chat else ""), spec, cost))
    rows = [Row("searched instruction" + (" (chat format)" if chat else ""), FAMILY_PE, "main", [rid])]
    if chat:  # the same instruction in the plain format: the second row, as for zero-shot
        plain = {"kind": "search_plain", "source": spec, "calibrations": list(cfg.calibrations)}
        pid = add(comp, Run("search/plain", "search_plain", "searched instruction (plain format)", plain,
                            len(comp.test) + len(comp.valid), deps=[rid]))
        rows.append(Row("searched instruction (plain format)", FAMILY_PE, "main", [pid]))
    return rows


@planner("cot")
def plan_cot(comp, p: Plan) -> list[Row]:
    """Two-stage chain-of-thought (on the first ``cot_limit`` test examples when set)."""
    task, cfg = comp.task, comp.cfg
    test = comp.test[: cfg.cot_limit] if cfg.cot_limit else comp.test
    spec = {"kind": "cot", "template": B.cot_template(task, comp.instruction), "verbalizer": task.verbalizer,
            "test_fp": fingerprint(test), "model": comp.fp["model"], "max_new_tokens": cfg.cot_max_new_tokens,
            "two_stage": True, "valid_fp": comp.fp["valid"], "calibrations": list(cfg.calibrations)}
    n = len(test) + (len(comp.valid) if len(test) == len(comp.test) else 0)
    cost = n * (1 + cfg.cot_max_new_tokens / 4) + 8 * cfg.cot_max_new_tokens / 4
    rid = add(comp, Run("cot", "cot", "chain-of-thought (zero-shot, two-stage)", spec, cost))
    return [Row("chain-of-thought (zero-shot; reasoning, then ranked answer)", FAMILY_PE, "main", [rid])]


def save_chosen_hard_prompt(comp) -> None:
    """Save the hard prompt the decision chose as a prompt artifact (template + verbalizer +
    calibration; ``instruction_search.hard_prompt``) at ``OUT/chosen/hard_prompt.safetensors``, for
    ``eval``, ``predict`` and ``serve``; its path goes into the decision block.  Prompts whose text
    differs per input (nearest-neighbour demonstrations, two-stage reasoning) have no such artifact."""
    from ...hard.instruction_search import hard_prompt

    dec = comp.results.get("decision") or {}
    chosen = dec.get("hard")
    if not chosen:
        return
    rec = comp.results["runs"].get(chosen["run"]) or {}
    if rec.get("kind") not in ("hard", "search", "search_plain") or not rec.get("template"):
        return
    verbalizer = rec.get("verbalizer") or (rec.get("spec") or {}).get("verbalizer") or comp.task.verbalizer
    task = Task(name=comp.task.name, kind=comp.task.kind, template=rec["template"], verbalizer=verbalizer,
                instruction=rec.get("instruction") or "")
    cal = Calibration.from_dict(rec["variants"][chosen["calibration"]]["calibration"])
    path = comp.out / "chosen" / "hard_prompt.safetensors"
    hard_prompt(comp.model, task, rec["template"], cal, chosen_by=dec.get("select_metric")).save(path)
    chosen["artifact"] = str(path.relative_to(comp.out))
