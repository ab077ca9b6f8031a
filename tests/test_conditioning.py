"""Mechanics of prompt conditioning on tiny random models: exact, fast checks."""
import pytest
import torch

from softprompt.core.bank import PromptBank
from softprompt.core.conditioning import continuation_logprobs, greedy_generate, label_logprobs, run_context
from softprompt.data import Example
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


def _with_prefix_entry(bank, n_prefix=3, seed=5):
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(bank.kv_shape(n_prefix), generator=g)
    bank.add("p", "review : {text} label :", kv=kv, verbalizer={"pos": " good", "neg": " not good"})
    bank.add("pg", "question : {text} answer :", kv=kv * 0.5, kind="generation")
    return bank


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_tuning_mixes_with_prompt_tuning(family):
    bank = _with_prefix_entry(make_bank(family))
    entries = [3, 0, 3, 1, 3, 0]
    with torch.no_grad():
        mixed = _scores(bank, entries, TEXTS)
        for e, t, m in zip(entries, TEXTS, mixed):
            (alone,) = _scores(bank, [e], [t])
            torch.testing.assert_close(m, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_generation_with_cache_equals_without(family):
    """Greedy decoding on the KV cache gives the same tokens as re-running the whole sequence
    (learned prefix + template + generated tokens) at every step."""
    from softprompt.core.cache_api import cache_arg, make_cache

    bank = _with_prefix_entry(make_bank(family))
    e = bank.index("pg")
    entry = bank.entries[e]
    with torch.no_grad():
        for text in ["why is my refund delayed", "good"]:
            suffix = bank.suffix_ids(e, {"text": text})
            ctx = run_context(bank, torch.tensor([e]), [suffix])
            (cached,) = greedy_generate(bank, ctx, max_new_tokens=8, stop_ids=set())
            ids = entry.prefix_ids + suffix
            learned = [(entry.kv[l, 0][None], entry.kv[l, 1][None]) for l in range(entry.kv.shape[0])]
            out = []
            for _ in range(8):
                full = torch.tensor([ids + out])
                n = entry.n_prefix
                h = bank.model.base_model(
                    input_ids=full, attention_mask=torch.ones(1, n + full.shape[1], dtype=torch.long),
                    position_ids=n + torch.arange(full.shape[1])[None], **cache_arg(bank.model.base_model, make_cache(learned)),
                    use_cache=False,
                ).last_hidden_state[0, -1]
                out.append(int(bank.model.get_output_embeddings()(h).argmax()))
            assert cached == out


def test_prefix_prompt_trains_and_round_trips(tmp_path):
    from softprompt.core.prompts import SoftPrompt
    from softprompt.data import Task
    from softprompt.training.prompt import TrainConfig, train_prompt

    model, tok = tiny_causal_lm(), tiny_tokenizer()
    task = Task(name="toy", kind="classification", template="review : {text} label :",
                verbalizer={"pos": " yes", "neg": " no"})
    pos = ["good movie", "great film", "love this movie", "amazing film"]
    neg = ["bad movie", "awful film", "hate this movie", "terrible film"]
    exs = [Example({"text": t}, "pos") for t in pos] + [Example({"text": t}, "neg") for t in neg]
    res = train_prompt(model, tok, task, exs, exs, TrainConfig(method="prefix", prefix_tokens=2, epochs=10, lr=0.1,
                       batch_size=4, init="vocab", warmup_steps=2), out_dir=tmp_path, progress=False)
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    sp = SoftPrompt.load(tmp_path / "prompt.safetensors", model=model)
    assert sp.method == "prefix_tuning" and sp.kv.shape == PromptBank(model, tok).kv_shape(2) and sp.n_tokens == 0
    b1, b2 = PromptBank(model, tok), PromptBank(model, tok)
    b1.add_prompt(res.prompt, "x")
    b2.add_prompt(sp, "x")
    from softprompt.core.scoring import classify
    assert torch.equal(classify(b1, "x", exs).scores, classify(b2, "x", exs).scores)


def test_template_without_any_prefix_tokens():
    """No BOS and a template that starts with its field: an empty prefix still works and
    mixes with entries that have one."""
    bank = make_bank("llama")
    bank.tokenizer.bos_token = None
    assert bank.tokenizer.bos_token_id is None
    e = bank.add("bare", "{text} label :", verbalizer={"pos": " good", "neg": " bad"})
    assert bank.entries[e].prefix_ids == []
    with torch.no_grad():
        mixed = _scores(bank, [e, 0, e], TEXTS[:3])
        for i, ent in enumerate([e, 0, e]):
            (alone,) = _scores(bank, [ent], [TEXTS[i]])
            torch.testing.assert_close(mixed[i], alone, atol=1e-5, rtol=0)
