"""Serving benchmark (issue 5): one frozen model, 8 tasks, dynamic batching across tasks.

Drives :class:`softprompt.serve.Engine` directly (and, with ``--http``, the real HTTP
server) with the embedded model and 8 tasks whose prompts are randomly initialised
20-token soft prompts behind realistic instructions.  ``--traffic`` picks the kind:

  classify   8 classification tasks (verbalizers of 2-5 one-token label words)
  generate   8 generation tasks (summaries, replies, titles, keywords, questions, ...),
             greedy, ``--max-new-tokens`` (16) per request, stopping only at EOS unless
             ``--stop-at-newline``: the random prompts would otherwise end some tasks'
             answers at their first token, and the output length of random prompts is
             not what is being measured
  both       the two, interleaved in the same rounds

Inputs are real tweets (twitter_complaints) and movie-review sentences (sst2) from the
shared data folder.  Every configuration but ``peft`` is a real code path of the engine,
selected by a flag, and all of them are measured in ONE run, interleaved round by round so
that drift in the machine's load hits them alike:

  mixed            8-task traffic, mixed batches, prompt key/values reused  (the server)
  single           1-task traffic, same engine settings
  per_task         8-task traffic, one task per batch (batching="per_task")
  per_task+recomp  one task per batch AND the prompt recomputed per request: what serving
                   HF PEFT prompt-tuning models amounts to (one active adapter per forward,
                   virtual tokens prepended to every input)
  recompute        8-task traffic, mixed batches, prompt recomputed per request
                   (prefix_cache=False): the baseline for KV-prefix reuse
  peft             8-task traffic served by Hugging Face PEFT itself, not the engine
                   (classification only): the 8 prompts exported as prompt-tuning adapters
                   of one PeftModel over the same model object, one task per batch
                   (``set_adapter``), every (input, label word) sequence run in full; its
                   labels are checked against the engine's

Throughput is measured closed-loop (``--concurrency`` clients, each sending its next
request when the previous one is answered); generation also reports generated tokens/s.
Latency is then measured open-loop (Poisson arrivals) at a few request rates, set as
fractions of the measured mixed throughput (generation: also time to first token).
Finally the cost of one-task batches of 1..16 rows shows how much batching itself buys
on the machine, which bounds the mixed / one-task-per-batch ratio.

The engine runs with its defaults (on a CPU ``split_padding=0.25``: a formed batch runs as
a few forward passes of similar length, because padded tokens cost real compute there;
the generation rows of all passes are then decoded as one batch); torch uses
``--threads`` intra-op threads (1 by default: on a shared 2-core machine two OpenMP
threads stall each other whenever another process holds a core).

    PYTHONPATH=src .venv/bin/python benchmarks/bench_serve.py               # classification, ~4-5 min on 2 busy cores
    PYTHONPATH=src .venv/bin/python benchmarks/bench_serve.py --traffic generate --requests 48 --rounds 3
    PYTHONPATH=src .venv/bin/python benchmarks/bench_serve.py --requests 48 --latency-requests 16  # quick
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import json
import os
import platform
import random
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from softprompt.families.loading import DEFAULT_MODEL, load_model
from softprompt.apps.interop.peft import export_peft, render_peft_input
from softprompt.core.prompts import SoftPrompt
from softprompt.serve import Engine
from softprompt.serve.testing import random_prompt
from softprompt.data import load_task

# name, template, verbalizer (every label word is one token for SmolLM2's tokenizer)
TASKS = [
    ("complaint", "{soft:20} Is this message a complaint about a product or a service?\nMessage: {text}\nAnswer:",
     {"complaint": " yes", "no_complaint": " no"}),
    ("sentiment", "{soft:20} What is the sentiment of the following text?\nText: {text}\nSentiment:",
     {"negative": " negative", "positive": " positive"}),
    ("topic", "{soft:20} Which topic is this text about: world, sports, business or technology?\nText: {text}\nTopic:",
     {"World": " World", "Sports": " Sports", "Business": " Business", "Sci/Tech": " Technology"}),
    ("emotion", "{soft:20} Which emotion does the writer of this text express most?\nText: {text}\nEmotion:",
     {"joy": " joy", "anger": " anger", "sadness": " sadness", "fear": " fear", "surprise": " surprise"}),
    ("urgency", "{soft:20} How urgently does this message need a reply from customer support?\nMessage: {text}\nUrgency:",
     {"high": " high", "medium": " medium", "low": " low"}),
    ("spam", "{soft:20} Is this message spam or a genuine message from a person?\nMessage: {text}\nLabel:",
     {"spam": " spam", "genuine": " genuine"}),
    ("formality", "{soft:20} Is this text written in a formal or an informal style?\nText: {text}\nStyle:",
     {"formal": " formal", "informal": " informal"}),
    ("intent", "{soft:20} Is the writer asking a question, making a request or making a statement?\nText: {text}\nIntent:",
     {"question": " question", "request": " request", "statement": " statement"}),
]
SINGLE_TASK = "sentiment"

# name, template: short instructions over the same real texts
GEN_TASKS = [
    ("summary", "{soft:20} Summarize the following message in a few words.\nMessage: {text}\nSummary:"),
    ("reply", "{soft:20} Write a short, polite reply from customer support to this message.\nMessage: {text}\nReply:"),
    ("title", "{soft:20} Give this text a short title.\nText: {text}\nTitle:"),
    ("keywords", "{soft:20} List the main keywords of this text.\nText: {text}\nKeywords:"),
    ("entity", "{soft:20} Which product, company or person is this text about?\nText: {text}\nAnswer:"),
    ("question", "{soft:20} What question could the writer of this text be asking?\nText: {text}\nQuestion:"),
    ("formal", "{soft:20} Rewrite this text in formal English.\nText: {text}\nFormal:"),
    ("french", "{soft:20} Translate this text into French.\nText: {text}\nFrench:"),
]
GEN_SINGLE_TASK = "summary"
KINDS = {"classify": ("classify",), "generate": ("generate",), "both": ("classify", "generate")}

CONFIGS = {  # name: (traffic, batching, prefix_cache)
    "mixed": ("mixed", "mixed", True),
    "single": ("single", "mixed", True),
    "per_task": ("mixed", "per_task", True),
    "per_task+recomp": ("mixed", "per_task", False),
    "recompute": ("mixed", "mixed", False),
    "peft": ("mixed", "per_task", False),  # not engine flags: PeftServer, which works this way
}
PEFT = "peft"


def texts(n: int, seed: int) -> list[str]:
    """Real short texts: twitter_complaints and sst2 test inputs, shuffled."""
    per = max(n, 200)
    tweets = [ex.fields["text"] for ex in load_task("twitter_complaints", limit_per_split=per)["test"]]
    sents = [ex.fields["sentence"] for ex in load_task("sst2", limit_per_split=per)["test"]]
    pool = tweets + sents
    random.Random(seed).shuffle(pool)
    return [pool[i % len(pool)] for i in range(n)]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


class Kind:
    """How requests of one traffic kind are sent to the engine and what they yield."""

    def __init__(self, name: str, engine: Engine, max_new_tokens: int = 16, stop_at_newline: bool = False):
        self.name, self.engine = name, engine
        self.max_new_tokens, self.stop_at_newline = max_new_tokens, stop_at_newline
        self.tasks = [t[0] for t in (TASKS if name == "classify" else GEN_TASKS)]
        self.single = SINGLE_TASK if name == "classify" else GEN_SINGLE_TASK

    def submit(self, task: str, text: str, first: list[float] | None = None):
        """Queue one request; for generation ``first`` receives the time of its first token."""
        if self.name == "classify":
            return self.engine.submit_classify(task, [text])[0]
        on_token = None
        if first is not None:
            def on_token(ids, first=first):
                if not first:
                    first.append(time.perf_counter())
        return self.engine.submit_generate(task, text, max_new_tokens=self.max_new_tokens,
                                           stop_at_newline=self.stop_at_newline, on_token=on_token)

    def tokens(self, result) -> int:
        return len(result.token_ids) if self.name == "generate" else 0


@dataclass
class _PeftRequest:
    task: str
    text: str
    ids: list[int]
    t_submit: float
    future: cf.Future = field(default_factory=cf.Future)


class PeftServer:
    """The classification tasks served by Hugging Face PEFT, as a PEFT-based server has to.

    One ``PeftModel`` over the engine's own model object (shared, not copied: prompt tuning
    leaves the base weights alone) holds each task's prompt as a named prompt-tuning
    adapter, written by :func:`export_peft`.  PEFT prepends the *active* adapter's virtual
    tokens to every row of a forward pass, so a batch can only hold one task: a small
    dynamic batcher takes the oldest request's task, gathers up to ``max_batch_size``
    queued requests of that task, waiting at most ``max_wait_ms`` from the oldest one's
    arrival (the engine's rule), and switches adapters with ``set_adapter``.  Rank
    classification is done the PEFT way: every (input, label word) sequence runs in full
    (virtual tokens, input, label), one padded forward for the whole batch, and the label
    tokens' log-probs are summed.  Only the logits at the label positions are projected
    (``logits_to_keep``), which any careful server would do; it only makes PEFT faster.

    ``submit(task, text) -> Future`` (of the label) is what :func:`closed_loop` calls on a
    :class:`Kind`, so both are measured by the same clients.  ``answers`` keeps every label
    given, for the check against the engine's.
    """

    def __init__(self, model, tok, prompts: dict[str, SoftPrompt], max_batch_size: int, max_wait_ms: float):
        from peft import PeftModel

        self.tok = tok
        self.max_batch_size, self.max_wait = max_batch_size, max_wait_ms / 1000.0
        self.device = model.get_input_embeddings().weight.device
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.tasks: dict[str, tuple[str, int, list[str], list[list[int]]]] = {}  # input template, virtual tokens, labels, label ids
        pm = None
        with tempfile.TemporaryDirectory() as tmp:  # the adapters' weights are in memory once loaded
            for name, prompt in prompts.items():
                exp = export_peft(prompt, model, tok, Path(tmp) / name)
                if pm is None:
                    with warnings.catch_warnings():  # peft reads a property transformers 5 deprecates; harmless
                        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
                        pm = PeftModel.from_pretrained(model, exp.out_dir, adapter_name=name,
                                                       torch_device=str(self.device))
                else:
                    pm.load_adapter(exp.out_dir, adapter_name=name, torch_device=str(self.device))
                labels = list(prompt.verbalizer)
                label_ids = [tok(prompt.verbalizer[lab], add_special_tokens=False).input_ids for lab in labels]
                self.tasks[name] = (exp.input_template, exp.num_virtual_tokens, labels, label_ids)
        if pm.get_base_model() is not model:
            raise RuntimeError("PeftModel does not wrap the engine's model object")
        self.model = pm.eval()
        self.answers: dict[tuple[str, str], str] = {}
        self.batches = self.rows = 0  # batches run and requests in them, like the engine's metrics
        self._queue: collections.deque[_PeftRequest] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="peft-batcher", daemon=True)
        self._thread.start()

    def submit(self, task: str, text: str) -> cf.Future:
        """Queue one request; its future gets the label.  Tokenized here, in the caller's
        thread, as the engine does."""
        template = self.tasks[task][0]
        ids = self.tok(render_peft_input(template, {"text": text}), add_special_tokens=False).input_ids
        req = _PeftRequest(task, text, ids, time.perf_counter())
        with self._cond:
            self._queue.append(req)
            self._cond.notify()
        return req.future

    def tokens(self, result) -> int:
        return 0  # classification generates no tokens

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                batch = self._form_batch()
            self.batches += 1  # counted before any answer, so a caller that has its answers sees its batch
            self.rows += len(batch)
            try:
                labels = self._classify(batch[0].task, [r.ids for r in batch])
            except Exception as e:  # noqa: BLE001 - the clients get the error
                for r in batch:
                    r.future.set_exception(e)
                continue
            for r, label in zip(batch, labels):
                self.answers[r.task, r.text] = label
                r.future.set_result(label)

    def _form_batch(self) -> list[_PeftRequest]:
        """With the lock held and a request queued: wait for the oldest request's task to fill a
        batch (or its wait to run out), then take that task's requests, oldest first."""
        head = self._queue[0]
        deadline = head.t_submit + self.max_wait
        while sum(r.task == head.task for r in self._queue) < self.max_batch_size:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            self._cond.wait(remaining)
        batch: list[_PeftRequest] = []
        rest: collections.deque[_PeftRequest] = collections.deque()
        for r in self._queue:
            (batch if r.task == head.task and len(batch) < self.max_batch_size else rest).append(r)
        self._queue = rest
        return batch

    @torch.no_grad()
    def _classify(self, task: str, inputs: list[list[int]]) -> list[str]:
        """One forward over all (input, label) rows of one task, right-padded: PEFT numbers
        positions 0, 1, ... from its virtual tokens on, whatever the mask says, so left
        padding would open a gap between the virtual tokens and the input."""
        _, n_virtual, labels, label_ids = self.tasks[task]
        self.model.set_adapter(task)
        rows = [(ctx, lab) for ctx in inputs for lab in label_ids]
        width = max(len(ctx) + len(lab) for ctx, lab in rows)
        depth = max(len(lab) for lab in label_ids)
        ids = torch.full((len(rows), width), self.pad)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        keep = torch.zeros((len(rows), depth), dtype=torch.long)  # the positions whose logits predict a label token
        target = torch.zeros((len(rows), depth), dtype=torch.long)
        valid = torch.zeros((len(rows), depth), dtype=torch.bool)
        for r, (ctx, lab) in enumerate(rows):
            ids[r, : len(ctx) + len(lab)] = torch.tensor(ctx + lab)
            mask[r, : len(ctx) + len(lab)] = 1
            for j, t in enumerate(lab):  # the outputs include the virtual tokens' positions
                keep[r, j], target[r, j], valid[r, j] = n_virtual + len(ctx) + j - 1, t, True
        logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                            logits_to_keep=keep.to(self.device)).logits
        logp = logits.float().log_softmax(-1).gather(-1, target.to(self.device)[..., None])[..., 0]
        scores = logp.masked_fill(~valid.to(self.device), 0.0).sum(-1).view(len(inputs), len(labels))
        return [labels[j] for j in scores.argmax(-1).tolist()]


def closed_loop(kind: Kind | PeftServer, traffic: list[tuple[str, str]], concurrency: int,
                answers: dict | None = None) -> tuple[float, list[float], int]:
    """Keep ``concurrency`` requests in flight until all are answered; (seconds, latencies,
    new tokens).  ``answers``, if given, receives each result under its (task, text)."""
    sem = threading.Semaphore(concurrency)
    lock = threading.Lock()
    lat: list[float] = []
    tokens = [0]
    errors: list[BaseException] = []
    left = [len(traffic)]
    done = threading.Event()
    t0 = time.perf_counter()
    for task, text in traffic:
        sem.acquire()
        ts = time.perf_counter()
        fut = kind.submit(task, text)

        def cb(f, ts=ts, key=(task, text)):
            with lock:
                lat.append(time.perf_counter() - ts)
                if f.exception() is not None:
                    errors.append(f.exception())
                else:
                    tokens[0] += kind.tokens(f.result())
                    if answers is not None:
                        answers[key] = f.result()
                left[0] -= 1
                if left[0] == 0:
                    done.set()
            sem.release()
        fut.add_done_callback(cb)
    done.wait()
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]!r}")
    return time.perf_counter() - t0, lat, tokens[0]


def open_loop(kind: Kind, traffic: list[tuple[str, str]], rate: float, seed: int) -> tuple[list[float], list[float]]:
    """Poisson arrivals at ``rate`` requests/s; (latencies, times to first token), both
    from the scheduled arrival (the second is empty for classification)."""
    rng = random.Random(seed)
    lat: list[float] = []
    ttft: list[float] = []
    left = [len(traffic)]
    lock = threading.Lock()
    done = threading.Event()
    t0 = time.perf_counter()
    at = 0.0
    for task, text in traffic:
        at += rng.expovariate(rate)
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        sched = t0 + at
        first: list[float] = []
        fut = kind.submit(task, text, first)

        def cb(f, sched=sched, first=first):
            f.result()
            with lock:
                lat.append(time.perf_counter() - sched)
                if first:
                    ttft.append(first[0] - sched)
                left[0] -= 1
                if left[0] == 0:
                    done.set()
        fut.add_done_callback(cb)
    done.wait()
    return lat, ttft


def http_closed_loop(kind: Kind, traffic, concurrency: int) -> tuple[float, list[float]]:
    """The same closed loop through the real HTTP server (uvicorn + httpx, 127.0.0.1)."""
    import asyncio

    import httpx

    from softprompt.serve import create_app
    from softprompt.serve.testing import ServerThread

    app = create_app(kind.engine, manage_engine=False, max_inputs=64)

    async def run(url):
        todo = list(enumerate(traffic))
        lat: list[float] = []

        async def client():
            async with httpx.AsyncClient(base_url=url, timeout=600) as c:
                while todo:
                    _, (task, text) = todo.pop()
                    ts = time.perf_counter()
                    if kind.name == "classify":
                        r = await c.post("/v1/classify", json={"task": task, "inputs": [text]})
                    else:
                        r = await c.post("/v1/generate", json={
                            "task": task, "input": text, "max_new_tokens": kind.max_new_tokens,
                            "stop_at_newline": kind.stop_at_newline})
                    r.raise_for_status()
                    lat.append(time.perf_counter() - ts)
        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return time.perf_counter() - t0, lat

    with ServerThread(app) as srv:
        return asyncio.run(run(srv.url))


def soft_sweep(engine: Engine, model, text_pool: list[str], sizes=(20, 50, 100), batch=16, reps=2) -> list[tuple]:
    """Time one batch of ``batch`` rows with prefix reuse vs recompute for several prompt lengths."""
    rows = []
    for n in sizes:
        name = f"sweep{n}"
        engine.register(name, random_prompt(model, TASKS[1][1].replace("{soft:20}", f"{{soft:{n}}}"), verbalizer=TASKS[1][2], seed=n))
        res = {}
        for cache in (True, False, True, False)[: 2 * reps]:
            engine.prefix_cache = cache
            t0 = time.perf_counter()
            engine.classify(name, text_pool[:batch])
            res.setdefault(cache, []).append(time.perf_counter() - t0)
        rows.append((n, min(res[True]), min(res[False])))
        engine.unregister(name)
    engine.prefix_cache = True
    return rows


def batch_curve(kind: Kind, text_pool: list[str], sizes=(1, 2, 4, 8, 16), reps=2) -> list[tuple[int, float, int]]:
    """Seconds per row of one batch of B rows of one task (best of ``reps``) and the new
    tokens of the batch: how much batching itself buys on this hardware, which bounds the
    mixed / per-task ratio."""
    engine = kind.engine
    out = []
    for b in sizes:
        if b > engine.max_batch_size:
            continue
        best, tokens = float("inf"), 0
        for _ in range(reps):
            t0 = time.perf_counter()
            with getattr(engine, "scheduler", engine)._cond:  # queue the whole batch before the worker can take part of it
                futs = [kind.submit(kind.single, t) for t in text_pool[:b]]
            tokens = sum(kind.tokens(f.result()) for f in futs)
            best = min(best, time.perf_counter() - t0)
        out.append((b, best / b, tokens))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--traffic", choices=list(KINDS), default="classify",
                    help="classification requests, generation requests, or both (interleaved)")
    ap.add_argument("--requests", type=int, default=128, help="requests per configuration (split over the rounds)")
    ap.add_argument("--rounds", type=int, default=4, help="interleaved rounds (each runs every configuration once)")
    ap.add_argument("--concurrency", type=int, default=16, help="closed-loop clients")
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--max-new-tokens", type=int, default=16, help="generation: new tokens per request")
    ap.add_argument("--stop-at-newline", action="store_true",
                    help="generation: also stop at a newline (default: only at EOS or --max-new-tokens)")
    ap.add_argument("--rates", default="0.25,0.5,0.75", help="open-loop request rates as fractions of mixed throughput")
    ap.add_argument("--latency-requests", type=int, default=32, help="requests per open-loop rate")
    ap.add_argument("--no-batch-curve", action="store_true", help="skip timing single-task batches of 1..16 rows")
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help=f"subset of {','.join(CONFIGS)} ({PEFT}: classification traffic only)")
    ap.add_argument("--split-padding", default="auto",
                    help="engine split_padding: 'auto' (CPU: 0.25), 'none', or a fraction")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (see docs/benchmarks.md)")
    ap.add_argument("--http", action="store_true", help="also run the mixed closed loop through the HTTP server")
    ap.add_argument("--soft-sweep", action="store_true", help="also time prefix reuse vs recompute at 20/50/100 soft tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where the model runs")
    ap.add_argument("--json", type=Path, help="write the raw numbers here")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    configs = [c for c in args.configs.split(",") if c]
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        ap.error(f"unknown configs {sorted(unknown)}")
    if args.max_new_tokens < 1:
        ap.error("--max-new-tokens must be >= 1")
    t_start = time.perf_counter()
    load0 = os.getloadavg()
    model, tok = load_model(args.model, device=args.device)
    split = {"auto": "auto", "none": None}.get(args.split_padding.lower(), None)
    if args.split_padding.lower() not in ("auto", "none"):
        split = float(args.split_padding)
    engine = Engine(model, tok, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                    max_queue=1_000_000, base_name=args.model, split_padding=split,
                    max_new_tokens_limit=max(256, args.max_new_tokens))
    kinds = {k: Kind(k, engine, args.max_new_tokens, args.stop_at_newline) for k in KINDS[args.traffic]}
    cls_prompts: dict[str, SoftPrompt] = {}
    if "classify" in kinds:
        for k, (name, template, verbalizer) in enumerate(TASKS):
            cls_prompts[name] = random_prompt(model, template, verbalizer=verbalizer, seed=k, task=name)
            engine.register(name, cls_prompts[name])
    if "generate" in kinds:
        for k, (name, template) in enumerate(GEN_TASKS):
            engine.register(name, random_prompt(model, template, kind="generation", seed=100 + k, task=name))
    engine.start()

    pool = texts(args.requests * 2, args.seed)
    rng = random.Random(args.seed)
    traffic: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for k, kind in kinds.items():
        mixed = [(rng.choice(kind.tasks), t) for t in pool[: args.requests]]
        traffic[k, "mixed"] = mixed
        traffic[k, "single"] = [(kind.single, t) for _, t in mixed]
    some = next(iter(kinds.values()))
    info = engine.task(some.single).info()
    print(f"# {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params), torch {torch.__version__}, "
          f"{args.threads} thread(s), {os.cpu_count()} CPUs, load average {load0[0]:.2f} at start"
          + (f", {torch.cuda.get_device_name(0)}" if args.device.startswith("cuda") else ""), flush=True)
    print(f"# traffic {args.traffic}: 8 tasks per kind, 20 soft tokens each (prefix {info['prefix_tokens'][0]} tokens incl. "
          f"BOS and instruction for {some.single!r}); {args.requests} requests per configuration in {args.rounds} "
          f"interleaved rounds; concurrency {args.concurrency}, max batch {args.max_batch_size}, max wait "
          f"{args.max_wait_ms} ms, split_padding {engine.split_padding}"
          + (f"; generation: greedy, max_new_tokens {args.max_new_tokens}, stop at "
             f"{'newline or EOS' if args.stop_at_newline else 'EOS only'}" if "generate" in kinds else ""), flush=True)

    peft = None
    peft_check: dict[str, float] = {}
    if PEFT in configs and "generate" in kinds:
        print(f"# {PEFT}: skipped for generation traffic (it is a classification baseline)", flush=True)
    if PEFT in configs and "classify" in kinds:
        # The PeftModel wraps the engine's model object: the engine must answer exactly as before it.
        import peft as peft_lib

        probe = traffic["classify", "mixed"][: min(16, args.requests)]
        before: dict = {}
        closed_loop(kinds["classify"], probe, args.concurrency, answers=before)
        peft = PeftServer(model, tok, cls_prompts, args.max_batch_size, args.max_wait_ms)
        after: dict = {}
        closed_loop(kinds["classify"], probe, args.concurrency, answers=after)
        peft_check["engine_max_abs_prob_change"] = max(
            abs(p - after[key].probabilities[lab]) for key, res in before.items() for lab, p in res.probabilities.items())
        n_virtual = peft.tasks[some.single][1]
        print(f"# {PEFT}: peft {peft_lib.__version__}, {len(peft.tasks)} prompt-tuning adapters in one PeftModel over "
              f"the engine's model object ({n_virtual} virtual tokens for {some.single!r}); engine label probabilities "
              f"after wrapping change by at most {peft_check['engine_max_abs_prob_change']:.1e} on {len(probe)} "
              f"requests", flush=True)

    # warm-up: one batch per configuration path
    for kind in kinds.values():
        for c, (tr, batching, cache) in CONFIGS.items():
            if c != PEFT:
                engine.batching, engine.prefix_cache = batching, cache
                closed_loop(kind, traffic[kind.name, tr][: min(8, args.requests)], args.concurrency)
    if peft is not None:
        closed_loop(peft, traffic["classify", "mixed"][: min(8, args.requests)], args.concurrency)

    def served(c: str) -> tuple[int, int]:
        """(batches, requests in them) so far, of whatever serves configuration ``c``."""
        if c == PEFT:
            return peft.batches, peft.rows
        return engine.metrics.batch_size.count(), engine.metrics.batch_size.sum()

    runs = [(k, c) for k in kinds for c in configs if c != PEFT or k == "classify"]
    engine_answers: dict = {}  # the engine's mixed-config results, for the check of PEFT's labels
    elapsed = {r: 0.0 for r in runs}
    lats: dict[tuple[str, str], list[float]] = {r: [] for r in runs}
    rows = {r: 0 for r in runs}
    toks = {r: 0 for r in runs}
    batches = {r: [0, 0] for r in runs}  # batches, rows (from the engine's metrics)
    per_round = [(r * args.requests // args.rounds, (r + 1) * args.requests // args.rounds) for r in range(args.rounds)]
    for r, (lo, hi) in enumerate(per_round):
        order = runs[r % len(runs):] + runs[: r % len(runs)]
        for k, c in order:
            tr, batching, cache = CONFIGS[c]
            if c != PEFT:
                engine.batching, engine.prefix_cache = batching, cache
            b0, s0 = served(c)
            dt, lat, nt = closed_loop(peft if c == PEFT else kinds[k], traffic[k, tr][lo:hi], args.concurrency,
                                      answers=engine_answers if (k, c) == ("classify", "mixed") else None)
            elapsed[k, c] += dt
            lats[k, c] += lat
            rows[k, c] += hi - lo
            toks[k, c] += nt
            b1, s1 = served(c)
            batches[k, c][0] += b1 - b0
            batches[k, c][1] += s1 - s0
            extra = f" {nt / dt:7.2f} tok/s" if k == "generate" else ""
            print(f"  round {r + 1}/{args.rounds} {k:<8} {c:<16} {(hi - lo) / dt:6.2f} req/s{extra}", flush=True)
    engine.batching, engine.prefix_cache = "mixed", True
    if peft is not None:
        peft.stop()
        missing = [key for key in peft.answers if key not in engine_answers]  # all, when "mixed" was not run
        if missing:
            closed_loop(kinds["classify"], missing, args.concurrency, answers=engine_answers)
        agree = sum(label == engine_answers[key].label for key, label in peft.answers.items())
        peft_check.update(agreement=agree / len(peft.answers), agreeing=agree, checked=len(peft.answers))
    thr = {r: rows[r] / elapsed[r] for r in runs}
    tps = {r: toks[r] / elapsed[r] for r in runs}

    report: dict[str, dict] = {}
    for k, kind in kinds.items():
        gen = k == "generate"
        # generation ratios use generated tokens/s: the single task's answers need not be as long as the mix's
        speed = tps if gen else thr
        unit = "tokens/s" if gen else "req/s"
        kconfigs = [c for c in configs if (k, c) in runs]
        print(f"\n## {k} traffic\n")
        print("| configuration | traffic | batching | prompt KV | req/s |" + (" new tokens/s | tokens/req |" if gen else "")
              + " mean batch | p50 ms | p99 ms |")
        print("|---|---|---|---|---:|" + ("---:|---:|" if gen else "") + "---:|---:|---:|")
        for c in kconfigs:
            tr, batching, cache = CONFIGS[c]
            mb = batches[k, c][1] / max(batches[k, c][0], 1)
            g = f" {tps[k, c]:.2f} | {toks[k, c] / max(rows[k, c], 1):.1f} |" if gen else ""
            print(f"| {c} | {tr} | {batching} | {'reused' if cache else 'recomputed'} | {thr[k, c]:.2f} |{g} {mb:.1f} | "
                  f"{percentile(lats[k, c], 0.5) * 1e3:.0f} | {percentile(lats[k, c], 0.99) * 1e3:.0f} |")
        ratios = []
        has = set(kconfigs)
        if {"mixed", "single"} <= has:
            ratios.append(("mixed 8-task / single-task throughput", speed[k, "mixed"] / speed[k, "single"], ">= 0.9"))
        if {"mixed", "per_task"} <= has:
            ratios.append(("mixed batches / one task per batch", speed[k, "mixed"] / speed[k, "per_task"], ">= 3 (target)"))
        if {"mixed", "per_task+recomp"} <= has:
            ratios.append(("mixed batches + KV reuse / one task per batch + recompute (PEFT-style)",
                           speed[k, "mixed"] / speed[k, "per_task+recomp"], ">= 3 (target)"))
        if {"mixed", "recompute"} <= has:
            ratios.append(("KV-prefix reuse / recompute the prompt per request (20 soft tokens)",
                           speed[k, "mixed"] / speed[k, "recompute"], "> 1"))
        if {"mixed", PEFT} <= has:
            ratios.append(("mixed batches + KV reuse / HF PEFT, one task per batch (what PEFT allows)",
                           speed[k, "mixed"] / speed[k, PEFT], ">= 3 (target)"))
        print(f"\n| ratio (same run, {unit}) | value | target |")
        print("|---|---:|---|")
        for name, v, target in ratios:
            print(f"| {name} | {v:.2f}x | {target} |")
        report[k] = {
            "throughput_req_s": {c: thr[k, c] for c in kconfigs},
            "throughput_tokens_s": {c: tps[k, c] for c in kconfigs} if gen else None,
            "ratios": {n: v for n, v, _ in ratios},
            "latency": {c: {"p50": percentile(lats[k, c], 0.5), "p99": percentile(lats[k, c], 0.99)} for c in kconfigs},
            "mean_batch": {c: batches[k, c][1] / max(batches[k, c][0], 1) for c in kconfigs},
        }
        if PEFT in kconfigs:
            report[k][PEFT] = peft_check
            print(f"\n{PEFT} vs engine (mixed), same requests: labels agree on {peft_check['agreeing']}"
                  f"/{peft_check['checked']} distinct (task, text) requests ({peft_check['agreement']:.1%}; fp32, "
                  f"random prompts: only near-ties may differ)")

        if "mixed" in configs and args.latency_requests > 0:
            print(f"\nOpen-loop latency, mixed 8-task {k} traffic, Poisson arrivals, {args.latency_requests} requests per rate:\n")
            print("| rate (req/s) | fraction of capacity | p50 ms | p99 ms |" + (" first token p50 ms | p99 ms |" if gen else "")
                  + " mean batch |")
            print("|---:|---:|---:|---:|" + ("---:|---:|" if gen else "") + "---:|")
            lat_pool = [(rng.choice(kind.tasks), t) for t in pool[args.requests: args.requests + args.latency_requests]]
            latency_rows = []
            for f in (float(x) for x in args.rates.split(",") if x):
                rate = f * thr[k, "mixed"]
                b0, s0 = engine.metrics.batch_size.count(), engine.metrics.batch_size.sum()
                lat, ttft = open_loop(kind, lat_pool, rate, args.seed)
                nb = engine.metrics.batch_size.count() - b0
                mb = (engine.metrics.batch_size.sum() - s0) / max(nb, 1)
                row = (rate, f, percentile(lat, 0.5), percentile(lat, 0.99), mb, percentile(ttft, 0.5), percentile(ttft, 0.99))
                latency_rows.append(row)
                g = f" {row[5] * 1e3:.0f} | {row[6] * 1e3:.0f} |" if gen else ""
                print(f"| {rate:.2f} | {f:.2f} | {row[2] * 1e3:.0f} | {row[3] * 1e3:.0f} |{g} {mb:.1f} |", flush=True)
            report[k]["open_loop"] = latency_rows

        if args.http:
            n = min(args.requests, len(traffic[k, "mixed"]))
            dt, lat = http_closed_loop(kind, traffic[k, "mixed"][:n], args.concurrency)
            report[k]["http"] = (n / dt, percentile(lat, 0.5), percentile(lat, 0.99))
            print(f"\nHTTP (uvicorn + httpx on 127.0.0.1), mixed {k} traffic, {n} requests: {n / dt:.2f} req/s, "
                  f"p50 {percentile(lat, 0.5) * 1e3:.0f} ms, p99 {percentile(lat, 0.99) * 1e3:.0f} ms")

        if not args.no_batch_curve:
            curve = batch_curve(kind, pool)
            report[k]["batch_curve"] = curve
            print(f"\nBatching efficiency on this machine (one {k} task, prompt KV reused):\n")
            if gen:
                print("| batch rows | ms per row | new tokens | ms per new token | vs 1 row |")
                print("|---:|---:|---:|---:|---:|")
                base = curve[0][1] / max(curve[0][2], 1)
                for b, per, nt in curve:
                    pt = per * b / max(nt, 1)
                    print(f"| {b} | {per * 1e3:.0f} | {nt} | {pt * 1e3:.0f} | {base / pt:.2f}x |")
            else:
                print("| batch rows | ms per row | vs 1 row |")
                print("|---:|---:|---:|")
                for b, per, _ in curve:
                    print(f"| {b} | {per * 1e3:.0f} | {curve[0][1] / per:.2f}x |")

    sweep = None
    if args.soft_sweep:
        sweep = soft_sweep(engine, model, pool)
        print("\n| soft tokens | batch of 16, prompt KV reused (s) | recomputed (s) | speedup |")
        print("|---:|---:|---:|---:|")
        for n, a, b in sweep:
            print(f"| {n} | {a:.2f} | {b:.2f} | {b / a:.2f}x |")

    engine.stop()
    print(f"\n# total {time.perf_counter() - t_start:.0f} s; load average {os.getloadavg()[0]:.2f} at the end; "
          f"{platform.processor() or platform.machine()}")
    if args.json:
        args.json.write_text(json.dumps({
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "load_average_start": load0[0], "load_average_end": os.getloadavg()[0],
            "traffic": report, "soft_sweep": sweep,
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
