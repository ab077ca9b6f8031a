"""Packed rows (core/packing.py): several examples and their label lanes in one row under a
block-diagonal tree mask compute what the unpacked ``full`` step and the ``cached`` step compute."""
import pytest
import torch

from softprompt.core.bank import PromptBank
from softprompt.core.conditioning import continuation_logprobs, full_context, run_context, tree_visibility
from softprompt.core.packing import DEFAULT_PACK_TOKENS, pack_batch, pack_rows, packed_logprobs
from softprompt.data import Example, Task
from softprompt.testing import tiny_causal_lm, tiny_tokenizer
from softprompt.training.prompt import TrainConfig, batch_loss, resolve_context, train_prompt

pytestmark = pytest.mark.usefixtures("one_thread")

TEMPLATE = "{soft:3} review : {text} {soft:2} label :"
VERBALIZER = {"pos": " good", "neg": " not good", "meh": " so so good"}  # 1-, 2- and 3-token label words
TEXTS = ["the movie was good", "awful service , slow flight", "great", "why is my refund delayed", "bad",
         "love this movie"]
LABELS = ["pos", "neg", "meh", "neg", "neg", "pos"]
FAMILIES = ["llama", "qwen2", "gpt2"]


def _bank(model, tok, kind="classification", n_soft=5):
    soft = torch.nn.Parameter(torch.randn(n_soft, 32, generator=torch.Generator().manual_seed(0)))
    bank = PromptBank(model, tok)
    template = TEMPLATE if kind == "classification" else "{soft:4} question : {text} answer :"
    entry = bank.add("t", template, soft, verbalizer=VERBALIZER if kind == "classification" else None, kind=kind)
    return bank, entry, soft


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_label_scores_equal_full_and_cached(family):
    model, tok = tiny_causal_lm(family), tiny_tokenizer()
    bank, entry, _ = _bank(model, tok)
    suffixes = [bank.suffix_ids(entry, {"text": t}) for t in TEXTS]
    idx = torch.full((len(TEXTS),), entry)
    conts = [bank.entries[entry].label_ids] * len(TEXTS)
    rows = [b for b in range(len(TEXTS)) for _ in conts[b]]
    flat = [c for cs in conts for c in cs]
    with torch.no_grad():
        packed = torch.cat(packed_logprobs(bank, idx, suffixes, conts))
        full = continuation_logprobs(bank, full_context(bank, idx, suffixes), rows, flat)
        cached = continuation_logprobs(bank, run_context(bank, idx, suffixes), rows, flat)
    torch.testing.assert_close(packed, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed, cached, atol=1e-5, rtol=1e-5)
    # a tight budget (one example per row) and a loose one (all in one row) give the same numbers
    for budget in (1, 10_000):
        with torch.no_grad():
            other = torch.cat(packed_logprobs(bank, idx, suffixes, conts, pack_tokens=budget))
        torch.testing.assert_close(other, packed, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["classification", "generation"])
def test_packed_loss_and_gradient_equal_full_and_cached(family, kind):
    model, tok = tiny_causal_lm(family), tiny_tokenizer()
    if kind == "classification":
        exs = [Example({"text": t}, label=lab) for t, lab in zip(TEXTS, LABELS)]
    else:
        exs = [Example({"text": t}, target="the world", answers=("the world",)) for t in TEXTS]
    results = {}
    for context in ("cached", "full", "packed"):
        bank, entry, soft = _bank(model, tok, kind, 5 if kind == "classification" else 4)
        loss, n = batch_loss(bank, entry, exs, "rank", context=context)
        loss.backward()
        results[context] = (loss.detach(), soft.grad.clone(), n)
    assert results["packed"][1].abs().sum() > 0
    for ref in ("full", "cached"):
        torch.testing.assert_close(results["packed"][0], results[ref][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(results["packed"][1], results[ref][1], atol=1e-5, rtol=1e-4)
        assert results["packed"][2] == results[ref][2]  # the same tokens counted for throughput


def test_packing_cuts_padding():
    model, tok = tiny_causal_lm(), tiny_tokenizer()
    bank, entry, _ = _bank(model, tok)
    texts = TEXTS + ["a long review : " + " ".join(TEXTS)]  # one long input: the short ones share rows
    suffixes = [bank.suffix_ids(entry, {"text": t}) for t in texts]
    idx = torch.full((len(texts),), entry)
    seqs = [bank.entries[entry].prefix_ids + s for s in suffixes]
    conts = [bank.entries[entry].label_ids] * len(texts)
    alone = pack_batch(seqs, conts, pack_tokens=1)  # one example per row: the unpacked layout
    longest = alone.source.shape[1]
    assert len(alone.rows) == len(texts)
    for budget in (None, 2 * longest):  # default budget: the longest example
        packed = pack_batch(seqs, conts, pack_tokens=budget)
        assert len(packed.rows) < len(texts) and packed.real_tokens == alone.real_tokens
        assert packed.source.shape[1] <= (budget or max(DEFAULT_PACK_TOKENS, longest))
        assert packed.padding < alone.padding
        # and fewer padded slots than full_context's context pass alone (before its padded lane pass)
        assert packed.padding < int((full_context(bank, idx, suffixes).mask == 0).sum())
    with torch.no_grad():  # the same scores whatever the budget
        ref = continuation_logprobs(bank, run_context(bank, idx, suffixes), [b for b in range(len(texts)) for _ in
                                    conts[b]], [c for cs in conts for c in cs])
        for budget in (None, 2 * longest):
            got = torch.cat(packed_logprobs(bank, idx, suffixes, conts, pack_tokens=budget))
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_pack_rows_first_fit_within_budget():
    lengths = [5, 3, 9, 2, 4, 7, 1]
    rows = pack_rows(lengths, 10)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows)
    assert len(rows) == 4  # 31 tokens: 4 rows of 10 is the least possible
    assert pack_rows([12, 3], 10) == [[0], [1]]  # longer than the budget: a row of its own
    # first-fit fills [8, 8, 2, 2] + [8, 8] (widest 20); evened out: [8, 8, 2] + [8, 8, 2] (widest 18)
    assert pack_rows([8, 8, 8, 8, 2, 2], 20) == [[0, 2, 4], [1, 3, 5]]


def test_tree_visibility_is_block_diagonal():
    # row: example 0 = 2 context tokens + a lane of 1; example 1 = 2 context tokens; 1 padding slot
    group = torch.tensor([[0, 0, 0, 1, 1, -1]])
    lane = torch.tensor([[-1, -1, 5, -1, -1, -1]])
    seen = tree_visibility(group, lane)[0]
    assert seen[2].tolist() == [True, True, True, False, False, False]  # the lane sees its own context
    assert seen[3].tolist() == [False, False, False, True, False, False]  # example 1 restarts
    assert seen[5].tolist() == [False] * 5 + [True]  # padding sees only itself (never fully masked)


def test_packed_training_run_gives_the_same_prompt():
    pos = ["good movie", "great film", "love this movie", "amazing film", "good good", "happy great"]
    neg = ["bad movie", "awful film", "hate this movie", "terrible film", "bad bad", "sad awful"]
    task = Task(name="toy", kind="classification", template="{soft:4} review : {text} label :",
                verbalizer={"pos": " yes", "neg": " no not"})
    train = [Example({"text": t}, "pos") for t in pos] + [Example({"text": t}, "neg") for t in neg]
    model, tok = tiny_causal_lm(), tiny_tokenizer()
    cfg = dict(epochs=2, lr=0.1, batch_size=4, init="vocab", warmup_steps=1)
    runs = {c: train_prompt(model, tok, task, train, None, TrainConfig(**cfg, context=c), progress=False)
            for c in ("cached", "full", "packed")}
    runs["packed64"] = train_prompt(model, tok, task, train, None, TrainConfig(**cfg, context="packed", pack_tokens=64),
                                    progress=False)
    for ref in ("cached", "full", "packed64"):
        torch.testing.assert_close(runs["packed"].prompt.embeddings, runs[ref].prompt.embeddings, atol=1e-5, rtol=1e-5)
    assert runs["packed"].prompt.training["context"] == "packed"  # saved with the prompt


def test_packed_refuses_prefix_tuning():
    model, tok = tiny_causal_lm(), tiny_tokenizer()
    assert resolve_context("packed", model) == "packed"
    bank = PromptBank(model, tok)
    kv = torch.zeros(bank.kv_shape(3))
    entry = bank.add("t", TEMPLATE, torch.zeros(5, 32), verbalizer=VERBALIZER, kv=kv)
    exs = [Example({"text": "great"}, label="pos")]
    with pytest.raises(ValueError, match="prefix-tuned"):
        batch_loss(bank, entry, exs, "rank", context="packed")
    task = Task(name="toy", kind="classification", template=TEMPLATE, verbalizer=VERBALIZER)
    with pytest.raises(ValueError, match="prefix tuning"):
        train_prompt(model, tok, task, exs * 4, None, TrainConfig(method="prefix", context="packed", epochs=1),
                     progress=False)


def test_packed_with_eager_attention_and_compiled_forward():
    """The additive block mask works with eager attention too, and through the compiled forward
    (compiled.py: row width bucketed) the packed step gives the eager loss and gradient."""
    model, tok = tiny_causal_lm(), tiny_tokenizer()
    exs = [Example({"text": t}, label=lab) for t, lab in zip(TEXTS, LABELS)]
    results = {}
    for name, compile in (("sdpa", False), ("compiled", True)):
        bank, entry, soft = _bank(model, tok)
        loss, _ = batch_loss(bank, entry, exs, "rank", context="packed", compile=compile, pack_tokens=40)
        loss.backward()
        results[name] = (loss.detach(), soft.grad.clone())
    model.set_attn_implementation("eager")
    bank, entry, soft = _bank(model, tok)
    loss, _ = batch_loss(bank, entry, exs, "rank", context="packed")
    loss.backward()
    results["eager"] = (loss.detach(), soft.grad.clone())
    for name in ("compiled", "eager"):
        torch.testing.assert_close(results[name][0], results["sdpa"][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(results[name][1], results["sdpa"][1], atol=1e-5, rtol=1e-4)


def test_cli_train_context_option(tmp_path, monkeypatch):
    """`softprompt train --context packed` trains packed (saved with the prompt); a bad value and
    prefix tuning are refused before any data or model loads; `eval --context` scores the same."""
    import json

    from typer.testing import CliRunner

    from softprompt.cli import app
    from softprompt.core.prompts import SoftPrompt

    r = CliRunner().invoke(app, ["train", "--task", "sst2", "--context", "fast"])
    assert r.exit_code != 0 and "context must be one of" in r.output
    r = CliRunner().invoke(app, ["train", "--task", "sst2", "--context", "packed", "--method", "prefix"])
    assert r.exit_code != 0 and "prefix tuning" in r.output
    model_dir = tmp_path / "tiny"
    tiny_causal_lm().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in zip(TEXTS, LABELS)))
    r = CliRunner().invoke(app, [
        "train", "--model", str(model_dir), "--train-file", str(data), "--template", "{soft:4} review : {text} label :",
        "--verbalizer", "pos=good", "--verbalizer", "neg=bad", "--verbalizer", "meh=so so", "--epochs", "1",
        "--batch-size", "3", "--init", "vocab", "--context", "packed", "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    assert SoftPrompt.load(tmp_path / "run" / "prompt.safetensors").training["context"] == "packed"
    # `softprompt eval --context`: the same metrics from packed rows as from the cached prompt
    from softprompt.families import decoder

    packed_calls = []
    real = decoder.packed_label_scores
    monkeypatch.setattr(decoder, "packed_label_scores", lambda *a, **k: packed_calls.append(1) or real(*a, **k))
    metrics = {}
    for context in ("cached", "packed"):
        out = tmp_path / f"{context}.json"
        r = CliRunner().invoke(app, ["eval", str(tmp_path / "run" / "prompt.safetensors"), "--model", str(model_dir),
                                     "--test-file", str(data), "--context", context, "--json", str(out)])
        assert r.exit_code == 0, r.output
        metrics[context] = json.loads(out.read_text())["soft"]
    assert metrics["packed"]["n"] == len(TEXTS) and packed_calls  # packed rows really scored
    for key in ("accuracy", "macro_f1"):
        assert metrics["packed"][key] == metrics["cached"][key]
    r = CliRunner().invoke(app, ["eval", "x.safetensors", "--context", "paged"])
    assert r.exit_code != 0 and "context must be one of" in " ".join(r.output.split())
    r = CliRunner().invoke(app, ["eval", "x.safetensors", "--context", "cached", "--compile", "on"])
    assert r.exit_code != 0 and "runs eagerly" in " ".join(r.output.split())


@pytest.mark.parametrize("family", FAMILIES)
def test_classify_packed_equals_cached_and_full(family):
    """Rank classification from packed rows gives the cached and full scores, including for a
    mixed batch of two entries and under a token budget that splits a batch into several passes."""
    from softprompt.core.scoring import classify

    model, tok = tiny_causal_lm(family), tiny_tokenizer()
    bank, entry, _ = _bank(model, tok)
    other = bank.add("u", "{soft:2} text : {text} verdict :", torch.randn(2, 32, generator=torch.Generator().manual_seed(1)),
                     verbalizer=VERBALIZER)
    exs = [Example({"text": t}, label=lab) for t, lab in zip(TEXTS, LABELS)]
    entries = [entry, other] * (len(TEXTS) // 2)
    ref = classify(bank, entries, exs, batch_size=4, context="cached")
    for context, budget in (("full", 4096), ("packed", 4096), ("packed", 30)):
        res = classify(bank, entries, exs, batch_size=4, context=context, max_batch_tokens=budget)
        torch.testing.assert_close(res.scores, ref.scores, atol=1e-5, rtol=1e-5)
        assert res.predictions == ref.predictions


def test_packed_label_scores_stay_within_the_token_budget(monkeypatch):
    """No packed pass holds more than max_batch_tokens tokens (unless one example alone is longer)."""
    from softprompt.core import packing

    model, tok = tiny_causal_lm(), tiny_tokenizer()
    bank, entry, _ = _bank(model, tok)
    suffixes = [bank.suffix_ids(entry, {"text": t}) for t in TEXTS]
    seen = []
    real = packing.packed_logprobs

    def spy(bank, idx, sfx, conts, **kw):
        seen.append((sum(packing.packed_size(len(bank.entries[e].prefix_ids) + len(s), cs)
                         for e, s, cs in zip(idx.tolist(), sfx, conts)), len(sfx), kw["pack_tokens"]))
        return real(bank, idx, sfx, conts, **kw)

    monkeypatch.setattr(packing, "packed_logprobs", spy)
    with torch.no_grad():
        scores = packing.packed_label_scores(bank, torch.full((len(TEXTS),), entry), suffixes, 40)
    assert len(scores) == len(TEXTS) and len(seen) > 1
    assert all(tokens <= 40 or n == 1 for tokens, n, _ in seen) and all(b == 40 for *_, b in seen)
    with pytest.raises(ValueError, match="max_batch_tokens"):
        packing.packed_label_scores(bank, torch.full((1,), entry), suffixes[:1], 0)


def test_classify_context_errors():
    from softprompt.core.scoring import classify

    model, tok = tiny_causal_lm(), tiny_tokenizer()
    bank, entry, _ = _bank(model, tok)
    exs = [Example({"text": "good"}, label="pos")]
    with pytest.raises(ValueError, match="context must be one of"):
        classify(bank, entry, exs, context="paged")
    with pytest.raises(ValueError, match="context 'cached' runs eagerly"):
        classify(bank, entry, exs, context="cached", compile="on")
