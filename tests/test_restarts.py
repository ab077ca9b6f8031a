"""Restarts: several seeds, the best-fitting prompt kept, on a tiny random model."""
import pytest
import torch

from softprompt.core.prompts import SoftPrompt
from softprompt.training.restarts import fit_score, restart_seeds, train_with_restarts
from softprompt.data import Example, Task
from softprompt.testing import tiny_causal_lm, tiny_tokenizer
from softprompt.training.prompt import TrainConfig, train_prompt

TASK = Task(name="toy", kind="classification", template="{soft:4} review : {text} label :",
            verbalizer={"pos": " yes", "neg": " no"})
TRAIN = ([Example({"text": t}, "pos") for t in ["good movie", "great film", "love this", "amazing film"]]
         + [Example({"text": t}, "neg") for t in ["bad movie", "awful film", "hate this", "sad film"]])
# few steps at a modest rate: runs end at different fits, so the choice matters
CFG = TrainConfig(epochs=2, lr=0.05, batch_size=4, init="random", warmup_steps=1, seed=3)


def test_restart_seeds():
    assert restart_seeds(3, 3) == [3, 1003, 2003]
    assert restart_seeds(0, 1) == [0]
    with pytest.raises(ValueError, match="at least 1"):
        restart_seeds(0, 0)


def test_one_restart_is_plain_training():
    model, tok = tiny_causal_lm(), tiny_tokenizer()
    plain = train_prompt(model, tok, TASK, TRAIN, None, CFG, progress=False)
    one = train_with_restarts(model, tok, TASK, TRAIN, None, CFG, 1, progress=False)
    assert torch.equal(plain.prompt.embeddings, one.prompt.embeddings)
    assert "restarts" not in one.prompt.training


def test_keeps_the_run_that_fits_the_training_examples_best(tmp_path):
    model, tok = tiny_causal_lm(), tiny_tokenizer()
    chosen = train_with_restarts(model, tok, TASK, TRAIN, None, CFG, 3, out_dir=tmp_path, progress=False)
    runs = chosen.prompt.training["restarts"]
    assert [r["seed"] for r in runs] == [3, 1003, 2003] and sum(r["chosen"] for r in runs) == 1
    assert all(r["judged_on"] == "training" for r in runs)
    # each run retrained on its own: the chosen prompt is that seed's, and no other run fits better
    singles = {s: train_prompt(model, tok, TASK, TRAIN, None, TrainConfig(**{**CFG.to_dict(), "seed": s}),
                               progress=False) for s in (3, 1003, 2003)}
    scores = {s: fit_score(model, tok, r, TRAIN, CFG)["score"] for s, r in singles.items()}
    assert len({round(sc[-1], 6) for sc in scores.values()}) == 3, "the runs should differ for this test to mean anything"
    best_seed = max(scores, key=scores.get)
    assert [r["seed"] for r in runs if r["chosen"]] == [best_seed]
    assert torch.equal(chosen.prompt.embeddings, singles[best_seed].prompt.embeddings)
    # on disk: every run in its own folder, the chosen prompt (with the record of the choice) at the top
    for r in range(3):
        assert (tmp_path / f"restart{r}" / "prompt.safetensors").exists()
    saved = SoftPrompt.load(tmp_path / "prompt.safetensors", model=model)
    assert torch.equal(saved.embeddings, chosen.prompt.embeddings)
    assert saved.training["restarts"] == runs


def test_validation_examples_decide_when_given():
    model, tok = tiny_causal_lm(), tiny_tokenizer()
    valid = TRAIN[1:3] + TRAIN[5:7]
    chosen = train_with_restarts(model, tok, TASK, TRAIN, valid, CFG, 2, progress=False)
    runs = chosen.prompt.training["restarts"]
    assert all(r["judged_on"] == "validation" for r in runs)
    best = max(runs, key=lambda r: (r["macro_f1"], r["accuracy"], -r["loss"]))  # macro-F1 first since issue 14
    assert best["chosen"]


def test_cli_train_with_restarts(tmp_path):
    from typer.testing import CliRunner

    from softprompt.cli import app

    model, tok = tiny_causal_lm(), tiny_tokenizer()
    folder = tmp_path / "tiny-lm"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    (tmp_path / "train.csv").write_text("text,label\n" + "".join(f"{e.fields['text']},{e.label}\n" for e in TRAIN))
    args = ["train", "--model", str(folder), "--train-file", str(tmp_path / "train.csv"), "--template",
            TASK.template, "--verbalizer", "pos= yes", "--verbalizer", "neg= no", "--init", "random",
            "--epochs", "1", "--batch-size", "4", "--lr", "0.05", "--out", str(tmp_path / "run")]
    r = CliRunner().invoke(app, args + ["--restarts", "2"])
    assert r.exit_code == 0, r.output
    assert r.output.count("restart seed") == 2 and r.output.count("<- kept") == 1
    saved = SoftPrompt.load(tmp_path / "run" / "prompt.safetensors")
    assert [run["seed"] for run in saved.training["restarts"]] == [0, 1000]
    assert (tmp_path / "run" / "restart1" / "prompt.safetensors").exists()
    r = CliRunner().invoke(app, args + ["--restarts", "0"])
    assert r.exit_code != 0 and "restarts" in r.output


def test_compare_trains_best_of_n(tmp_path):
    """compare --restarts: its own run id and row name, the choice recorded, and the run's
    training time the cost of every restart; without it the ids stay as they were."""
    from softprompt.apps import compare as C
    from softprompt.data import TaskData

    model, tok = tiny_causal_lm(), tiny_tokenizer()
    data = TaskData(TASK, {"train": TRAIN, "test": TRAIN[:6]})
    base = dict(methods=("soft",), seeds=(0,), prompt_length=2, epochs=1, min_steps=2, lr=0.05, batch_size=4,
                warmup_steps=1, latency_examples=2, eval_batch_size=8, valid_limit=0, test_limit=None)
    plain, _ = C.Comparison(C.CompareConfig(**base), data, model, tok, tmp_path / "a", progress=False,
                            log=lambda s: None).plan()
    assert list(plain) == ["soft/main/len2/labels/n8/seed0"] and "restarts" not in plain[next(iter(plain))].spec
    comp = C.Comparison(C.CompareConfig(**base, restarts=2), data, model, tok, tmp_path / "b", progress=False,
                        log=lambda s: None)
    runs, rows = comp.plan()
    assert list(runs) == ["soft/main/len2/labels/n8/seed0/best-of-2"] and rows[0].name.endswith("best of 2 runs)")
    rec = comp.run()["runs"]["soft/main/len2/labels/n8/seed0/best-of-2"]
    picked = rec["train"]["restarts"]
    assert [r["seed"] for r in picked] == [0, 1000] and sum(r["chosen"] for r in picked) == 1
    assert rec["train"]["wall_s"] >= sum(r["wall_time_s"] for r in picked) - 0.02
    from softprompt.apps.report import load_results, write_report

    md = write_report(load_results(tmp_path / "b" / "results.json"), tmp_path / "b")["markdown"].read_text()
    restarts = md[md.index("## Restarts"): md.index("## Every run")]
    assert restarts.count("| soft/main/len2/labels/n8/seed0/best-of-2 |") == 2 and restarts.count("| kept |") == 1
    with pytest.raises(ValueError, match="restarts"):
        C.CompareConfig(**base, restarts=0)


def test_judging_on_a_large_training_set_uses_a_sample(monkeypatch):
    import softprompt.training.restarts as R

    seen = []
    real = R.fit_score
    monkeypatch.setattr(R, "FIT_LIMIT", 3)
    monkeypatch.setattr(R, "fit_score", lambda m, t, res, exs, cfg: seen.append(list(exs)) or real(m, t, res, exs, cfg))
    model, tok = tiny_causal_lm(), tiny_tokenizer()
    R.train_with_restarts(model, tok, TASK, TRAIN, None, CFG, 2, progress=False)
    assert [len(s) for s in seen] == [3, 3] and seen[0] == seen[1] and all(ex in TRAIN for ex in seen[0])


def test_resumed_restarts_give_the_same_prompt_and_count_the_earlier_training(tmp_path):
    model, tok = tiny_causal_lm(), tiny_tokenizer()
    first = train_with_restarts(model, tok, TASK, TRAIN, None, CFG, 2, out_dir=tmp_path, progress=False)
    again = train_with_restarts(model, tok, TASK, TRAIN, None, CFG, 2, out_dir=tmp_path, resume=True, progress=False)
    assert torch.equal(first.prompt.embeddings, again.prompt.embeddings)
    trained = sum(r["wall_time_s"] for r in first.prompt.training["restarts"])
    assert [r["wall_time_s"] for r in again.prompt.training["restarts"]] == [
        r["wall_time_s"] for r in first.prompt.training["restarts"]]
    assert again.wall_time_s >= trained - 0.02, "the finished runs' training time is part of the cost"
