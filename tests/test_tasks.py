"""Tests for softprompt.data: file loading, error messages, the demo set, built-in tasks.

Built-in tasks other than ``demo`` read the shared data directory; those tests skip with a
reason when it cannot be found.  Everything is offline and takes well under a second or two.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from softprompt.data import (
    BUILTIN_TASKS,
    DataError,
    DataNotFoundError,
    Example,
    Task,
    TaskData,
    TaskKind,
    data_root,
    from_hf_dataset,
    hotpot_context,
    list_tasks,
    load_examples,
    load_task,
)


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def shared_root() -> Path:
    try:
        return data_root()
    except DataNotFoundError as e:
        pytest.skip(f"shared data directory not available (set SOFTPROMPT_DATA): {e}")


SENTIMENT = Task(
    name="toy",
    kind="classification",
    template="{soft:4} Review: {text}\nSentiment:",
    verbalizer={"negative": " negative", "positive": " positive"},
)


# --------------------------------------------------------------------------- Task


def test_task_fields_and_labels():
    t = Task(
        name="nli",
        kind="classification",
        template="{soft:3} {{literal}} P: {premise} {soft:2} H: {hypothesis} again {premise}",
        verbalizer={"yes": " yes", "no": " no"},
    )
    assert t.input_fields == ("premise", "hypothesis")
    assert t.labels == ["yes", "no"]
    assert Task.from_dict(t.to_dict()) == t


def test_task_rejects_bad_definitions():
    with pytest.raises(ValueError, match="kind"):
        Task(name="x", kind="regression", template="{text}")
    with pytest.raises(ValueError, match="verbalizer"):
        Task(name="x", kind="classification", template="{text}")


def test_task_kind_is_read_as_the_enum_and_written_as_its_string():
    t = Task(name="qa", kind="generation", template="{soft:2} Q: {text} A:")
    assert t.kind is TaskKind.GENERATION and t.kind == "generation"
    assert json.loads(json.dumps(t.to_dict()))["kind"] == "generation"
    assert f"{t.kind}" == "generation" and str(SENTIMENT.kind) == "classification"
    with pytest.raises(ValueError, match=r"\['classification', 'generation'\], got 'Generation'"):
        Task(name="x", kind="Generation", template="{text}")


def test_check_unknown_label_names_label_row_and_known_labels():
    exs = [Example({"text": "fine"}, label="positive"), Example({"text": "meh"}, label="neutral")]
    with pytest.raises(DataError) as ei:
        SENTIMENT.check(exs, source="reviews.csv")
    msg = str(ei.value)
    assert "reviews.csv" in msg and "row 2" in msg and "'neutral'" in msg
    assert "negative" in msg and "positive" in msg


def test_check_missing_template_field():
    with pytest.raises(DataError, match=r"row 1 .*'text'"):
        SENTIMENT.check([Example({"sentence": "hi"}, label="positive")], source="x.jsonl")


def test_check_generation_needs_target_unless_unlabeled_allowed():
    gen = Task(name="qa", kind="generation", template="Q: {question}\nA:")
    with pytest.raises(DataError, match="target"):
        gen.check([Example({"question": "who?"})])
    gen.check([Example({"question": "who?"})], require_labels=False)


# --------------------------------------------------------------------------- file loading


def test_csv_with_column_mapping_and_label_map(tmp_path):
    p = write(tmp_path / "r.csv", 'id,review,stars\n1,"Great, loved it",1\n2,  awful  ,0\n')
    exs = load_examples(p, fields={"text": "review"}, label_column="stars",
                        label_map={"0": "negative", "1": "positive"})
    assert exs == [Example({"text": "Great, loved it"}, "positive"), Example({"text": "awful"}, "negative")]
    SENTIMENT.check(exs)


def test_tsv_headerless_by_index_keeps_quotes(tmp_path):
    p = write(tmp_path / "r.tsv", 'it \'s "fine"\tpos\n\nbad film\tneg\n')
    exs = load_examples(p, fields={"text": 0}, label_column=1, has_header=False,
                        label_map={"pos": "positive", "neg": "negative"})
    assert [(e.fields["text"], e.label) for e in exs] == [('it \'s "fine"', "positive"), ("bad film", "negative")]


def test_jsonl_with_bool_labels_list_targets_and_limit(tmp_path):
    lines = [
        {"q": "is it?", "ans": True, "golds": ["yes", "yes", "y"]},
        {"q": "is it not?", "ans": False, "golds": "no"},
        {"q": "third", "ans": True, "golds": "x"},
    ]
    p = write(tmp_path / "d.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n")
    exs = load_examples(p, fields={"question": "q"}, label_column="ans", target_column="golds", limit=2)
    assert len(exs) == 2
    assert exs[0] == Example({"question": "is it?"}, label="true", target="yes", answers=("yes", "y"))
    assert exs[1].label == "false" and exs[1].answers == ("no",)


def test_format_override_and_utf8_bom(tmp_path):
    p = write(tmp_path / "data.txt", "\ufefftext,label\nhello there,positive\n")
    with pytest.raises(DataError, match="format="):
        load_examples(p, fields={"text": "text"})
    exs = load_examples(p, fields={"text": "text"}, label_column="label", format="csv")
    assert exs[0].label == "positive"


# --------------------------------------------------------------------------- errors


def test_missing_file_names_path(tmp_path):
    p = tmp_path / "nope.csv"
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        load_examples(p, fields={"text": "text"})
    with pytest.raises(DataError):
        load_examples(p, fields={"text": "text"})


def test_empty_file(tmp_path):
    p = write(tmp_path / "empty.csv", "  \n")
    with pytest.raises(DataError, match=r"empty\.csv.*empty"):
        load_examples(p, fields={"text": "text"})
    p2 = write(tmp_path / "header_only.csv", "text,label\n")
    with pytest.raises(DataError, match=r"header_only\.csv.*no data rows"):
        load_examples(p2, fields={"text": "text"})


def test_missing_column_lists_existing_columns(tmp_path):
    p = write(tmp_path / "cols.csv", "sentence,label\nhi,1\n")
    with pytest.raises(DataError) as ei:
        load_examples(p, fields={"text": "text"}, label_column="label")
    msg = str(ei.value)
    assert "cols.csv" in msg and "'text'" in msg and "sentence" in msg and "label" in msg


def test_empty_value_names_row_and_column(tmp_path):
    p = write(tmp_path / "gaps.csv", "text,label\nok,positive\n,negative\n")
    with pytest.raises(DataError) as ei:
        load_examples(p, fields={"text": "text"}, label_column="label")
    msg = str(ei.value)
    assert "gaps.csv" in msg and "row 2" in msg and "line 3" in msg and "'text'" in msg
    p2 = write(tmp_path / "nolabel.csv", "text,label\nok,positive\nfine,\n")
    with pytest.raises(DataError, match=r"nolabel\.csv: row 2 .*label"):
        load_examples(p2, fields={"text": "text"}, label_column="label")


def test_short_row_is_reported(tmp_path):
    p = write(tmp_path / "short.tsv", "a\tpositive\nb\n")
    with pytest.raises(DataError, match=r"short\.tsv: row 2 .*missing"):
        load_examples(p, fields={"text": 0}, label_column=1, has_header=False)


def test_unknown_raw_label_with_label_map(tmp_path):
    p = write(tmp_path / "labels.csv", "text,y\na,0\nb,1\nc,7\n")
    with pytest.raises(DataError) as ei:
        load_examples(p, fields={"text": "text"}, label_column="y", label_map={"0": "neg", "1": "pos"})
    msg = str(ei.value)
    assert "labels.csv" in msg and "row 3" in msg and "'7'" in msg and "'0'" in msg


def test_wrong_encoding_names_file_position_and_fix(tmp_path):
    p = write(tmp_path / "latin.csv", "text,label\nfine,positive\ncaf\u00e9 au lait,positive\n", "latin-1")
    with pytest.raises(DataError) as ei:
        load_examples(p, fields={"text": "text"}, label_column="label")
    msg = str(ei.value)
    assert "latin.csv" in msg and "line 3" in msg and "byte" in msg and "encoding=" in msg
    exs = load_examples(p, fields={"text": "text"}, label_column="label", encoding="latin-1")
    assert exs[1].fields["text"] == "caf\u00e9 au lait"


def test_malformed_json_line(tmp_path):
    p = write(tmp_path / "bad.jsonl", '{"text": "ok", "label": "positive"}\n{"text": "oops", "label": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl: line 2: malformed JSON"):
        load_examples(p, fields={"text": "text"}, label_column="label")


def test_jsonl_missing_key_lists_keys(tmp_path):
    p = write(tmp_path / "keys.jsonl", '{"sentence": "ok", "label": "positive"}\n')
    with pytest.raises(DataError, match=r"keys\.jsonl: line 1: key 'text' not found.*sentence"):
        load_examples(p, fields={"text": "text"}, label_column="label")


# --------------------------------------------------------------------------- Hugging Face


def test_from_hf_dataset_classlabel_and_overrides():
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features({
        "sentence": datasets.Value("string"),
        "label": datasets.ClassLabel(names=["negative", "positive"]),
    })
    ds = datasets.Dataset.from_dict({"sentence": ["bad", "good", "great"], "label": [0, 1, 1]}, features=feats)
    exs = from_hf_dataset(ds, fields={"text": "sentence"}, label_column="label")
    assert [e.label for e in exs] == ["negative", "positive", "positive"]
    SENTIMENT.check(exs)
    exs2 = from_hf_dataset(ds, fields={"text": "sentence"}, label_column="label", label_names=["neg", "pos"])
    assert exs2[0].label == "neg"
    with pytest.raises(DataError, match="columns are"):
        from_hf_dataset(ds, fields={"text": "text"})

    qa = datasets.Dataset.from_dict({
        "question": ["who?", "where?"],
        "answers": [{"text": ["Ann", "Ann B."], "answer_start": [0, 0]}, {"text": [""], "answer_start": [0]}],
    })
    with pytest.raises(DataError, match="row 2"):
        from_hf_dataset(qa, fields={"question": "question"}, target_column="answers")
    first = from_hf_dataset(qa.select([0]), fields={"question": "question"}, target_column="answers")
    assert first[0].target == "Ann" and first[0].answers == ("Ann", "Ann B.")


# --------------------------------------------------------------------------- data root


def test_data_root_resolution(tmp_path, monkeypatch):
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "main" / "sub").mkdir(parents=True)
    assert data_root(tmp_path) == tmp_path
    monkeypatch.setenv("SOFTPROMPT_DATA", str(tmp_path))
    assert data_root() == tmp_path
    monkeypatch.setenv("SOFTPROMPT_DATA", str(tmp_path / "missing"))
    with pytest.raises(DataNotFoundError, match="SOFTPROMPT_DATA"):
        data_root()
    monkeypatch.delenv("SOFTPROMPT_DATA")
    monkeypatch.chdir(tmp_path / "main" / "sub")
    assert data_root() == tmp_path / "shared" / "data"
    with pytest.raises(DataNotFoundError, match="data_dir"):
        data_root(tmp_path / "nowhere")


def test_data_root_not_found_lists_places(tmp_path, monkeypatch):
    import softprompt.data.loaders as tasks_mod

    monkeypatch.delenv("SOFTPROMPT_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    fake_src = tmp_path / "pkg" / "tasks.py"
    monkeypatch.setattr(tasks_mod, "__file__", str(fake_src))
    with pytest.raises(DataNotFoundError) as ei:
        data_root()
    msg = str(ei.value)
    assert str(tmp_path / "shared" / "data") in msg and str(tmp_path / "pkg" / "shared" / "data") in msg
    assert "SOFTPROMPT_DATA" in msg and "data_dir" in msg


# --------------------------------------------------------------------------- registry and demo


def test_registry():
    assert set(list_tasks()) == {
        "demo", "twitter_complaints", "sst2", "agnews", "boolq", "rte", "cb", "hotpotqa", "squad"
    }
    assert list_tasks() == list(BUILTIN_TASKS)
    with pytest.raises(ValueError, match="known tasks.*sst2"):
        load_task("sst3")


def test_demo_task_is_self_contained(monkeypatch, tmp_path):
    monkeypatch.setenv("SOFTPROMPT_DATA", str(tmp_path / "does-not-exist"))  # must not be consulted
    td = load_task("demo")
    assert isinstance(td, TaskData)
    assert td.task.labels == ["complaint", "praise"]
    assert td.task.input_fields == ("text",)
    assert {k: len(v) for k, v in td.splits.items()} == {"train": 200, "test": 100}
    for split in ("train", "test"):
        counts = Counter(e.label for e in td[split])
        assert set(counts) == {"complaint", "praise"}
        assert min(counts.values()) >= 0.4 * len(td[split])
    texts = [e.fields["text"] for e in td["train"] + td["test"]]
    assert len(set(texts)) == len(texts)
    assert all(8 <= len(t.split()) <= 25 for t in texts)
    assert len(load_task("demo", limit_per_split=5)["test"]) == 5
    with pytest.raises(KeyError, match="splits are"):
        td["validation"]


# --------------------------------------------------------------------------- built-in tasks (shared data)

EXPECTED = {
    "twitter_complaints": ("classification", ["complaint", "no complaint"], {"train", "test"}),
    "sst2": ("classification", ["negative", "positive"], {"train", "validation", "test"}),
    "agnews": ("classification", ["World", "Sports", "Business", "Sci/Tech"], {"train", "test"}),
    "boolq": ("classification", ["false", "true"], {"train", "validation", "test"}),
    "rte": ("classification", ["entailment", "not_entailment"], {"train", "validation", "test"}),
    "cb": ("classification", ["entailment", "contradiction", "neutral"], {"train", "validation", "test"}),
    "hotpotqa": ("generation", [], {"train", "test"}),
    "squad": ("generation", [], {"train", "test"}),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_task_loads(name):
    root = shared_root()
    kind, labels, splits = EXPECTED[name]
    td = load_task(name, root, limit_per_split=4)
    assert td.task.name == name and td.task.kind == kind and td.task.labels == labels
    assert set(td.splits) == splits
    assert all(len(v) == 4 for v in td.splits.values())
    assert td.task.instruction and "{soft:" in td.task.template
    for word in (td.task.verbalizer or {}).values():
        assert word.startswith(" ") and word.strip()
    for examples in td.splits.values():
        for e in examples:
            assert set(td.task.input_fields) <= set(e.fields)
            if kind == "generation":
                assert e.target and e.target == e.answers[0]


def test_twitter_complaints_label_counts():
    td = load_task("twitter_complaints", shared_root())
    assert Counter(e.label for e in td["train"]) == {"no complaint": 33, "complaint": 17}
    assert Counter(e.label for e in td["test"]) == {"no complaint": 2184, "complaint": 1215}


def test_sst2_test_counts():
    root = shared_root()
    exs = load_examples(root / "sst2" / "alps_test.tsv", fields={"sentence": "sentence"},
                        label_column="label", label_map={"0": "negative", "1": "positive"})
    assert Counter(e.label for e in exs) == {"positive": 444, "negative": 428}
    td = load_task("sst2", root, limit_per_split=2)
    assert td["test"] == exs[:2]


def test_generation_splits_are_positional():
    root = shared_root()
    hq = load_task("hotpotqa", root, limit_per_split=2)
    first = json.loads((root / "hotpotqa_ircot_dev500" / "dev_subsampled.jsonl").open().readline())
    assert hq["train"][0].fields["question"] == first["question_text"].strip()
    assert hq["train"][0].answers == tuple(first["answers_objects"][0]["spans"])
    sq = load_task("squad", root, limit_per_split=1)
    data = json.loads((root / "squad_v1.1_dev" / "dev-v1.1.rebuilt.json").read_text())
    qs = [qa for a in data["data"] for p in a["paragraphs"] for qa in p["qas"]]
    assert sq["train"][0].fields["question"] == qs[0]["question"].strip()
    assert sq["test"][0].fields["question"] == qs[500]["question"].strip()


def test_hotpot_context_rule():
    paras = [
        {"title": "A", "paragraph_text": "one two three", "is_supporting": False},
        {"title": "B", "paragraph_text": "gold  text here", "is_supporting": True},
        {"title": "C", "paragraph_text": "w " * 20, "is_supporting": False},
        {"title": "D", "paragraph_text": "more gold", "is_supporting": True},
    ]
    ctx = hotpot_context(paras, max_context_words=11)
    assert ctx.split("\n") == ["B: gold text here", "D: more gold", "A: one two three"]
    assert hotpot_context(paras, max_context_words=0).split("\n") == ["B: gold text here", "D: more gold"]


def test_builtin_table_gives_the_known_task_definitions():
    """The table rows are the task definitions the code used to hold (checked without data)."""
    from softprompt.data import builtin_task

    sst2 = builtin_task("sst2")
    assert sst2.verbalizer == {"negative": " negative", "positive": " positive"}
    assert sst2.template == "{soft:20} Review: {sentence}\nSentiment:"
    cb = builtin_task("cb")
    assert cb.template == (
        "{soft:20} Premise: {premise}\nHypothesis: {hypothesis}\n"
        "Is the hypothesis true given the premise? Yes, no, or maybe? Answer:"
    )
    assert cb.labels == ["entailment", "contradiction", "neutral"]
    agnews = builtin_task("agnews")
    assert agnews.verbalizer["Sci/Tech"] == " Technology" and agnews.input_fields == ("text",)
    squad = builtin_task("squad")
    assert squad.kind == "generation" and squad.verbalizer is None
    assert squad.instruction == "Answer the question with a short span copied from the context."
    assert builtin_task("demo").template.startswith("{soft:8} Customer message: {text}")
    assert builtin_task("hotpotqa").input_fields == ("context", "question")
    assert builtin_task("twitter_complaints").verbalizer == {"complaint": " yes", "no complaint": " no"}


def test_task_fields_use_the_template_grammar():
    """One grammar: a task reads its fields as the renderer does, and rejects what it rejects."""
    from softprompt.core.templates import Template, TemplateError

    t = Task("t", "generation", "{soft:3} A: {a} {{lit}} B: {b} {a}")
    assert t.input_fields == Template(t.template).fields == ("a", "b")
    with pytest.raises(TemplateError):
        Task("t", "generation", "{soft: 5} {two words}").input_fields
