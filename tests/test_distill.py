"""Distillation (apps/distill.py) on tiny models: the student learns the teacher's answers, never reads
labels, reuses the teacher's stored outputs, and is an ordinary prompt the server answers with."""
import json
import random

import pytest
import torch
from typer.testing import CliRunner

from softprompt.apps.distill import (TEACHER_CACHE, Teacher, compare_to_teacher, distil, distillation_examples,
                                     teacher_outputs)
from softprompt.cli import app
from softprompt.core.bank import PromptBank
from softprompt.core.calibration import Calibration
from softprompt.core.losses import classification_loss
from softprompt.core.prompts import SoftPrompt
from softprompt.core.scoring import classify
from softprompt.data import Example, Task
from softprompt.serve.engine import Engine
from softprompt.testing import tiny_causal_lm, tiny_tokenizer
from softprompt.training.prompt import TrainConfig, train_prompt

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

POS = ["good movie", "great film", "love this movie", "amazing film", "good good", "happy great", "great great",
       "love love", "good film", "amazing movie"]
NEG = ["bad movie", "awful film", "hate this movie", "terrible film", "bad bad", "sad awful", "awful awful",
       "hate hate", "bad film", "terrible movie"]
TASK = Task(name="toy", kind="classification", template="{soft:4} review : {text} label :",
            verbalizer={"pos": " yes", "neg": " no"})
LABELLED = [Example({"text": t}, "pos") for t in POS] + [Example({"text": t}, "neg") for t in NEG]
FAST = dict(max_steps=40, eval_every=5, patience=20, warmup_steps=2, batch_size=4, reparam="none")  # direct: lr as given


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model and a teacher that knows the toy task (a prompt trained on its labels, then
    given a calibration so the teacher's scores are not the raw ones)."""
    model, tok = tiny_causal_lm(), tiny_tokenizer()
    res = train_prompt(model, tok, TASK, LABELLED, LABELLED,
                       TrainConfig(epochs=15, lr=0.1, batch_size=4, init="vocab", warmup_steps=2), progress=False)
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    res.prompt.calibration = Calibration("batch", [-0.6, -0.8])
    res.prompt.save(path)
    teacher = Teacher.from_artifact(path, model)
    return model, tok, teacher, path


def _student_task() -> Task:
    return Task(name="toy", kind="classification", template="{soft:4} review : {text} label :",
                verbalizer=TASK.verbalizer)


def test_soft_targets_are_the_cross_entropy_to_the_teacher():
    scores = torch.tensor([[0.2, -1.0], [-0.3, 0.4]])
    probs = torch.tensor([[0.7, 0.3], [0.1, 0.9]])
    got = classification_loss(scores, torch.tensor([0, 1]), target_probs=probs)
    want = -(probs * scores.log_softmax(-1)).sum(-1).mean()
    assert torch.allclose(got, want)
    one_hot = classification_loss(scores, torch.tensor([0, 1]), target_probs=torch.eye(2))
    assert torch.allclose(one_hot, classification_loss(scores, torch.tensor([0, 1])))


def test_loss_falls_and_agreement_rises(setup, tmp_path):
    model, tok, teacher, _ = setup
    inputs = [Example(dict(ex.fields)) for ex in LABELLED] * 2
    d = distil(model, tok, _student_task(), teacher, inputs, n_tokens=3, valid_fraction=0.25, search=False,
               out_dir=tmp_path, progress=False, lr=0.05, init="random", **dict(FAST, max_steps=80))
    hist = d.result.history
    assert hist[-1]["loss"] < 0.7 * hist[0]["loss"], (hist[0]["loss"], hist[-1]["loss"])
    valids = [h["valid"]["accuracy"] for h in hist if h.get("valid")]
    assert max(valids) > valids[0], valids
    assert d.agreement_valid == pytest.approx(max(valids))
    assert d.agreement_valid >= 0.8, valids
    saved = SoftPrompt.load(tmp_path / "prompt.safetensors", model)
    assert saved.training["distilled_from"]["template"] == teacher.template
    assert saved.n_tokens == 3


def test_student_never_reads_labels(setup, tmp_path):
    """Inputs given with their labels, or with the labels shuffled, give the same student."""
    model, tok, teacher, _ = setup
    shuffled = [e.label for e in LABELLED]
    random.Random(3).shuffle(shuffled)
    assert shuffled != [e.label for e in LABELLED]
    runs = []
    for i, labels in enumerate(([e.label for e in LABELLED], shuffled)):
        inputs = [Example(dict(ex.fields), lab) for ex, lab in zip(LABELLED, labels)]
        d = distil(model, tok, _student_task(), teacher, inputs, n_tokens=3, search=False, out_dir=tmp_path / str(i),
                   progress=False, lr=0.1, **dict(FAST, max_steps=10))
        runs.append(d.prompt.embeddings)
    assert torch.equal(runs[0], runs[1])


def test_teacher_outputs_are_stored_and_reused(setup, tmp_path, monkeypatch):
    model, tok, teacher, _ = setup
    inputs = [Example(dict(ex.fields)) for ex in LABELLED]
    first = teacher_outputs(model, tok, TASK, teacher, inputs, cache_dir=tmp_path, progress=False)
    assert not first["cached"] and (tmp_path / TEACHER_CACHE).exists()
    import softprompt.apps.distill as D

    def refuse(*a, **k):
        raise AssertionError("the teacher was scored again")

    monkeypatch.setattr(D, "classify", refuse)
    again = teacher_outputs(model, tok, TASK, teacher, inputs, cache_dir=tmp_path, progress=False)
    assert again["cached"] and again["scores"] == first["scores"]
    with pytest.raises(AssertionError, match="scored again"):  # other inputs: recomputed, not a stale cache
        teacher_outputs(model, tok, TASK, teacher, inputs[:-1], cache_dir=tmp_path, progress=False)
    # the stored scores are the teacher's calibrated ones
    monkeypatch.undo()
    bank = PromptBank(model, tok)
    ref = classify(bank, teacher.add_to(bank), inputs, calibration=teacher.calibration)
    assert torch.allclose(torch.tensor(first["scores"]), ref.scores.float(), atol=1e-5)
    exs = distillation_examples(TASK, inputs, first, temperature=2.0)
    assert [e.label for e in exs] == ref.predictions
    assert all(abs(sum(e.soft_label) - 1) < 1e-6 for e in exs)


def test_distilled_prompt_is_served_like_eval(setup, tmp_path):
    model, tok, teacher, _ = setup
    d = distil(model, tok, _student_task(), teacher, [Example(dict(ex.fields)) for ex in LABELLED], n_tokens=3,
               search=False, out_dir=tmp_path, progress=False, lr=0.1, **dict(FAST, max_steps=10))
    prompt = SoftPrompt.load(tmp_path / "prompt.safetensors", model)
    texts = [ex.fields["text"] for ex in LABELLED]
    with Engine(model, tok, max_batch_size=8, max_wait_ms=5) as eng:
        eng.register("student", prompt)
        served = eng.classify("student", texts)
    bank = PromptBank(model, tok)
    ref = classify(bank, bank.add_prompt(prompt, "s"), [Example({"text": t}) for t in texts])
    assert [r.label for r in served] == ref.predictions
    report = compare_to_teacher(model, tok, TASK, d, LABELLED, latency_examples=4)
    assert 0.0 <= report["agreement"] <= 1.0 and report["student"]["accuracy"] >= 0.0
    assert report["student_tokens_per_query"] == report["teacher_tokens_per_query"] - 1  # 3 soft tokens, not 4


def test_cli_distils_user_files(setup, tmp_path):
    model, tok, _, teacher_path = setup
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    unl = tmp_path / "inputs.csv"
    unl.write_text("text\n" + "\n".join(ex.fields["text"] for ex in LABELLED) + "\n")
    test = tmp_path / "test.csv"
    test.write_text("text,label\n" + "\n".join(f"{ex.fields['text']},{ex.label}" for ex in LABELLED) + "\n")
    out = tmp_path / "out"
    args = ["distill", "--model", str(folder), "--unlabeled-file", str(unl), "--test-file", str(test),
            "--template", "{soft:4} review : {text} label :", "--verbalizer", "pos= yes", "--verbalizer", "neg= no",
            "--teacher", str(teacher_path), "--tokens", "2", "--max-steps", "6", "--no-search", "--out", str(out)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    report = json.loads((out / "distill.json").read_text())
    assert report["test"]["n_test"] == len(LABELLED) and "agreement" in report["test"]
    assert not report["teacher_cached"]
    r = CliRunner().invoke(app, args)  # again: the teacher's outputs come from the run folder
    assert r.exit_code == 0, r.output
    assert json.loads((out / "distill.json").read_text())["teacher_cached"]
    bad = CliRunner().invoke(app, ["distill", "--model", str(folder), "--unlabeled-file", str(unl),
                                   "--teacher", str(teacher_path), "--demos", "4"])
    assert bad.exit_code != 0 and "one or the other" in bad.output


def test_prefix_student_starts_from_the_teachers_head_text(setup, tmp_path):
    """--method prefix: key/value positions before the bare template, from the teacher's head text."""
    from softprompt.apps.distill import student_template, teacher_head_text

    model, tok, _, _ = setup
    teacher = Teacher("is the review good ?\nreview : {text} label :", TASK.verbalizer)
    assert teacher_head_text(teacher) == "is the review good ?\nreview :"
    assert student_template(TASK, 3, "prefix") == "review : {text} label :"
    d = distil(model, tok, _student_task(), teacher, [Example(dict(ex.fields)) for ex in LABELLED], n_tokens=3,
               method="prefix", search=False, progress=False, lr=0.01, **dict(FAST, max_steps=4))
    assert d.prompt.kv is not None and d.prompt.n_prefix == 3 and d.prompt.n_tokens == 0
    assert d.prompt.training["init"] == "text" and d.prompt.training["init_text"] == teacher_head_text(teacher)


def test_generation_student_learns_the_teachers_answers(tmp_path):
    """Sequence-level distillation: the teacher's greedy answers are the student's targets, and
    agreement is the student's exact match with them."""
    model, tok = tiny_causal_lm(), tiny_tokenizer()
    task = Task(name="qa", kind="generation", template="{soft:3} question : {q} answer :")
    teacher = Teacher("question : {q} answer :", None)
    inputs = [Example({"q": q}) for q in ("who", "what", "where", "why", "when", "how")]
    out = teacher_outputs(model, tok, task, teacher, inputs, cache_dir=tmp_path, progress=False)
    assert len(out["texts"]) == len(inputs)
    exs = distillation_examples(task, inputs, out)
    assert [e.target for e in exs] == out["texts"] and all(e.answers == (e.target,) for e in exs)
    d = distil(model, tok, task, teacher, inputs, n_tokens=3, valid_fraction=0.34, search=False, out_dir=tmp_path,
               progress=False, lr=0.1, **dict(FAST, max_steps=6))
    assert d.n_valid == 2 and d.agreement_valid is not None and 0.0 <= d.agreement_valid <= 1.0
    assert d.prompt.kind == "generation" and d.prompt.training["distilled_from"]["n_inputs"] == len(inputs)
