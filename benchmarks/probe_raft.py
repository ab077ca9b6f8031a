"""How much of RAFT twitter_complaints can the frozen model's hidden states tell apart?

A ceiling check for issue 2's target (accuracy >= 0.80, macro-F1 >= 0.75 from the 50 training
tweets).  A soft prompt can only steer what the frozen network computes, and its answer is read
at the last position.  This fits L2-regularised logistic regressions ("linear probes") on the
model's hidden states of the same 50 tweets, at every layer, pooled two ways:

- ``last``: the state at the position where the answer's first token is predicted, the place a
  verbalizer reads;
- ``mean``: the mean over every position of the templated tweet, which no single position holds.

The regularisation strength is chosen by 10-fold cross-validation on the 50 training tweets
(no test labels).  The table gives every layer's test accuracy and macro-F1 on the test tweets,
so the best row of the table is chosen with the test labels (an optimistic bound, marked as
such); "chosen by CV" picks the layer by cross-validation too.

    python benchmarks/probe_raft.py [--threads 2] [--features runs/probe_raft.pt]

The hidden states of all 3,449 tweets are computed once (about 12 minutes on one CPU thread)
and kept in --features, so a second run only refits.

``--prompts P [P ...]`` also scores trained prompts (``prompt.safetensors`` files) on the test
tweets and asks how far any decision rule on their scores could go: the AUC of P(complaint),
the accuracy of the best threshold (chosen with the test labels: a bound, not a method), and
the mean of their probabilities (an ensemble).  An AUC near 0.77 caps accuracy near 0.75 on
this 64/36 split whatever the threshold, so a recipe must separate the classes better, not
calibrate them.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from softprompt import PromptBank, SoftPrompt, classify, load_model, load_task
from softprompt.core.scoring import classification_metrics

CHAT = ("<|im_start|>user\nTweet: {text}\nIs this tweet a complaint? Answer yes or no.<|im_end|>\n"
        "<|im_start|>assistant\n")
PENALTIES = (1e-3, 1e-2, 1e-1, 1.0)


@torch.no_grad()
def hidden_states(model, bank: PromptBank, entry: int, examples) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example and layer (embeddings first): the mean over positions and the last position."""
    means, lasts = [], []
    for ex in tqdm(examples, desc="hidden states", unit="tweet"):
        ids = torch.tensor([bank.suffix_ids(entry, ex.fields)])
        h = torch.stack(model(ids, output_hidden_states=True).hidden_states)[:, 0]  # [layers + 1, T, H]
        means.append(h.mean(1))
        lasts.append(h[:, -1])
    return torch.stack(means), torch.stack(lasts)


def fit_probe(x: torch.Tensor, y: torch.Tensor, penalty: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Logistic regression with an L2 penalty on the weights, solved by L-BFGS."""
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ w + b, y) + penalty * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def cv_accuracy(x: torch.Tensor, y: torch.Tensor, penalty: float, folds: int = 10) -> float:
    correct = 0
    for f in range(folds):
        held = torch.arange(f, len(y), folds)
        kept = torch.tensor([i for i in range(len(y)) if i % folds != f])
        w, b = fit_probe(x[kept], y[kept], penalty)
        correct += (((x[held] @ w + b) > 0).float() == y[held]).sum().item()
    return correct / len(y)


def auc(score: torch.Tensor, positive: torch.Tensor) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    pos, neg = score[positive], score[~positive]
    greater = (pos[:, None] > neg[None]).float().mean()
    return float(greater + 0.5 * (pos[:, None] == neg[None]).float().mean())


def best_threshold_accuracy(score: torch.Tensor, positive: torch.Tensor) -> float:
    """The highest accuracy any threshold on ``score`` reaches (chosen with the labels)."""
    order = torch.argsort(score, descending=True)
    pos_sorted = positive[order].float()
    # predicting the top k as positive: tp = positives among them, tn = negatives outside them
    tp = torch.cat([torch.zeros(1), pos_sorted.cumsum(0)])
    k = torch.arange(len(score) + 1)
    tn = (~positive).sum() - (k - tp)
    return float(((tp + tn) / len(score)).max())


def prompt_rows(paths: list[Path], test) -> list[dict]:
    """Accuracy, macro-F1, AUC and best-threshold accuracy of each prompt and of their mean."""
    model, tok = load_model()
    bank = PromptBank(model, tok)
    positive = torch.tensor([ex.label == "complaint" for ex in test])
    gold = [ex.label for ex in test]
    probs, rows = [], []

    def row(name: str, p_complaint: torch.Tensor) -> dict:
        pred = ["complaint" if v > 0.5 else "no complaint" for v in p_complaint.tolist()]
        m = classification_metrics(gold, pred, ["complaint", "no complaint"])
        return dict(name=name, acc=m["accuracy"], f1=m["macro_f1"], auc=auc(p_complaint, positive),
                    best=best_threshold_accuracy(p_complaint, positive))

    for path in paths:
        sp = SoftPrompt.load(path, model)
        bank.add(str(path), sp.template, sp.embeddings, verbalizer=sp.verbalizer, kv=sp.kv)
        c = classify(bank, str(path), test, batch_size=32, progress=f"scoring {path}")
        probs.append(c.probabilities[:, c.labels.index("complaint")])
        rows.append(row(str(path), probs[-1]))
    if len(probs) > 1:
        rows.append(row(f"mean of the {len(probs)} prompts", torch.stack(probs).mean(0)))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--template", default=CHAT, help="the tweet's template (no soft tokens)")
    p.add_argument("--features", type=Path, default=Path("runs/probe_raft.pt"), help="cache of the hidden states")
    p.add_argument("--prompts", type=Path, nargs="+", default=[], help="also score these trained prompts")
    p.add_argument("--no-probes", action="store_true", help="only score --prompts")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = load_task("twitter_complaints")
    train, test = data["train"], data["test"]
    for path in args.prompts:
        if not path.exists():
            p.error(f"--prompts: no such file {path}")
    if args.prompts:
        print(f"{'prompt':60s} {'accuracy':>9s} {'macro-F1':>9s} {'AUC':>6s} {'best threshold':>15s}")
        for r in prompt_rows(args.prompts, test):
            print(f"{r['name']:60s} {r['acc']:9.4f} {r['f1']:9.4f} {r['auc']:6.3f} {r['best']:15.4f}", flush=True)
    if args.no_probes:
        return
    if args.features.exists():
        feats = torch.load(args.features)
    else:
        model, tok = load_model()
        bank = PromptBank(model, tok)
        entry = bank.add("tweet", args.template, verbalizer=data.task.verbalizer)
        t = time.perf_counter()
        feats = {"train": hidden_states(model, bank, entry, train), "test": hidden_states(model, bank, entry, test)}
        print(f"hidden states of {len(train) + len(test)} tweets: {time.perf_counter() - t:.0f} s")
        args.features.parent.mkdir(parents=True, exist_ok=True)
        torch.save(feats, args.features)
    labels = ["complaint", "no complaint"]
    y = torch.tensor([ex.label == "complaint" for ex in train]).float()
    gold = [ex.label for ex in test]
    rows = []
    for k, pooling in enumerate(("mean", "last")):  # the order hidden_states returns
        xtr_all, xte_all = feats["train"][k], feats["test"][k]
        for layer in range(xtr_all.shape[1]):
            xtr, xte = xtr_all[:, layer], xte_all[:, layer]
            mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
            xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
            cv = {lam: cv_accuracy(xtr, y, lam) for lam in PENALTIES}
            lam = max(PENALTIES, key=lambda v: (cv[v], v))  # ties: the stronger penalty
            w, b = fit_probe(xtr, y, lam)
            pred = [labels[0] if s > 0 else labels[1] for s in (xte @ w + b).tolist()]
            m = classification_metrics(gold, pred, labels)
            rows.append(dict(pooling=pooling, layer=layer, penalty=lam, cv=cv[lam], acc=m["accuracy"], f1=m["macro_f1"]))
    print(f"\nlinear probes, 50 training tweets, {len(test)} test tweets; template {args.template!r}")
    print(f"{'pooling':8s} {'layer':>5s} {'penalty':>8s} {'CV acc':>7s} {'test acc':>9s} {'macro-F1':>9s}")
    for r in rows:
        print(f"{r['pooling']:8s} {r['layer']:5d} {r['penalty']:8g} {r['cv']:7.3f} {r['acc']:9.4f} {r['f1']:9.4f}")
    for pooling in ("mean", "last"):
        mine = [r for r in rows if r["pooling"] == pooling]
        oracle = max(mine, key=lambda r: r["acc"])
        by_cv = max(mine, key=lambda r: (r["cv"], r["layer"]))
        print(f"{pooling}: best layer by test accuracy (optimistic) {oracle['layer']}: {oracle['acc']:.4f} / "
              f"{oracle['f1']:.4f}; chosen by CV, layer {by_cv['layer']}: {by_cv['acc']:.4f} / {by_cv['f1']:.4f}")


if __name__ == "__main__":
    main()
