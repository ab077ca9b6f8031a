"""A prompt's stored calibration is applied everywhere it is used: the server's answer (label and
probabilities, single prompts and each ensemble member before the vote) equals
``scoring.classify`` with the same calibration, and ``eval`` / ``predict`` use it by default."""
import json

import pytest
import torch
from typer.testing import CliRunner

from softprompt.hard import baselines as B
from softprompt.core.bank import PromptBank
from softprompt.core.calibration import Calibration
from softprompt.core.calibrate import fit_calibration
from softprompt.cli import app
from softprompt.core.prompts import ModelIdentity, SoftPrompt
from softprompt.core.scoring import classify
from softprompt.serve.engine import Engine
from softprompt.serve.testing import random_prompt
from softprompt.data import Example, Task
from softprompt.testing import tiny_causal_lm, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

TASK = Task(name="toy", kind="classification", template="{soft:3} review : {text} label :",
            verbalizer={"neg": " no", "pos": " yes"}, instruction="is the review good ?")
TEXTS = ["the movie was good", "awful service , slow", "great", "why is my refund delayed", "love this film", "help"]
GOLD = ["pos", "neg", "pos", "neg", "pos", "neg"]


def calibrated(model, tok, prompt: SoftPrompt, method: str) -> SoftPrompt:
    bank = PromptBank(model, tok)
    bank.add_prompt(prompt, "p")
    prompt.calibration = fit_calibration(bank, "p", method, inputs=[Example({"text": t}) for t in TEXTS])
    return prompt


def hard_prompt(model, template: str, verbalizer: dict) -> SoftPrompt:
    ident = ModelIdentity.of(model)
    return SoftPrompt(torch.zeros(0, ident.hidden_size), ident, template=template, verbalizer=verbalizer,
                      task="toy", method="hard_prompt")


def reference(model, tok, prompt: SoftPrompt):
    bank = PromptBank(model, tok)
    bank.add_prompt(prompt, "ref")
    return classify(bank, "ref", [Example({"text": t}) for t in TEXTS], calibration=prompt.calibration)


@pytest.fixture(scope="module")
def setup():
    model, tok = tiny_causal_lm("llama"), tiny_tokenizer()
    soft = calibrated(model, tok, random_prompt(model, TASK.template, verbalizer=TASK.verbalizer, seed=1), "contextual")
    hard = calibrated(model, tok, hard_prompt(model, B.zero_shot_template(TASK), TASK.verbalizer), "pmi")
    ens = [calibrated(model, tok, random_prompt(model, TASK.template, verbalizer=TASK.verbalizer, seed=5), "batch"),
           calibrated(model, tok, random_prompt(model, "{soft:2} text {text} ?", verbalizer={"pos": " yes", "neg": " no"},
                                                seed=6), "contextual")]
    return model, tok, {"soft": soft, "hard": hard, "ens": ens}


def test_server_answer_equals_classify_with_the_same_calibration(setup):
    model, tok, ps = setup
    assert all(p.calibration.active for p in [ps["soft"], ps["hard"], *ps["ens"]])
    with Engine(model, tok, max_batch_size=8, max_wait_ms=5) as eng:
        for name, p in ps.items():
            eng.register(name, p)
        got = {name: eng.classify(name, TEXTS) for name in ps}
    for name in ("soft", "hard"):
        ref = reference(model, tok, ps[name])
        for r, pred, probs, raw in zip(got[name], ref.predictions, ref.probabilities.tolist(), ref.raw_scores.tolist()):
            assert r.label == pred
            assert r.probabilities == pytest.approx(dict(zip(ref.labels, probs)), abs=1e-5)
            assert list(r.scores.values()) == pytest.approx(raw, abs=1e-4)  # scores stay the raw log-probs
    refs = [reference(model, tok, p) for p in ps["ens"]]
    for i, r in enumerate(got["ens"]):
        members = [dict(zip(ref.labels, ref.probabilities[i].tolist())) for ref in refs]
        mean = {lab: sum(m[lab] for m in members) / len(members) for lab in ("neg", "pos")}
        assert r.probabilities == pytest.approx(mean, abs=1e-5)
        assert r.label == max(mean, key=mean.get)
        assert [m["label"] for m in r.members] == [ref.predictions[i] for ref in refs]


def test_calibration_changes_the_served_answer(setup):
    """Guard against a test that cannot fail: a strong prior must move the served probabilities."""
    model, tok, ps = setup
    p = random_prompt(model, TASK.template, verbalizer=TASK.verbalizer, seed=1)
    skewed = random_prompt(model, TASK.template, verbalizer=TASK.verbalizer, seed=1)
    skewed.calibration = Calibration("batch", [-0.01, -5.0])
    with Engine(model, tok, max_batch_size=8, max_wait_ms=5) as eng:
        eng.register("plain", p)
        eng.register("skewed", skewed)
        a, b = eng.classify("plain", TEXTS), eng.classify("skewed", TEXTS)
    assert all(y.probabilities["pos"] > x.probabilities["pos"] for x, y in zip(a, b))


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    tiny_causal_lm().save_pretrained(folder / "tiny")
    tiny_tokenizer().save_pretrained(folder / "tiny")
    (folder / "test.csv").write_text("text,label\n" + "".join(f"{t.replace(',', '')},{g}\n" for t, g in zip(TEXTS, GOLD)))
    return folder


def test_eval_and_predict_use_the_saved_calibration(user_folder):
    model, tok = tiny_causal_lm(), tiny_tokenizer()
    hp = calibrated(model, tok, hard_prompt(model, B.zero_shot_template(TASK), TASK.verbalizer), "pmi")
    path = user_folder / "hard.safetensors"
    hp.save(path)
    texts = [t.replace(",", "") for t in TEXTS]
    bank = PromptBank(model, tok)
    bank.add_prompt(hp, "h")
    exs = [Example({"text": t}, g) for t, g in zip(texts, GOLD)]
    want = {c: classify(bank, "h", exs, calibration=cal)
            for c, cal in (("saved", hp.calibration), ("none", Calibration()),
                           ("batch", fit_calibration(bank, "h", "batch", inputs=exs)))}
    for choice, ref in want.items():
        out = user_folder / f"m-{choice}.json"
        r = CliRunner().invoke(app, ["eval", str(path), "--model", str(user_folder / "tiny"), "--test-file",
                                     str(user_folder / "test.csv"), "--calibration", choice, "--json", str(out)])
        assert r.exit_code == 0, r.output
        m = json.loads(out.read_text())["soft"]
        assert m["accuracy"] == pytest.approx(ref.metrics["accuracy"]) and m["confusion"] == ref.metrics["confusion"]
        assert m["calibration"]["method"] == ("pmi" if choice == "saved" else choice)
    out = user_folder / "m-several.json"
    r = CliRunner().invoke(app, ["eval", str(path), "--model", str(user_folder / "tiny"), "--test-file",
                                 str(user_folder / "test.csv"), "--calibration", "none, batch", "--json", str(out)])
    assert r.exit_code == 0, r.output
    several = json.loads(out.read_text())
    assert sorted(several) == ["soft/batch", "soft/none"]
    for choice in ("none", "batch"):
        assert several[f"soft/{choice}"]["confusion"] == want[choice].metrics["confusion"]
    r = CliRunner().invoke(app, ["predict", str(path), "--model", str(user_folder / "tiny")]
                           + [a for t in texts for a in ("--text", t)])
    assert r.exit_code == 0, r.output
    answers, dec, text = [], json.JSONDecoder(), r.output
    pos = text.find("{")
    while pos != -1:
        obj, end = dec.raw_decode(text, pos)
        answers.append(obj)
        pos = text.find("{", end)
    ref = want["saved"]
    assert [a["label"] for a in answers] == ref.predictions
    for a, probs in zip(answers, ref.probabilities.tolist()):
        assert list(a["probabilities"].values()) == pytest.approx(probs, abs=1e-4)
    bad = CliRunner().invoke(app, ["predict", str(path), "--model", str(user_folder / "tiny"), "--text", "x",
                                   "--calibration", "platt"])
    assert bad.exit_code != 0 and "--calibration" in bad.output


def test_registry_serves_a_calibrated_hard_prompt_file(setup, tmp_path):
    """A hard-prompt artifact (no soft slots) dropped in the prompt folder is served with its calibration."""
    from softprompt.serve.registry import Registry

    model, tok, ps = setup
    ps["hard"].save(tmp_path / "hard.safetensors")
    with Engine(model, tok, max_batch_size=8, max_wait_ms=5) as eng:
        Registry(tmp_path, eng).sync()
        got = eng.classify("hard", TEXTS)
    ref = reference(model, tok, SoftPrompt.load(tmp_path / "hard.safetensors"))
    assert [r.label for r in got] == ref.predictions
    for r, probs in zip(got, ref.probabilities.tolist()):
        assert r.probabilities == pytest.approx(dict(zip(ref.labels, probs)), abs=1e-5)
