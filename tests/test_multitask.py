"""Multi-task prompt training (training/multitask.py) on tiny models: a mixed batch's loss equals the
one-by-one losses, the mixture samples as asked, and the shared prompt is saved once per task."""
import pytest
import torch

from softprompt.core.prompts import SoftPrompt
from softprompt.data import Example, Task
from softprompt.testing import tiny_causal_lm, tiny_tokenizer
from softprompt.training.config import TrainConfig
from softprompt.training.multitask import MultiTaskTrainable, TaskExample, mixture, train_multitask
from softprompt.training.prompt import batch_loss

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

SENT = Task(name="sent", kind="classification", template="{soft:3} review : {text} label :",
            verbalizer={"pos": " yes", "neg": " no"})
TOPIC = Task(name="topic", kind="classification", template="{soft:3} article : {text} topic :",
             verbalizer={"a": " good", "b": " bad", "c": " film"})
SENT_EX = [Example({"text": t}, lab) for t, lab in (("good movie", "pos"), ("bad film", "neg"), ("great", "pos"),
                                                      ("awful", "neg"), ("love it", "pos"), ("hate it", "neg"))]
TOPIC_EX = [Example({"text": t}, lab) for t, lab in (("ball game", "a"), ("stock market", "b"), ("new chip", "c"),
                                                       ("goal", "a"), ("bank rate", "b"), ("phone", "c"))]


def test_a_mixed_batch_equals_the_one_by_one_losses():
    model, tok = tiny_causal_lm(), tiny_tokenizer()
    pool = mixture([SENT_EX, TOPIC_EX])
    tr = MultiTaskTrainable(model, tok, [SENT, TOPIC], pool, TrainConfig(init="vocab"))
    tr.prepare()
    batch = [pool[0], pool[7], pool[2], pool[9], pool[11]]
    mixed, _ = tr.loss(batch, list(range(len(batch))))
    single = [batch_loss(tr.bank, tr.entries[x.task], [x.example])[0] for x in batch]
    assert torch.allclose(mixed, torch.stack(single).mean(), atol=1e-6)
    mixed.backward()
    grad = tr.trained.parameters()["prompt"].grad
    assert grad is not None and grad.abs().sum() > 0  # both tasks' losses reach the one shared tensor


def test_mixture_sampling():
    big, small = SENT_EX * 4, TOPIC_EX[:2]
    prop = mixture([big, small])
    assert [sum(x.task == k for x in prop) for k in (0, 1)] == [24, 2]
    flat = mixture([big, small], "temperature", temperature=1e9)
    counts = [sum(x.task == k for x in flat) for k in (0, 1)]
    assert counts == [13, 13]  # a large temperature: equal shares, the small task repeated
    with pytest.raises(ValueError, match="sampling"):
        mixture([big, small], "uniform")


def test_training_on_a_mixture_saves_the_shared_prompt_per_task(tmp_path):
    model, tok = tiny_causal_lm(), tiny_tokenizer()
    cfg = TrainConfig(epochs=6, lr=0.1, batch_size=4, init="vocab", warmup_steps=2)
    res = train_multitask(model, tok, [SENT, TOPIC], [SENT_EX, TOPIC_EX], [SENT_EX, TOPIC_EX], cfg, out_dir=tmp_path,
                          progress=False)
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    assert set(res.history[-1]["valid"]["per_task"]) == {"sent", "topic"}
    a = SoftPrompt.load(tmp_path / "prompt.sent.safetensors", model)
    b = SoftPrompt.load(tmp_path / "prompt.topic.safetensors", model)
    assert torch.equal(a.embeddings, b.embeddings)
    assert (a.template, b.template) == (SENT.template, TOPIC.template)
    assert a.training["multitask"] == ["sent", "topic"]


def test_refuses_templates_that_cannot_share_a_prompt():
    model, tok = tiny_causal_lm(), tiny_tokenizer()
    other = Task(name="topic", kind="classification", template="{soft:5} article : {text} topic :",
                 verbalizer=TOPIC.verbalizer)
    with pytest.raises(ValueError, match="same number of soft tokens"):
        train_multitask(model, tok, [SENT, other], [SENT_EX, TOPIC_EX], None, TrainConfig(epochs=1), progress=False)
    with pytest.raises(ValueError, match="two or more"):
        train_multitask(model, tok, [SENT], [SENT_EX], None, TrainConfig(epochs=1), progress=False)
    assert isinstance(mixture([SENT_EX, TOPIC_EX])[0], TaskExample)


def test_cli_trains_one_prompt_on_two_builtin_tasks(tmp_path, monkeypatch):
    """`train --task a --task b` on built-in tasks (the demo set needs no data directory; a second
    built-in task does, so the CLI is checked with demo twice renamed away: refused, same name)."""
    from typer.testing import CliRunner

    from softprompt.cli import app

    model, tok = tiny_causal_lm(), tiny_tokenizer()
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    r = CliRunner().invoke(app, ["train", "--task", "demo", "--task", "demo", "--model", str(folder),
                                 "--out", str(tmp_path / "o"), "--max-steps", "2"])
    assert r.exit_code != 0 and "names must differ" in r.output
    r = CliRunner().invoke(app, ["train", "--task", "demo", "--task", "sst2", "--train-file", "x.csv"])
    assert r.exit_code != 0 and "built-in tasks only" in r.output


def test_cli_mixture_of_sst2_and_agnews(tmp_path):
    from typer.testing import CliRunner

    from softprompt.cli import app
    from softprompt.data import DataNotFoundError, load_task

    try:
        load_task("sst2", limit_per_split=1), load_task("agnews", limit_per_split=1)
    except (DataNotFoundError, FileNotFoundError) as e:
        pytest.skip(f"shared data not available: {e}")
    model, tok = tiny_causal_lm(), tiny_tokenizer()
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    out = tmp_path / "mix"
    r = CliRunner().invoke(app, ["train", "--task", "sst2", "--task", "agnews", "--model", str(folder), "--out", str(out),
                                 "--train-limit", "8", "--valid-limit", "4", "--test-limit", "4", "--max-steps", "3",
                                 "--mix", "temperature"])
    mpt = CliRunner().invoke(app, ["train", "--task", "sst2", "--task", "agnews", "--model", str(folder), "--out",
                                   str(tmp_path / "mpt"), "--train-limit", "8", "--valid-limit", "4", "--test-limit", "4",
                                   "--max-steps", "2", "--mpt-rank", "1"])
    assert mpt.exit_code == 0, mpt.output
    assert (tmp_path / "mpt" / "prompt._shared.safetensors").exists()
    assert r.exit_code == 0, r.output
    a = SoftPrompt.load(out / "prompt.sst2.safetensors", model)
    b = SoftPrompt.load(out / "prompt.agnews.safetensors", model)
    assert torch.equal(a.embeddings, b.embeddings) and a.training["multitask"] == ["sst2", "agnews"]
    assert "sst2" in r.output and "agnews" in r.output
