"""The serving engine on tiny random models: mixed batches, prefix reuse, ensembles,
hot swaps, overload and failure isolation.  Every answer is checked against an
independent one-by-one computation (scoring.classify / scoring.generate on a separate bank)."""
import threading
import time

import pytest
import torch

from softprompt.core.bank import PromptBank
from softprompt.core.scoring import classify as ref_classify
from softprompt.core.scoring import generate as ref_generate
from softprompt.serve.engine import (
    Engine, InputTooLongError, InvalidInputError, ModelMismatchError, OverloadedError, PromptRejectedError,
    UnknownTaskError, WrongKindError,
)
from softprompt.serve.testing import random_prompt
from softprompt.data import Example
from softprompt.testing import tiny_causal_lm, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = [
    "the movie was good", "awful service , slow flight and broken order", "great", "why is my refund delayed please help",
    "it was not bad", "love this film", "help", "what a terrible , awful , slow , broken service it was",
]
SENT = "{soft:5} review : {text} label :"
TWEET = "{soft:3} tweet : {text} {soft:2} is this a complaint ? answer :"
QA = "{soft:4} question : {text} answer :"
NLI = "{soft:3} premise : {premise} hypothesis : {hypothesis} answer :"


def prompts(model):
    return {
        "sent": random_prompt(model, SENT, verbalizer={"pos": " good", "neg": " not good"}, seed=1),
        "tweet": random_prompt(model, TWEET, verbalizer={"yes": " yes", "no": " no", "maybe": " maybe not"}, seed=2),
        "qa": random_prompt(model, QA, kind="generation", seed=3),
        "nli": random_prompt(model, NLI, verbalizer={"entailment": " yes", "contradiction": " no"}, seed=4),
        "ens": [random_prompt(model, SENT, verbalizer={"pos": " good", "neg": " bad"}, seed=10 + k) for k in range(2)]
        + [random_prompt(model, "{soft:2} text {text} ?", verbalizer={"neg": " bad", "pos": " good"}, seed=12)],
    }


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def families(request):
    """Model-family-sensitive checks (cache layout, positions) run on two families."""
    model, tok = tiny_causal_lm(request.param), tiny_tokenizer()
    return model, tok, prompts(model)


@pytest.fixture(scope="module")
def setup():
    model, tok = tiny_causal_lm("llama"), tiny_tokenizer()
    return model, tok, prompts(model)


def make_engine(setup, **kw):
    model, tok, ps = setup
    eng = Engine(model, tok, **kw)
    for name, p in ps.items():
        eng.register(name, p)
    return eng


class Ref:
    """One-by-one reference answers from an independent bank."""

    def __init__(self, model, tok):
        self.bank = PromptBank(model, tok)
        self.n = 0

    def _add(self, p):
        self.n += 1
        return self.bank.add_prompt(p, f"p{self.n}")

    def probs(self, p, fields):
        e = self._add(p)
        r = ref_classify(self.bank, e, [Example(fields)])
        return dict(zip(r.labels, r.probabilities[0].tolist())), r.predictions[0]

    def text(self, p, fields, max_new_tokens, stop_at_newline=True):
        e = self._add(p)
        return ref_generate(self.bank, e, [Example(fields)], max_new_tokens=max_new_tokens,
                            stop_at_newline=stop_at_newline).texts[0]


def assert_probs(got: dict, want: dict, atol=1e-4):
    assert set(got) == set(want)
    for k in want:
        assert abs(got[k] - want[k]) <= atol, (k, got, want)


def test_mixed_traffic_equals_one_by_one(families):
    setup = families
    model, tok, ps = setup
    ref = Ref(model, tok)
    with make_engine(setup, max_batch_size=16, max_wait_ms=20) as eng:
        batches = []
        eng.batch_hook = lambda items: batches.append(sorted({it.task for it in items}))
        futs = []
        for i, t in enumerate(TEXTS):
            futs.append(("sent", t, eng.submit_classify("sent", [t])[0]))
            futs.append(("tweet", t, eng.submit_classify("tweet", [t])[0]))
            futs.append(("qa", t, eng.submit_generate("qa", t, max_new_tokens=3 + i % 4)))
            futs.append(("nli", t, eng.submit_classify("nli", [{"premise": t, "hypothesis": TEXTS[-1 - i]}])[0]))
        for task, t, f in futs:
            r = f.result(30)
            if task == "qa":
                assert r.text == ref.text(ps["qa"], {"text": t}, 3 + TEXTS.index(t) % 4)
            elif task == "nli":
                want, label = ref.probs(ps["nli"], {"premise": t, "hypothesis": TEXTS[-1 - TEXTS.index(t)]})
                assert_probs(r.probabilities, want)
                assert r.label == label
            else:
                want, label = ref.probs(ps[task], {"text": t})
                assert_probs(r.probabilities, want)
                assert r.label == label
    assert any(len(b) > 1 for b in batches), "tasks were mixed inside batches"


def test_prefix_reuse_equals_recomputing_the_prompt(families):
    setup = families
    """The issue's check: cached prompt key/values give the same answer (1e-4, fp32) as
    running the whole prompt + input for every request (the engine's own baseline path)."""
    answers = {}
    for cache in (True, False):
        with make_engine(setup, prefix_cache=cache, max_batch_size=8, max_wait_ms=5) as eng:
            cls = [f.result(30) for f in eng.submit_classify("tweet", TEXTS)]
            ens = [f.result(30) for f in eng.submit_classify("ens", TEXTS)]
            gen = [eng.submit_generate("qa", t, max_new_tokens=6).result(30) for t in TEXTS[:4]]
        answers[cache] = (cls, ens, gen)
    for a, b in zip(answers[True][0] + answers[True][1], answers[False][0] + answers[False][1]):
        assert a.label == b.label
        assert_probs(a.probabilities, b.probabilities, atol=1e-4)
    assert [g.token_ids for g in answers[True][2]] == [g.token_ids for g in answers[False][2]]


def test_ensemble_votes_inside_one_batch(setup):
    model, tok, ps = setup
    ref = Ref(model, tok)
    with make_engine(setup, max_batch_size=4, max_wait_ms=20) as eng:
        sizes = []
        eng.batch_hook = lambda items: sizes.append([it.rows for it in items])
        res = eng.classify("ens", TEXTS[:3])
        maj = eng.classify("ens", TEXTS[:3], vote="majority")
    assert all(r == 3 for s in sizes for r in s), "an ensemble example is one row per member, kept together"
    for t, r, m in zip(TEXTS, res, maj):
        members = [ref.probs(p, {"text": t}) for p in ps["ens"]]
        mean = {lab: sum(mp[lab] for mp, _ in members) / 3 for lab in ("pos", "neg")}
        assert_probs(r.probabilities, mean)
        assert r.label == max(mean, key=mean.get)
        votes = {lab: sum(pred == lab for _, pred in members) for lab in ("pos", "neg")}
        assert m.votes == votes
        assert m.label == max(("pos", "neg"), key=lambda lab: (votes[lab], mean[lab]))
        assert [x["label"] for x in r.members] == [pred for _, pred in members]


def test_generation_limits_stops_and_streaming(families):
    setup = families
    model, tok, ps = setup
    ref = Ref(model, tok)
    with make_engine(setup) as eng:
        seen = []
        r = eng.submit_generate("qa", TEXTS[1], max_new_tokens=7, stop_at_newline=False, on_token=seen.append).result(30)
        assert r.text == ref.text(ps["qa"], {"text": TEXTS[1]}, 7, stop_at_newline=False)
        assert seen and seen[-1] == r.token_ids and all(seen[i] == seen[-1][: len(seen[i])] for i in range(len(seen)))
        assert r.finish_reason in ("length", "stop") and len(r.token_ids) <= 7
        if r.text:
            word = r.text.split()[min(1, len(r.text.split()) - 1)]
            cut = eng.generate("qa", TEXTS[1], max_new_tokens=7, stop_at_newline=False, stop=[word])
            assert cut.text == r.text[: r.text.find(word)].strip() and cut.finish_reason == "stop"
        with pytest.raises(InvalidInputError):
            eng.submit_generate("qa", "x", max_new_tokens=0)
        with pytest.raises(InvalidInputError):
            eng.submit_generate("qa", "x", max_new_tokens=eng.max_new_tokens_limit + 1)


def test_input_validation(setup):
    with make_engine(setup, max_input_tokens=12) as eng:
        with pytest.raises(UnknownTaskError):
            eng.submit_classify("nope", ["x"])
        with pytest.raises(InvalidInputError, match="empty"):
            eng.submit_classify("sent", ["   "])
        with pytest.raises(InputTooLongError):
            eng.submit_classify("sent", ["good " * 40])
        with pytest.raises(InvalidInputError, match="fields"):
            eng.submit_classify("nli", ["a string for a two-field task"])
        with pytest.raises(InvalidInputError, match="missing"):
            eng.submit_classify("nli", [{"premise": "x"}])
        with pytest.raises(InvalidInputError, match=r"inputs\[1\]"):
            eng.submit_classify("sent", ["fine", ""])
        with pytest.raises(WrongKindError):
            eng.submit_classify("qa", ["x"])
        with pytest.raises(WrongKindError):
            eng.submit_generate("sent", "x")
        assert eng.queued_rows == 0, "a rejected request queues nothing"
        assert eng.classify("sent", ["good"])[0].label in ("pos", "neg")


def test_per_task_batching_is_a_real_mode(setup):
    with make_engine(setup, batching="per_task", max_batch_size=32, max_wait_ms=30) as eng:
        batches = []
        eng.batch_hook = lambda items: batches.append({it.task for it in items})
        futs = [eng.submit_classify(task, [t])[0] for t in TEXTS for task in ("sent", "tweet", "ens")]
        mixed = [f.result(30) for f in futs]
    assert batches and all(len(b) == 1 for b in batches)
    with make_engine(setup, max_batch_size=32, max_wait_ms=0) as eng:
        again = [eng.submit_classify(task, [t])[0].result(30) for t in TEXTS for task in ("sent", "tweet", "ens")]
    for a, b in zip(mixed, again):
        assert_probs(a.probabilities, b.probabilities, atol=1e-5)


def _blocking_engine(setup, **kw):
    """An engine whose next batch waits for ``release`` (to hold a batch 'in flight')."""
    eng = make_engine(setup, **kw)
    entered, release = threading.Event(), threading.Event()

    def hook(items):
        if not release.is_set():
            entered.set()
            assert release.wait(30)
    eng.batch_hook = hook
    return eng, entered, release


def test_replace_during_a_batch_serves_old_or_new_never_a_mix(setup):
    model, tok, ps = setup
    ref = Ref(model, tok)
    new = random_prompt(model, "{soft:2} new template {text} label :", verbalizer={"pos": " yes", "neg": " no"}, seed=99)
    eng, entered, release = _blocking_engine(setup, max_wait_ms=1)
    with eng:
        old_version = eng.task("sent").version
        inflight = eng.submit_classify("sent", [TEXTS[0]])[0]
        assert entered.wait(30)  # the batch holding it has been formed and is running
        swapper = threading.Thread(target=eng.register, args=("sent", new))
        swapper.start()
        time.sleep(0.05)
        assert swapper.is_alive(), "a replacement waits for the running batch"
        queued = eng.submit_classify("sent", [TEXTS[1]])[0]
        release.set()
        swapper.join(30)
        r_old, r_new = inflight.result(30), queued.result(30)
        after = eng.classify("sent", [TEXTS[0]])[0]
        assert len(eng.bank) == sum(len(s.members) for s in eng.tasks().values()), "old entries are dropped"
    assert r_old.version == old_version and r_new.version == after.version > old_version
    assert_probs(r_old.probabilities, ref.probs(ps["sent"], {"text": TEXTS[0]})[0])
    assert_probs(r_new.probabilities, ref.probs(new, {"text": TEXTS[1]})[0])
    assert_probs(after.probabilities, ref.probs(new, {"text": TEXTS[0]})[0])


def test_swaps_under_load(setup):
    """Replace a task back and forth while clients hammer it: every answer equals the
    one-by-one answer of the version it reports."""
    model, tok, ps = setup
    ref = Ref(model, tok)
    versions = [ps["tweet"], random_prompt(model, TWEET, verbalizer={"yes": " yes", "no": " no", "maybe": " maybe not"}, seed=7)]
    want = [{t: ref.probs(v, {"text": t})[0] for t in TEXTS} for v in versions]
    with make_engine(setup, max_batch_size=8, max_wait_ms=1) as eng:
        which = {eng.task("tweet").version: 0}
        results, stop = [], threading.Event()

        def client(k):
            i = k
            while not stop.is_set():
                t = TEXTS[i % len(TEXTS)]
                results.append((t, eng.submit_classify("tweet", [t])[0].result(30)))
                i += 1
        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for th in threads:
            th.start()
        for s in range(6):
            time.sleep(0.03)
            which[eng.register("tweet", versions[(s + 1) % 2]).version] = (s + 1) % 2
        stop.set()
        for th in threads:
            th.join(30)
    assert len({r.version for _, r in results}) >= 2
    for t, r in results:
        assert_probs(r.probabilities, want[which[r.version]][t])


def test_remove_while_queued_and_register_rejections(setup):
    model, tok, ps = setup
    eng, entered, release = _blocking_engine(setup, max_wait_ms=1)
    with eng:
        first = eng.submit_classify("sent", ["good"])[0]
        assert entered.wait(30)
        queued = eng.submit_classify("nli", [{"premise": "a", "hypothesis": "b"}])[0]
        remover = threading.Thread(target=eng.unregister, args=("nli",))
        remover.start()
        time.sleep(0.02)
        release.set()
        remover.join(30)
        assert first.result(30).label in ("pos", "neg")
        with pytest.raises(UnknownTaskError):
            queued.result(30)
        assert "nli" not in eng.tasks()

        before = (dict(eng.tasks()), len(eng.bank))
        other = tiny_causal_lm("llama", seed=5)
        bad = {
            "mismatch": random_prompt(other, SENT, verbalizer={"pos": " good", "neg": " bad"}),
            "nan": random_prompt(model, SENT, verbalizer={"pos": " good", "neg": " bad"}),
            "nofield": random_prompt(model, "{soft:2} label :", verbalizer={"pos": " good", "neg": " bad"}),
            "template": random_prompt(model, SENT, verbalizer={"pos": " good", "neg": " bad"}),
        }
        bad["nan"].embeddings[0, 0] = float("nan")
        bad["template"].template = "{soft:5} broken {"
        for name, p in bad.items():
            with pytest.raises(ModelMismatchError if name == "mismatch" else PromptRejectedError):
                eng.register("sent", p)
        with pytest.raises(PromptRejectedError, match="label sets"):
            eng.register("sent", [ps["sent"], ps["tweet"]])
        assert (eng.tasks(), len(eng.bank)) == before, "a rejected prompt changes nothing"
        assert eng.classify("sent", ["good"])[0].version == before[0]["sent"].version


def test_overload_is_refused_with_retry_after(setup):
    eng, entered, release = _blocking_engine(setup, max_queue=4, max_wait_ms=1)
    with eng:
        eng.submit_classify("sent", ["good"])
        assert entered.wait(30)
        futs = eng.submit_classify("sent", ["a", "b", "c", "d"])
        with pytest.raises(OverloadedError) as info:
            eng.submit_classify("sent", ["e"])
        assert info.value.retry_after >= 1
        with pytest.raises(InvalidInputError):
            eng.submit_classify("ens", ["a", "b"])  # 6 rows can never fit a 4-row queue
        release.set()
        assert all(f.result(30).label for f in futs)
    assert eng.metrics.rejected.value(reason="queue_full") == 1


def test_a_failing_request_does_not_fail_its_batch_mates(setup):
    eng, entered, release = _blocking_engine(setup, max_wait_ms=1, max_batch_size=16)
    original = eng.runner.vote_classify

    def flaky(it, scores):
        if it.fields.get("text") == "poison":
            raise RuntimeError("boom")
        return original(it, scores)
    eng.runner.vote_classify = flaky
    with eng:
        eng.submit_classify("sent", ["warm"])
        assert entered.wait(30)
        futs = eng.submit_classify("sent", ["good", "poison", "bad"])
        release.set()
        assert futs[0].result(30).label and futs[2].result(30).label
        with pytest.raises(RuntimeError, match="boom"):
            futs[1].result(30)
        assert eng.alive and eng.classify("sent", ["still serving"])[0].label


def test_padding_groups_keep_examples_whole_and_answers_equal(setup):
    model, tok, ps = setup
    texts = ["good", "the movie was good and the service was great but slow and broken", "bad", "why is it bad",
             "help please thanks why what who where when how delayed flight order refund support happy sad"]
    answers = {}
    for split in (None, 0.0, 0.25):
        eng = make_engine(setup, split_padding=split, max_wait_ms=50)
        groups = []
        run_group = eng.runner.run_group
        eng.runner.run_group = lambda items: (groups.append([(it.task, it.rows) for it in items]), run_group(items))
        with eng:
            futs = [f for t in texts for f in (eng.submit_classify("ens", [t]) + eng.submit_classify("sent", [t]))]
            answers[split] = [f.result(30) for f in futs]
        assert sum(len(g) for g in groups) == 2 * len(texts)
        assert all(rows == 3 for g in groups for task, rows in g if task == "ens"), "ensemble rows stay in one pass"
        if split is None:
            assert len(groups) == 1
        if split == 0.0:
            assert len(groups) > 2
    for split in (0.0, 0.25):
        for a, b in zip(answers[None], answers[split]):
            assert a.label == b.label
            assert_probs(a.probabilities, b.probabilities, atol=1e-5)


def test_generation_rows_of_all_passes_decode_together(families, monkeypatch):
    """A batch split into several prefill passes (split_padding=0) still decodes its
    generation rows as one batch; rows that finish early leave it; every answer equals the
    one-by-one reference."""
    import softprompt.serve.runner as runner_mod

    model, tok, ps = families
    ref = Ref(model, tok)
    texts = ["good", "the movie was good and the service was great but slow and broken", "why is it bad",
             "help please thanks why what who where when how delayed flight order refund support happy sad", "bad"]
    eng = make_engine(families, split_padding=0.0, max_wait_ms=100)
    groups, decoded, steps = [], [], []
    run_group, decode, step = eng.runner.run_group, eng.runner.decode, runner_mod.decode_step
    monkeypatch.setattr(eng.runner, "run_group", lambda items: (groups.append(len(items)), run_group(items)))
    monkeypatch.setattr(eng.runner, "decode", lambda ctx, owners: (decoded.append(len(owners)), decode(ctx, owners)))
    monkeypatch.setattr(runner_mod, "decode_step", lambda m, nxt, *a: (steps.append(nxt.shape[0]), step(m, nxt, *a))[1])
    with eng:
        futs = [eng.submit_generate("qa", t, max_new_tokens=1 + 2 * i, stop_at_newline=False) for i, t in enumerate(texts)]
        futs.append(eng.submit_classify("sent", [texts[0]])[0])
        got = [f.result(30) for f in futs]
    assert len(groups) > 1 and decoded == [len(texts)], (groups, decoded)
    assert steps[0] == len(texts) > steps[-1] and steps == sorted(steps, reverse=True), "finished rows leave the batch"
    for i, (t, r) in enumerate(zip(texts, got)):
        assert r.text == ref.text(ps["qa"], {"text": t}, 1 + 2 * i, stop_at_newline=False)
        assert len(r.token_ids) <= 1 + 2 * i
    assert got[-1].label == ref.probs(ps["sent"], {"text": texts[0]})[1]


def test_prefix_cache_auto_follows_the_device(setup):
    model, tok, _ = setup
    assert Engine(model, tok).prefix_cache is (model.device.type == "cpu")  # measured choice per device
    assert Engine(model, tok, prefix_cache=False).prefix_cache is False
    with pytest.raises(ValueError, match="prefix_cache"):
        Engine(model, tok, prefix_cache="sometimes")


def test_prefix_tuned_prompts_keep_their_key_values_without_the_prefix_cache(setup):
    """Recomputing prompts (the GPU default) cannot recompute learned key/values: such prompts
    still run on top of them, and answer as with the cache."""
    model, tok, ps = setup
    bank = PromptBank(model, tok)
    shape = list(bank.kv_shape(None))
    shape[3] = 3
    kv = torch.randn(*shape, generator=torch.Generator().manual_seed(7))
    deep = random_prompt(model, "review : {text} label :", verbalizer={"pos": " good", "neg": " bad"}, seed=5)
    deep.kv, deep.method = kv, "prefix_tuning"
    answers = {}
    for cache in (True, False):
        with make_engine(setup, prefix_cache=cache, max_batch_size=8) as eng:
            eng.register("deep", deep)
            answers[cache] = [r.probabilities for r in eng.classify("deep", TEXTS)]
            mixed = [f.result() for f in eng.submit_classify("deep", TEXTS[:3]) + eng.submit_classify("sent", TEXTS[:3])]
    for a, b in zip(answers[True], answers[False]):
        assert a == pytest.approx(b, abs=1e-5)
    assert len(mixed) == 6


def test_a_line_break_before_the_answer_is_skipped_not_an_empty_answer(setup):
    """With newline stops, a first token that is a line break does not end the answer (it would
    be empty); the engine and conditioning.greedy_generate apply the same rule and budget."""
    from softprompt.core.conditioning import greedy_generate, run_context, take_token

    out: list[int] = []
    assert take_token(7, out, {7, 2}, {7}) is False and out == []  # leading: skipped
    assert take_token(5, out, {7, 2}, {7}) is False and out == [5]
    assert take_token(7, out, {7, 2}, {7}) is True and out == [5]  # after the answer started: a stop

    model, tok, ps = setup
    bank = PromptBank(model, tok)
    entry = bank.add_prompt(ps["qa"], "qa")
    suffixes = [bank.suffix_ids(entry, {"text": t}) for t in TEXTS]
    firsts = greedy_generate(bank, run_context(bank, torch.full((len(TEXTS),), entry), suffixes), max_new_tokens=1)
    newline = firsts[0][0]  # pretend the first token the model emits is a line break
    eos = tok.eos_token_id
    ctx = run_context(bank, torch.full((len(TEXTS),), entry), suffixes)
    want = greedy_generate(bank, ctx, max_new_tokens=6, stop_ids={newline}, skip_leading={newline})
    assert want[0] and want[0][0] != newline  # the answer went on past the line break
    with make_engine(setup, max_batch_size=8) as eng:
        eng.runner.newlines, eng.runner.stops_newline = frozenset({newline}), frozenset({newline, eos})
        got = [f.result().token_ids for f in [eng.submit_generate("qa", t, max_new_tokens=6) for t in TEXTS]]
    assert got == want
