"""Instruction search (APE-style) on a tiny random model: candidates, induction through the
generate path, scoring on training data only with the calibrated scorer, and its cost."""
import random

import pytest

from softprompt.hard import baselines as B
from softprompt.hard import instruction_search as S
from softprompt.core.bank import PromptBank
from softprompt.core.calibrate import fit_calibration
from softprompt.core.scoring import classify
from softprompt.data import Example, Task, TaskData

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

TASK = Task(name="toy", kind="classification", template="{soft:4} review : {text} label :",
            verbalizer={"neg": " no", "pos": " yes"}, instruction="is the review good ? answer yes or no .")
POS = ["good movie", "great film", "love this movie", "amazing film", "happy great", "good good"]
NEG = ["bad movie", "awful film", "hate this movie", "terrible film", "sad awful", "bad bad"]
TRAIN = [Example({"text": t}, "pos") for t in POS] + [Example({"text": t}, "neg") for t in NEG]
TEST = [Example({"text": t}, lab) for t, lab in [("good film", "pos"), ("awful movie", "neg"), ("love it", "pos"),
                                                  ("slow film", "neg"), ("amazing", "pos"), ("terrible", "neg")]]
NLI = Task(name="nli", kind="classification", template="premise : {premise} hypothesis : {hypothesis} answer :",
           verbalizer={"entailment": " yes", "contradiction": " no", "neutral": " maybe"})


def test_candidates_order_dedupe_and_patterns():
    cands = S.instruction_candidates(TASK, user_instructions=["say  yes or no .", TASK.instruction], induced=["x"])
    assert cands[0] == TASK.instruction and cands[1] == "say yes or no ." and cands[-1] == "x"
    assert len(cands) == len(set(cands))
    pats = S.pattern_instructions(TASK)
    assert pats and all(p in cands for p in pats)
    assert all("{" not in p and "yes" in p for p in pats)
    nli = S.pattern_instructions(NLI)
    assert any("premise and hypothesis" in p for p in nli) and all("yes, no or maybe" in p or "yes, no, maybe" in p
                                                                  for p in nli)
    assert S.instruction_candidates(NLI)[0] == nli[0]  # no task instruction: patterns first
    with pytest.raises(ValueError, match="generation"):
        S.pattern_instructions(Task(name="qa", kind="generation", template="q : {text} a :"))


def test_instructions_file(tmp_path):
    f = tmp_path / "ins.txt"
    f.write_text("# mine\nrate the review .\n\n  answer yes if good .  \n")
    assert S.read_instructions_file(f) == ["rate the review .", "answer yes if good ."]
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match="no instructions"):
        S.read_instructions_file(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError):
        S.read_instructions_file(tmp_path / "missing.txt")


def test_induction_generates_through_the_model(lm):
    model, tok = lm
    bank = PromptBank(model, tok)
    out = S.induce_instructions(bank, TASK, TRAIN, n=3, seed=0, max_new_tokens=6)
    assert out == S.induce_instructions(model, TASK, TRAIN, n=3, seed=0, max_new_tokens=6, tokenizer=tok)
    assert 1 <= len(out) <= 3 and all(o[0].isupper() or not o[0].isalpha() for o in out)
    assert len(bank) == 0  # the induction entry is removed again
    assert S.clean_instruction(' classify the review.\nmore') == "Classify the review."
    assert S.clean_instruction("  \n") == ""
    with pytest.raises(ValueError, match="labelled"):
        S.induce_instructions(bank, TASK, [Example({"text": "x"})], n=1)


def test_search_scores_on_training_data_only(lm, tmp_path):
    model, tok = lm
    f = tmp_path / "ins.txt"
    f.write_text("answer yes or no .\n")
    data = TaskData(TASK, {"train": list(TRAIN), "test": list(TEST)})
    res = S.search_instructions(model, tok, TASK, data["train"], instructions_file=f, calibration="contextual",
                                induce=2, seed=0)
    cands = [c for c, _ in res.candidates]
    assert cands[:2] == [TASK.instruction, "answer yes or no ."] and res.sources["answer yes or no ."] == "user"
    assert res.best in cands and res.score == max(s for _, s in res.candidates)
    assert res.forward_passes >= len(cands) and res.seconds > 0 and res.calibration == "contextual"
    # the kept score is the calibrated zero-shot macro-F1 of the best instruction on the training data
    bank = PromptBank(model, tok)
    bank.add("best", B.zero_shot_template(TASK, res.best), verbalizer=TASK.verbalizer)
    cal = fit_calibration(bank, "best", "contextual")
    assert res.template == B.zero_shot_template(TASK, res.best) and res.fitted == cal
    assert res.score == pytest.approx(classify(bank, "best", TRAIN, calibration=cal).metrics["macro_f1"])
    # shuffling the test labels changes nothing: the search never sees test data
    labels = [ex.label for ex in data["test"]]
    random.Random(1).shuffle(labels)
    data.splits["test"] = [Example(ex.fields, lab) for ex, lab in zip(data["test"], labels)]
    again = S.search_instructions(model, tok, TASK, data["train"], instructions_file=f, calibration="contextual",
                                  induce=2, seed=0)
    assert (again.best, again.candidates) == (res.best, res.candidates)
    # ... while the training labels are what it scores against
    flipped = [Example(ex.fields, "pos" if ex.label == "neg" else "neg") for ex in TRAIN]
    other = S.search_instructions(model, tok, TASK, flipped, instructions_file=f, calibration="contextual", induce=2)
    assert [s for _, s in other.candidates] != [s for _, s in res.candidates]
    d = res.to_dict()
    assert d["n_candidates"] == len(cands) and d["fitted"]["method"] == "contextual"
    # the chosen prompt as an artifact: save, load, score with its own calibration
    res.to_prompt(model, TASK).save(tmp_path / "best.safetensors")
    from softprompt.core.prompts import SoftPrompt

    back = SoftPrompt.load(tmp_path / "best.safetensors", model=model)
    assert back.n_tokens == 0 and back.method == "hard_prompt" and back.calibration == cal
    assert back.training["instruction_search"]["best"] == res.best
    bank.add_prompt(back, "loaded")
    assert classify(bank, "loaded", TRAIN, calibration=back.calibration).metrics["macro_f1"] == pytest.approx(res.score)
    with pytest.raises(ValueError, match="soft slots"):
        S.hard_prompt(model, TASK, TASK.template)


@pytest.mark.parametrize("cal", ["none", "batch", "pmi"])
def test_search_with_each_calibration(lm, cal):
    model, tok = lm
    res = S.search_instructions(model, tok, TASK, TRAIN, calibration=cal, induce=0, metric="accuracy")
    assert res.calibration == cal and res.fitted.method == cal and res.metric == "accuracy"
    assert all(0 <= s <= 1 for _, s in res.candidates)


def test_search_refuses_bad_input(lm):
    model, tok = lm
    with pytest.raises(ValueError, match="labelled"):
        S.search_instructions(model, tok, TASK, [Example({"text": "good"})], induce=0)
    with pytest.raises(ValueError, match="calibration"):
        S.search_instructions(model, tok, TASK, TRAIN, calibration="platt")
    with pytest.raises(ValueError, match="metric"):
        S.search_instructions(model, tok, TASK, TRAIN, metric="auc")
