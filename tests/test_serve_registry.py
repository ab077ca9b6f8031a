"""The prompt folder: layout (single prompts, ensemble folders, manifests), sync, atomic
uploads and deletions that leave everything unchanged when rejected."""
import json
import os

import pytest
import torch

from softprompt.serve.engine import Engine, ModelMismatchError, PromptRejectedError, UnknownTaskError
from softprompt.serve.registry import (
    InvalidTaskNameError, NotSafetensorsError, Registry, UploadTooLargeError, validate_task_name,
)
from softprompt.serve.testing import random_prompt
from softprompt.testing import tiny_causal_lm

pytestmark = pytest.mark.usefixtures("one_thread")

SENT = "{soft:3} review : {text} label :"
VERB = {"pos": " good", "neg": " bad"}


def sp(model, seed, template=SENT, verbalizer=VERB, kind="classification"):
    return random_prompt(model, template, verbalizer=verbalizer if kind == "classification" else None, kind=kind, seed=seed)


@pytest.fixture
def store(lm, tmp_path):
    model, tok = lm
    root = tmp_path / "prompts"
    root.mkdir()
    sp(model, 1).save(root / "single.safetensors")
    (root / "folder").mkdir()
    for k in range(3):
        sp(model, 10 + k).save(root / "folder" / f"seed{k}.safetensors")
    (root / "majority").mkdir()
    for k in range(3):
        sp(model, 20 + k).save(root / "majority" / f"m{k}.safetensors")
    (root / "majority" / "manifest.json").write_text(json.dumps(
        {"members": ["m0.safetensors", {"path": "m2.safetensors", "name": "second"}], "vote": "majority"}))
    (root / "shared").mkdir()
    sp(model, 30).save(root / "shared" / ".hidden.safetensors")  # ignored
    sp(model, 31).save(root / "pool_a.safetensors")
    (root / "combo.json").write_text(json.dumps({"members": ["single.safetensors", "pool_a.safetensors"]}))
    sp(model, 2, template="{soft:2} q : {text} a :", kind="generation").save(root / "qa.safetensors")
    (root / ".upload-x.tmp").write_bytes(b"junk")  # leftovers of an interrupted upload are ignored
    (root / "notes.txt").write_text("not a prompt")
    eng = Engine(model, tok)
    reg = Registry(root, eng)
    return model, eng, reg, root


def test_layout(store):
    model, eng, reg, root = store
    report = reg.sync()
    assert sorted(report["added"]) == ["combo", "folder", "majority", "pool_a", "qa", "single"]
    assert report["errors"] == {"shared": f"folder {root / 'shared'} holds no .safetensors prompts"}
    tasks = eng.tasks()
    assert tasks["single"].members and not tasks["single"].ensemble
    assert tasks["folder"].member_names == ("seed0", "seed1", "seed2") and tasks["folder"].vote == "mean"
    assert tasks["majority"].member_names == ("m0", "second") and tasks["majority"].vote == "majority"
    assert tasks["combo"].member_names == ("single", "pool_a")
    assert tasks["qa"].kind == "generation"
    assert len(eng.bank) == sum(len(s.members) for s in tasks.values())
    with eng:
        r = eng.classify("folder", ["good"])[0]
        assert len(r.members) == 3 and abs(sum(r.probabilities.values()) - 1) < 1e-5


def test_manifest_cannot_escape_the_folder(store, tmp_path):
    model, eng, reg, root = store
    sp(model, 5).save(tmp_path / "outside.safetensors")
    (root / "evil.json").write_text(json.dumps({"members": ["../outside.safetensors"]}))
    (root / "abs.json").write_text(json.dumps({"members": [str(tmp_path / "outside.safetensors")]}))
    (root / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    (root / "bad name.safetensors").write_bytes(b"x")
    report = reg.sync()
    assert "outside" in report["errors"]["evil"] and "relative" in report["errors"]["abs"]
    assert "outside" in report["errors"]["link"]
    assert "invalid task name" in report["errors"]["bad name"]
    assert not {"evil", "abs", "link", "bad name"} & set(eng.tasks())


def test_sync_adds_replaces_and_removes(store):
    model, eng, reg, root = store
    reg.sync()
    v = eng.tasks()["single"].version
    assert reg.sync()["unchanged"]  # nothing changed on disk, nothing reloaded
    assert eng.tasks()["single"].version == v
    sp(model, 77).save(root / "single.safetensors")
    sp(model, 78).save(root / "newcomer.safetensors")
    (root / "qa.safetensors").unlink()
    report = reg.sync()
    # combo's manifest uses single.safetensors too, so it is reloaded with it
    assert report["replaced"] == ["combo", "single"] and report["added"] == ["newcomer"] and report["removed"] == ["qa"]
    assert eng.tasks()["single"].version > v and "qa" not in eng.tasks()
    # a file that turns bad is reported and the previous version keeps serving
    (root / "single.safetensors").write_bytes(b"garbage")
    v2 = eng.tasks()["single"].version
    report = reg.sync()
    assert "single" in report["errors"] and eng.tasks()["single"].version == v2
    assert len(eng.bank) == sum(len(s.members) for s in eng.tasks().values())


@pytest.mark.parametrize("name", ["..", ".", "../x", "a/b", "a\\b", ".hidden", "x" * 65, "", "a b", "a\x00b", "é", "a..b", "-x"])
def test_invalid_names(name):
    with pytest.raises(InvalidTaskNameError):
        validate_task_name(name)


def test_valid_names():
    for name in ("sst2", "twitter_complaints", "a.b-c_1", "X" * 64):
        assert validate_task_name(name) == name


def test_put_and_delete(store, lm, tmp_path):
    model, eng, reg, root = store
    reg.sync()
    data_path = tmp_path / "p.safetensors"
    sp(model, 5).save(data_path)
    spec, replaced = reg.put("fresh", data_path.read_bytes())
    assert not replaced and (root / "fresh.safetensors").read_bytes() == data_path.read_bytes()
    assert eng.tasks()["fresh"].version == spec.version
    spec2, replaced = reg.put("fresh", data_path.read_bytes())
    assert replaced and spec2.version > spec.version
    # replacing an ensemble folder by a single prompt removes the folder
    reg.put("folder", data_path.read_bytes())
    assert not (root / "folder").exists() and (root / "folder.safetensors").exists()
    assert not eng.tasks()["folder"].ensemble
    reg.delete("majority")
    assert not (root / "majority").exists() and "majority" not in eng.tasks()
    reg.delete("combo")  # a manifest-defined task: the manifest goes, the shared members stay
    assert not (root / "combo.json").exists() and (root / "pool_a.safetensors").exists()
    with pytest.raises(UnknownTaskError):
        reg.delete("majority")
    assert not [p for p in os.listdir(root) if p.startswith((".upload-", ".trash-")) and p != ".upload-x.tmp"]
    assert len(eng.bank) == sum(len(s.members) for s in eng.tasks().values())


def test_rejected_uploads_change_nothing(store, tmp_path):
    model, eng, reg, root = store
    reg.sync()
    before = (reg.listing(), {n: s.version for n, s in eng.tasks().items()}, len(eng.bank))
    good = tmp_path / "g.safetensors"
    sp(model, 5).save(good)
    other = tmp_path / "o.safetensors"
    random_prompt(tiny_causal_lm("llama", seed=3), SENT, verbalizer=VERB).save(other)
    nan = sp(model, 6)
    nan.embeddings[1, 2] = float("inf")
    nan.save(tmp_path / "nan.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    cases = [
        ("single", b"\x80\x04\x95 pickle", NotSafetensorsError),
        ("single", b'{"json": "not a prompt"}', NotSafetensorsError),
        ("single", (8).to_bytes(8, "little") + b"{}      ", PromptRejectedError),
        ("single", (tmp_path / "plain.safetensors").read_bytes(), PromptRejectedError),
        ("single", other.read_bytes(), ModelMismatchError),
        ("single", (tmp_path / "nan.safetensors").read_bytes(), PromptRejectedError),
        ("single", good.read_bytes() + b"x" * reg.max_upload_bytes, UploadTooLargeError),
        ("../single", good.read_bytes(), InvalidTaskNameError),
        ("brand_new", other.read_bytes(), ModelMismatchError),
    ]
    for name, data, err in cases:
        with pytest.raises(err):
            reg.put(name, data)
        assert (reg.listing(), {n: s.version for n, s in eng.tasks().items()}, len(eng.bank)) == before, name
