"""Label scoring without per-label copies of the context, in bounded passes: the packed
("lane") scorer must give the numbers of the straightforward one, for any budget."""
import pytest
import torch
import torch.nn.functional as F

from softprompt.core.bank import PromptBank
from softprompt.core.cache_api import cache_arg
from softprompt.core.conditioning import (
    Context, continuation_logprobs, label_logprobs, lm_logits, make_cache, pad_right, run_context, token_logprobs,
)
from softprompt.testing import TINY_WORDS, tiny_causal_lm, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ["llama", "qwen2", "gpt2"]
TEXTS = [
    "the movie was good", "awful service , slow flight and broken order", "great", "why is my refund delayed please help",
    "it was not bad", "love this film",
]


def reference_continuation_logprobs(bank, ctx: Context, rows, conts):
    """The straightforward scorer (what continuation_logprobs did before): every multi-token
    continuation runs on its own gathered copy of its row's context key/values."""
    model = bank.model
    rows_t = torch.tensor(rows)
    uniq, inv = rows_t.unique(return_inverse=True)
    first_lp = F.log_softmax(lm_logits(model, ctx.last_hidden.index_select(0, uniq)), dim=-1)
    total = first_lp[inv, torch.tensor([c[0] for c in conts])]
    multi = [i for i, c in enumerate(conts) if len(c) > 1]
    if not multi:
        return total
    sub = ctx.select(rows_t[multi])
    ids, cmask = pad_right([conts[i][:-1] for i in multi])
    tgt, _ = pad_right([conts[i][1:] for i in multi])
    positions = sub.next_pos[:, None] + torch.arange(ids.shape[1])[None, :]
    out = model.base_model(input_ids=ids, attention_mask=torch.cat([sub.mask, cmask], dim=1), position_ids=positions,
                           **cache_arg(model.base_model, make_cache(sub.layers)), use_cache=False)
    sel = cmask.bool()
    lp = F.log_softmax(lm_logits(model, out.last_hidden_state[sel]), dim=-1)
    tok_lp = lp.gather(-1, tgt[sel][:, None]).squeeze(-1)
    row_of = torch.arange(len(multi))[:, None].expand_as(sel)[sel]
    extra = torch.zeros(len(multi)).index_add(0, row_of, tok_lp)
    return total.index_add(0, torch.tensor(multi), extra)


def many_label_bank(family, n_labels=40, seed=3):
    """Two classification entries with many labels of 1-4 tokens (and one generation entry)."""
    model, tok = tiny_causal_lm(family), tiny_tokenizer()
    bank = PromptBank(model, tok)
    g = torch.Generator().manual_seed(seed)
    words = list(TINY_WORDS)

    def verbalizer(n):
        out = {}
        for j in range(n):
            k = 1 + int(torch.randint(0, 4, (1,), generator=g))
            out[f"l{j}"] = " " + " ".join(words[int(w)] for w in torch.randint(0, len(words), (k,), generator=g))
        return out

    bank.add("a", "{soft:3} review : {text} label :", torch.randn(3, 32, generator=g), verbalizer=verbalizer(n_labels))
    bank.add("b", "tweet : {text} {soft:2} answer :", torch.randn(2, 32, generator=g), verbalizer=verbalizer(7))
    return bank


def _ctx(bank, entries, texts):
    return run_context(bank, torch.tensor(entries), [bank.suffix_ids(e, {"text": t}) for e, t in zip(entries, texts)])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("budget", [1, 40, 300, 1 << 20])
def test_packed_label_scores_equal_reference(family, budget):
    """Mixed entries, many labels of 1-4 tokens, budgets from 'one lane per pass' (1) to 'all
    at once': the same scores as the per-label-copy reference, to float rounding."""
    bank = many_label_bank(family)
    entries = [0, 1, 0, 0, 1, 0]
    with torch.no_grad():
        ctx = _ctx(bank, entries, TEXTS)
        rows, conts = [], []
        for b, e in enumerate(entries):
            for ids in bank.entries[e].label_ids:
                rows.append(b)
                conts.append(ids)
        assert {len(c) for c in conts} == {1, 2, 3, 4}
        ours = continuation_logprobs(bank, ctx, rows, conts, max_batch_tokens=budget)
        ref = reference_continuation_logprobs(bank, ctx, rows, conts)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=0)


def test_unordered_rows_and_long_targets_equal_reference():
    """Continuations given in any row order, several per row, some long (generation targets)."""
    bank = many_label_bank("llama", n_labels=5)
    with torch.no_grad():
        ctx = _ctx(bank, [0, 1, 0], TEXTS[:3])
        tok = bank.tokenizer
        conts = [tok(t, add_special_tokens=False).input_ids for t in
                 ["the world is great", "no", "why is my refund delayed please help", "good movie", "a", "yes maybe"]]
        rows = [2, 0, 1, 2, 0, 1]
        for budget in (1, 30, 10_000):
            ours = continuation_logprobs(bank, ctx, rows, conts, max_batch_tokens=budget)
            torch.testing.assert_close(ours, reference_continuation_logprobs(bank, ctx, rows, conts), atol=2e-5, rtol=0)


def test_eager_attention_and_fallback_without_tree_masks_agree():
    """The 4D mask works for eager attention too, and an attention implementation that takes
    no custom mask (flash attention) falls back to one continuation per lane."""
    import softprompt.core.conditioning as cond

    bank = many_label_bank("llama", n_labels=12)
    with torch.no_grad():
        ctx = _ctx(bank, [0, 0, 0], TEXTS[:3])
        ref = torch.stack(label_logprobs(bank, ctx))
        bank.model.config._attn_implementation = "eager"
        try:
            torch.testing.assert_close(torch.stack(label_logprobs(bank, ctx)), ref, atol=2e-5, rtol=0)
        finally:
            bank.model.config._attn_implementation = "sdpa"
        old = cond.TREE_MASK_ATTENTION
        cond.TREE_MASK_ATTENTION = ()
        try:
            torch.testing.assert_close(torch.stack(label_logprobs(bank, ctx, max_batch_tokens=50)), ref, atol=2e-5, rtol=0)
        finally:
            cond.TREE_MASK_ATTENTION = old


def test_gradients_equal_reference():
    """Training losses differentiate through the packed scorer: same gradient on the soft tokens."""
    bank = many_label_bank("llama", n_labels=9)
    grads = []
    for scorer in ("ours", "ref"):
        soft = bank.entries[0].soft.detach().clone().requires_grad_(True)
        bank.entries[0].soft = soft
        ctx = _ctx(bank, [0, 0], TEXTS[:2])
        rows = [b for b in range(2) for _ in bank.entries[0].label_ids]
        conts = [ids for _ in range(2) for ids in bank.entries[0].label_ids]
        lp = (continuation_logprobs(bank, ctx, rows, conts, max_batch_tokens=64) if scorer == "ours"
              else reference_continuation_logprobs(bank, ctx, rows, conts))
        loss = -lp.view(2, -1).log_softmax(-1)[:, 0].sum()
        loss.backward()
        grads.append(soft.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-4, rtol=1e-4)


def test_token_logprobs_in_chunks(monkeypatch):
    """The vocabulary log-softmax in chunks of rows equals the one-shot version, in any pair order."""
    import softprompt.core.conditioning as cond

    model = tiny_causal_lm("llama")
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(11, 32, generator=g)
    at = torch.tensor([10, 0, 3, 3, 7, 1, 10, 5])
    tokens = torch.randint(0, 160, (8,), generator=g)
    full = F.log_softmax(lm_logits(model, hidden), -1)[at, tokens]
    monkeypatch.setattr(cond, "LOGITS_CHUNK_ELEMENTS", 160 * 3)  # 3 rows per chunk
    torch.testing.assert_close(token_logprobs(model, hidden, at, tokens), full)


def test_no_label_copies_the_context(monkeypatch):
    """The label pass never gathers a copy of the context per label: every lane pass runs at
    most one lane per context row here (the budget holds them all)."""
    import softprompt.core.conditioning as cond

    bank = many_label_bank("llama", n_labels=30)
    seen = []
    real = cond._lane_pass
    monkeypatch.setattr(cond, "_lane_pass", lambda model, ctx, lanes, conts, tree: seen.append(lanes) or real(
        model, ctx, lanes, conts, tree))
    with torch.no_grad():
        label_logprobs(bank, _ctx(bank, [0, 0, 0, 0], TEXTS[:4]))
    assert len(seen) == 1 and [r for r, _ in seen[0]] == [0, 1, 2, 3]


def test_t5_label_scores_in_bounded_passes_equal_one_pass():
    """Encoder-decoders score (example, label) pairs in passes that fit the budget, with the
    same numbers as one pass."""
    from softprompt.families import seq2seq
    from softprompt.testing import tiny_t5

    model, tok = tiny_t5(), tiny_tokenizer()
    bank = PromptBank(model, tok)
    e = bank.add("a", "{soft:3} review : {text} label :", torch.randn(3, 32, generator=torch.Generator().manual_seed(0)),
                 verbalizer={f"l{j}": " " + " ".join(TINY_WORDS[(j + k) % 50] for k in range(1 + j % 3)) for j in range(12)})
    with torch.no_grad():
        enc = seq2seq.encode(bank, torch.tensor([e] * 3), [bank.suffix_ids(e, {"text": t}) for t in TEXTS[:3]])
        calls = []
        real = seq2seq.continuation_logprobs

        def spy(bank_, enc_, rows, conts):
            calls.append(len(rows))
            return real(bank_, enc_, rows, conts)

        seq2seq.continuation_logprobs = spy
        try:
            small = torch.stack(seq2seq.label_logprobs(bank, enc, max_batch_tokens=enc.hidden.shape[1] * 5))
        finally:
            seq2seq.continuation_logprobs = real
        big = torch.stack(seq2seq.label_logprobs(bank, enc, max_batch_tokens=1 << 20))
    assert len(calls) > 1 and max(calls) <= 5
    torch.testing.assert_close(small, big, atol=2e-5, rtol=0)
