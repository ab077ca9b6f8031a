"""The comparison's runner: data preparation, the plan (``planners``), execution of every run
(the runner's own kinds here, the others through ``planners.EXECUTORS``) and persistence in
``results.json`` after every run, so that a crash loses at most the run in progress and a
rerun skips finished runs (same *spec*: template, data fingerprints, budgets, seed, model).
"""
from __future__ import annotations

import json
import os
import platform
import re
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ...hard import baselines as B
from ...core.bank import PromptBank
from ...core.prompts import ModelIdentity, SoftPrompt
from ...core.scoring import classify, generate
from ...core import atomic
from ...data import Example, Task, TaskData
from .config import FORMAT, HARD_KINDS, RESULTS, CompareConfig, Row, Run, _sample, fingerprint
from .decision import candidates, from_results, select
from .distilled import distil_chosen_hard
from .hard_runs import save_chosen_hard_prompt  # importing hard_runs registers its planners and executors
from .measure import latency, stats_line
from .planners import EXECUTORS
from .planners import plan as plan_runs
from .templates import transfer_template
from .variants import ensemble_variants, score_calibrated

__all__ = ["Comparison", "run_compare"]


def _safe(run_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", run_id)


class Comparison:
    """Plans and executes the runs of one comparison; see the package docstring."""

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
            from ...data.splits import holdout_split

            self.pool, self.valid = holdout_split(self.pool, self.task.labels, config.valid_fraction,
                                                  config.valid_limit, config.data_seed)
            self.valid_source = "held out from the training pool" if self.valid else "none"
        self.test = _sample(data["test"], config.test_limit, config.data_seed)
        self.demo_pool = data.splits.get("demonstrations") or self.pool
        from ...hard.demo_selection import PoolEmbeddings

        self.demo_embeddings = PoolEmbeddings()  # kNN demonstrations: the pool embedded once per comparison
        if not self.pool or not self.test:
            raise ValueError("empty training pool or test set")
        self.fp = {"train": fingerprint(self.pool), "valid": fingerprint(self.valid), "test": fingerprint(self.test),
                   "model": self.identity.embedding_fingerprint[:16]}
        self.eval_data = eval_data
        self.eval_test: list[Example] = []
        if "transfer" in config.methods and eval_data is not None:
            self.eval_test = self._mapped_eval_test(eval_data)
        self.bank = PromptBank(model, tokenizer)
        self.family = self.bank.family  # what the model supports (prefix tuning, ensembles): the planners ask it
        self.start: dict[str, Any] | None = None  # the chosen hard prompt soft prompts start from (run())
        self.chat = self.chat_for(config)
        self.notes: list[str] = []  # shown under "Setup" in the report (e.g. how the instruction was made)
        self.runs: dict[str, Run] = {}
        self.rows: list[Row] = []
        self.results: dict[str, Any] = {}
        self.executed: list[str] = []  # run ids executed by the last call of run()
        # the time plan (budget.fit): measured speeds, the plan's estimates, and with a budget its deadline
        self.throughput = None  # estimate.Throughput, once measured: every planned run gets its estimate_s
        self.budget_plan: dict[str, Any] | None = None
        self.started: float | None = None  # time.time() when the command started
        self.deadline: float | None = None  # past it, runs outside budget.CORE are not started
        self.skipped: list[str] = []

    def chat_for(self, config: CompareConfig) -> bool:
        """Whether hand-written prompts are (also) written in the model's chat format under ``config``."""
        from ...hard.chat import has_chat_template

        return not self.generative and (config.chat == "on" or (config.chat == "auto" and has_chat_template(self.tok)))

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

    def _train_subset(self, n: int, seed: int) -> list[Example]:
        if n <= 0 or n >= len(self.pool):
            return list(self.pool)
        return B.sample_demos(self.pool, n, sampling="random" if self.generative else "balanced", seed=seed,
                              labels=self.task.labels)

    def _chat_format(self, plain: str) -> tuple[str, dict[str, str]]:
        from ...hard.chat import chat_template, chat_verbalizer

        tpl = chat_template(self.tok, plain)
        return tpl, chat_verbalizer(self.task.verbalizer or {}, tpl)

    def _choose_start(self) -> dict[str, Any] | None:
        """The hard prompt chosen on validation among the finished hard runs (decision.select)."""
        hard, _ = candidates({"rows": [asdict(r) for r in self.rows], "runs": self.results.get("runs", {})})
        best = select(hard, self.cfg.select_metric)
        if best is None:
            return None
        return {"name": best["name"], "run": best["run"], "instruction": best.get("instruction"),
                "calibration": best["calibration"], "valid": best["valid"]}

    # ------------------------------------------------------------------ plan
    def plan(self) -> tuple[dict[str, Run], list[Row]]:
        """Every method's runs (``planners.plan``, in ``config.PLAN_ORDER``) and report rows."""
        self.rows = plan_runs(self)
        if self.throughput is not None:
            from .estimate import annotate

            annotate(self, self.throughput)
        return self.runs, self.rows

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
        atomic.write_json(path, self.results, indent=1, default=str, mode=0o644, prefix=".results.")

    def unsupported(self, capability: str) -> str:
        """Why the model's family cannot run ``capability`` (the ``UnsupportedError`` message)."""
        from ...families import UnsupportedError

        try:
            self.family.require(capability)
        except UnsupportedError as e:
            return str(e)
        return ""

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
                "torch": torch.__version__, "device": str(self.bank.device), "threads": torch.get_num_threads(),
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
                "test_gold": [pos[ex.label] for ex in self.test], "valid_gold": [pos[ex.label] for ex in self.valid],
                "valid_source": self.valid_source,
                "valid_label_counts": {lab: sum(ex.label == lab for ex in self.valid) for lab in self.task.labels}})
        if self.notes:
            self.results["notes"] = list(self.notes)
        if self.budget_plan is not None:
            self.results["plan"] = dict(self.budget_plan)
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
        if self.budget_plan is not None:
            from .budget import record_times

            record_times(self)
        if not self.generative:
            self.results["decision"] = from_results(self.results)
            save_chosen_hard_prompt(self)
            distil_chosen_hard(self)
        self.save()
        return self.results

    def _run_pending(self, pending: list[Run]) -> None:
        from tqdm.auto import tqdm

        from .budget import why_not_run

        if not pending:
            return
        total = sum(r.cost for r in pending)
        bar = tqdm(total=total, disable=not self.progress, unit="u", dynamic_ncols=True,
                   bar_format="{desc} {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]")
        try:
            for i, run in enumerate(pending, 1):
                why = why_not_run(self, run)
                if why:
                    self.skipped.append(run.id)
                    self.log(f"{run.label}: not run ({why})")
                    bar.update(run.cost)
                    continue
                bar.set_description_str(f"[{i}/{len(pending)}] {run.label}")
                t0 = time.perf_counter()
                rec = self._execute(run)
                rec.update({"id": run.id, "kind": run.kind, "label": run.label, "spec": json.loads(json.dumps(run.spec)),
                            "status": "done", "run_wall_s": time.perf_counter() - t0, "method": run.method,
                            "estimate_s": run.estimate_s,
                            "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
                self.results["runs"][run.id] = rec
                self.save()
                self._cleanup(run)
                self.executed.append(run.id)
                bar.update(run.cost)
                msg = f"{run.label}: {stats_line(rec['metrics'])}  ({rec['run_wall_s']:.1f}s)"
                (bar.write if self.progress else self.log)(msg)
        finally:
            bar.close()

    def _cleanup(self, run: Run) -> None:
        if run.kind == "soft":  # the run's own, its search candidates' and its restarts' checkpoints
            for ckpt in (self.out / "prompts" / _safe(run.id)).rglob("checkpoint.safetensors"):
                ckpt.unlink(missing_ok=True)

    def _execute(self, run: Run) -> dict[str, Any]:
        """The record of one run: the runner's own kinds, else the kind's registered executor."""
        own = {"hard": self._exec_hard, "soft": self._exec_soft, "ensemble": self._exec_ensemble,
               "transfer": self._exec_transfer}
        if run.kind in own:
            return own[run.kind](run)
        if run.kind in EXECUTORS:
            return EXECUTORS[run.kind](self, run)
        raise ValueError(f"unknown run kind {run.kind!r}")  # pragma: no cover

    # ------------------------------------------------------------------ measurement helpers
    def _latency(self, fn: Callable[[list[Example], int], Any], examples: list[Example], n: int | None = None) -> dict:
        """ms per query at batch 1 and batched (``measure.latency``) on ``latency_examples`` examples."""
        return latency(fn, examples, n or self.cfg.latency_examples)

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

    def _score_calibrated(self, name: str, calibrations, **kw) -> dict[str, Any]:
        return score_calibrated(self, name, calibrations, **kw)

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
                scored = self._score_calibrated(name, run.spec["calibrations"], free_selection=True)
                scored["instruction"] = run.spec.get("instruction")
            else:
                scored = self._score_entry(name, test)
        finally:
            self.bank.remove(name)
        return {**scored, "template": tpl, "trainable_params": 0,
                "artifact_bytes": len(tpl.encode("utf-8")), "artifact": None,
                "tokens_added": B.template_overhead_tokens(tpl, self.tok), "train": None}

    def _exec_soft(self, run: Run) -> dict[str, Any]:
        from .soft_training import train_record, train_soft

        sp = run.spec
        task = Task(name=self.task.name, kind=self.task.kind, template=sp["template"], verbalizer=self.task.verbalizer,
                    instruction=self.instruction)
        train = self._train_subset(sp["n_train"] if sp["n_train"] < len(self.pool) else 0, sp["seed"])
        run_dir = self.out / "prompts" / _safe(run.id)
        res = train_soft(self, sp, task, train, run_dir)
        name = f"run:{run.id}"
        self.bank.add_prompt(res.prompt, name)
        try:
            if sp.get("calibrations"):
                from ...core.calibration import Calibration

                scored = self._score_calibrated(name, sp["calibrations"])
                res.prompt.calibration = Calibration.from_dict(scored["variants"][scored["calibration"]]["calibration"])
            else:
                scored = self._score_entry(name, self.test)
        finally:
            self.bank.remove(name)
        metrics = scored["metrics"]
        res.prompt.metrics = {"test": {k: v for k, v in metrics.items() if k != "confusion"}}
        size = res.prompt.save(run_dir / "prompt.safetensors")
        extra: dict[str, Any] = {}
        if "method" in sp:  # P-tuning / prefix tuning: what was trained is not what was saved
            extra = {"method": sp["method"], "artifact_params": res.prompt.n_params,
                     "prefix_positions": res.prompt.n_prefix}
        return {
            **scored, **extra, "template": sp["template"],
            "trainable_params": res.trainable_params if "method" in sp else res.prompt.embeddings.numel(),
            "artifact_bytes": size, "artifact": str((run_dir / "prompt.safetensors").relative_to(self.out)),
            "tokens_added": B.template_overhead_tokens(sp["template"], self.tok) + res.prompt.n_prefix,
            "train": train_record(res, sp, len(train)),
        }

    def _load_member(self, run_id: str) -> SoftPrompt:
        rec = self.results["runs"][run_id]
        return SoftPrompt.load(self.out / rec["artifact"], model=self.model)

    def _exec_ensemble(self, run: Run) -> dict[str, Any]:
        from ..ensemble import ensemble_classify

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
            variants, valid_s = ensemble_variants(self, names, res)
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

    def _exec_transfer(self, run: Run) -> dict[str, Any]:
        src = self._load_member(run.deps[0])
        et = self.eval_data.task  # type: ignore[union-attr]
        tpl = transfer_template(src, et)
        name = f"run:{run.id}"
        self.bank.add(name, tpl, src.embeddings.to(self.bank.device, self.bank._dtype()), verbalizer=src.verbalizer)
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
    budget_s: float | None = None,
    started: float | None = None,
    throughput=None,
    unlabeled: list | None = None,
) -> dict[str, Any]:
    """Plan, print the plan with its time estimate (``budget.fit``; with ``budget_s``, only what fits
    in that many seconds from ``started``, a ``time.time()``), run (skipping finished runs) and, with
    ``report``, write the report folder.  ``command`` (the command line that ran it) is kept in
    ``results.json`` and shown in the report, so that a reader can rerun it.  ``throughput``: measured
    speeds to use instead of measuring (``estimate.Throughput``); ``unlabeled``: inputs the chosen hard prompt
    is distilled on (``distilled.py``).  Returns the results dict (as in ``results.json``)."""
    comp = Comparison(config, data, model, tokenizer, out_dir, eval_data=eval_data, model_name=model_name,
                      progress=progress, log=log)
    comp.command, comp.notes, comp.unlabeled = command, list(notes or []), list(unlabeled or [])
    from .budget import start
    start(comp, budget_s, started=started, throughput=throughput)  # measure, choose, print the plan
    results = comp.run()
    if report:
        from ..report import write_report
        write_report(results, out_dir)
    return results
