"""Regression tests for the prompt folder (issue 21, items 3, 6 and 7g): hostile manifests and
unexpected errors are reported per task instead of breaking reload and start-up; an upload
cannot swap an incompatible prompt into an ensemble; a symlinked alias can be deleted without
touching the tasks that use its target."""
import json
import os

import pytest
from fastapi.testclient import TestClient

import softprompt.core.prompts as prompts_mod
from softprompt.serve import Engine, Registry, create_app
from softprompt.serve.registry import TaskInUseError
from softprompt.serve.testing import error_of as err, random_prompt

pytestmark = pytest.mark.usefixtures("one_thread")

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SENT = "{soft:3} review : {text} label :"
VERB = {"pos": " good", "neg": " bad"}


def good(model, root, name, seed=1, verbalizer=VERB):
    random_prompt(model, SENT, verbalizer=verbalizer, seed=seed).save(root / f"{name}.safetensors")


def setup(lm, tmp_path):
    model, tok = lm
    root = tmp_path / "p"
    root.mkdir()
    good(model, root, "demo")
    good(model, root, "pool_a", 2)
    good(model, root, "pool_b", 3)
    (root / "topic.json").write_text(json.dumps({"members": ["pool_a.safetensors", "pool_b.safetensors"]}))
    eng = Engine(model, tok, base_name="tiny", max_wait_ms=1)
    reg = Registry(root, eng, max_upload_bytes=64_000)
    return model, root, eng, reg


def app_of(eng, reg):
    return TestClient(create_app(eng, registry=reg, token=TOKEN), raise_server_exceptions=False)


# ----------------------------------------------------------------------------- 3. hostile manifests
def hostile_manifests(root):
    deep = "[" * 100_000 + "]" * 100_000
    (root / "deep.json").write_text('{"members": ' + deep + "}")
    (root / "deepdir").mkdir()
    (root / "deepdir" / "manifest.json").write_text("{" * 100_000)  # also not valid JSON
    (root / "huge.json").write_text(json.dumps({"members": ["pool_a.safetensors"], "pad": "x" * (5 << 20)}))
    (root / "latin.json").write_bytes(b'{"members": ["\xff.safetensors"]}')
    (root / "nul.json").write_text(json.dumps({"members": ["a\u0000b.safetensors"]}))  # ValueError in resolve()


def check_hostile_report(errors):
    assert "nests deeper than 64 levels" in errors["deep"] and "deep.json" in errors["deep"]
    assert "nests deeper than 64 levels" in errors["deepdir"]
    assert "the limit is" in errors["huge"]
    assert "UTF-8" in errors["latin"]
    assert "nul" in errors["nul"]
    assert all(len(e) < 2000 for e in errors.values()), errors


def test_deep_and_odd_manifests_are_skipped_and_reported(lm, tmp_path):
    model, root, eng, reg = setup(lm, tmp_path)
    hostile_manifests(root)
    report = reg.sync()  # was RecursionError (deep) and ValueError (nul): the whole scan died
    check_hostile_report(report["errors"])
    assert sorted(report["added"]) == ["demo", "pool_a", "pool_b", "topic"]
    assert set(report["errors"]) == {"deep", "deepdir", "huge", "latin", "nul"}


def test_reload_answers_200_with_a_deep_manifest(lm, tmp_path):
    model, root, eng, reg = setup(lm, tmp_path)
    reg.sync()
    hostile_manifests(root)
    with app_of(eng, reg) as c:
        r = c.post("/v1/admin/reload", headers=AUTH)  # was 500
        assert r.status_code == 200, r.text[:500]
        check_hostile_report(r.json()["errors"])
        assert c.post("/v1/classify", json={"task": "topic", "inputs": ["good"]}).status_code == 200


def test_start_up_survives_a_deep_manifest(lm, tmp_path, monkeypatch):
    import uvicorn

    import softprompt.families.loading
    from softprompt.serve import serve

    model, root, eng, reg = setup(lm, tmp_path)
    hostile_manifests(root)
    served = {}
    monkeypatch.setattr(softprompt.families.loading, "load_model", lambda name, device=None: lm)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app))
    serve("tiny", root, token=TOKEN)  # was a RecursionError traceback
    assert "app" in served


def test_an_unexpected_error_loading_one_task_is_reported_for_it(lm, tmp_path, monkeypatch):
    model, root, eng, reg = setup(lm, tmp_path)
    real_load = prompts_mod.SoftPrompt.load.__func__

    def load(cls, path, *a, **kw):
        if os.path.basename(path) == "pool_b.safetensors":
            raise RuntimeError("disk on fire")
        return real_load(cls, path, *a, **kw)

    monkeypatch.setattr(prompts_mod.SoftPrompt, "load", classmethod(load))
    report = reg.sync()  # was: the RuntimeError aborted the whole sync
    assert "RuntimeError: disk on fire" in report["errors"]["pool_b"]
    assert "RuntimeError: disk on fire" in report["errors"]["topic"]
    assert sorted(report["added"]) == ["demo", "pool_a"]


# ----------------------------------------------------------------------------- 6. member replacement
def test_an_incompatible_member_replacement_is_refused(lm, tmp_path):
    model, root, eng, reg = setup(lm, tmp_path)
    reg.sync()
    listing = sorted(os.listdir(root))
    three = tmp_path / "three.safetensors"
    random_prompt(model, SENT, verbalizer={"pos": " good", "neg": " bad", "meh": " ok"}, seed=9).save(three)
    gen = tmp_path / "gen.safetensors"
    random_prompt(model, "{soft:3} q : {text} a :", kind="generation", seed=9).save(gen)
    version = eng.tasks()["pool_a"].version
    with app_of(eng, reg) as c:
        for bad in (three, gen):
            e = err(c.put("/v1/tasks/pool_a", content=bad.read_bytes(), headers=AUTH), 409, "task_in_use")
            assert "topic" in e["message"] and "topic.json" in e["message"], e
            assert sorted(os.listdir(root)) == listing and eng.tasks()["pool_a"].version == version
        assert "different label sets" in e["message"] or "kind" in e["message"]
        # a compatible replacement stays allowed; the manifest's task picks it up at the next reload
        compatible = tmp_path / "compatible.safetensors"
        random_prompt(model, SENT, verbalizer={"neg": " bad", "pos": " good"}, seed=10).save(compatible)
        assert c.put("/v1/tasks/pool_a", content=compatible.read_bytes(), headers=AUTH).status_code == 200
        r = c.post("/v1/admin/reload", headers=AUTH).json()
        assert r["errors"] == {} and r["replaced"] == ["topic"], r
    # and after a restart the ensemble still loads
    fresh = Registry(root, Engine(model, lm[1], base_name="tiny"))
    assert fresh.sync()["errors"] == {} and "topic" in fresh.engine.tasks()


def test_a_refused_member_upload_names_the_task_even_through_a_symlink(lm, tmp_path):
    """An ensemble folder whose member is a link to a top-level file depends on that file."""
    model, root, eng, reg = setup(lm, tmp_path)
    (root / "ens").mkdir()
    good(model, root / "ens", "m0", 4)
    (root / "ens" / "m1.safetensors").symlink_to("../demo.safetensors")
    assert reg.sync()["errors"] == {}
    other = random_prompt(model, SENT, verbalizer={"a": " good", "b": " bad"}, seed=5)
    other.save(tmp_path / "o.safetensors")
    with pytest.raises(TaskInUseError, match="task 'ens'"):
        reg.put("demo", (tmp_path / "o.safetensors").read_bytes())


# ----------------------------------------------------------------------------- 7g. symlinked aliases
def test_a_symlinked_alias_can_be_deleted_and_only_what_goes_through_it_is_protected(lm, tmp_path):
    model, root, eng, reg = setup(lm, tmp_path)
    (root / "alias.safetensors").symlink_to("demo.safetensors")
    (root / "ens").mkdir()
    good(model, root / "ens", "m0", 4)
    (root / "ensalias").symlink_to("ens")
    (root / "via.json").write_text(json.dumps({"members": ["ensalias/m0.safetensors"]}))
    assert reg.sync()["errors"] == {}
    with app_of(eng, reg) as c:
        r = c.delete("/v1/tasks/alias", headers=AUTH)  # was 409: the link resolved to demo.safetensors
        assert r.status_code == 200 and r.json()["files"] == ["alias.safetensors"], r.text
        assert (root / "demo.safetensors").is_file() and "demo" in eng.tasks() and "alias" not in eng.tasks()
        # the link to a folder: the manifest goes through it, so it is in use; the folder itself too
        e = err(c.delete("/v1/tasks/ensalias", headers=AUTH), 409, "task_in_use")
        assert "via" in e["message"]
        err(c.delete("/v1/tasks/ens", headers=AUTH), 409, "task_in_use")
        assert c.delete("/v1/tasks/via", headers=AUTH).status_code == 200
        # nothing goes through the link now: deleting it leaves the folder and its task
        r = c.delete("/v1/tasks/ensalias", headers=AUTH)
        assert r.status_code == 200 and r.json()["files"] == ["ensalias"], r.text
        assert (root / "ens" / "m0.safetensors").is_file() and "ens" in eng.tasks()
        # a real file is protected from a task that reaches it through a link
        (root / "alias2.safetensors").symlink_to("demo.safetensors")
        assert c.post("/v1/admin/reload", headers=AUTH).json()["added"] == ["alias2"]
        e = err(c.delete("/v1/tasks/demo", headers=AUTH), 409, "task_in_use")
        assert "alias2" in e["message"]
