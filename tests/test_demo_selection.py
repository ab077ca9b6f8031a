"""Nearest-neighbour demonstrations on a tiny random model: the chosen neighbours are the most
similar by an independent computation, and per-query few-shot scoring equals scoring each
query's own few-shot prompt, calibrated or not."""
import pytest
import torch

from softprompt.hard import baselines as B
from softprompt.hard import demo_selection as D
from softprompt.core.bank import PromptBank
from softprompt.core.calibration import Calibration, log_prior_from_scores
from softprompt.core.calibrate import fit_calibration
from softprompt.core.scoring import classify
from softprompt.data import Example, Task
from softprompt.core.templates import encode_text
from softprompt.testing import tiny_causal_lm

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

TASK = Task(name="toy", kind="classification", template="{soft:4} review : {text} label :",
            verbalizer={"neg": " no", "pos": " yes"}, instruction="is the review good ?")
POS = ["good movie", "great film", "love this movie", "amazing film", "happy great", "good good"]
NEG = ["bad movie", "awful film", "hate this movie", "terrible film", "sad awful", "bad bad slow"]
POOL = [Example({"text": t}, "pos") for t in POS] + [Example({"text": t}, "neg") for t in NEG]
QUERIES = [Example({"text": t}, lab) for t, lab in [("good film", "pos"), ("awful movie", "neg"),
                                                     ("love it", "pos"), ("slow film", "neg"), ("bad movie", "neg")]]


@torch.no_grad()
def one_by_one(model, tok, text):
    ids = [tok.bos_token_id] + encode_text(tok, text)
    h = model.base_model(input_ids=torch.tensor([ids])).last_hidden_state[0].mean(0)
    return torch.nn.functional.normalize(h, dim=0)


def test_mean_pooled_equals_one_by_one(lm):
    model, tok = lm
    texts = [ex.fields["text"] for ex in POOL]
    emb = D.mean_pooled(model, tok, texts, batch_size=4)  # padded, length-sorted batches
    for e, t in zip(emb, texts):
        assert torch.allclose(e, one_by_one(model, tok, t), atol=1e-5)


def test_neighbours_are_the_most_similar(lm):
    model, tok = lm
    k = 3
    demos, idx = D.select_demos_knn(QUERIES, POOL, k, model=model, tokenizer=tok, fields=("text",))
    pool_emb = torch.stack([one_by_one(model, tok, ex.fields["text"]) for ex in POOL])
    for q, ds, ix in zip(QUERIES, demos, idx):
        sims = pool_emb @ one_by_one(model, tok, q.fields["text"])
        allowed = [j for j in range(len(POOL)) if POOL[j].fields != q.fields]  # its own copy is skipped
        best = sorted(allowed, key=lambda j: -float(sims[j]))[:k]
        assert set(ix) == set(best) and [POOL[j] for j in ix] == ds
        assert [float(sims[j]) for j in ix] == sorted(float(sims[j]) for j in ix)  # nearest last
    # "bad movie" is in the pool: with copies allowed it is its own nearest neighbour (cosine 1)
    _, idx2 = D.select_demos_knn(QUERIES[-1:], POOL, 2, model=model, tokenizer=tok, exclude_identical=False,
                                 order="nearest_first")
    assert POOL[idx2[0][0]].fields == {"text": "bad movie"}
    with pytest.raises(ValueError, match="labelled"):
        D.select_demos_knn(QUERIES, [Example({"text": "x"})], 1, model=model, tokenizer=tok)
    with pytest.raises(ValueError, match="order"):
        D.select_demos_knn(QUERIES, POOL, 1, model=model, tokenizer=tok, order="random")


@pytest.mark.parametrize("cal", ["none", "contextual", "pmi", "batch"])
def test_knn_few_shot_equals_each_querys_own_prompt(lm, cal):
    model, tok = lm
    bank = PromptBank(model, tok)
    res = D.knn_few_shot_classify(bank, TASK, QUERIES, POOL, 2, calibration=cal, chunk=2, batch_size=3)
    assert len(bank) == 0  # per-query entries are removed again
    raws, scores = [], []
    for q, ix in zip(QUERIES, res.demos):
        ref = PromptBank(model, tok)
        ref.add("q", B.few_shot_template(TASK, [POOL[j] for j in ix]), verbalizer=TASK.verbalizer)
        c = fit_calibration(ref, "q", cal) if cal in ("contextual", "pmi") else Calibration()
        r = classify(ref, "q", [q], calibration=c)
        raws.append(r.raw_scores[0])
        scores.append(r.scores[0])
    raw = torch.stack(raws)
    want = Calibration("batch", log_prior_from_scores(raw)).apply(raw) if cal == "batch" else torch.stack(scores)
    assert torch.allclose(res.raw_scores, raw, atol=1e-4) and torch.allclose(res.scores, want, atol=1e-4)
    assert res.predictions == [TASK.labels[j] for j in want.argmax(-1).tolist()]
    assert res.metrics["n"] == len(QUERIES) and res.calibration == cal


def test_mean_pooled_with_an_encoder_model():
    """The MiniLM option: any encoder whose base_model gives last_hidden_state (a tiny BERT here);
    its [CLS] token opens each text."""
    from test_encoder import tiny_bert, tiny_bert_tokenizer

    model, tok = tiny_bert(), tiny_bert_tokenizer()
    texts = ["good movie", "bad film", "great"]
    emb = D.mean_pooled(model, tok, texts, batch_size=2)
    for e, t in zip(emb, texts):
        ids = [tok.cls_token_id] + encode_text(tok, t)
        h = model(input_ids=torch.tensor([ids])).last_hidden_state[0].mean(0)
        assert torch.allclose(e, torch.nn.functional.normalize(h, dim=0), atol=1e-5)


def test_knn_batch_calibration_with_a_class_prior(lm):
    model, tok = lm
    bank = PromptBank(model, tok)
    plain = D.knn_few_shot_classify(bank, TASK, QUERIES, POOL, 2, calibration="batch")
    aimed = D.knn_few_shot_classify(bank, TASK, QUERIES, POOL, 2, calibration="batch", class_prior=[0.2, 0.8])
    want = plain.scores + torch.tensor([0.2, 0.8]).log()
    assert torch.allclose(aimed.scores, want, atol=1e-5)


def reference_one_by_one(model, tok, queries, k, calibrations):
    """The old path, written out: per query, the pool embedded again, its neighbours chosen, its
    prompt scored alone and each calibration fitted by its own scoring."""
    raws, per_cal = [], {c: [] for c in calibrations}
    for q in queries:
        pool_emb = torch.stack([one_by_one(model, tok, ex.fields["text"]) for ex in POOL])
        sims = pool_emb @ one_by_one(model, tok, q.fields["text"])
        allowed = [j for j in range(len(POOL)) if POOL[j].fields != q.fields]
        near = sorted(allowed, key=lambda j: -float(sims[j]))[:k][::-1]  # nearest last
        bank = PromptBank(model, tok)
        bank.add("q", B.few_shot_template(TASK, [POOL[j] for j in near]), verbalizer=TASK.verbalizer)
        r = classify(bank, "q", [Example(q.fields)], batch_size=1)
        raws.append(r.raw_scores[0])
        for c in calibrations:
            if c in ("contextual", "pmi"):
                per_cal[c].append(fit_calibration(bank, "q", c, batch_size=1).apply(r.raw_scores[0]))
    raw = torch.stack(raws)
    out = {"none": raw, "batch": Calibration("batch", log_prior_from_scores(raw)).apply(raw)}
    out.update({c: torch.stack(v) for c, v in per_cal.items() if v})
    return {c: out[c] for c in calibrations}


def test_knn_one_pass_equals_the_per_query_path(lm):
    """The fast path (pool embedded once, one scoring pass, per-query priors scored together in
    chunks, batch calibration from the raw scores) predicts what the per-query path predicts,
    under every calibration, and never embeds the same pool twice."""
    model, tok = lm
    cals = ("none", "contextual", "batch", "pmi")
    want = reference_one_by_one(model, tok, QUERIES, 3, cals)
    bank = PromptBank(model, tok)
    cache = D.PoolEmbeddings()
    res = D.knn_few_shot_classify(bank, TASK, QUERIES, POOL, 3, calibrations=cals, pool_cache=cache, chunk=3,
                                  batch_size=4)
    assert len(bank) == 0 and list(res.by_calibration) == list(cals)
    for c in cals:
        got = res.by_calibration[c]
        assert got.argmax(-1).tolist() == want[c].argmax(-1).tolist(), c
        assert torch.allclose(got, want[c], atol=1e-4), c
    assert res.predictions == [TASK.labels[j] for j in want["none"].argmax(-1).tolist()]
    # the cache: a second query set reuses the pool's embeddings; another pool or encoder recomputes
    again = D.knn_few_shot_classify(bank, TASK, QUERIES[:2], POOL, 3, calibration="contextual", pool_cache=cache)
    assert cache.computed == 1
    assert torch.allclose(again.scores, want["contextual"][:2], atol=1e-4)
    D.select_demos_knn(QUERIES, POOL[:-1], 3, model=model, tokenizer=tok, pool_cache=cache)
    assert cache.computed == 2
    other = tiny_causal_lm("llama", seed=1)
    D.select_demos_knn(QUERIES, POOL[:-1], 3, model=other, tokenizer=tok, pool_cache=cache)
    assert cache.computed == 3
