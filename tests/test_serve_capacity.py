"""What the served tasks hold between requests is bounded (issue 21, item 7c): the number of
tasks (``max_tasks``) and their cached template-head key/values (``max_prefix_cache_bytes``),
at upload (422) and from the folder (not loaded, reported by reload); a replacement counts
instead of its old version."""
import pytest
from fastapi.testclient import TestClient

from softprompt.core.prompts import ModelIdentity
from softprompt.serve import Engine, EngineConfig, Registry, create_app
from softprompt.serve.backends.vllm import FrontModel, VllmBackend
from softprompt.serve.engine import PromptRejectedError
from softprompt.serve.testing import error_of as err, random_prompt
from softprompt.testing import TINY_WORDS

pytestmark = pytest.mark.usefixtures("one_thread")

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SENT = "{soft:3} review : {text} label :"
VERB = {"pos": " good", "neg": " bad"}


def prompt(model, seed=1, head_words=0):
    words = " ".join(TINY_WORDS[i % len(TINY_WORDS)] for i in range(head_words))
    return random_prompt(model, "{soft:3} " + words + " review : {text} label :", verbalizer=VERB, seed=seed)


def cached_bytes(eng) -> int:
    """What the bank really holds: the bytes of the distinct storages of its cached key/values."""
    seen = {}
    for _, layers in eng.bank._kv_cache.values():
        for k, v in layers:
            for t in (k, v):
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def test_head_bytes_is_what_the_bank_holds(lm):
    """The estimate the limit is enforced with equals the measured key/value storage."""
    model, tok = lm
    eng = Engine(model, tok)
    assert eng.kv_bytes_per_token == 2 * 2 * 2 * 8 * 4  # layers x (k, v) x kv heads x head dim x fp32
    total = 0
    for name, words in (("short", 0), ("long", 40)):
        spec = eng.register(name, prompt(model, head_words=words))
        total += eng.head_bytes(spec.prompts, spec.prefix_lens)
        assert cached_bytes(eng) == total
    ens = eng.register("ens", [prompt(model, 2), prompt(model, 3)])
    assert cached_bytes(eng) == total + eng.head_bytes(ens.prompts, ens.prefix_lens)


def test_the_task_cap_counts_a_replacement_once(lm, tmp_path):
    model, tok = lm
    root = tmp_path / "p"
    root.mkdir()
    for k, name in enumerate(("a", "b", "c")):
        prompt(model, k).save(root / f"{name}.safetensors")
    eng = Engine(model, tok, max_tasks=2)
    reg = Registry(root, eng)
    report = reg.sync()  # from the folder: not loaded, reported
    assert report["added"] == ["a", "b"] and "max_tasks" in report["errors"]["c"]
    with pytest.raises(PromptRejectedError) as e:
        eng.register("d", prompt(model, 4))
    assert e.value.code == "too_many_tasks"
    eng.register("a", prompt(model, 5))  # a replacement is not a third task
    prompt(model, 6).save(tmp_path / "up.safetensors")
    data = (tmp_path / "up.safetensors").read_bytes()
    with TestClient(create_app(eng, registry=reg, token=TOKEN), raise_server_exceptions=False) as c:
        before = reg.listing()
        e = err(c.put("/v1/tasks/new", content=data, headers=AUTH), 422, "too_many_tasks")
        assert "2 tasks" in e["message"] and reg.listing() == before
        assert c.put("/v1/tasks/b", content=data, headers=AUTH).status_code == 200
        # a task removed from the folder makes room for another at the same reload
        (root / "b.safetensors").unlink()
        r = c.post("/v1/admin/reload", headers=AUTH).json()
        assert r["removed"] == ["b"] and r["added"] == ["c"] and r["errors"] == {}, r
    assert sorted(eng.tasks()) == ["a", "c"]


def test_the_prefix_memory_cap_counts_a_replacement_once(lm, tmp_path):
    model, tok = lm
    one = Engine(model, tok).register("x", prompt(model))
    cost = Engine(model, tok).head_bytes(one.prompts, one.prefix_lens)
    eng = Engine(model, tok, max_prefix_cache_bytes=cost * 3 // 2)
    eng.register("a", prompt(model, 1))
    with pytest.raises(PromptRejectedError) as e:
        eng.register("b", prompt(model, 2))
    assert e.value.code == "prefix_memory_full" and "max_prefix_cache_bytes" in e.value.message
    v = eng.register("a", prompt(model, 3)).version  # same size: replaces, not counted twice
    with pytest.raises(PromptRejectedError) as e:  # a longer head than the room left
        eng.register("a", prompt(model, 4, head_words=20))
    assert e.value.code == "prefix_memory_full" and eng.tasks()["a"].version == v
    root = tmp_path / "p"
    root.mkdir()
    reg = Registry(root, eng)
    prompt(model, 6).save(tmp_path / "up.safetensors")
    with TestClient(create_app(eng, registry=reg, token=TOKEN), raise_server_exceptions=False) as c:
        err(c.put("/v1/tasks/b", content=(tmp_path / "up.safetensors").read_bytes(), headers=AUTH), 422,
            "prefix_memory_full")
        assert reg.listing() == [] and sorted(eng.tasks()) == ["a"]
        line = next(ln for ln in c.get("/metrics").text.splitlines() if ln.startswith("softprompt_prefix_cache_bytes "))
        assert float(line.split()[1]) == eng.head_bytes(eng.tasks()["a"].prompts, eng.tasks()["a"].prefix_lens) == cost


def test_the_vllm_backend_takes_the_task_cap_from_the_config(lm):
    model, tok = lm
    front = FrontModel(tok, model.get_input_embeddings().weight.detach().float(), ModelIdentity.of(model), "",
                       int(model.config.max_position_embeddings))
    backend = VllmBackend(front, None, **EngineConfig(max_tasks=1).limits())
    backend.register("a", prompt(model, 1))
    backend.register("a", prompt(model, 2))
    with pytest.raises(PromptRejectedError) as e:
        backend.register("b", prompt(model, 3))
    assert e.value.code == "too_many_tasks"
