"""compare with unlabelled inputs: the chosen hard prompt is distilled into a soft prompt, scored on the
same test examples and shown in the decision block with its cost (apps/compare/distilled.py)."""
import pytest

from softprompt.apps import compare as C
from softprompt.apps.report import load_results
from softprompt.core.prompts import SoftPrompt
from softprompt.data import Example
from softprompt.testing import tiny_causal_lm, tiny_tokenizer

from test_compare import tiny_config, toy_data

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_the_chosen_hard_prompt_is_distilled_on_unlabelled_inputs(tmp_path):
    model, tok = tiny_causal_lm(), tiny_tokenizer()
    data = toy_data()
    inputs = [Example(dict(ex.fields)) for ex in toy_data(seed=5, n_train=24)["train"]]
    out = tmp_path / "rep"
    cfg = tiny_config(methods=("zero_shot", "soft"), seeds=(0,), eval_task=None, max_steps=3)
    C.run_compare(cfg, data, model, tok, out, progress=False, log=lambda s: None, unlabeled=inputs)
    res = load_results(out)
    d = res["decision"]["distilled"]
    assert d["n_inputs"] == len(inputs) and d["artifact"] == "distilled/prompt.safetensors"
    assert 0 <= d["agreement_test"] <= 1 and set(d["test"]) >= {"accuracy", "macro_f1"}
    assert d["cost"]["tokens_per_query"] < d["cost"]["teacher_tokens_per_query"]
    student = SoftPrompt.load(out / d["artifact"], model)
    teacher_file = res["decision"]["hard"]["artifact"]
    assert student.training["distilled_from"]["template"] == SoftPrompt.load(out / teacher_file, model).template
    report = (out / "report.md").read_text()
    assert "**Distilled option**" in report
    # without unlabelled inputs there is no such option
    out2 = tmp_path / "rep2"
    C.run_compare(cfg, data, model, tok, out2, progress=False, log=lambda s: None)
    assert "distilled" not in load_results(out2)["decision"]


def test_cli_refuses_a_missing_unlabeled_file(tmp_path):
    from typer.testing import CliRunner

    from softprompt.cli import app
    from test_compare import user_files

    folder = user_files(tmp_path, toy_data(), "text,label", lambda e: f"{e.fields['text']},{e.label}")
    r = CliRunner().invoke(app, ["compare", "--model", str(folder), "--train-file", str(tmp_path / "train.csv"),
                                 "--test-file", str(tmp_path / "test.csv"), "--verbalizer", "neg=no", "--verbalizer",
                                 "pos=yes", "--unlabeled-file", str(tmp_path / "missing.csv"), "--out",
                                 str(tmp_path / "rep")])
    assert r.exit_code != 0 and "missing.csv" in r.output


def test_hand_written_candidates_are_also_chosen_on_the_pool_they_never_saw(tmp_path):
    """Issue 23, item 2: zero-shot is scored on validation + the whole training pool, few-shot on
    validation + the pool less its own demonstrations; the soft side on validation only."""
    from softprompt.apps.compare.decision_stats import selection_metrics

    model, tok = tiny_causal_lm(), tiny_tokenizer()
    out = tmp_path / "rep"
    cfg = tiny_config(methods=("zero_shot", "few_shot", "soft"), seeds=(0,), eval_task=None, max_steps=2)
    comp = C.Comparison(cfg, toy_data(), model, tok, out, progress=False, log=lambda s: None)
    res = comp.run()
    n_valid, n_pool = len(comp.valid), len(comp.pool)
    zs = res["runs"]["zero_shot"]["variants"]["none"]
    assert zs["selection_n"] == n_valid + n_pool and zs["selection"] != zs["valid"]
    few = [r for k, r in res["runs"].items() if k.startswith("few_shot") and r.get("variants")]
    assert few and all(n_valid + n_pool - 2 * cfg.shots <= v["selection_n"] < n_valid + n_pool
                       for r in few for v in r["variants"].values())  # its demonstrations are not selection data
    soft = next(r for k, r in res["runs"].items() if k.startswith("soft/"))
    assert all("selection" not in v for v in soft["variants"].values())
    dec = res["decision"]
    assert dec["selection_n"]["soft"] == n_valid and dec["selection_n"]["hard"] > n_valid
    chosen = next(c for c in [dec["hard"]] if c)
    assert selection_metrics(chosen) == chosen["selection"]
    from softprompt.apps.report import write_report

    write_report(res, out)
    assert f"compared on {dec['selection_n']['hard']} examples" in (out / "report.md").read_text()
