"""How much do the frozen model's features separate a task? A linear-probe estimate (issue 22).

A logistic regression (L2, fitted with L-BFGS in torch) on the last-token hidden states (last and middle
layer, concatenated, standardised) of each example rendered in the task's template without soft tokens,
trained on the first ``--train`` training examples, scored on the first 300 test examples, for three L2
strengths.  The strength is NOT chosen on validation: the best of the three is an optimistic ceiling,
which is what this script is for (not a method).

    PYTHONPATH=src python benchmarks/probe_ceiling.py demo
    PYTHONPATH=src python benchmarks/probe_ceiling.py sst2 --train 64
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from softprompt import load_model, load_task
from softprompt.core.templates import Template


def features(model, tok, template: Template, examples) -> np.ndarray:
    out = []
    for ex in examples:
        ids = [tok.bos_token_id] + tok(template.render_text(ex.fields), add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            hs = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
        out.append(torch.cat([hs[-1][0, -1], hs[len(hs) // 2][0, -1]]).numpy())
    return np.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("task")
    ap.add_argument("--train", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model()
    data = load_task(args.task)
    template = Template(data.task.template).without_soft()
    train = list(data["train"])[: args.train] if args.train else list(data["train"])
    test = list(data["test"])[:300]
    labels = data.task.labels
    x, xt = (torch.tensor(features(model, tok, template, e)) for e in (train, test))
    mu, sd = x.mean(0), x.std(0) + 1e-6
    x, xt = (x - mu) / sd, (xt - mu) / sd
    y = torch.tensor([labels.index(e.label) for e in train])
    yt = np.array([labels.index(e.label) for e in test])
    print("| task | train | L2 | test accuracy |\n|---|---|---|---|")
    for lam in (1e-3, 1e-2, 1e-1):
        w = torch.zeros(x.shape[1], len(labels), requires_grad=True)
        b = torch.zeros(len(labels), requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=500)

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(x @ w + b, y) + lam * (w ** 2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        acc = float(((xt @ w + b).argmax(1).numpy() == yt).mean())
        print(f"| {args.task} | {len(train)} | {lam:g} | {100 * acc:.1f} |")


if __name__ == "__main__":
    main()
