"""`softprompt compare` end to end on a tiny random model: every method runs through the same
scorer, results.json is written after every run, a rerun skips finished runs, and the report
folder (markdown, self-contained HTML, PNGs) is complete."""
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from softprompt.apps import compare as C
from softprompt.cli import app
from softprompt.apps.report import PLOTS, load_results, summarize, write_report
from softprompt.data import Example, Task, TaskData
from softprompt.core.templates import Template
from softprompt.testing import tiny_causal_lm, tiny_tokenizer

POS = ["good", "great", "love", "amazing", "happy", "fast", "thanks"]
NEG = ["bad", "awful", "hate", "terrible", "sad", "slow", "broken"]
TASK = Task(name="toy", kind="classification", template="{soft:4} review : {text} label :",
            verbalizer={"neg": " no", "pos": " yes"}, instruction="is the review good ? answer yes or no .")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def toy_data(seed=0, n_train=16, n_test=12, name="toy"):
    rng = random.Random(seed)

    def mk(n):
        out = []
        for i in range(n):
            lab = "pos" if i % 2 else "neg"
            words = POS if lab == "pos" else NEG
            out.append(Example({"text": " ".join(rng.choice(words) for _ in range(2)) + " movie"}, lab))
        return out

    task = Task(**{**TASK.to_dict(), "name": name})
    return TaskData(task, {"train": mk(n_train), "validation": mk(4), "test": mk(n_test)})


def tiny_config(**kw):
    base = {"train_limit": None, "valid_limit": 4, "test_limit": None, "shots": 2, "fewshot_seeds": (0,),
            "fewshot_orders": 2, "cot_max_new_tokens": 3, "prompt_length": 2, "seeds": (0, 1), "lengths": (1, 2),
            "inits": ("vocab", "labels"), "positions": ("prefix", "between", "answer"), "max_steps": 4,
            "lr": 0.1, "batch_size": 8, "warmup_steps": 1, "train_sizes": (4, 0), "latency_examples": 2,
            "eval_batch_size": 16, "eval_task": "toy2",
            # the tests below predate the start from the chosen hard prompt (issue 14): label init keeps
            # their plans small; test_compare_decision covers it
            "init": "labels"}
    base.update(kw)
    return C.CompareConfig(**base)


def test_templates_for_lengths_positions_and_transfer():
    assert C.with_soft_length(TASK.template, 7) == "{soft:7} review : {text} label :"
    assert C.with_soft_length("a {soft:2} {text} b {soft:3}", 5) == "a {soft:5} {text} b "
    assert C.with_soft_length("{text} {{x}}", 2) == "{soft:2} {text} {{x}}"
    hy = {p: C.hybrid_template(TASK, 3, p) for p in C.POSITIONS}
    instr = "is the review good ? answer yes or no .\n"
    assert hy["prefix"] == "{soft:3} " + instr + "review : {text} label :"
    assert hy["between"] == instr + "review : {text}{soft:3} label :"
    assert hy["answer"] == instr + "review : {text} label :{soft:3}"
    assert all(Template(t).n_soft == 3 for t in hy.values())
    two = Task(name="pair", kind="classification", template="{soft:2} p : {premise} h : {hypothesis} ?",
               verbalizer={"a": " yes", "b": " no"})
    assert C.hybrid_template(two, 1, "between", "") == "p : {premise}{soft:1} h : {hypothesis} ?"


def test_compare_end_to_end_resume_and_report(tmp_path):
    model, tok = tiny_causal_lm(), tiny_tokenizer()
    cfg = tiny_config()
    out = tmp_path / "rep"
    comp = C.Comparison(cfg, toy_data(), model, tok, out, eval_data=toy_data(seed=1, name="toy2"), progress=False,
                        log=lambda s: None)
    runs, rows = comp.plan()
    kinds = sorted({r.kind for r in runs.values()})
    assert kinds == ["cot", "ensemble", "hard", "knn", "search", "soft", "transfer"]  # knn, search: issue 14
    # the main prompt-tuning runs are shared by the length/init/curve rows, not trained twice
    main = next(r for r in rows if r.section == "main" and r.family == C.FAMILY_PT)
    assert len(main.runs) == 2
    for sec, x in (("length", 2), ("init", "labels"), ("curve", 16)):
        assert next(r for r in rows if r.section == sec and r.x == x).runs == main.runs
    results = comp.run()
    assert set(comp.executed) == set(runs)
    assert comp.demo_embeddings.computed == 1  # issue 24: kNN embeds its pool once per comparison
    on_disk = load_results(out)
    assert set(on_disk["runs"]) == set(runs) and on_disk["data"]["test"] == 12
    for rid, rec in on_disk["runs"].items():
        assert rec["status"] == "done" and 0 <= rec["metrics"]["accuracy"] <= 1, rid
        assert rec["latency"]["batch1_ms"] > 0 and rec["latency"]["batched_ms"] > 0
        assert rec["tokens_added"] > 0
        if rec["kind"] == "soft":
            n_soft = Template(rec["template"]).n_soft
            assert rec["trainable_params"] == n_soft * model.config.hidden_size
            assert rec["artifact_bytes"] == (out / rec["artifact"]).stat().st_size > n_soft * 32 * 4
            assert rec["train"]["loss"] and rec["train"]["wall_s"] > 0
            assert not (out / rec["artifact"]).with_name("checkpoint.safetensors").exists()
        else:
            assert rec["kind"] != "hard" or rec["trainable_params"] == 0
    cot = on_disk["runs"]["cot"]
    # issue 14: two-stage chain-of-thought answers every example; the free-text parse is a diagnostic
    assert cot["cot"]["two_stage"] and cot["metrics"]["n"] == 12 and 0 <= cot["cot"]["n_unparseable"] <= 12
    assert len(cot["variants"]["none"]["predictions"]) == 12
    ens = on_disk["runs"][next(r for r in runs if r.startswith("ensemble"))]
    assert set(ens["ensemble"]["variants"]) == {"mean", "vote"} and ens["ensemble"]["context_passes"] == 1
    assert ens["trainable_params"] == 2 * 2 * model.config.hidden_size
    # few-shot: 1 seed x 2 orders aggregated in one row
    fs = next(r for r in summarize(results) if r["name"].startswith("few-shot"))
    assert fs["accuracy"]["n"] == 2 and fs["accuracy"]["min"] <= fs["accuracy"]["mean"] <= fs["accuracy"]["max"]

    paths = write_report(results, out)
    md = (out / "report.md").read_text()
    for r in summarize(results):
        if r["in_table"]:
            assert r["name"] in md
    assert "| method | accuracy % | macro-F1 % | trainable params | artifact | tokens added / query |" in md
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(PLOTS) and " src='http" not in html
    for name in PLOTS:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and name in paths

    # a second call skips every finished run; changing one budget reruns only what it affects
    comp2 = C.Comparison(cfg, toy_data(), model, tok, out, eval_data=toy_data(seed=1, name="toy2"), progress=False,
                         log=lambda s: None)
    comp2.run()
    assert comp2.executed == []
    comp3 = C.Comparison(tiny_config(cot_max_new_tokens=2), toy_data(), model, tok, out,
                         eval_data=toy_data(seed=1, name="toy2"), progress=False, log=lambda s: None)
    comp3.run()
    assert comp3.executed == ["cot"]


def test_crash_keeps_finished_runs(tmp_path, monkeypatch):
    model, tok = tiny_causal_lm(), tiny_tokenizer()
    cfg = tiny_config(methods=("zero_shot", "soft", "ensemble"), eval_task=None)
    out = tmp_path / "rep"

    def boom(self, run):
        raise RuntimeError("killed")

    monkeypatch.setattr(C.Comparison, "_exec_ensemble", boom)
    with pytest.raises(RuntimeError, match="killed"):
        C.run_compare(cfg, toy_data(), model, tok, out, progress=False, log=lambda s: None)
    saved = load_results(out)["runs"]
    assert sorted(saved) == sorted(["zero_shot", "soft/main/len2/labels/n16/seed0", "soft/main/len2/labels/n16/seed1"])
    monkeypatch.undo()
    comp = C.Comparison(cfg, toy_data(), model, tok, out, progress=False, log=lambda s: None)
    comp.run()
    assert comp.executed == ["ensemble/2x2"]


def test_cli_compare_report_only_and_errors(tmp_path):
    model, tok = tiny_causal_lm(), tiny_tokenizer()
    out = tmp_path / "rep"
    C.run_compare(tiny_config(methods=("zero_shot", "few_shot"), eval_task=None), toy_data(), model, tok, out,
                  progress=False, report=False, log=lambda s: None)
    assert not (out / "report.md").exists()
    runner = CliRunner()
    r = runner.invoke(app, ["compare", "--out", str(out), "--report-only", "--publish", str(tmp_path / "docs")])
    assert r.exit_code == 0, r.output
    assert (out / "report.md").exists() and (out / "accuracy_by_method.png").exists()
    assert sorted(p.name for p in (tmp_path / "docs").iterdir()) == ["accuracy_by_method.png", "report.md"]
    r = runner.invoke(app, ["compare", "--out", str(tmp_path / "none"), "--report-only"])
    assert r.exit_code == 2
    r = runner.invoke(app, ["compare", "--task", "demo", "--methods", "zero_shot,nonsense", "--out", str(out)])
    assert r.exit_code == 2 and "unknown methods" in r.output
    with pytest.raises(ValueError, match="eval_label_map"):
        other = toy_data(name="toy3")
        other.splits["test"] = [Example(e.fields, "maybe") for e in other["test"]]
        other.task = Task(name="toy3", kind="classification", template=TASK.template,
                          verbalizer={"maybe": " yes"})
        C.Comparison(tiny_config(methods=("transfer",)), toy_data(), model, tok, out, eval_data=other,
                     progress=False)


def user_files(tmp_path, data, header: str, row) -> Path:
    """What a user of the CLI has: a model folder (the tiny model) and train/test CSVs of ``data``."""
    folder = tmp_path / "tiny"
    tiny_causal_lm().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    for split in ("train", "test"):
        (tmp_path / f"{split}.csv").write_text("\n".join([header] + [row(e) for e in data[split]]) + "\n")
    return folder


def test_cli_compare_runs_on_user_files(tmp_path):
    folder = user_files(tmp_path, toy_data(), "text,label", lambda e: f"{e.fields['text']},{e.label}")
    out = tmp_path / "rep"
    args = ["compare", "--model", str(folder), "--train-file", str(tmp_path / "train.csv"),
            "--test-file", str(tmp_path / "test.csv"), "--template", "{soft:2} review : {text} label :",
            "--verbalizer", "neg=no", "--verbalizer", "pos=yes", "--methods", "zero_shot,soft", "--seeds", "0",
            "--max-steps", "4", "--latency-examples", "1", "--no-progress", "--out", str(out),
            "--publish", str(tmp_path / "docs")]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    res = load_results(out)
    # issue 14: a quarter of the 16 training examples is held out for validation, the main method starts from the
    # hard prompt's instruction (built from the label words: no --instruction); issue 22: one run per seed, its
    # learning rate chosen on validation by successive halving over 3 rates x 2 seeds
    assert sorted(res["runs"]) == ["soft/main/len20/text/n12/seed0", "zero_shot"]
    soft = res["runs"]["soft/main/len20/text/n12/seed0"]
    search, train = soft["train"]["lr_search"], soft["train"]
    assert soft["spec"]["lr"] == "auto" and train["lr_auto"] and len(search) == 6
    assert len({(c["lr"], c["seed"]) for c in search}) == 6 and sum(c["chosen"] for c in search) == 1
    chosen = next(c for c in search if c["chosen"])
    retried = train.get("collapse_restarts") or []  # the chosen run collapsed: retrained from another seed at its rate
    assert train["lr"] == chosen["lr"]
    if retried:
        assert retried[0]["seed"] == chosen["seed"] and retried[0]["collapsed"]
        assert train["seed"] == next(a["seed"] for a in retried if a["chosen"])
    else:
        assert train["seed"] == chosen["seed"] and chosen["steps"] == train["steps"]
    assert sum(c["steps"] for c in search) <= 2.75 * 4  # the better half goes on, not every candidate
    assert res["decision"]["soft"]["cost"]["search_runs"] == 6  # the decision's cost counts every candidate
    row = next(r for r in res["rows"] if r["runs"] == ["soft/main/len20/text/n12/seed0"] and r["section"] == "main")
    assert "lr chosen on validation" in row["name"] and "lr chosen on validation" in r.output
    md = (out / "report.md").read_text()
    assert "## Learning rates" in md and md.count("| soft/main/len20/text/n12/seed0 |") >= 6
    instruction = "Classify the text. Answer no or yes."
    assert res["runs"]["zero_shot"]["template"] == instruction + "\nreview : {text} label :"
    assert res["data"]["valid"] == 4 and res["data"]["valid_source"] == "held out from the training pool"
    assert res["start"]["instruction"] == instruction
    assert res["runs"]["soft/main/len20/text/n12/seed0"]["spec"]["init_text"] == instruction
    assert res["task"]["name"] == tmp_path.name  # train.csv + test.csv: named after their folder, not "train"
    assert res["decision"]["deploy"] in ("hard", "soft") and res["decision"]["recommendation"]
    assert (tmp_path / "docs" / "report.md").exists() and "zero-shot instruction" in r.output
    # --lrs: the explicit grid of absolute rates (one row and one run per rate and seed, no search)
    r = CliRunner().invoke(app, args[:-4] + ["--lrs", "0.05,0.1", "--out", str(tmp_path / "grid")])
    assert r.exit_code == 0, r.output
    grid = load_results(tmp_path / "grid")
    ids = sorted(rid for rid in grid["runs"] if rid.startswith("soft/"))
    assert ids == ["soft/main/len20/text/n12/seed0/lr0.05", "soft/main/len20/text/n12/seed0/lr0.1"]
    assert [grid["runs"][i]["train"]["lr"] for i in ids] == [0.05, 0.1]
    assert not any(grid["runs"][i]["train"].get("lr_search") or grid["runs"][i]["train"]["lr_auto"] for i in ids)
    names = [r["name"] for r in grid["rows"] if r["section"] == "main" and r["runs"][0] in ids]
    assert len(names) == 2 and names[0].endswith(", lr 0.05") and names[1].endswith(", lr 0.1")
    assert "lr chosen on validation" not in r.output


QA = Task(name="qa", kind="generation", template="{soft:2} context : {context} question : {question} answer :",
          instruction="answer the question .")


def qa_data(n_train=8, n_test=6):
    rng = random.Random(0)

    def mk(n):
        out = []
        for _ in range(n):
            a, b = rng.sample(POS + NEG, 2)
            out.append(Example({"context": f"the answer is {a} not {b} .", "question": "what is the answer ?"},
                               target=a, answers=(a, f"{a} movie")))
        return out

    demos = [Example({"context": "it is yes .", "question": "what ?"}, target="yes", answers=("yes",))] * 3
    return TaskData(QA, {"train": mk(n_train), "test": mk(n_test), "demonstrations": demos})


def test_compare_generation_task_scores_em_f1(tmp_path):
    """A generation task runs zero-shot, few-shot (answers as demonstrations, from the
    demonstrations split) and prompt tuning through scoring.generate; the report shows
    exact match and F1, the sample answers and the EM/F1 bar chart."""
    model, tok = tiny_causal_lm(), tiny_tokenizer()
    with pytest.raises(ValueError, match="init 'labels'"):
        C.Comparison(tiny_config(), qa_data(), model, tok, tmp_path, progress=False)
    logs = []
    cfg = tiny_config(methods=("zero_shot", "few_shot", "soft", "cot", "ensemble"), init="vocab", seeds=(0,),
                      valid_limit=0, max_new_tokens=3, eval_task=None)
    out = tmp_path / "qa"
    comp = C.Comparison(cfg, qa_data(), model, tok, out, progress=False, log=logs.append)
    runs, _ = comp.plan()
    assert sorted(r.kind for r in runs.values()) == ["hard", "hard", "hard", "soft"]
    assert any("cot, ensemble skipped" in m for m in logs)
    fs = [r for r in runs.values() if r.id.startswith("few_shot")]
    assert all(r.id.startswith("few_shot/k2/random/") for r in fs)
    assert fs[0].spec["template"].startswith("answer the question .\n") and "question : what ? answer : yes\n\n" in fs[0].spec["template"]
    results = comp.run()
    for rec in results["runs"].values():
        m = rec["metrics"]
        assert set(m) == {"exact_match", "f1", "n"} and m["n"] == 6 and 0 <= m["exact_match"] <= m["f1"] <= 1
        assert len(rec["samples"]) == 6 and rec["samples"][0]["gold"] == list(qa_data()["test"][0].answers)
    soft = next(r for r in results["runs"].values() if r["kind"] == "soft")
    assert soft["train"]["loss"] and soft["trainable_params"] == 2 * model.config.hidden_size
    assert results["data"]["majority_accuracy"] is None and results["data"]["demonstration_pool"] == 3
    rows_ = summarize(results)
    assert all(r["exact_match"] is r["primary"] and r["f1"] is r["secondary"] for r in rows_)
    write_report(results, out)
    md = (out / "report.md").read_text()
    assert "| method | exact match % | F1 % | trainable params |" in md and "## Sample answers" in md
    assert (out / "em_f1_by_method.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "accuracy_by_method.png").exists()
    # the answers are part of the data fingerprint: other gold answers rerun everything
    other = qa_data()
    other.splits["test"] = [Example(e.fields, target="yes", answers=("yes",)) for e in other["test"]]
    assert C.fingerprint(other["test"]) != C.fingerprint(qa_data()["test"])


def test_cli_compare_generation_on_user_files(tmp_path):
    """`compare --target-column` makes user files a generation task: EM / F1 in the table, text init."""
    folder = user_files(tmp_path, qa_data(), "context,question,answer",
                        lambda e: f"{e.fields['context']},{e.fields['question']},{e.target}")
    out = tmp_path / "rep"
    args = ["compare", "--model", str(folder), "--train-file", str(tmp_path / "train.csv"),
            "--test-file", str(tmp_path / "test.csv"), "--field", "context=context", "--field", "question=question",
            "--target-column", "answer", "--template", "{soft:2} context : {context} question : {question} answer :",
            "--methods", "zero_shot,soft", "--seeds", "0", "--epochs", "1", "--min-steps", "1",
            "--latency-examples", "0", "--no-progress", "--out", str(out)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    res = load_results(out)
    assert res["task"]["kind"] == "generation"
    assert sorted(res["runs"]) == ["soft/main/len20/text/n8/seed0", "zero_shot"]
    assert "exact match" in r.output and "exact_match" in res["runs"]["zero_shot"]["metrics"]
    assert res["command"].startswith("softprompt compare ") and "--target-column answer" in res["command"]
    assert f"Command: `{res['command']}`" in (out / "report.md").read_text()


# the spec keys of a prompt-tuning run: P-tuning / prefix tuning add theirs only to their own runs, so a
# method joining compare does not change these (and old results.json files keep resuming); issue 22 changed
# them once, for the training recipe's schedule (max_steps, patience) and the learning-rate search
SOFT_SPEC_KEYS = ["kind", "template", "init", "init_text", "seed", "n_train", "train_fp", "valid_fp", "test_fp",
                  "model", "max_steps", "lr", "batch_size", "warmup_steps", "optimizer", "verbalizer", "eval_every",
                  "patience"]


def _check_ptuning_prefix(results, out, model, tok, n: int, cfg):
    """Shared checks of the P-tuning and prefix runs of one comparison (one seed each)."""
    from softprompt.hard.baselines import template_overhead_tokens
    from softprompt.core.prompts import SoftPrompt

    runs = results["runs"]
    pt = runs[f"soft/ptuning-lstm/len{n}/{cfg.init}/n{results['data']['train_pool']}/seed0"]
    px = runs[f"soft/prefix/len{n}/{cfg.init}/n{results['data']['train_pool']}/seed0"]
    assert pt["spec"]["method"] == "ptuning" and pt["spec"]["encoder"] == "lstm" and pt["spec"]["lr"] == cfg.encoder_lr
    assert px["spec"]["method"] == "prefix" and px["spec"]["prefix_tokens"] == n and px["spec"]["lr"] == cfg.lr
    assert Template(px["template"]).n_soft == 0 and Template(pt["template"]).n_soft == n
    hidden, layers = model.config.hidden_size, model.config.num_hidden_layers
    kv_heads = getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads
    kv_numel = layers * 2 * kv_heads * n * (hidden // model.config.num_attention_heads)
    # P-tuning trains an encoder network, far more numbers than the n x hidden prompt it saves
    assert pt["artifact_params"] == n * hidden < pt["trainable_params"]
    assert px["trainable_params"] == px["artifact_params"] == kv_numel and px["prefix_positions"] == n
    assert px["tokens_added"] == template_overhead_tokens(px["template"], tok) + n
    for rec, method in ((pt, "p_tuning"), (px, "prefix_tuning")):
        assert rec["status"] == "done" and rec["train"]["loss"] and rec["train"]["steps"] >= 1
        saved = SoftPrompt.load(out / rec["artifact"], model=model)
        assert saved.method == method and saved.n_params == rec["artifact_params"]
    assert saved.kv is not None and saved.n_prefix == n
    rows = [r for r in summarize(results) if r["section"] == "main" and r["family"] == C.FAMILY_PT]
    assert [r["name"] for r in rows if r["name"].startswith(("P-tuning", "prefix"))] == [
        f"P-tuning ({n} soft tokens, lstm encoder)", f"prefix tuning ({n} key/value positions per layer)"]
    write_report(results, out)
    md = (out / "report.md").read_text()
    assert all(f"| {r['name']} |" in md for r in rows)
    return pt, px


def test_compare_ptuning_and_prefix_classification(tmp_path):
    """P-tuning and prefix tuning as compare methods: distinct runs next to prompt tuning, whose
    planned spec and id are unchanged; honest parameter counts; rows in the main table."""
    model, tok = tiny_causal_lm(), tiny_tokenizer()
    cfg = tiny_config(methods=("soft", "ptuning", "prefix"), seeds=(0,), eval_task=None)
    out = tmp_path / "rep"
    comp = C.Comparison(cfg, toy_data(), model, tok, out, progress=False, log=lambda s: None)
    runs, _ = comp.plan()
    assert sorted(runs) == ["soft/main/len2/labels/n16/seed0", "soft/prefix/len2/labels/n16/seed0",
                            "soft/ptuning-lstm/len2/labels/n16/seed0"]
    # issue 14 deliberately adds the calibrations every classification prompt is scored under
    assert list(runs["soft/main/len2/labels/n16/seed0"].spec) == [*SOFT_SPEC_KEYS, "search", "calibrations"]
    results = comp.run()
    for rec in results["runs"].values():
        assert 0 <= rec["metrics"]["accuracy"] <= 1 and rec["latency"]["batch1_ms"] > 0
    _check_ptuning_prefix(results, out, model, tok, 2, cfg)
    assert (out / "accuracy_by_method.png").exists()
    # the MLP-reparameterised prefix is another run (own id, encoder lr), not a resume of this one
    cfg2 = tiny_config(methods=("prefix",), seeds=(0,), eval_task=None, prefix_reparam="mlp")
    runs2, _ = C.Comparison(cfg2, toy_data(), model, tok, out, progress=False, log=lambda s: None).plan()
    (rid, run), = runs2.items()
    assert rid == "soft/prefix-mlp/len2/labels/n16/seed0" and run.spec["lr"] == cfg2.encoder_lr
    with pytest.raises(ValueError, match="P-tuning encoder"):
        tiny_config(ptuning_encoder="gru")
    # encoder-decoders have no prefix tuning here: skipped with the reason, before any training
    from softprompt.testing import tiny_t5

    logs = []
    runs3, _ = C.Comparison(tiny_config(methods=("ptuning", "prefix"), seeds=(0,), eval_task=None), toy_data(),
                            tiny_t5(), tok, tmp_path / "t5", progress=False, log=logs.append).plan()
    assert list(runs3) == ["soft/ptuning-lstm/len2/labels/n16/seed0"] and logs[0].startswith("prefix skipped")
    # the CLI: 'all' combines with the opt-in methods, and the new options reach the config
    r = CliRunner().invoke(app, ["compare", "--task", "demo", "--methods", "all,ptuning,prefix",
                                 "--ptuning-encoder", "gru", "--out", str(tmp_path / "cli")])
    assert r.exit_code == 2 and "unknown P-tuning encoder 'gru'" in r.output, r.output


def test_compare_ptuning_and_prefix_generation(tmp_path):
    """Both methods also train and answer on a generation task (EM / F1, sample answers)."""
    model, tok = tiny_causal_lm(), tiny_tokenizer()
    cfg = tiny_config(methods=("soft", "ptuning", "prefix"), init="vocab", seeds=(0,), valid_limit=0,
                      max_new_tokens=3, eval_task=None)
    out = tmp_path / "qa"
    comp = C.Comparison(cfg, qa_data(), model, tok, out, progress=False, log=lambda s: None)
    runs, _ = comp.plan()
    assert list(runs["soft/main/len2/vocab/n8/seed0"].spec) == [*SOFT_SPEC_KEYS, "max_new_tokens"]
    results = comp.run()
    for rec in results["runs"].values():
        assert set(rec["metrics"]) == {"exact_match", "f1", "n"} and rec["metrics"]["n"] == 6
        assert len(rec["samples"]) == 6
    _check_ptuning_prefix(results, out, model, tok, 2, cfg)
    md = (out / "report.md").read_text()
    assert "## Sample answers" in md and "| P-tuning | prefix tuning |" in md


def test_cli_verbalizer_words_continue_the_template():
    from softprompt.cli import _verbalizer

    assert _verbalizer(["a=yes", "b= no"], "Tweet: {text}\nAnswer:") == {"a": " yes", "b": " no"}
    assert _verbalizer(["a=yes", "b=no"], "<|im_start|>assistant\n") == {"a": "yes", "b": "no"}
    assert _verbalizer(["a=yes"], "Answer: ") == {"a": "yes"}  # the template's own space is the separator


def test_planner_registry_has_one_entry_per_method_and_a_stable_order(monkeypatch):
    """Issue 13: a method is one registry entry; plan() calls the planners in PLAN_ORDER, so two
    plans of one config list the same runs and rows in the same order."""
    from dataclasses import replace

    from softprompt.apps.compare import planners as P

    assert sorted(P.PLANNERS) == sorted(C.ALL_METHODS) and sorted(C.PLAN_ORDER) == sorted(C.ALL_METHODS)
    assert len(C.PLAN_ORDER) == len(set(C.PLAN_ORDER))
    assert {"cot", "knn", "search", "search_plain"} <= set(P.EXECUTORS)  # hard_runs registers its run kinds
    called = []
    for name, entry in list(P.PLANNERS.items()):
        spy = (lambda c, p, _n=name, _f=entry.fn: called.append(_n) or _f(c, p))
        monkeypatch.setitem(P.PLANNERS, name, replace(entry, fn=spy))
    model, tok = tiny_causal_lm(), tiny_tokenizer()
    cfg = tiny_config(methods=tuple(reversed(C.ALL_METHODS)), seeds=(0, 1))

    def plan():
        comp = C.Comparison(cfg, toy_data(), model, tok, "unused", eval_data=toy_data(seed=1, name="toy2"),
                            progress=False, log=lambda s: None)
        runs, rows = comp.plan()
        return [(r.id, r.kind) for r in runs.values()], [r.name for r in rows]

    first = plan()
    assert called == list(C.PLAN_ORDER)  # every method given, whatever the order of --methods
    assert plan() == first
    runs, rows = first
    kinds = list(dict.fromkeys(k for _, k in runs))
    assert kinds[:5] == ["hard", "knn", "search", "cot", "soft"] and rows[0].startswith("zero-shot")


def test_init_from_adds_the_transferred_start_as_a_soft_candidate(tmp_path):
    """compare --init-from PATH: the init sweep also trains from a saved prompt (transfer)."""
    import torch

    from softprompt.core.prompts import SoftPrompt
    from softprompt.serve.testing import random_prompt

    model, tok = tiny_causal_lm(), tiny_tokenizer()
    source = random_prompt(model, "{soft:3} other : {text} label :", verbalizer=TASK.verbalizer, seed=4)
    path = tmp_path / "source.safetensors"
    source.save(path)
    cfg = tiny_config(methods=("zero_shot", "init"), inits=("labels",), init_from=str(path), eval_task=None,
                      max_steps=2)
    out = tmp_path / "rep"
    C.run_compare(cfg, toy_data(), model, tok, out, progress=False, log=lambda s: None)
    runs = load_results(out)["runs"]
    moved = [k for k, r in runs.items() if f"prompt:{path}" in str(r.get("spec", {}).get("init"))]
    assert len(moved) == 1, sorted(runs)
    rows = [r["name"] for r in load_results(out)["rows"]]
    assert any("start from source.safetensors" in n for n in rows), rows
    trained = SoftPrompt.load(out / "prompts" / C.runner._safe(moved[0]) / "prompt.safetensors", model)
    assert trained.training["init"] == f"prompt:{path}" and trained.n_tokens == 2
    assert not torch.equal(trained.embeddings, source.embeddings[:2])  # it trained on from there
    with pytest.raises(ValueError, match="no prompt file"):
        tiny_config(init_from=str(tmp_path / "missing.safetensors"))
