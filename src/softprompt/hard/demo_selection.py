"""Nearest-neighbour demonstrations for few-shot prompts (KATE, Liu et al. 2022).

Each query gets the ``k`` labelled training examples most similar to it: cosine similarity of
mean-pooled last hidden states of a frozen encoder, by default the frozen LM itself (any model
whose ``base_model`` returns ``last_hidden_state``: a decoder, or the embedded MiniLM encoder,
``load_model("minilm-l6")``). Demonstrations are ordered least similar first, so the nearest one
sits right before the query.

Per-query demonstrations make the prompt differ per query. The least invasive way to score that
with the shared machinery is a bank entry per query (its demonstrations are its cached head), in
chunks that are removed again, so memory stays bounded by the chunk size whatever the number of
queries (``knn_few_shot_classify``); all queries of a chunk are scored in batches. Calibration:
one scoring pass gives the raw scores every calibration is derived from: ``batch`` fits one prior
over all queries' raw scores; ``contextual`` and ``pmi`` fit each query's own prompt (1-3 extra rows
per query, scored together per chunk). The pool's embeddings are computed once per pool and
encoder when a ``PoolEmbeddings`` is passed (a comparison holds one).
"""
from __future__ import annotations

import torch

from ..core.calibration import CALIBRATIONS, batch_calibration
from ..core.calibrate import fit_per_entry
from ..core.conditioning import pad_right
from ..core.scoring import Classification, classification_metrics, classify, length_sorted_batches
from ..data import Example, Task
from ..core.templates import encode_text

ORDERS = ("nearest_last", "nearest_first")


def example_text(ex: Example, fields) -> str:
    """The text that stands for an example when comparing inputs: its fields, one per line."""
    return "\n".join(" ".join(str(ex.fields[f]).split()) for f in fields)


@torch.no_grad()
def mean_pooled(model, tokenizer, texts: list[str], *, batch_size: int = 16, max_tokens: int = 256) -> torch.Tensor:
    """[N, d] L2-normalised means of the last hidden states over each text's tokens (at most
    ``max_tokens``, so memory is bounded; BOS/CLS added when the tokenizer has one)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        bos = getattr(tokenizer, "cls_token_id", None)
    ids = [([bos] if bos is not None else []) + encode_text(tokenizer, t)[: max_tokens] for t in texts]
    ids = [s if s else [tokenizer.unk_token_id or 0] for s in ids]
    device = model.get_input_embeddings().weight.device
    out = torch.empty(len(texts), model.get_input_embeddings().weight.shape[1])
    for idx in length_sorted_batches([len(s) for s in ids], batch_size):
        x, mask = pad_right([ids[i] for i in idx], device=device)
        hidden = model.base_model(input_ids=x, attention_mask=mask).last_hidden_state.float()
        m = mask[..., None].float()
        pooled = (hidden * m).sum(1) / m.sum(1)
        out[torch.tensor(idx)] = pooled.cpu()
    return torch.nn.functional.normalize(out, dim=-1)


class PoolEmbeddings:
    """The demonstration pool's embeddings, computed once and reused while the pool texts and the
    encoder stay the same: they do not depend on the queries, and a comparison selects demonstrations
    for several query sets (test, validation, each latency probe) from one pool.  Another pool or
    encoder recomputes (the key holds the texts and the model and tokenizer objects themselves)."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._emb: torch.Tensor | None = None
        self.computed = 0  # how many times the pool was embedded (what the cache saves is visible)

    def get(self, model, tokenizer, texts: list[str], *, batch_size: int = 16) -> torch.Tensor:
        """[N, d] embeddings of ``texts`` (``mean_pooled``), from the cache when the key matches."""
        key = (model, tokenizer, tuple(texts))
        k = self._key
        if k is None or k[0] is not model or k[1] is not tokenizer or k[2] != key[2]:
            self._emb = mean_pooled(model, tokenizer, texts, batch_size=batch_size)
            self._key = key
            self.computed += 1
        return self._emb


def nearest(query_emb: torch.Tensor, pool_emb: torch.Tensor, k: int,
            exclude: list[set[int]] | None = None) -> tuple[list[list[int]], list[list[float]]]:
    """Per query, the indices of the ``k`` most similar pool rows (most similar first) and
    their cosine similarities; ``exclude[i]`` are pool rows query ``i`` may not use."""
    sims = query_emb @ pool_emb.T
    if exclude:
        for i, rows in enumerate(exclude):
            if rows:
                sims[i, list(rows)] = float("-inf")
    kk = min(k, pool_emb.shape[0])
    vals, idx = sims.topk(kk, dim=-1)
    return idx.tolist(), vals.tolist()


def select_demos_knn(queries: list[Example], pool: list[Example], k: int, *, model, tokenizer, fields=None,
                     batch_size: int = 16, order: str = "nearest_last", exclude_identical: bool = True,
                     pool_embeddings: torch.Tensor | None = None, pool_cache: PoolEmbeddings | None = None
                     ) -> tuple[list[list[Example]], list[list[int]]]:
    """Per query, its ``k`` nearest labelled pool examples (see module doc) and their pool indices.
    ``pool_cache`` keeps the pool's embeddings between calls (``PoolEmbeddings``).

    ``exclude_identical``: a pool example with exactly the query's fields is skipped (a training
    example scored against the training pool must not see its own label)."""
    if order not in ORDERS:
        raise ValueError(f"unknown demonstration order {order!r}; choose one of {', '.join(ORDERS)}")
    if k <= 0:
        raise ValueError(f"k must be >= 1, got {k}")
    if not pool or any(ex.label is None for ex in pool):
        raise ValueError("nearest-neighbour demonstrations need a pool of labelled examples")
    fields = tuple(fields or sorted(pool[0].fields))
    if pool_embeddings is None:
        texts = [example_text(ex, fields) for ex in pool]
        pool_embeddings = (pool_cache.get(model, tokenizer, texts, batch_size=batch_size) if pool_cache is not None
                           else mean_pooled(model, tokenizer, texts, batch_size=batch_size))
    q_emb = mean_pooled(model, tokenizer, [example_text(ex, fields) for ex in queries], batch_size=batch_size)
    exclude = None
    if exclude_identical:
        where: dict[tuple, set[int]] = {}
        for j, ex in enumerate(pool):
            where.setdefault(tuple(sorted(ex.fields.items())), set()).add(j)
        exclude = [where.get(tuple(sorted(q.fields.items())), set()) for q in queries]
    idx, _ = nearest(q_emb, pool_embeddings, k, exclude)
    if order == "nearest_last":
        idx = [list(reversed(r)) for r in idx]
    return [[pool[j] for j in r] for r in idx], idx


@torch.no_grad()
def knn_few_shot_classify(bank, task: Task, queries: list[Example], pool: list[Example], k: int, *,
                          instruction: str | None = None, calibration: str = "none", embedder=None,
                          order: str = "nearest_last", batch_size: int = 16, chunk: int = 32,
                          class_prior=None, calibrations=(), pool_cache: PoolEmbeddings | None = None
                          ) -> Classification:
    """Few-shot rank classification with each query's own nearest demonstrations.

    One scoring pass gives the raw label scores; every calibration in ``calibrations`` (and
    ``calibration``, which decides the predictions) is derived from them: ``batch`` fits one
    prior over all queries' raw scores, ``contextual`` and ``pmi`` each query's own prompt (their
    rows scored together per chunk, ``calibrate.fit_per_entry``).  The result carries
    ``by_calibration`` ({method: [N, L] scores}) and ``demos`` (pool indices per query, in prompt
    order) as attributes.  ``embedder``: a ``(model, tokenizer)`` pair for the similarities
    (default: the bank's frozen LM); ``pool_cache``: keeps the pool's embeddings between calls;
    ``class_prior``: see ``calibrate.fit_calibration``."""
    from .baselines import few_shot_template

    cals = list(dict.fromkeys([*calibrations, calibration]))
    bad = [c for c in cals if c not in CALIBRATIONS]
    if bad:
        raise ValueError(f"unknown calibration {bad[0]!r}; choose one of {', '.join(CALIBRATIONS)}")
    emb_model, emb_tok = embedder if embedder is not None else (bank.model, bank.tokenizer)
    demos, demo_idx = select_demos_knn(queries, pool, k, model=emb_model, tokenizer=emb_tok, fields=task.input_fields,
                                       batch_size=batch_size, order=order, pool_cache=pool_cache)
    labels = task.labels
    raw = torch.empty(len(queries), len(labels))
    per_query = {c: torch.empty(len(queries), len(labels)) for c in cals if c in ("contextual", "pmi")}
    for start in range(0, len(queries), chunk):
        rows = range(start, min(start + chunk, len(queries)))
        names = [f"__knn{i}__" for i in rows]
        for n, i in zip(names, rows):
            bank.add(n, few_shot_template(task, demos[i], instruction), verbalizer=task.verbalizer)
        try:
            entries = [bank.index(n) for n in names]
            part = classify(bank, entries, [Example(queries[i].fields) for i in rows], batch_size=batch_size)
            raw[start: start + len(names)] = part.scores
            for c, out in per_query.items():
                fitted = fit_per_entry(bank, entries, c, batch_size=batch_size, class_prior=class_prior)
                for j, (i, cal) in enumerate(zip(rows, fitted)):
                    out[i] = cal.apply(part.scores[j])
        finally:
            for n in names:
                bank.remove(n)
    by_cal = {"none": raw, **per_query}
    if "batch" in cals:
        by_cal["batch"] = batch_calibration(raw, class_prior).apply(raw)
    scores = by_cal[calibration]
    preds = [labels[j] for j in scores.argmax(-1).tolist()]
    res = Classification(labels=labels, predictions=preds, probabilities=scores.softmax(-1), scores=scores,
                         raw_scores=raw, calibration=calibration)
    gold = [ex.label for ex in queries]
    if all(g is not None for g in gold):
        res.metrics = classification_metrics(gold, preds, labels)
    res.demos = demo_idx  # type: ignore[attr-defined]
    res.by_calibration = {c: by_cal[c] for c in cals}  # type: ignore[attr-defined]
    return res
