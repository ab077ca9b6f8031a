"""Issue 14 in `softprompt compare`: validation held out from the pool, calibrated hard-prompt
candidates, an lr grid, soft prompts that start from the chosen hard prompt, a decision block
chosen without test data, the model's chat format, and one-command use on a user's CSV files."""
import copy
import json
import random

import pytest
from typer.testing import CliRunner

from softprompt.apps import compare as C
from softprompt.apps.compare import decision as D
from softprompt.hard.chat import chat_template, chat_verbalizer
from softprompt.cli import _files_name, app, default_instruction, default_template
from softprompt.apps.report import load_results
from softprompt.data.splits import holdout_split
from softprompt.data import Example, Task, TaskData
from softprompt.testing import tiny_causal_lm, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

POS = ["good", "great", "love", "amazing", "happy", "fast", "thanks"]
NEG = ["bad", "awful", "hate", "terrible", "sad", "slow", "broken"]
TASK = Task(name="toy", kind="classification", template="{soft:4} review : {text} label :",
            verbalizer={"neg": " no", "pos": " yes"}, instruction="is the review good ? answer yes or no .")
CHAT = ("{% for m in messages %}<|user|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def mk(n, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        lab = "pos" if i % 2 else "neg"
        out.append(Example({"text": " ".join(rng.choice(POS if lab == "pos" else NEG) for _ in range(2))}, lab))
    return out


def small_config(**kw):
    base = dict(methods=("zero_shot", "few_shot", "soft"), train_limit=None, valid_limit=8, test_limit=None, shots=2,
                fewshot_seeds=(0,), fewshot_orders=1, prompt_length=2, seeds=(0,), lrs=(0.1, 0.3), epochs=1,
                min_steps=2, batch_size=8, warmup_steps=1, latency_examples=1, eval_batch_size=16)
    base.update(kw)
    return C.CompareConfig(**base)


def test_holdout_split_is_stratified_disjoint_and_seeded():
    pool = mk(40) + [Example({"text": "rare"}, "rare")]
    train, valid = holdout_split(pool, ["neg", "pos", "rare"], 0.25, 64, seed=3)
    assert len(valid) == 10 and len(train) == 31 and not {id(e) for e in train} & {id(e) for e in valid}
    assert sorted(e.label for e in valid) == ["neg"] * 5 + ["pos"] * 5  # the single "rare" example stays in training
    assert [e.fields for e in holdout_split(pool, None, 0.25, 64, seed=3)[1]] == [e.fields for e in valid]
    assert len(holdout_split(pool, None, 0.25, 4, seed=3)[1]) == 4  # capped by the limit
    assert holdout_split(pool, None, 0.0, 64) == (pool, [])


def test_compare_chooses_on_validation_and_starts_soft_prompts_from_the_hard_prompt(tmp_path):
    model, tok = tiny_causal_lm(), tiny_tokenizer()
    data = TaskData(TASK, {"train": mk(24), "test": mk(12, seed=1)})  # no validation split
    out = tmp_path / "rep"
    res = C.run_compare(small_config(methods=("zero_shot", "few_shot", "soft", "hybrid"), positions=("answer",)),
                        data, model, tok, out, progress=False, log=lambda s: None)
    d = res["data"]
    assert d["valid"] == 6 and d["train_pool"] == 18 and d["valid_source"] == "held out from the training pool"
    assert len(d["test_gold"]) == 12
    hard_runs = [r for r in res["runs"].values() if r["kind"] == "hard"]
    for r in hard_runs:  # every calibration, on validation and test
        assert set(r["variants"]) == set(C.CALIBRATIONS)
        assert all(v["valid"]["n"] == 6 and len(v["predictions"]) == 12 for v in r["variants"].values())
    # the start is the hard candidate best on validation; soft prompts start from its instruction
    hard, soft = D.candidates(res)
    best = D.select(hard, "macro_f1")
    assert res["start"]["run"] == best["run"] and res["start"]["calibration"] == best["calibration"]
    softs = [r for r in res["runs"].values() if r["kind"] == "soft"]
    assert {r["spec"]["lr"] for r in softs if "/main/" in r["id"]} == {0.1, 0.3}
    assert all(r["spec"]["init"] == "text" and r["spec"]["init_text"] == TASK.instruction
               for r in softs if "/main/" in r["id"])
    assert any(r["spec"]["template"].startswith(TASK.instruction) for r in softs if "hybrid" in r["id"])
    # the decision: chosen on validation, paired on test, soft cost = every training of the search
    dec = res["decision"]
    assert dec["hard"]["name"] == best["name"] and dec["soft"]["name"] == D.select(soft, "macro_f1")["name"]
    assert dec["soft"]["cost"]["search_runs"] == 3  # 2 learning rates + 1 hybrid
    assert dec["soft"]["cost"]["train_s"] >= sum(r["train"]["wall_s"] for r in softs) - 1e-6
    assert set(dec["difference"]) == {"macro_f1", "accuracy"} and dec["deploy"] in ("hard", "soft")
    assert json.loads((out / "results.json").read_text())["decision"]["recommendation"] == dec["recommendation"]
    # issue 23: every candidate carries its validation predictions; the block its floor, stability, break-even
    assert d["valid_gold"] and all(len(c["valid_predictions"]) == len(d["valid_gold"]) for c in hard + soft)
    assert dec["floor"]["label"] in TASK.labels and dec["stability"]["resamples"] == 200
    assert sum(dec["stability"]["counts"].values()) == 200 and "Stability:" in dec["recommendation"]
    assert dec["break_even"]["hard_ms"] == dec["hard"]["cost"]["latency_ms"] and dec["latency_limit"] is None
    # the chosen hard prompt is saved as an artifact that scores as the decision says
    from softprompt.core.bank import PromptBank
    from softprompt.core.prompts import SoftPrompt
    from softprompt.core.scoring import classify

    hp = SoftPrompt.load(out / dec["hard"]["artifact"])
    assert hp.calibration.method == dec["hard"]["calibration"] and hp.n_tokens == 0
    bank = PromptBank(model, tok)
    bank.add_prompt(hp, "chosen")
    again = classify(bank, "chosen", C._sample(data["test"], None, 0), calibration=hp.calibration)
    assert again.metrics["accuracy"] == pytest.approx(dec["hard"]["test"]["accuracy"])
    md = (out / "report.md").read_text()
    assert "## Decision" in md and "**Recommendation.**" in md and "## Calibration" in md and "Headline" not in md
    assert "**Checks on the choice.** Majority floor: always answering" in md
    # test labels do not move the choice: perturb every test score, recompute
    shuffled = copy.deepcopy(res)
    rng = random.Random(0)
    for r in shuffled["runs"].values():
        for v in (r.get("variants") or {}).values():
            v["test"] = {"accuracy": rng.random(), "macro_f1": rng.random()}
            v["predictions"] = [rng.randrange(2) for _ in v["predictions"]]
    again = D.from_results(shuffled)
    assert (again["hard"]["name"], again["soft"]["name"]) == (dec["hard"]["name"], dec["soft"]["name"])


def test_selection_by_validation_when_the_test_best_is_another_method():
    """A comparison's results where the test-best hard prompt is not the validation-best one: the
    decision takes the validation-best, and reports the other's better test score nowhere as chosen."""
    gold = [0, 1] * 10

    def run(rid, valid_f1, preds):
        test = D.metric_value(gold, preds, 2, "macro_f1")
        return {"id": rid, "label": rid, "kind": "hard", "status": "done", "tokens_added": 5,
                "variants": {"none": {"valid": {"macro_f1": valid_f1, "accuracy": valid_f1},
                                      "test": {"macro_f1": test, "accuracy": test}, "predictions": preds}}}

    perfect, poor = list(gold), [0] * 20
    results = {"task": {"kind": "classification", "verbalizer": {"a": " a", "b": " b"}},
               "config": {"select_metric": "macro_f1"}, "data": {"test_gold": gold, "majority_accuracy": 0.5},
               "rows": [{"name": "x", "family": "prompt engineering", "section": "main", "runs": ["test-best", "valid-best"]}],
               "runs": {"test-best": run("test-best", 0.4, perfect), "valid-best": run("valid-best", 0.9, poor)}}
    dec = D.from_results(results)
    assert dec["hard"]["name"] == "valid-best" and dec["hard"]["test"]["macro_f1"] < 0.5
    assert dec["hard"]["at_or_below_majority"] and dec["deploy"] == "hard"
    # without validation scores nothing is chosen (never by test)
    for r in results["runs"].values():
        r["variants"]["none"]["valid"] = None
    assert D.from_results(results)["deploy"] is None


def test_chat_format_rows_from_the_tokenizer_chat_template(tmp_path):
    model, tok = tiny_causal_lm(), tiny_tokenizer()
    tok.chat_template = CHAT
    tpl = chat_template(tok, "Q : {text} A :")
    assert tpl == "<|user|>Q : {text} A :\n<|assistant|>\n"
    assert chat_verbalizer({"pos": " yes"}, tpl) == {"pos": "yes"}  # after a line break: no leading space
    data = TaskData(TASK, {"train": mk(16), "validation": mk(4, 2), "test": mk(6, 1)})
    comp = C.Comparison(small_config(methods=("zero_shot", "few_shot")), data, model, tok, tmp_path, progress=False,
                        log=lambda s: None)
    runs, rows = comp.plan()
    assert [r.name for r in rows][:2] == ["zero-shot instruction (chat format)", "zero-shot instruction (plain format)"]
    chat = runs["zero_shot/chat"].spec
    assert chat["template"].startswith("<|user|>" + TASK.instruction) and chat["template"].endswith("<|assistant|>\n")
    assert chat["verbalizer"] == {"neg": "no", "pos": "yes"}
    assert runs["zero_shot"].spec["verbalizer"] == TASK.verbalizer
    fs = sorted(r for r in runs if r.startswith("few_shot"))
    assert fs == ["few_shot/k2/balanced/seed0/order0", "few_shot/k2/balanced/seed0/order0/chat"]
    assert [r.name for r in rows][2:] == ["few-shot k=2 (balanced, 1 seed x 1 order, chat format)",
                                          "few-shot k=2 (balanced, 1 seed x 1 order, plain format)"]
    searched = C.Comparison(small_config(methods=("search",)), data, model, tok, tmp_path, progress=False).plan()[0]
    assert searched["search"].spec["chat"] and searched["search/plain"].deps == ["search"]
    res = C.run_compare(small_config(methods=("search",), induce=0), data, model, tok, tmp_path / "s", progress=False,
                        log=lambda s: None, report=False)
    chat_run, plain_run = res["runs"]["search"], res["runs"]["search/plain"]
    assert chat_run["instruction"] == plain_run["instruction"] and chat_run["template"].startswith("<|user|>")
    assert plain_run["template"] == plain_run["instruction"] + "\nreview : {text} label :"
    assert {c["run"] for c in D.candidates(res)[0]} == {"search", "search/plain"}
    off = C.Comparison(small_config(methods=("zero_shot",), chat="off"), data, model, tok, tmp_path, progress=False)
    assert sorted(off.plan()[0]) == ["zero_shot"]


def test_user_file_defaults():
    from pathlib import Path

    assert default_template(["text"]) == "{soft:20}Text: {text}\nAnswer:"
    assert default_template(["premise", "hypothesis"]) == "{soft:20}Premise: {premise}\nHypothesis: {hypothesis}\nAnswer:"
    t = Task(name="x", kind="classification", template="{soft:2}Text: {text}\nAnswer:",
             verbalizer={"a": " ham", "b": " spam", "c": " other"})
    assert default_instruction(t) == "Classify the text. Answer ham, spam or other."
    assert _files_name(Path("d/sms_train.csv"), Path("d/sms_test.csv")) == "sms"
    assert _files_name(Path("data/train.csv"), Path("data/test.csv")) == "data"


def test_cli_compare_on_user_csv_in_one_command(tmp_path):
    """The README's one command on a user's CSV files (latin-1, other column names, no template,
    no instruction): defaults fill in the rest, and the report says how."""
    folder = tmp_path / "tiny"
    tiny_causal_lm().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    for split, n, seed in (("train", 16, 0), ("test", 8, 1)):
        rows = ["message;kind"] + [f"{e.fields['text']} café;{'spam' if e.label == 'pos' else 'ham'}"
                                   for e in mk(n, seed)]
        (tmp_path / f"sms_{split}.csv").write_bytes(("\n".join(rows) + "\n").replace(";", ",").encode("latin-1"))
    out = tmp_path / "rep"
    args = ["compare", "--model", str(folder), "--train-file", str(tmp_path / "sms_train.csv"),
            "--test-file", str(tmp_path / "sms_test.csv"), "--field", "text=message", "--label-column", "kind",
            "--verbalizer", "ham=no", "--verbalizer", "spam=yes", "--encoding", "latin-1", "--threads", "1",
            "--methods", "zero_shot,few_shot,soft", "--seeds", "0", "--lrs", "0.3", "--fewshot-seeds", "0",
            "--prompt-length", "2", "--epochs", "1", "--min-steps", "1", "--latency-examples", "1", "--no-progress",
            "--out", str(out)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    res = load_results(out)
    assert res["task"]["name"] == "sms" and res["task"]["template"] == "{soft:20}Text: {text}\nAnswer:"
    assert res["instruction"] == "Classify the text. Answer no or yes."
    assert res["config"]["shots"] == 4 and res["config"]["lrs"] == [0.3] and res["environment"]["threads"] == 1
    assert res["decision"]["recommendation"] and "Recommendation:" in r.output
    md = (out / "report.md").read_text()
    assert md.startswith("# Hard prompts vs soft prompts: sms on ")
    assert "Instruction built from the label words" in md and "## Decision" in md
    # --report-only recomputes the decision from results.json (e.g. after a rule changed)
    stale = dict(res, decision={"recommendation": "stale", "select_metric": "macro_f1"})
    (out / "results.json").write_text(json.dumps(stale))
    r = CliRunner().invoke(app, ["compare", "--out", str(out), "--report-only"])
    assert r.exit_code == 0, r.output
    md = (out / "report.md").read_text()
    assert "stale" not in md and res["decision"]["recommendation"] in md


def test_default_soft_runs_follow_the_training_recipe(tmp_path):
    """Issue 22: one home for the default learning rate and schedule, the recipe.  The main method's
    runs search their rate (costed as 2.75 runs), the sweeps train at the recipe's rate, both until
    convergence (at most the recipe's max_steps); without validation data nothing is searched."""
    from softprompt.apps.compare.planners import recipe_lr, search_runs
    from softprompt.training.recipe import DEFAULT_RECIPE

    model, tok = tiny_causal_lm(), tiny_tokenizer()
    cfg = C.CompareConfig(methods=("soft", "length"), lengths=(1, 20), seeds=(0,), latency_examples=1)
    assert cfg.lr is None and cfg.lrs == () and cfg.epochs is None and cfg.max_steps is None
    data = TaskData(TASK, {"train": mk(16), "validation": mk(4, 2), "test": mk(6, 1)})
    comp = C.Comparison(cfg, data, model, tok, tmp_path, progress=False, log=lambda s: None)
    runs, rows = comp.plan()
    main, sweep = runs["soft/main/len20/text/n16/seed0"], runs["soft/length/len1/text/n16/seed0"]
    assert main.spec["lr"] == "auto" and main.spec["search"]["seeds"] == 2
    assert sweep.spec["lr"] == recipe_lr(comp) == pytest.approx(DEFAULT_RECIPE.default_lr(model), rel=1e-5)
    assert main.spec["search"]["lrs"] == list(DEFAULT_RECIPE.search_lrs(model))
    for run in (main, sweep):
        assert (run.spec["max_steps"], run.spec["patience"]) == (DEFAULT_RECIPE.max_steps, DEFAULT_RECIPE.patience)
    assert search_runs(DEFAULT_RECIPE.max_steps) == 2.75 and main.cost > 2.5 * sweep.cost
    assert rows[0].name.endswith("lr chosen on validation)")
    # --restarts is a seed choice of its own: it replaces the search (the recipe's rate)
    best_of, _ = C.Comparison(C.CompareConfig(methods=("soft",), seeds=(0,), restarts=2), data, model, tok, tmp_path,
                              progress=False).plan()
    assert [(rid, r.spec["lr"]) for rid, r in best_of.items()] == [
        ("soft/main/len20/text/n16/seed0/best-of-2", recipe_lr(comp))]
    # no validation data: the main runs train at the recipe's rate, unsearched; --epochs fixes the schedule
    data = TaskData(TASK, {"train": mk(16), "test": mk(6, 1)})
    fixed = C.CompareConfig(methods=("soft",), seeds=(0,), valid_limit=0, epochs=3, min_steps=10)
    (run,) = C.Comparison(fixed, data, model, tok, tmp_path, progress=False).plan()[0].values()
    assert run.spec["lr"] == recipe_lr(comp) and (run.spec["max_steps"], run.spec["patience"]) == (10, None)


def test_help_is_not_cut_at_80_columns():
    r = CliRunner().invoke(app, ["compare", "--help"], terminal_width=80, env={"COLUMNS": "80"})
    assert r.exit_code == 0
    assert "zero_shot,few_shot,knn,search,cot,soft,length,init,hybrid" in r.output.replace("\n", "").replace(" ", "").replace("│", "")


def test_searched_instruction_knn_and_two_stage_cot_are_hard_candidates(tmp_path):
    model, tok = tiny_causal_lm(), tiny_tokenizer()
    data = TaskData(TASK, {"train": mk(16), "validation": mk(6, 2), "test": mk(8, 1)})
    cfg = small_config(methods=("zero_shot", "search", "knn", "cot"), induce=1, instructions=("say yes or no .",),
                       cot_max_new_tokens=3)
    res = C.run_compare(cfg, data, model, tok, tmp_path / "rep", progress=False, log=lambda s: None)
    search = res["runs"]["search"]
    assert search["search"]["n_candidates"] >= 3 and search["search"]["forward_passes"] > 0
    assert search["instruction"] in [c["instruction"] for c in search["search"]["candidates"]]
    assert search["search"]["n_train"] == 16  # the training pool only
    knn = res["runs"]["knn/k2"]
    assert {"none", "contextual", "batch"} <= set(knn["variants"]) and knn["valid_metrics"]["n"] == 6
    assert res["runs"]["cot"]["metrics"]["n"] == 8 and set(res["runs"]["cot"]["variants"]) == {"none", "batch"}
    hard, soft = D.candidates(res)
    assert {c["run"] for c in hard} == {"zero_shot", "search", "knn/k2", "cot"} and not soft
    assert res["decision"]["deploy"] == "hard" and res["decision"]["soft"] is None
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "searched instruction" in md and "nearest-neighbour" in md and "ranked answer" in md
    # the search never sees validation or test labels: shuffled, the same instruction is chosen
    rng = random.Random(5)
    shuffled = TaskData(TASK, {"train": mk(16), "validation": [Example(e.fields, rng.choice(["pos", "neg"])) for e in mk(6, 2)],
                               "test": [Example(e.fields, rng.choice(["pos", "neg"])) for e in mk(8, 1)]})
    again = C.run_compare(small_config(methods=("search",), induce=1, instructions=("say yes or no .",)), shuffled,
                          model, tok, tmp_path / "again", progress=False, log=lambda s: None, report=False)
    assert again["runs"]["search"]["instruction"] == search["instruction"]


def test_training_and_restarts_choose_by_macro_f1_not_accuracy(monkeypatch):
    """A prompt stuck on the majority class (accuracy 0.8, macro-F1 0.44) must score below a
    balanced one (accuracy 0.7, macro-F1 0.67) in validate(), which picks the best step and restart."""
    import torch

    from softprompt.training import prompt as T
    from softprompt.core.scoring import Classification, classification_metrics

    gold = ["a"] * 8 + ["b"] * 2
    preds = {"stuck": ["a"] * 10, "balanced": ["a"] * 5 + ["b"] * 3 + ["b"] * 2}

    class Entry:
        kind = "classification"

    class Bank:
        entries = {"stuck": Entry(), "balanced": Entry()}

    def fake_classify(bank, entry, examples, batch_size=32, **scoring_options):
        p = preds[entry]
        scores = torch.tensor([[0.0, -1.0] if x == "a" else [-1.0, 0.0] for x in p])
        return Classification(["a", "b"], p, scores.softmax(-1), scores, classification_metrics(gold, p, ["a", "b"]))

    monkeypatch.setattr(T, "classify", fake_classify)
    exs = [Example({"text": "x"}, g) for g in gold]
    stuck, balanced = (T.validate(Bank(), e, exs, T.TrainConfig()) for e in ("stuck", "balanced"))
    assert stuck["accuracy"] > balanced["accuracy"] and balanced["score"] > stuck["score"]


def _tiny_folder(tmp_path):
    folder = tmp_path / "tiny"
    tiny_causal_lm().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_cli_eval_takes_a_verbalizer(tmp_path):
    folder = _tiny_folder(tmp_path)
    (tmp_path / "t.csv").write_text("text,label\n" + "".join(f"{e.fields['text']},{e.label}\n" for e in mk(6)))
    out = tmp_path / "m.json"
    args = ["eval", "--hard", "--model", str(folder), "--test-file", str(tmp_path / "t.csv"), "--verbalizer", "neg=no",
            "--verbalizer", "pos=yes", "--json", str(out)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["hard"]["n"] == 6


def test_cli_demo_shows_the_searched_calibrated_hard_prompt(tmp_path):
    r = CliRunner().invoke(app, ["demo", "--model", str(_tiny_folder(tmp_path)), "--max-steps", "2", "--out",
                                 str(tmp_path / "demo")])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.replace("│", " ").split())
    assert "searched instruction (" in text and "contextual calibration" in text and "soft prompt" in text
    assert (tmp_path / "demo" / "prompt.safetensors").exists()


def test_score_variants_batch_prior_equals_fit_calibration(lm):
    """The batch prior taken from the scores already computed is fit_calibration's own."""
    from softprompt.core.bank import PromptBank
    from softprompt.core.calibrate import fit_calibration
    from softprompt.apps.compare.variants import score_variants

    model, tok = lm
    bank = PromptBank(model, tok)
    bank.add("p", "review : {text} label :", verbalizer=TASK.verbalizer)
    valid, test = mk(6, 2), mk(8, 1)
    sv = score_variants(bank, "p", valid, test, ["none", "batch", "contextual"])
    ref = fit_calibration(bank, "p", "batch", inputs=test).log_prior
    assert sv["variants"]["batch"]["calibration"]["log_prior"] == pytest.approx(ref, abs=1e-5)
    assert sv["variants"]["contextual"]["calibration"]["log_prior"] == pytest.approx(
        fit_calibration(bank, "p", "contextual").log_prior, abs=1e-6)
    assert sv["valid_s"] >= 0 and sv["calibration"] in ("none", "batch", "contextual")


def test_no_validation_means_no_decision_and_the_report_says_why(tmp_path):
    from softprompt.apps.report import write_report

    model, tok = tiny_causal_lm(), tiny_tokenizer()
    data = TaskData(TASK, {"train": mk(12), "test": mk(6, 1)})
    res = C.run_compare(small_config(methods=("zero_shot", "soft"), valid_limit=0), data, model, tok, tmp_path,
                        progress=False, log=lambda s: None, report=False)
    assert res["data"]["valid"] == 0 and res["decision"]["deploy"] is None
    # no validation data to pick with: only the grid's first rate
    assert [r for r in res["runs"] if r.startswith("soft")] == ["soft/main/len2/text/n12/seed0/lr0.1"]
    md = write_report(res, tmp_path)["markdown"].read_text()
    assert "No decision: without validation data" in md
