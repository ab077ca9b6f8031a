"""Operators per training step: a CPU proxy for kernel launches on a GPU.

A 135M model at small batch sizes is bound by kernel launches on a GPU, not by arithmetic, so
the number of aten operators one step dispatches predicts its GPU speed better than CPU time.
This counts them with the PyTorch profiler for softprompt's two training steps
(``TrainConfig.context`` "cached" and "full") and for HF PEFT prompt tuning, on a randomly
initialised model of SmolLM2-135M's shape (30 layers) at a small width so it runs in seconds.
The steps are the ones ``bench_speed.py`` times (same data, template and batch).

    python benchmarks/count_ops.py [--batch-size 8] [--width 64]
"""
from __future__ import annotations

import argparse
import functools
import time

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoConfig, AutoModelForCausalLM

import bench_speed as B
from softprompt import load_model, load_task
from softprompt.families.loading import convert_embedded, freeze


def shaped_model(width: int):
    """SmolLM2-135M's configuration (layers, heads ratio, vocabulary) at hidden size ``width``."""
    cfg = AutoConfig.from_pretrained(convert_embedded())
    cfg.hidden_size, cfg.intermediate_size = width, 2 * width
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = 4, 2, width // 4
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    freeze(model)
    model.softprompt_name = f"smollm2-shape-w{width}"
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--n-tokens", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(1)
    _, tok = load_model()  # the real tokenizer; the model below only has its shape
    model = shaped_model(args.width)
    data = load_task("twitter_complaints")
    steps = {
        "softprompt, context=cached": functools.partial(B.ours_train, context="cached"),
        "softprompt, context=full": functools.partial(B.ours_train, context="full"),
        "HF PEFT prompt tuning": B.peft_train,
    }
    print(f"{'training step':32s} {'aten ops / step':>16s} {'CPU ms / step':>14s}")
    for name, fn in steps.items():
        run = functools.partial(fn, model, tok, data.task, data["train"], 1, args.batch_size, args.n_tokens, 0.03)
        run()  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            run()  # 1 timed step + 2 warm-up steps inside each train function: 3 steps
            dt = (time.perf_counter() - t0) / 3
        ops = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::")) / 3
        print(f"{name:32s} {ops:16,.0f} {dt * 1000:14.0f}")


if __name__ == "__main__":
    main()
