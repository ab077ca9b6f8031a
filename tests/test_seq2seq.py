"""Soft prompts on encoder-decoder models, checked exactly on a tiny random T5.

No pre-trained T5 weights are available offline (no model hub, and no T5 is embedded in
a package), so these tests check mechanics only: shapes, agreement with the model's own
full forward pass, padding invariance, mixed prompts in one batch, cached generation,
save/load, training, and refusals.  How well a soft prompt does on a real T5 is not
measured here.
"""
import pytest
import torch

from softprompt.families import seq2seq
from softprompt.core.bank import PromptBank
from softprompt.families import is_encoder_decoder
from softprompt.families.loading import load_model
from softprompt.core.prompts import PromptMismatchError, SoftPrompt
from softprompt.core.scoring import classify, generate
from softprompt.data import Example, Task
from softprompt.testing import tiny_t5, tiny_tokenizer
from softprompt.training.prompt import TrainConfig, train_prompt

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = [
    "the movie was good", "awful service , slow flight and broken order", "great", "why is my refund delayed please help",
    "it was not bad", "love this film",
]
POS = ["good movie", "great film", "love this movie", "amazing film", "good good", "happy great"]
NEG = ["bad movie", "awful film", "hate this movie", "terrible film", "bad bad", "sad awful"]
TASK = Task(name="toy", kind="classification", template="{soft:4} review : {text} label :",
            verbalizer={"pos": " yes", "neg": " no"})
TRAIN = [Example({"text": t}, "pos") for t in POS] + [Example({"text": t}, "neg") for t in NEG]


@pytest.fixture(scope="module")
def t5():
    return tiny_t5(), tiny_tokenizer()


def make_bank(model, tok):
    bank = PromptBank(model, tok)
    g = torch.Generator().manual_seed(1)
    bank.add("a", "{soft:3} review : {text} label :", torch.randn(3, 32, generator=g),
             verbalizer={"pos": " good", "neg": " not good"})
    bank.add("b", "{soft:5} tweet : {text} {soft:2} answer :", torch.randn(7, 32, generator=g),
             verbalizer={"yes": " yes", "no": " no", "maybe": " maybe not"})
    bank.add("c", "{soft:2} question : {text} answer :", torch.randn(2, 32, generator=g), kind="generation")
    return bank


def _scores(bank, entries, texts):
    sfx = [bank.suffix_ids(e, {"text": t}) for e, t in zip(entries, texts)]
    return seq2seq.label_logprobs(bank, seq2seq.encode(bank, torch.tensor(entries), sfx))


def test_detects_family(t5):
    from softprompt.testing import tiny_causal_lm

    assert is_encoder_decoder(t5[0]) and not is_encoder_decoder(tiny_causal_lm())
    assert seq2seq.decoder_start_id(t5[0]) == 3


def test_shapes(t5):
    bank = make_bank(*t5)
    entries, texts = [0, 1, 2], TEXTS[:3]
    sfx = [bank.suffix_ids(e, {"text": t}) for e, t in zip(entries, texts)]
    enc = seq2seq.encode(bank, torch.tensor(entries), sfx)
    lengths = [len(bank.entries[e].prefix_ids) + len(s) + 1 for e, s in zip(entries, sfx)]  # + EOS
    assert enc.hidden.shape == (3, max(lengths), 32)
    assert enc.mask.sum(-1).tolist() == lengths
    scores = _scores(bank, [0, 1], TEXTS[:2])
    assert [s.shape for s in scores] == [torch.Size([2]), torch.Size([3])]
    assert all(bool((s < 0).all()) and bool(torch.isfinite(s).all()) for s in scores)


def test_scores_equal_the_models_own_forward(t5):
    """Independent reference: the whole input (soft tokens embedded) and the label as
    ``labels`` through the model's ordinary forward; its mean loss times the label length is
    minus the summed log-prob."""
    model, tok = t5
    bank = make_bank(model, tok)
    with torch.no_grad():
        (scores,) = _scores(bank, [1], [TEXTS[1]])
        e = bank.entries[1]
        ids = e.prefix_ids + bank.suffix_ids(1, {"text": TEXTS[1]}) + [tok.eos_token_id]
        emb = bank.embed(torch.tensor([ids]), torch.tensor([1]))
        for j, lab in enumerate(e.label_ids):
            loss = model(inputs_embeds=emb, labels=torch.tensor([lab])).loss
            torch.testing.assert_close(scores[j], -loss * len(lab), atol=1e-5, rtol=0)


def test_padding_invariance(t5):
    """A short example's scores and encoder states do not change when a longer one pads it."""
    bank = make_bank(*t5)
    with torch.no_grad():
        (alone,) = _scores(bank, [0], [TEXTS[2]])
        padded = _scores(bank, [0, 0], [TEXTS[2], TEXTS[1]])[0]
        torch.testing.assert_close(padded, alone, atol=1e-5, rtol=0)
        sfx = [bank.suffix_ids(0, {"text": t}) for t in (TEXTS[2], TEXTS[1])]
        enc2 = seq2seq.encode(bank, torch.tensor([0, 0]), sfx)
        enc1 = seq2seq.encode(bank, torch.tensor([0]), sfx[:1])
        n = enc1.hidden.shape[1]
        assert enc2.hidden.shape[1] > n
        torch.testing.assert_close(enc2.hidden[0, :n], enc1.hidden[0], atol=1e-5, rtol=0)


def test_mixed_batch_equals_one_by_one(t5):
    bank = make_bank(*t5)
    entries = [0, 1, 0, 1, 1, 0]
    with torch.no_grad():
        mixed = _scores(bank, entries, TEXTS)
        for e, t, m in zip(entries, TEXTS, mixed):
            (alone,) = _scores(bank, [e], [t])
            torch.testing.assert_close(m, alone, atol=1e-5, rtol=0)
    # in float64 the two agree exactly: the fp32 gap is round-off, not a leak between rows
    b64 = make_bank(tiny_t5().double(), t5[1])
    for e in b64.entries:
        e.soft = e.soft.double()
    with torch.no_grad():
        mixed64 = _scores(b64, entries, TEXTS)
        for e, t, m in zip(entries, TEXTS, mixed64):
            torch.testing.assert_close(m, _scores(b64, [e], [t])[0], atol=1e-12, rtol=0)
    # the soft tokens matter: another prompt on the same entry template changes the scores
    other = make_bank(*t5)
    other.add("a", "{soft:3} review : {text} label :", torch.zeros(3, 32), verbalizer={"pos": " good", "neg": " not good"})
    with torch.no_grad():
        assert not torch.allclose(_scores(other, [0], [TEXTS[0]])[0], mixed[0], atol=1e-3)


def test_generate_mixed_batch_and_cache(t5):
    model, tok = t5
    bank = make_bank(model, tok)
    entries = [2, 0, 2, 1, 2]
    sfx = [bank.suffix_ids(e, {"text": t}) for e, t in zip(entries, TEXTS)]
    enc = seq2seq.encode(bank, torch.tensor(entries), sfx)
    cached = seq2seq.greedy_generate(bank, enc, max_new_tokens=12)
    plain = seq2seq.greedy_generate(bank, enc, max_new_tokens=12, use_cache=False)
    assert cached == plain
    assert sum(len(o) for o in cached) > len(cached), "the tiny model should generate something"
    for i, (e, s) in enumerate(zip(entries, sfx)):
        one = seq2seq.greedy_generate(bank, seq2seq.encode(bank, torch.tensor([e]), [s]), max_new_tokens=12)
        assert one == [cached[i]]
    # a stop id ends a row before that token
    first = cached[0][0]
    stopped = seq2seq.greedy_generate(bank, enc, max_new_tokens=12, stop_ids={first})
    assert stopped[0] == []


def test_scoring_dispatches_to_seq2seq(t5):
    model, tok = t5
    bank = make_bank(model, tok)
    exs = [Example({"text": t}, "pos" if i % 2 else "neg") for i, t in enumerate(TEXTS)]
    res = classify(bank, "a", exs, batch_size=4)
    with torch.no_grad():
        direct = torch.stack(_scores(bank, [0] * len(TEXTS), TEXTS))
    torch.testing.assert_close(res.scores, direct, atol=1e-5, rtol=0)
    assert set(res.metrics) >= {"accuracy", "macro_f1"}
    gen = generate(bank, "c", [Example({"text": t}, target="the world", answers=("the world",)) for t in TEXTS])
    assert len(gen.texts) == len(TEXTS) and set(gen.metrics) >= {"exact_match", "f1"}


def test_training_loss_falls_and_model_stays_frozen(t5, tmp_path):
    model, tok = t5
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(epochs=15, lr=0.3, batch_size=4, init="vocab", warmup_steps=2)
    res = train_prompt(model, tok, TASK, TRAIN, TRAIN, cfg, out_dir=tmp_path, progress=False)
    first, last = res.history[0]["loss"], res.history[-1]["loss"]
    assert last < 0.5 * first, (first, last)
    assert res.history[-1]["valid"]["accuracy"] == 1.0
    assert all(not p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), "base weights untouched"
    assert (tmp_path / "prompt.safetensors").exists()


def test_generation_task_trains(t5):
    model, tok = t5
    # the decoder sees the prompt only through cross-attention: 8 soft tokens (3 are not
    # enough on this tiny random model) and the paper's learning rate, 0.3
    task = Task(name="qa", kind="generation", template="{soft:8} question : {q} answer :")
    exs = [Example({"q": q}, target="the world", answers=("the world",)) for q in ("who", "what", "where", "why")]
    res = train_prompt(model, tok, task, exs, exs, TrainConfig(epochs=50, lr=0.3, batch_size=4, init="vocab",
                                                                 warmup_steps=2), progress=False)
    assert res.history[-1]["loss"] < 0.5 * res.history[0]["loss"]
    assert res.history[0]["valid"]["exact_match"] == 0.0
    assert res.history[-1]["valid"]["f1"] >= 0.75, res.history[-1]["valid"]


def saved_entry(bank, i: int, task: str, path) -> SoftPrompt:
    """Entry ``i`` of ``bank`` as an artifact, saved to ``path``."""
    e = bank.entries[i]
    prompt = SoftPrompt(embeddings=e.soft.clone(), identity=bank.identity, template=e.template.text,
                        verbalizer=e.verbalizer, task=task)
    prompt.save(path)
    return prompt


def test_save_load_round_trip(t5, tmp_path):
    model, tok = t5
    bank = make_bank(model, tok)
    prompt = saved_entry(bank, 1, "b", tmp_path / "p.safetensors")
    loaded = SoftPrompt.load(tmp_path / "p.safetensors", model=model)
    assert torch.equal(loaded.embeddings, prompt.embeddings)
    fresh = PromptBank(model, tok)
    fresh.add_prompt(loaded, "b")
    with torch.no_grad():
        torch.testing.assert_close(_scores(fresh, [0, 0], TEXTS[:2]), _scores(bank, [1, 1], TEXTS[:2]), atol=0, rtol=0)


def test_prompt_for_another_model_is_refused(t5, tmp_path):
    model, tok = t5
    bank = make_bank(model, tok)
    prompt = saved_entry(bank, 0, "a", tmp_path / "p.safetensors")
    other = tiny_t5(seed=1)
    with pytest.raises(PromptMismatchError, match="tiny-t5-0"):
        SoftPrompt.load(tmp_path / "p.safetensors", model=other)
    with pytest.raises(PromptMismatchError):
        PromptBank(other, tok).add_prompt(prompt)


def test_prefix_tuning_is_refused(t5):
    model, tok = t5
    with pytest.raises(ValueError, match="not supported for encoder-decoder"):
        train_prompt(model, tok, TASK, TRAIN, config=TrainConfig(method="prefix"), progress=False)
    bank = PromptBank(model, tok)
    bank.add("p", TASK.template, torch.zeros(4, 32), verbalizer=TASK.verbalizer, kv=torch.zeros(2, 2, 4, 3, 8))
    with pytest.raises(ValueError, match="not supported for encoder-decoder"):
        classify(bank, "p", TRAIN[:2])


def test_load_model_reads_a_t5_folder(t5, tmp_path):
    model, tok = t5
    model.save_pretrained(tmp_path / "tiny-t5")
    tok.save_pretrained(tmp_path / "tiny-t5")
    loaded, ltok = load_model(str(tmp_path / "tiny-t5"))
    assert type(loaded).__name__ == "T5ForConditionalGeneration"
    assert all(not p.requires_grad for p in loaded.parameters())
    a, b = make_bank(model, tok), make_bank(loaded, ltok)
    with torch.no_grad():
        torch.testing.assert_close(_scores(b, [0, 1], TEXTS[:2]), _scores(a, [0, 1], TEXTS[:2]), atol=1e-6, rtol=0)
