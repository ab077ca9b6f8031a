"""Prompt-engineering baselines on a tiny random model: few-shot prompt assembly, balanced
sampling, chain-of-thought parsing (with unparseable outputs counted), token accounting."""
from collections import Counter

import pytest

from softprompt.hard import baselines as B
from softprompt.core.bank import PromptBank
from softprompt.core.scoring import classify
from softprompt.data import Example, Task
from softprompt.core.templates import Template, encode_text
from softprompt.testing import tiny_causal_lm, tiny_tokenizer

TASK = Task(name="toy", kind="classification", template="{soft:4} review : {text} label :",
            verbalizer={"neg": " no", "pos": " yes"}, instruction="is the review good ? answer yes or no .")
POS = ["good movie", "great film", "love this movie", "amazing film", "happy great", "good good"]
NEG = ["bad movie", "awful film", "hate this movie", "terrible film", "sad awful", "bad bad", "slow film"]
TRAIN = [Example({"text": t}, "pos") for t in POS] + [Example({"text": t}, "neg") for t in NEG]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_zero_shot_template_is_instruction_plus_hard_template():
    tpl = B.zero_shot_template(TASK)
    assert tpl == "is the review good ? answer yes or no .\nreview : {text} label :"
    assert Template(tpl).n_soft == 0
    assert B.zero_shot_template(TASK, "say {yes}") == "say {{yes}}\nreview : {text} label :"


def test_few_shot_demonstrations_go_into_the_cached_prefix():
    tok = tiny_tokenizer()
    demos = [Example({"text": "good {text} movie"}, "pos"), Example({"text": "bad film"}, "neg")]
    tpl = B.few_shot_template(TASK, demos)
    t = Template(tpl)
    assert t.fields == ("text",) and t.n_soft == 0
    # the demonstrations are literal text before the first field: part of the shared prefix
    head = "".join(s.value for s in t.segments[: t.first_field])
    assert head == ("is the review good ? answer yes or no .\n"
                    "review : good {text} movie label : yes\n\nreview : bad film label : no\n\nreview : ")
    assert t.render_text({"text": "x"}).count("{text}") == 1  # braces in a demo stay literal
    prefix = t.prefix_ids(tok)
    assert len(prefix) > len(Template(B.zero_shot_template(TASK)).prefix_ids(tok)) + 10
    # the per-example suffix is the same as the zero-shot prompt's
    q = {"text": "great film"}
    assert t.suffix_ids(tok, q) == Template(B.zero_shot_template(TASK)).suffix_ids(tok, q)
    assert B.render_demo(TASK.template, demos[1], TASK.verbalizer) == "review : bad film label : no"


def test_few_shot_prefix_is_computed_once_per_prompt():
    model, tok = tiny_causal_lm(), tiny_tokenizer()
    bank = PromptBank(model, tok)
    bank.add("fs", B.few_shot_template(TASK, TRAIN[:4]), verbalizer=TASK.verbalizer)
    calls = []
    orig = model.base_model.forward

    def counting(*a, **kw):
        calls.append(kw["inputs_embeds"].shape[0] if kw.get("inputs_embeds") is not None else -1)
        return orig(*a, **kw)

    model.base_model.forward = counting
    try:
        res = classify(bank, "fs", TRAIN, batch_size=4, context="cached")
    finally:
        model.base_model.forward = orig
    # one prefix pass (a single row), then one context pass per batch of 4 (13 examples);
    # label words are single tokens, so no extra pass scores them
    assert calls == [1, 4, 4, 4, 1]
    assert set(res.predictions) <= {"pos", "neg"} and res.metrics["n"] == len(TRAIN)


def test_balanced_sampling():
    pool = [Example({"text": f"t{i}"}, "pos") for i in range(20)] + [Example({"text": f"n{i}"}, "neg") for i in range(10)]
    for k in (2, 4, 8, 10):
        demos = B.sample_demos(pool, k, seed=3, labels=["neg", "pos"])
        c = Counter(d.label for d in demos)
        assert c["pos"] == c["neg"] == k // 2, (k, c)
        assert len({id(d) for d in demos}) == k  # without replacement
    odd = Counter(d.label for d in B.sample_demos(pool, 5, seed=1))
    assert sorted(odd.values()) == [2, 3]
    assert B.sample_demos(pool, 4, seed=7) == B.sample_demos(pool, 4, seed=7)  # seeded
    assert any(B.sample_demos(pool, 4, seed=0) != B.sample_demos(pool, 4, seed=s) for s in range(1, 5))
    # a label with too few examples gives all it has; the others fill the shortfall
    skew = pool[:20] + pool[20:21]
    c = Counter(d.label for d in B.sample_demos(skew, 6, seed=0))
    assert c == {"neg": 1, "pos": 5}
    rnd = B.sample_demos(pool, 6, sampling="random", seed=2)
    assert len(rnd) == 6 and rnd == B.sample_demos(pool, 6, sampling="random", seed=2)
    with pytest.raises(ValueError, match="only 30"):
        B.sample_demos(pool, 31)
    with pytest.raises(ValueError, match="sampling"):
        B.sample_demos(pool, 2, sampling="stratified")
    demos = B.sample_demos(pool, 6, seed=0)
    assert B.order_demos(demos, 0) == demos
    other = B.order_demos(demos, 1, seed=0)
    assert sorted(map(id, other)) == sorted(map(id, demos)) and other != demos


@pytest.mark.parametrize("text,label", [
    ("the tweet is angry. The answer is yes.", "pos"),
    ("Answer: no", "neg"),
    ("it says yes and no, but the answer is: NO", "neg"),
    ("yes, clearly", "pos"),
    ("no idea what this is", "neg"),
    ("it could be yes or no", None),            # two labels, no explicit answer
    ("the movie was long", None),               # no label word at all
    ("yesterday it was nothing", None),         # whole words only
    ("so the answer would be yes", "pos"),
])
def test_cot_parse_rule(text, label):
    assert B.parse_label(text, {"neg": " no", "pos": " yes"}) == label


def test_cot_parse_prefers_longest_words():
    verb = {"entailment": " entailment", "not_entailment": " not entailment"}
    assert B.parse_label("so: not entailment", verb) == "not_entailment"
    assert B.parse_label("the answer is entailment", verb) == "entailment"


def test_metrics_count_unparseable_as_wrong():
    gold = ["pos", "pos", "neg", "neg"]
    m = B.metrics_with_unparseable(gold, ["pos", None, "neg", "pos"], ["neg", "pos"])
    assert m["accuracy"] == 0.5 and m["n_unparseable"] == 1 and m["unparseable_rate"] == 0.25
    assert m["accuracy_parsed"] == pytest.approx(2 / 3)
    assert m["confusion"] == [[1, 1, 0], [0, 1, 1]]  # last column: unparseable
    # pos: tp 1, fp 1, fn 1 (one miss is the unparseable one) -> 0.5; neg: tp 1, fn 1 -> 2/3
    assert m["macro_f1"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert set(m["per_label_f1"]) == {"neg", "pos"}


def test_cot_on_tiny_model_counts_unparseable():
    model, tok = tiny_causal_lm(), tiny_tokenizer()
    bank = PromptBank(model, tok)
    tpl = B.cot_template(TASK)
    assert tpl.endswith("label : Let's think step by step.") and "one of: no, yes" in tpl
    bank.add("cot", tpl, kind="generation")
    res = B.cot_classify(bank, "cot", TRAIN, TASK.verbalizer, max_new_tokens=6, batch_size=8)
    assert len(res.texts) == len(TRAIN) and res.n_unparseable == sum(p is None for p in res.predictions)
    m = res.metrics
    assert m["n_unparseable"] == res.n_unparseable and m["n"] == len(TRAIN)
    right = sum(p == ex.label for p, ex in zip(res.predictions, TRAIN))
    assert m["accuracy"] == pytest.approx(right / len(TRAIN))
    assert 0 < res.generated_tokens <= 6


def test_template_overhead_tokens_exclude_fields_and_bos():
    tok = tiny_tokenizer()
    for tpl in ("{soft:3} review : {text} label :", B.zero_shot_template(TASK),
                "a {soft:2} {text} b {soft:1} c", B.few_shot_template(TASK, TRAIN[:2])):
        t = Template(tpl)
        ex = {"text": "good movie"}
        total = len(t.prefix_ids(tok, add_bos=False)) + len(t.suffix_ids(tok, ex))
        assert B.template_overhead_tokens(tpl, tok) == total - len(encode_text(tok, " good movie")), tpl
