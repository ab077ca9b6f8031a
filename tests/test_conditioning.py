"""Mechanics of prompt conditioning on tiny random models: exact, fast checks."""
import pytest
import torch

from softprompt.bank import PromptBank
from softprompt.conditioning import continuation_logprobs, greedy_generate, label_logprobs, run_context
from softprompt.tasks import Example
from softprompt.testing import tiny_causal_lm, tiny_tokenizer

FAMILIES = ["llama", "qwen2", "gpt2"]
TEXTS = [
    "the movie was good", "awful service , slow flight and broken order", "great", "why is my refund delayed please help",
    "it was not bad", "love this film",
]


def make_bank(family):
    model, tok = tiny_causal_lm(family), tiny_tokenizer()
    bank = PromptBank(model, tok)
    g = torch.Generator().manual_seed(1)
    bank.add("a", "{soft:3} review : {text} label :", torch.randn(3, 32, generator=g),
             verbalizer={"pos": " good", "neg": " not good"})
    bank.add("b", "{soft:5} tweet : {text} {soft:2} answer :", torch.randn(7, 32, generator=g),
             verbalizer={"yes": " yes", "no": " no", "maybe": " maybe not"})
    bank.add("c", "question : {text} answer :", kind="generation")
    return bank


def _scores(bank, entries, texts):
    ctx = run_context(bank, torch.tensor(entries), [bank.suffix_ids(e, {"text": t}) for e, t in zip(entries, texts)])
    return label_logprobs(bank, ctx)


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch_equals_one_by_one(family):
    bank = make_bank(family)
    entries = [0, 1, 0, 1, 1, 0]
    with torch.no_grad():
        mixed = _scores(bank, entries, TEXTS)
        for e, t, m in zip(entries, TEXTS, mixed):
            (alone,) = _scores(bank, [e], [t])
            torch.testing.assert_close(m, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_kv_equals_full_sequence(family):
    """Scoring from the cached prefix equals running prompt + input + label as one sequence."""
    bank = make_bank(family)
    model = bank.model
    with torch.no_grad():
        (scores,) = _scores(bank, [1], [TEXTS[1]])
        e = bank.entries[1]
        ids = e.prefix_ids + bank.suffix_ids(1, {"text": TEXTS[1]})
        for j, lab in enumerate(e.label_ids):
            full = torch.tensor([ids + lab])
            emb = bank.embed(full, torch.tensor([1]))
            logits = model(inputs_embeds=emb).logits.log_softmax(-1)[0]
            n = len(ids)
            ref = sum(logits[n - 1 + k, t] for k, t in enumerate(lab))
            torch.testing.assert_close(scores[j], ref, atol=1e-5, rtol=0)


def test_gradient_reaches_prefix_and_suffix_soft_tokens():
    bank = make_bank("llama")
    soft = bank.entries[1].soft.clone().requires_grad_(True)
    bank.entries[1].soft = soft
    ctx = run_context(bank, torch.tensor([1, 1]), [bank.suffix_ids(1, {"text": t}) for t in TEXTS[:2]])
    loss = -torch.stack(label_logprobs(bank, ctx))[:, 0].sum()
    loss.backward()
    assert soft.grad is not None
    assert (soft.grad.abs().sum(-1) > 0).all(), "every soft token (prefix and suffix slots) gets a gradient"


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_hf_generate(family):
    bank = make_bank(family)
    model = bank.model
    texts = ["why is my refund delayed", "good"]
    with torch.no_grad():
        ctx = run_context(bank, torch.tensor([2, 2]), [bank.suffix_ids(2, {"text": t}) for t in texts])
        ours = greedy_generate(bank, ctx, max_new_tokens=6, stop_ids=set())
        for t, o in zip(texts, ours):
            ids = torch.tensor([bank.entries[2].prefix_ids + bank.suffix_ids(2, {"text": t})])
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                 eos_token_id=None, pad_token_id=3)[0, ids.shape[1]:].tolist()
            assert o == ref[: len(o)] and len(o) == 6


def test_continuation_with_multi_token_target_matches_full_pass():
    bank = make_bank("llama")
    with torch.no_grad():
        ids = bank.suffix_ids(2, {"text": "who"})
        ctx = run_context(bank, torch.tensor([2]), [ids])
        target = bank.tokenizer("the world is great", add_special_tokens=False).input_ids
        lp = continuation_logprobs(bank, ctx, [0], [target])
        full = torch.tensor([bank.entries[2].prefix_ids + ids + target])
        logits = bank.model(full).logits.log_softmax(-1)[0]
        n = full.shape[1] - len(target)
        ref = sum(logits[n - 1 + k, t] for k, t in enumerate(target))
        torch.testing.assert_close(lp[0], ref, atol=1e-5, rtol=0)
