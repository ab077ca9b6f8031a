"""EngineConfig: every engine knob in one validated dataclass, resolved per device; the
server's vote names are ensemble.py's; each engine's metrics live in their own registry."""
import dataclasses

import pytest

from softprompt.apps.ensemble import COMBINE
from softprompt.serve.config import EngineConfig
from softprompt.serve.metrics import Gauge, Metrics
from softprompt.serve.spec import VOTES, canonical_vote


def test_defaults_are_the_cli_defaults():
    c = EngineConfig()
    assert (c.max_batch_size, c.max_wait_ms, c.max_queue, c.max_input_tokens, c.max_new_tokens_limit) == (32, 5.0, 1024, 512, 256)
    assert (c.max_batch_tokens, c.max_labels, c.max_label_tokens, c.max_template_tokens) == (8192, 100, 16, 1024)
    assert (c.batching, c.prefix_cache, c.split_padding) == ("mixed", "auto", "auto")


@pytest.mark.parametrize("bad, match", [
    (dict(max_batch_size=0), "max_batch_size"), (dict(max_queue=0), "max_queue"), (dict(max_wait_ms=-1), "max_wait_ms"),
    (dict(max_batch_tokens=0), "max_batch_tokens"), (dict(max_labels=0), "max_labels"),
    (dict(max_label_tokens=0), "max_label_tokens"), (dict(max_template_tokens=0), "max_template_tokens"),
    (dict(max_input_tokens=0), "max_input_tokens"), (dict(max_input_chars=0), "max_input_chars"),
    (dict(max_new_tokens_limit=0), "max_new_tokens_limit"), (dict(batching="sometimes"), "batching"),
    (dict(prefix_cache="sometimes"), "prefix_cache"), (dict(split_padding=1.0), "split_padding"),
    (dict(split_padding=-0.1), "split_padding"), (dict(split_padding="half"), "split_padding"),
])
def test_invalid_knobs_are_refused_with_their_name(bad, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(**bad)
    with pytest.raises(ValueError, match=match):  # a changed copy is checked too
        EngineConfig().replace(**bad)


def test_auto_choices_follow_the_device():
    cpu, gpu = EngineConfig().resolve("cpu"), EngineConfig().resolve("cuda")
    assert (cpu.prefix_cache, cpu.split_padding) == (True, 0.25)
    assert (gpu.prefix_cache, gpu.split_padding) == (False, None)
    fixed = EngineConfig(prefix_cache=False, split_padding=0.0).resolve("cpu")
    assert (fixed.prefix_cache, fixed.split_padding) == (False, 0.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cpu.max_batch_size = 2


def test_limits_are_what_every_backend_enforces():
    lim = EngineConfig(max_labels=7).limits()
    assert lim["max_labels"] == 7 and "max_batch_size" not in lim and "max_queue" in lim


def test_engine_takes_a_config_and_keyword_overrides():
    from softprompt.serve.engine import Engine
    from softprompt.testing import tiny_causal_lm, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_causal_lm()
    eng = Engine(model, tok, EngineConfig(max_batch_size=4, max_labels=9), max_labels=3)
    assert (eng.max_batch_size, eng.max_labels, eng.config.max_labels) == (4, 3, 3)
    assert eng.prefix_cache is (model.device.type == "cpu")
    with pytest.raises(ValueError, match="max_batch_size"):
        Engine(model, tok, max_batch_size=0)


def test_vote_names_come_from_the_ensemble_module():
    assert set(COMBINE) <= set(VOTES) and "majority" in VOTES  # the old name still loads
    assert canonical_vote("majority") == "vote" and canonical_vote("mean") == "mean"


def test_each_metrics_has_its_own_registry():
    a, b = Metrics(), Metrics()
    a.add(Gauge("softprompt_tasks", "Tasks.", lambda: 3))
    b.add(Gauge("softprompt_tasks", "Tasks.", lambda: 5))  # no clash: not the global registry
    a.requests.inc(task="t", kind="classify", status="ok")
    assert a.requests.value(task="t", kind="classify", status="ok") == 1
    assert b.requests.value(task="t", kind="classify", status="ok") == 0
    assert "softprompt_tasks 3.0" in a.render() and "softprompt_tasks 5.0" in b.render()
    a.batch_tasks.observe(1)
    assert 'softprompt_batch_tasks_bucket{le="1"} 1.0' in a.render() and a.batch_tasks.count() == 1


def test_cli_refuses_a_bad_knob_before_loading_the_model(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import softprompt.families.loading
    from softprompt.cli import app

    monkeypatch.setattr(softprompt.families.loading, "load_model", lambda *a, **kw: pytest.fail("the model was loaded"))
    r = CliRunner().invoke(app, ["serve", "--prompts", str(tmp_path), "--max-batch-size", "0"])
    assert r.exit_code == 2 and "max_batch_size" in r.output


def test_vote_and_its_old_name_majority_answer_alike():
    from softprompt.serve.engine import Engine, InvalidInputError
    from softprompt.serve.testing import random_prompt
    from softprompt.testing import tiny_causal_lm, tiny_tokenizer

    tok, model = tiny_tokenizer(), tiny_causal_lm()
    members = [random_prompt(model, "{soft:3} review : {text} label :", verbalizer={"pos": " good", "neg": " bad"},
                             seed=s) for s in range(3)]
    texts = ["the movie was good", "awful service", "great", "why is it bad"]
    with Engine(model, tok, max_wait_ms=1) as eng:
        spec = eng.register("ens", members, vote="majority")  # an old manifest's spelling loads as it was
        assert spec.vote == "majority" and spec.info()["vote"] == "majority"
        old = eng.classify("ens", texts)
        new = eng.classify("ens", texts, vote="vote")
        assert [(r.label, r.votes) for r in old] == [(r.label, r.votes) for r in new]
        assert [r.label for r in old] == [max(r.votes, key=lambda lab: (r.votes[lab], r.probabilities[lab])) for r in old]
        with pytest.raises(InvalidInputError, match="vote must be one of"):
            eng.classify("ens", texts, vote="unanimous")
