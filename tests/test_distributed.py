"""Data-parallel training: 2 processes (gloo on CPU, `accelerate launch`) end where 1 process ends.

Every case trains a tiny random model in fp32 twice with the same seed and global batch: once
here in one process, once in one 2-process launch that runs all cases (one launch, so the
start-up is paid once).  Batches are sized so that some rank gets an empty shard, classes are
weighted, validation and early stopping run; the prompt, history and best step must match to
float rounding.  Also: a run checkpointed by 1 process and resumed by 2, the frozen model
sharded with FSDP2 over the 2 processes, and `softprompt train --processes 2`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from softprompt.core.prompts import SoftPrompt
from softprompt.data import Example, Task
from softprompt.testing import tiny_causal_lm, tiny_tokenizer
from softprompt.training.prompt import TrainConfig, train_prompt
from softprompt.training.checkpoint import CHECKPOINT, load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
SRC, TESTS = Path(__file__).parents[1] / "src", Path(__file__).parent

TOY = Task(name="toy", kind="classification", template="{soft:4} review : {text} label :",
           verbalizer={"pos": " yes", "neg": " no"})
POS = ["good movie", "great film", "love this movie", "amazing film", "good good", "happy great"]
NEG = ["bad movie", "awful film", "hate this movie", "terrible film", "sad awful"]
TRAIN = [Example({"text": t}, "pos") for t in POS] + [Example({"text": t}, "neg") for t in NEG]  # 11: 5 + 5 + 1
QA = Task(name="qa", kind="generation", template="{soft:2} question : {q} answer :")
QA_TRAIN = [Example({"q": q}, target="the world", answers=("the world",)) for q in ("who", "what", "where", "why", "how")]

# batch 5 of 11 examples: each epoch ends with a 1-example batch, an empty shard on rank 1
PROMPT_CFG = TrainConfig(epochs=4, lr=0.1, batch_size=5, init="vocab", warmup_steps=2, eval_every=2, patience=4,
                         checkpoint_every=2, balance=True, seed=3)


def case_prompt(out: Path, resume: bool = False):
    return train_prompt(tiny_causal_lm(), tiny_tokenizer(), TOY, TRAIN, TRAIN[::2], PROMPT_CFG, out_dir=out,
                        resume=resume, progress=False)


def case_ptuning(out: Path, resume: bool = False):
    cfg = TrainConfig(method="ptuning", encoder="lstm", encoder_hidden=16, epochs=3, lr=0.01, batch_size=5,
                      init="vocab", warmup_steps=2, eval_every=3, seed=1)
    return train_prompt(tiny_causal_lm(), tiny_tokenizer(), TOY, TRAIN, TRAIN[1::2], cfg, out_dir=out,
                        resume=resume, progress=False)


def case_prefix(out: Path, resume: bool = False):  # prefix tuning on a generation task (generation validation)
    cfg = TrainConfig(method="prefix", prefix_tokens=3, epochs=4, lr=0.05, batch_size=3, init="vocab",
                      warmup_steps=1, eval_every=2, max_new_tokens=4, seed=2)
    return train_prompt(tiny_causal_lm("qwen2"), tiny_tokenizer(), QA, QA_TRAIN, QA_TRAIN, cfg, out_dir=out,
                        resume=resume, progress=False)


def case_encoder(out: Path, resume: bool = False):  # soft prompt + head on a tiny BERT (encoder.py's loop)
    from test_encoder import SENTIMENT, tiny_bert, tiny_bert_tokenizer, toy_examples

    from softprompt.training.encoder_head import train_encoder_prompt

    cfg = TrainConfig(epochs=2, batch_size=7, lr=0.1, warmup_steps=2, eval_every=2, init="random", seed=0)
    return train_encoder_prompt(tiny_bert(), tiny_bert_tokenizer(), SENTIMENT, toy_examples(15, seed=1),
                                toy_examples(9, seed=2), cfg, head_lr=0.2, out_dir=out, resume=resume, progress=False)


def case_probe(out: Path, resume: bool = False):  # head only on a tiny BERT: pooled features sharded and gathered
    from test_encoder import SENTIMENT, tiny_bert, tiny_bert_tokenizer, toy_examples

    from softprompt.training.encoder_head import train_encoder_prompt

    cfg = TrainConfig(epochs=2, batch_size=7, lr=0.1, warmup_steps=2, eval_every=2, seed=0)
    return train_encoder_prompt(tiny_bert(), tiny_bert_tokenizer(), SENTIMENT, toy_examples(15, seed=1),
                                toy_examples(9, seed=2), cfg, n_tokens=0, head_lr=0.2, out_dir=out, resume=resume,
                                progress=False)


IMBALANCED_VALID = [Example({"text": t}, "pos") for t in POS + POS[:2]] + [Example({"text": t}, "neg") for t in NEG[:2]]
"""8 pos / 2 neg (80/20): accuracy and macro-F1 can rank steps differently; both runs must use the one rule."""


def case_imbalanced(out: Path, resume: bool = False):
    return train_prompt(tiny_causal_lm(), tiny_tokenizer(), TOY, TRAIN, IMBALANCED_VALID, PROMPT_CFG, out_dir=out,
                        resume=resume, progress=False)


def case_fsdp(out: Path, resume: bool = False):
    """Prompt tuning with the frozen model's layers sharded over the processes (FSDP2 on gloo)."""
    from softprompt.training.distributed import launched, shard_frozen_model

    model = tiny_causal_lm()
    if launched():
        shard_frozen_model(model, "cpu")
    return train_prompt(model, tiny_tokenizer(), TOY, TRAIN, TRAIN[::2], PROMPT_CFG, out_dir=out, resume=resume,
                        progress=False)


CASES = {"prompt": case_prompt, "imbalanced": case_imbalanced, "ptuning": case_ptuning, "prefix": case_prefix, "encoder": case_encoder,
         "probe": case_probe, "fsdp": case_fsdp, "resume": case_prompt}

WORKER = textwrap.dedent("""
    import json, os, sys, torch
    sys.path.insert(0, {src!r}); sys.path.insert(0, {tests!r})
    from pathlib import Path
    import softprompt.training.prompt as T
    from test_distributed import CASES
    torch.set_num_threads(1)
    root = Path(sys.argv[1])
    real, seen = T.batch_loss, []
    def counting(bank, entry, examples, *a, **k):  # how many examples this rank trains on, step by step
        seen.append(len(examples))
        return real(bank, entry, examples, *a, **k)
    T.batch_loss = counting
    for name in sys.argv[2:]:
        seen.clear()
        CASES[name](root / name, resume=name == "resume")
        (root / name / f"seen.{{os.environ['RANK']}}.json").write_text(json.dumps(seen))
""")


def free_port() -> int:
    from softprompt.cli import _free_port

    return _free_port()


def launch(args: list[str], tmp_path: Path, *, timeout: int = 240) -> None:
    """Run ``python -m softprompt ARGS`` (or a script) under accelerate launch on 2 CPU processes."""
    from softprompt.cli import launch_command

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0",
           "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run(launch_command(2, args, free_port()), env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def assert_same_run(one: Path, two: Path, atol: float = 1e-4) -> None:
    """The same run to float rounding: sums over 2 shards round differently from one sum, and Adam
    carries the difference along (measured up to ~1.3e-5 on these runs)."""
    a, b = SoftPrompt.load(one / "prompt.safetensors"), SoftPrompt.load(two / "prompt.safetensors")
    assert a.training["best_step"] == b.training["best_step"] and a.training["steps"] == b.training["steps"]
    torch.testing.assert_close(b.embeddings, a.embeddings, atol=atol, rtol=0)
    assert (a.kv is None) == (b.kv is None)
    if a.kv is not None:
        torch.testing.assert_close(b.kv, a.kv, atol=atol, rtol=0)
    for k in (a.head or {}):
        torch.testing.assert_close(b.head[k], a.head[k], atol=atol, rtol=0)
    ha, hb = json.loads((one / "history.json").read_text()), json.loads((two / "history.json").read_text())
    assert [h["step"] for h in ha] == [h["step"] for h in hb]
    assert [h["loss"] for h in hb] == pytest.approx([h["loss"] for h in ha], rel=1e-4, abs=atol)
    for x, y in zip(ha, hb):
        assert ("valid" in x) == ("valid" in y)
        if "valid" in x:
            assert y["valid"] == pytest.approx(x["valid"], rel=1e-4, abs=atol), (x, y)


class Interrupted(Exception):
    pass


def test_two_processes_train_the_same_prompt_as_one(tmp_path, monkeypatch):
    import softprompt.training.prompt as T

    one, two = tmp_path / "one", tmp_path / "two"
    names = ["prompt", "imbalanced", "ptuning", "prefix", "encoder", "probe", "fsdp"]
    for name in names:
        CASES[name](one / name)
    # a 1-process run that dies after its checkpoint at step 4, to be resumed by 2 processes
    real, calls = T.batch_loss, {"n": 0}

    def dies_at_step_five(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise Interrupted
        return real(*a, **k)

    with monkeypatch.context() as m:
        m.setattr(T, "batch_loss", dies_at_step_five)
        with pytest.raises(Interrupted):
            case_prompt(two / "resume")
    assert load_checkpoint(two / "resume" / CHECKPOINT)[1]["step"] == 4
    assert not (two / "resume" / "prompt.safetensors").exists()

    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(src=str(SRC), tests=str(TESTS)))
    # ``launch_command`` runs ``-m softprompt ARGS``; a script runs the same launcher with the path instead
    from softprompt import cli

    real_cmd = cli.launch_command

    def script_command(processes, args, port=None):
        cmd = real_cmd(processes, args, port)
        return cmd[: cmd.index("-m", 3)] + [str(script)] + cmd[cmd.index("-m", 3) + 2:]

    monkeypatch.setattr(cli, "launch_command", script_command)
    launch([str(two), *names, "resume"], tmp_path)

    # each rank trained on its shard only: ceil(b/2) and floor(b/2) rows of a b-row batch (one
    # weight-0 row for an empty shard), not the whole batch as a plain copy of the 1-process run would
    from softprompt.training.loop import batch_plan

    plan = batch_plan(len(TRAIN), PROMPT_CFG.batch_size, PROMPT_CFG.epochs, PROMPT_CFG.seed)
    steps = len(json.loads((one / "prompt" / "history.json").read_text()))
    assert json.loads((two / "prompt" / "seen.0.json").read_text()) == [(len(b) + 1) // 2 for _, b in plan[:steps]]
    assert json.loads((two / "prompt" / "seen.1.json").read_text()) == [max(len(b) // 2, 1) for _, b in plan[:steps]]
    assert 1 in [len(b) for _, b in plan[:steps]], "the plan should include a batch that leaves rank 1 empty"
    for name in names:
        assert_same_run(one / name, two / name)
    assert_same_run(one / "prompt", two / "resume")  # resumed on 2 processes from a 1-process checkpoint
    # imbalanced validation (80/20): both runs kept the step best by selection.classification_score
    from softprompt.training.selection import classification_score

    hist = [h for h in json.loads((one / "imbalanced" / "history.json").read_text()) if "valid" in h]
    best = max(hist, key=lambda h: classification_score(h["valid"]))["step"]
    assert SoftPrompt.load(one / "imbalanced" / "prompt.safetensors").training["best_step"] == best
    # sanity: the comparison can fail - different seeds give different prompts
    a = SoftPrompt.load(one / "prompt" / "prompt.safetensors").embeddings
    b = SoftPrompt.load(one / "ptuning" / "prompt.safetensors").embeddings
    assert not torch.allclose(a, b, atol=1e-3)


def test_cli_processes_flag_launches_a_data_parallel_run(tmp_path):
    """`softprompt train --processes 2` re-runs itself under accelerate launch and gives the
    1-process prompt, with the frozen model replicated or sharded (--shard-model); only the
    main process writes and reports (one prompt, one metrics file, one report)."""
    model_dir = tmp_path / "tiny"
    tiny_causal_lm().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps({"text": ex.fields["text"], "label": ex.label}) + "\n" for ex in TRAIN))
    # the 1-process reference, in this process: what `softprompt train` runs with these options
    cfg = TrainConfig(epochs=3, batch_size=5, lr=0.1, init="vocab", warmup_steps=2, eval_every=2)
    ref = train_prompt(tiny_causal_lm(), tiny_tokenizer(), TOY, TRAIN, TRAIN, cfg, out_dir=tmp_path / "one",
                       progress=False)
    args = ["train", "--model", str(model_dir), "--train-file", str(data), "--valid-file", str(data),
            "--test-file", str(data), "--template", TOY.template, "--verbalizer", "pos=yes", "--verbalizer", "neg=no",
            "--epochs", "3", "--batch-size", "5", "--lr", "0.1", "--init", "vocab", "--warmup-steps", "2",
            "--eval-every", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    metrics = []
    for out, extra in (("two", ["--processes", "2"]), ("sharded", ["--processes=2", "--shard-model"])):
        proc = subprocess.run([sys.executable, "-m", "softprompt", *args, "--out", str(tmp_path / out), *extra],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
        assert "launching 2 processes" in proc.stderr
        assert proc.stdout.count("saved ") == 1, proc.stdout  # the main process reports, once
        assert_same_run(tmp_path / "one", tmp_path / out)
        assert SoftPrompt.load(tmp_path / out / "prompt.safetensors").verbalizer == ref.prompt.verbalizer
        metrics.append(json.loads((tmp_path / out / "metrics.json").read_text())["test"])
    for k in ("accuracy", "macro_f1", "per_label_f1"):  # test scoring: main only / every rank (sharded)
        assert metrics[0][k] == pytest.approx(metrics[1][k])


def test_help_documents_the_distributed_options():
    from typer.testing import CliRunner

    from softprompt.cli import app

    out = CliRunner().invoke(app, ["train", "--help"], terminal_width=200).output
    assert "--processes" in out and "--shard-model" in out


def test_shard_model_refuses_a_single_process_and_other_methods(tmp_path):
    from softprompt.training.distributed import shard_frozen_model

    with pytest.raises(ValueError, match="several processes"):
        shard_frozen_model(tiny_causal_lm())
    model = tiny_causal_lm()
    model.softprompt_sharded = True  # as shard_frozen_model leaves it
    with pytest.raises(ValueError, match="method 'prompt' only"):
        train_prompt(model, tiny_tokenizer(), TOY, TRAIN, None, TrainConfig(method="prefix", epochs=1), progress=False)
    with pytest.raises(ValueError, match="context 'cached'"):
        train_prompt(model, tiny_tokenizer(), TOY, TRAIN, None, TrainConfig(context="cached", epochs=1), progress=False)


def test_processes_flag_must_match_the_launcher(monkeypatch):
    from typer.testing import CliRunner

    from softprompt.cli import app

    monkeypatch.setenv("WORLD_SIZE", "2")
    res = CliRunner().invoke(app, ["train", "--task", "demo", "--processes", "3"])
    assert res.exit_code == 2 and "launcher that started 2" in res.output
