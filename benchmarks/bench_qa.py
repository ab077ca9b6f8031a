"""HotpotQA generative QA on the embedded decoder-only model: zero-shot vs few-shot vs prompt tuning.

    PYTHONPATH=src python benchmarks/bench_qa.py --out reports/hotpotqa --publish docs/reports/hotpotqa

Data: the 500 HotpotQA dev questions that come with their paragraphs
(``hotpotqa_ircot_dev500`` in the shared data directory, read by
``data.hotpotqa_examples``).  Each question becomes "context + question -> short answer".

Context rule (``data.hotpot_context``): at most ``--budget`` tokens (default 256) of the
context string, supporting paragraphs first and always kept (cut to their marked supporting
sentences when they alone exceed the budget and the official distractor file marks them),
then whole distractor paragraphs in file order while they fit.

Split: the 500 questions are shuffled with ``--split-seed``; the first ``--held-out`` are
held out and only scored, the others form the training pool.  Nothing from the held-out
questions is used for training, demonstrations or any choice of settings.

Methods, all run and scored by ``softprompt.apps.compare`` (generation mode) on the same
held-out questions: greedy answers of at most ``--max-new-tokens`` tokens, stopping at a
newline, scored by SQuAD-normalised exact match and token F1 against every gold answer.

* zero-shot: the task's instruction line + the hard template (context, question, "Answer:").
* few-shot: the instruction + ``--shots`` demonstrations (context, question, gold answer)
  drawn at random from the training questions whose supporting paragraphs alone fit in
  ``--demo-budget`` tokens; a demonstration's context is those paragraphs only, so the
  demonstrations stay short.
* prompt tuning: ``--prompt-length`` soft tokens in front of the hard template,
  initialised from the instruction's token embeddings, trained on ``--train-limit``
  training questions (a seeded sample) with the loss on the answer tokens (+ EOS only).
* with ``--methods ...,ptuning``: P-tuning, the same soft tokens trained through a prompt
  encoder (``--ptuning-encoder``) at ``--encoder-lr``; with ``prefix``: prefix tuning,
  ``--prompt-length`` key/value positions per layer before the hard template, trained
  directly at ``--lr`` or, with ``--prefix-reparam mlp``, through an MLP at ``--encoder-lr``.

Writes ``results.json``, ``report.md``, ``report.html``, ``em_f1_by_method.png`` and
``training_loss.png`` to ``--out`` (a rerun skips finished runs); ``--publish`` copies
``report.md`` and the PNGs to a folder such as ``docs/reports/hotpotqa``.
"""
from __future__ import annotations

import argparse
import json
import random
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from softprompt import load_model
from softprompt.apps.compare import RESULTS, CompareConfig, Comparison
from softprompt.apps.report import write_report
from softprompt.data import HOTPOT_FILE, TaskData, data_root, hotpotqa_examples, load_task


def token_count(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False).input_ids)


def supporting_block(row: dict) -> str:
    """The supporting paragraphs as hotpot_context writes them when they are kept whole."""
    return "\n".join(" ".join(f"{p['title']}: {p['paragraph_text']}".split()) for p in row["contexts"] if p["is_supporting"])


def context_stats(tok, rows: list[dict], examples, budget: int) -> dict:
    lens = [token_count(tok, e.fields["context"]) for e in examples]
    whole = sum(e.fields["context"].startswith(supporting_block(r)) for r, e in zip(rows, examples))
    return {"mean_tokens": statistics.mean(lens), "median_tokens": statistics.median(lens), "max_tokens": max(lens),
            "over_budget": sum(n > budget for n in lens), "support_cut_to_sentences": len(examples) - whole,
            "n": len(examples)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("reports/hotpotqa"))
    p.add_argument("--publish", type=Path, help="copy report.md and the PNGs here (e.g. docs/reports/hotpotqa)")
    p.add_argument("--data-dir", type=Path)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--budget", type=int, default=256, help="context tokens per question")
    p.add_argument("--held-out", type=int, default=300, help="questions held out for scoring (the rest: training pool)")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--test-limit", type=int, help="score a seeded sample of this many held-out questions (default all)")
    p.add_argument("--train-limit", type=int, help="train on a seeded sample of this many training questions (default all)")
    p.add_argument("--shots", type=int, default=3)
    p.add_argument("--fewshot-seeds", default="0")
    p.add_argument("--demo-budget", type=int, default=128, help="max tokens of a demonstration's context")
    p.add_argument("--prompt-length", type=int, default=20)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--seeds", default="0", help="prompt-tuning seeds")
    p.add_argument("--methods", default="zero_shot,few_shot,soft",
                   help="comma list: zero_shot, few_shot, soft, ptuning, prefix (or other compare methods)")
    p.add_argument("--ptuning-encoder", default="lstm", choices=["lstm", "mlp"])
    p.add_argument("--encoder-lr", type=float, default=1e-3, help="lr of P-tuning and of prefix tuning via an MLP")
    p.add_argument("--prefix-reparam", default="none", choices=["none", "mlp"])
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--latency-examples", type=int, default=0, help="0: no latency measurement (shared CPU)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where the model runs")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    started = time.strftime("%Y-%m-%d %H:%M")

    model, tok = load_model(args.model, device=args.device)
    root = data_root(args.data_dir)
    rows = [json.loads(line) for line in (root / HOTPOT_FILE).read_text(encoding="utf-8").splitlines() if line.strip()]
    examples = hotpotqa_examples(root, tokenizer=tok, max_context_tokens=args.budget)
    short = hotpotqa_examples(root, tokenizer=tok, max_context_tokens=0)  # supporting paragraphs only
    if not 0 < args.held_out < len(examples):
        sys.exit(f"--held-out must be between 1 and {len(examples) - 1}")
    order = list(range(len(examples)))
    random.Random(args.split_seed).shuffle(order)
    held, train = order[: args.held_out], order[args.held_out:]
    demos = [short[i] for i in train if token_count(tok, short[i].fields["context"]) <= args.demo_budget]
    task = load_task("hotpotqa", root, limit_per_split=0).task
    data = TaskData(task, {"train": [examples[i] for i in train], "test": [examples[i] for i in held],
                           "demonstrations": demos})
    cfg = CompareConfig(
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()), train_limit=args.train_limit,
        valid_limit=0,
        test_limit=args.test_limit, data_seed=args.split_seed, shots=args.shots,
        fewshot_seeds=tuple(int(s) for s in args.fewshot_seeds.split(",")), fewshot_orders=1,
        prompt_length=args.prompt_length, init="text", seeds=tuple(int(s) for s in args.seeds.split(",")),
        epochs=args.epochs, min_steps=0, lr=args.lr, batch_size=args.batch_size, warmup_steps=args.warmup_steps,
        max_new_tokens=args.max_new_tokens, eval_batch_size=args.eval_batch_size,
        latency_examples=args.latency_examples, ptuning_encoder=args.ptuning_encoder, encoder_lr=args.encoder_lr,
        prefix_reparam=args.prefix_reparam,
    )
    comp = Comparison(cfg, data, model, tok, args.out, model_name=args.model, progress=True)
    comp.plan()
    stats_test = context_stats(tok, [rows[i] for i in held], data["test"], args.budget)
    stats_all = context_stats(tok, rows, examples, args.budget)
    print(f"split: {len(held)} held out / {len(train)} training; scored: {len(comp.test)}; "
          f"prompt tuning trains on {len(comp.pool)}; demonstration pool {len(demos)}", flush=True)
    print(f"contexts (all 500): {json.dumps(stats_all)}", flush=True)
    results = comp.run()

    cmd = "PYTHONPATH=src python benchmarks/bench_qa.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    methods = set(cfg.methods)
    trained = [n for m, n in (("soft", "prompt tuning"), ("ptuning", "P-tuning"), ("prefix", "prefix tuning"))
               if m in methods]
    how = []
    if "few_shot" in methods:
        how.append(f"Few-shot demonstrations: {args.shots} drawn at random from the {len(demos)} training questions "
                   f"whose supporting paragraphs alone fit in {args.demo_budget} tokens; their context is those "
                   "paragraphs only.")
    if "soft" in methods:
        how.append(f"Prompt tuning: {args.prompt_length} soft tokens before the hard template, initialised from the "
                   f"instruction's token embeddings, AdamW lr {args.lr}.")
    if "ptuning" in methods:
        how.append(f"P-tuning: the same {args.prompt_length} soft tokens trained through a {args.ptuning_encoder} "
                   f"prompt encoder (width 128, output added to the instruction's embeddings), AdamW lr "
                   f"{args.encoder_lr}.")
    if "prefix" in methods:
        how.append(f"Prefix tuning: {args.prompt_length} learned key/value positions at every layer before the hard "
                   "template (no soft tokens), started from the key/values of the instruction's tokens, "
                   + (f"trained directly, AdamW lr {args.lr}." if args.prefix_reparam == "none"
                      else f"through an MLP (width 128), AdamW lr {args.encoder_lr}."))
    if trained:
        how.append(f"All trained prompts ({', '.join(trained)}): batch {args.batch_size}, {args.epochs} epoch(s), "
                   "loss on the answer tokens (+ EOS) only, the last prompt kept (no validation).")
    results["notes"] = [
        (f"Data: the {len(examples)} HotpotQA dev questions with paragraphs (`{HOTPOT_FILE}`), shuffled with seed "
         f"{args.split_seed}: {len(held)} held out, {len(train)} for training. Scored: "
         + (f"a seeded sample of {len(comp.test)} held-out questions" if len(comp.test) < len(held)
            else f"all {len(held)} held-out questions")
         + (f"; the trained prompts ({', '.join(trained)}) learn from {len(comp.pool)} training questions"
            if trained else "")
         + (" (a seeded sample)" if trained and len(comp.pool) < len(train) else "") + "."),
        (f"Contexts (`data.hotpot_context`): at most {args.budget} tokens of context, supporting paragraphs first and "
         "always kept (cut to their marked supporting sentences when they alone exceed the budget and the official "
         "distractor file marks them), then whole distractor paragraphs in file order while they fit. All "
         f"{stats_all['n']} questions: mean {stats_all['mean_tokens']:.0f} tokens, max {stats_all['max_tokens']}; "
         f"{stats_all['over_budget']} exceed the budget because their supporting paragraphs alone do, "
         f"{stats_all['support_cut_to_sentences']} have supporting paragraphs cut to their marked sentences. Scored "
         f"held-out questions: mean {stats_test['mean_tokens']:.0f} tokens."),
        *([" ".join(how)] if how else []),
        f"Command: `{cmd}` (started {started}, {args.threads} torch thread(s)).",
    ]
    (args.out / RESULTS).write_text(json.dumps(results, indent=1, default=str))
    paths = write_report(results, args.out)
    print(f"report: {paths['markdown']}")
    for r in results["runs"].values():
        m = r["metrics"]
        tr = r.get("train") or {}
        print(f"{r['label']:60s} EM {m['exact_match']:.4f}  F1 {m['f1']:.4f}  n {m['n']}  "
              f"eval {r['eval_wall_s']:.0f}s" + (f"  train {tr['wall_s']:.0f}s ({tr['steps']} steps)" if tr else ""))
    if args.publish:
        args.publish.mkdir(parents=True, exist_ok=True)
        for f in [args.out / "report.md", *sorted(args.out.glob("*.png"))]:
            shutil.copy2(f, args.publish / f.name)
        print(f"published report.md and PNGs to {args.publish}")


if __name__ == "__main__":
    main()
