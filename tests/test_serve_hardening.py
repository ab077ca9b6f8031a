"""Regression tests for the server under attack and overload (issue 12): names that alias
another task's files, auth before any body is read, cancelled work, non-finite tensors,
crash leftovers, malformed artifact metadata, and the smaller holes of item 9."""
import asyncio
import json
import os
import threading
import time

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file

from softprompt.core.prompts import PromptFileError, SoftPrompt
from softprompt.serve import Engine, Registry, create_app
from softprompt.serve.registry import InvalidTaskNameError, validate_task_name
from softprompt.serve.testing import error_of as err, random_prompt

pytestmark = pytest.mark.usefixtures("one_thread")

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SENT = "{soft:3} review : {text} label :"
VERB = {"pos": " good", "neg": " bad"}
QA = "{soft:4} question : {text} answer :"


def populate(model, root):
    random_prompt(model, SENT, verbalizer=VERB, seed=1).save(root / "demo.safetensors")
    random_prompt(model, SENT, verbalizer=VERB, seed=2).save(root / "pool_a.safetensors")
    random_prompt(model, SENT, verbalizer=VERB, seed=3).save(root / "pool_b.safetensors")
    (root / "topic.json").write_text(json.dumps({"members": ["pool_a.safetensors", "./pool_b.safetensors"]}))
    random_prompt(model, QA, kind="generation", seed=6).save(root / "qa.safetensors")


def build(lm, root, **kw):
    model, tok = lm
    root.mkdir(exist_ok=True)
    if not any(root.iterdir()):
        populate(model, root)
    eng = Engine(model, tok, base_name="tiny", max_wait_ms=kw.pop("max_wait_ms", 1), max_new_tokens_limit=64,
                 max_input_tokens=64, max_queue=kw.pop("max_queue", 256))
    reg = Registry(root, eng, max_upload_bytes=kw.pop("max_upload_bytes", 64_000))
    reg.sync()
    app = create_app(eng, registry=reg, token=kw.pop("token", TOKEN), max_inputs=8, max_body_bytes=32_000, **kw)
    return eng, reg, app


def listing(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


# ----------------------------------------------------------------------------- 2. aliasing names
@pytest.mark.parametrize("name", ["demo.safetensors", "topic.json", "demo.SafeTensors", "x.JSON"])
def test_names_that_alias_a_file_are_refused(name):
    with pytest.raises(InvalidTaskNameError):
        validate_task_name(name)


def test_put_and_delete_cannot_touch_another_tasks_files(lm, tmp_path):
    root = tmp_path / "p"
    eng, reg, app = build(lm, root)
    before = listing(root)
    data = (root / "demo.safetensors").read_bytes()
    with TestClient(app, raise_server_exceptions=False) as c:
        for name in ("demo.safetensors", "topic.json", "pool_a.safetensors"):
            err(c.delete(f"/v1/tasks/{name}", headers=AUTH), 400, "invalid_task_name")
            err(c.put(f"/v1/tasks/{name}", content=data, headers=AUTH), 400, "invalid_task_name")
            assert listing(root) == before, name
        assert c.post("/v1/admin/reload", headers=AUTH).json()["errors"] == {}
        assert {"demo", "topic", "qa"} <= set(eng.tasks())


# ----------------------------------------------------------------------------- 5. non-finite tensors
def _nonfinite_files(model, tmp_path):
    """One artifact per tensor kind with a NaN or inf in it."""
    out = {}
    p = random_prompt(model, SENT, verbalizer=VERB, seed=5)
    p.embeddings[0, 0] = float("nan")
    p.save(tmp_path / "emb.safetensors")
    out["embeddings"] = tmp_path / "emb.safetensors"
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    for what, val in (("prefix_kv", float("inf")), ("prefix_kv_nan", float("nan"))):
        q = random_prompt(model, "review : {text} label :", verbalizer=VERB, seed=6)
        q.method = "prefix_tuning"
        q.kv = torch.zeros(cfg.num_hidden_layers, 2, cfg.num_key_value_heads, 2, head_dim)
        q.kv[1, 0, 0, 1, 2] = val
        q.save(tmp_path / f"{what}.safetensors")
        out[what] = tmp_path / f"{what}.safetensors"
    # any other tensor in the file (one the loader does not even use)
    good = random_prompt(model, SENT, verbalizer=VERB, seed=7)
    save_file({"prompt": good.embeddings.contiguous(), "extra": torch.tensor([1.0, float("-inf")])},
              str(tmp_path / "extra.safetensors"), metadata={"softprompt": json.dumps(good.metadata())})
    out["other"] = tmp_path / "extra.safetensors"
    return out


def test_non_finite_tensors_are_refused_at_load_and_upload(lm, tmp_path):
    model, _ = lm
    files = _nonfinite_files(model, tmp_path)
    for what, path in files.items():
        with pytest.raises(PromptFileError, match="NaN or infinite"):
            SoftPrompt.load(path)
    root = tmp_path / "p"
    eng, reg, app = build(lm, root)
    before = listing(root)
    with TestClient(app, raise_server_exceptions=False) as c:
        for what, path in files.items():
            for name in ("demo", "fresh"):
                e = err(c.put(f"/v1/tasks/{name}", content=path.read_bytes(), headers=AUTH), 422)
                assert "NaN or infinite" in e["message"], (what, e)
                assert listing(root) == before
        # and at load: a non-finite file dropped into the folder is not served
        os.link(files["prefix_kv"], root / "bad.safetensors")
        report = c.post("/v1/admin/reload", headers=AUTH).json()
        assert "NaN or infinite" in report["errors"]["bad"] and "bad" not in eng.tasks()


# ----------------------------------------------------------------------------- 7. malformed metadata
def _with_meta(model, path, meta_text: str):
    good = random_prompt(model, SENT, verbalizer=VERB, seed=8)
    save_file({"prompt": good.embeddings.contiguous()}, str(path), metadata={"softprompt": meta_text})
    return path


def _malformed(model, tmp_path):
    good = random_prompt(model, SENT, verbalizer=VERB, seed=8).metadata()
    cases = {"list": "[]", "null": "null", "deep": "[" * 100_000 + "]" * 100_000, "number": "3",
             "not-json": "{nope", "deep-dict": '{"a":' * 50_000 + "1" + "}" * 50_000}
    for key, val in (("kind", ["classification"]), ("template", 3), ("template", None), ("verbalizer", ["good", "bad"]),
                     ("base_model", "tiny"), ("base_model", {"name": "x"}), ("format_version", "1"),
                     ("verbalizer", {"pos": 1}), ("training", []), ("head", 5)):
        cases[f"{key}={json.dumps(val)}"] = json.dumps({**good, key: val})
    missing = dict(good)
    del missing["template"]
    cases["no-template"] = json.dumps(missing)
    return {name: _with_meta(model, tmp_path / f"m{i}.safetensors", text) for i, (name, text) in enumerate(cases.items())}


def test_malformed_metadata_is_a_clear_error_everywhere(lm, tmp_path):
    model, _ = lm
    files = _malformed(model, tmp_path)
    for what, path in files.items():
        with pytest.raises(PromptFileError):
            SoftPrompt.load(path)
    root = tmp_path / "p"
    eng, reg, app = build(lm, root, max_upload_bytes=1 << 20)
    before = listing(root)
    with TestClient(app, raise_server_exceptions=False) as c:
        for what, path in files.items():
            r = c.put("/v1/tasks/fresh", content=path.read_bytes(), headers=AUTH)
            assert r.status_code == 422, (what, r.status_code, r.text)
            assert listing(root) == before


def test_metadata_schema_keeps_old_and_extended_artifacts(lm, tmp_path):
    model, _ = lm
    good = random_prompt(model, SENT, verbalizer=VERB, seed=8)
    meta = good.metadata()
    # an old artifact without the optional keys, and a newer one with keys this reader does not know
    old = {k: v for k, v in meta.items() if k in ("format_version", "base_model", "template", "verbalizer")}
    new = {**meta, "calibration": {"method": "contextual", "log_prior": [-0.1, -2.3], "extra": 1}, "future": {"x": 1}}
    for i, m in enumerate((old, new)):
        p = _with_meta(model, tmp_path / f"ok{i}.safetensors", json.dumps(m))
        sp = SoftPrompt.load(p, model=model)
        assert sp.template == SENT and sp.verbalizer == VERB and sp.kind == "classification"


# ----------------------------------------------------------------------------- raw ASGI driver
async def asgi(app, method, path, headers=(), receive=None, timeout=10.0):
    """Call the ASGI app directly; returns (status, headers, body, number of receive() calls)."""
    calls = [0]
    out = {"status": None, "headers": {}, "body": b""}

    async def default_receive():
        await asyncio.sleep(3600)

    async def rec():
        calls[0] += 1
        return await (receive or default_receive)()

    async def send(msg):
        if msg["type"] == "http.response.start":
            out["status"] = msg["status"]
            out["headers"] = {k.decode().lower(): v.decode() for k, v in msg.get("headers", [])}
        elif msg["type"] == "http.response.body":
            out["body"] += msg.get("body", b"")

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers], "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 80)}
    await asyncio.wait_for(app(scope, rec, send), timeout)
    return out["status"], out["headers"], out["body"], calls[0]


# ----------------------------------------------------------------------------- 3. auth before the body
def test_unauthenticated_uploads_are_refused_before_any_body_is_read(lm, tmp_path):
    eng, reg, app = build(lm, tmp_path / "p", max_upload_bytes=8 << 20)
    big = str(8 << 20)

    async def main():
        for headers, status in [
            ([("content-length", big)], 401),
            ([("content-length", big), ("authorization", "Bearer wrong")], 401),
            ([("content-length", big), ("authorization", TOKEN)], 401),
            ([("content-length", str(9 << 20)), ("authorization", f"Bearer {TOKEN}")], 413),
            ([("authorization", f"Bearer {TOKEN}"), ("transfer-encoding", "chunked")], 411),
        ]:
            st, hd, body, calls = await asgi(app, "PUT", "/v1/tasks/fresh", headers)
            assert (st, calls) == (status, 0), (headers, st, body, calls)
        # many at once: none of them is buffered (receive is never called)
        results = await asyncio.gather(*[asgi(app, "PUT", "/v1/tasks/x", [("content-length", big)]) for _ in range(40)])
        assert {(r[0], r[3]) for r in results} == {(401, 0)}
        # protected reads: an unauthenticated POST body is not read either
        eng2, reg2, app2 = build(lm, tmp_path / "q", protect_reads=True)
        st, _, _, calls = await asgi(app2, "POST", "/v1/classify", [("content-length", "30000")])
        assert (st, calls) == (401, 0)
        eng3, reg3, app3 = build(lm, tmp_path / "r", token=None)
        st, _, _, calls = await asgi(app3, "PUT", "/v1/tasks/x", [("content-length", big)])
        assert (st, calls) == (403, 0)

    asyncio.run(main())


def test_concurrent_uploads_are_bounded(lm, tmp_path):
    eng, reg, app = build(lm, tmp_path / "p", max_concurrent_uploads=1)
    data = (tmp_path / "p" / "demo.safetensors").read_bytes()

    async def main():
        gate = asyncio.Event()
        sent = [False]

        async def slow_receive():  # the first upload trickles in: its body arrives only when the gate opens
            if sent[0]:
                await asyncio.sleep(3600)
            await gate.wait()
            sent[0] = True
            return {"type": "http.request", "body": data, "more_body": False}

        hdrs = [("content-length", str(len(data))), ("authorization", f"Bearer {TOKEN}")]
        first = asyncio.ensure_future(asgi(app, "PUT", "/v1/tasks/fresh", hdrs, slow_receive))
        await asyncio.sleep(0.05)
        st, headers, body, calls = await asgi(app, "PUT", "/v1/tasks/other", hdrs)
        assert (st, calls) == (429, 0), (st, body)
        assert int(headers["retry-after"]) >= 1
        gate.set()
        st, _, body, _ = await first
        assert st == 201, body

    asyncio.run(main())


# ----------------------------------------------------------------------------- 4. cancelled work
def _body_then_disconnect(body: bytes, gone: asyncio.Event):
    sent = [False]

    async def receive():
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}
    return receive


def test_a_client_that_gives_up_has_its_queued_work_dropped(lm, tmp_path):
    eng, reg, app = build(lm, tmp_path / "p")
    seen, entered, release = [], threading.Event(), threading.Event()

    def hook(items):
        seen.extend(it.fields.get("text") for it in items)
        entered.set()
        release.wait(30)

    eng.batch_hook = hook
    eng.start()
    try:
        blocker = eng.submit_classify("demo", ["blocker"])
        assert entered.wait(30)

        async def main():
            gone = asyncio.Event()
            body = json.dumps({"task": "demo", "inputs": ["gave up 1", "gave up 2"]}).encode()
            req = asyncio.ensure_future(asgi(app, "POST", "/v1/classify", [("content-type", "application/json"),
                                        ("content-length", str(len(body)))], _body_then_disconnect(body, gone)))
            for _ in range(500):
                if eng.queued_rows == 2:
                    break
                await asyncio.sleep(0.01)
            assert eng.queued_rows == 2
            gone.set()
            st, _, _, _ = await asyncio.wait_for(req, 10)  # answered although the worker is still blocked
            assert st == 499

        asyncio.run(main())
        release.set()
        assert blocker[0].result(30).label and eng.classify("demo", ["next"], timeout=30)[0].label
        assert seen == ["blocker", "next"], seen  # the abandoned inputs never reached the model
        assert eng.metrics.requests.value(task="demo", kind="classify", status="ok") == 2
        assert eng.metrics.requests.value(task="demo", kind="classify", status="cancelled") == 2
    finally:
        release.set()
        eng.stop()


@pytest.mark.parametrize("path", ["/v1/generate", "/v1/completions"])
def test_a_client_that_gives_up_stops_its_running_generation(lm, tmp_path, monkeypatch, path):
    import softprompt.serve.runner as runner_mod

    eng, reg, app = build(lm, tmp_path / "p")
    text = "tell me a long story"
    eng.start()
    try:
        full = eng.generate("qa", text, max_new_tokens=64, stop_at_newline=False, timeout=60)
        assert full.finish_reason == "length" and len(full.token_ids) == 64  # a long generation when nobody leaves
        running = []
        eng.batch_hook = running.extend
        steps = [0]
        real_step = runner_mod.decode_step

        async def main():
            loop = asyncio.get_running_loop()
            gone = asyncio.Event()

            def counting_step(*a, **kw):
                steps[0] += 1
                if steps[0] == 3:  # the client leaves while its generation runs; wait until the server noticed
                    loop.call_soon_threadsafe(gone.set)
                    t_end = time.monotonic() + 10
                    while not running[-1].abandoned and time.monotonic() < t_end:
                        time.sleep(0.005)
                return real_step(*a, **kw)

            monkeypatch.setattr(runner_mod, "decode_step", counting_step)
            body = ({"task": "qa", "input": text, "max_new_tokens": 64, "stop_at_newline": False}
                    if path == "/v1/generate" else {"model": "tiny:qa", "prompt": text, "max_tokens": 64})
            data = json.dumps(body).encode()
            st, _, _, _ = await asgi(app, "POST", path, [("content-type", "application/json"),
                                     ("content-length", str(len(data)))], _body_then_disconnect(data, gone))
            assert st == 499

        asyncio.run(main())
        assert eng.classify("demo", ["next"], timeout=30)[0].label  # the worker is free again
        assert steps[0] <= 4, steps  # it stopped right after the client left, not after 64 tokens
        assert eng.metrics.requests.value(task="qa", kind="generate", status="cancelled") == 1
    finally:
        eng.stop()


# ----------------------------------------------------------------------------- 6. crash leftovers
def _crashed_folder(model, root):
    """The states a kill -9 leaves behind, each at a different step of an upload or delete."""
    populate(model, root)
    (root / ".upload-demo.abc123.tmp").write_bytes(b"half an upload")
    # a delete of task 'gone' that reached its commit point (files renamed to .trash-)
    (root / f".trash-{'1' * 32}-gone.safetensors").write_bytes((root / "demo.safetensors").read_bytes())
    (root / f".trash-{'2' * 32}-gonedir").mkdir()
    (root / f".trash-{'2' * 32}-gonedir" / "m.safetensors").write_bytes(b"x")
    # an upload of 'ens' that set the old folder aside but was killed before its file landed
    (root / f".replaced-{'3' * 32}-ens").mkdir()
    random_prompt(model, SENT, verbalizer=VERB, seed=21).save(root / f".replaced-{'3' * 32}-ens" / "a.safetensors")
    # an upload of 'qa' that landed: what it set aside goes
    (root / f".replaced-{'4' * 32}-qa.json").write_text("{}")


def test_recover_finishes_or_undoes_interrupted_writes(lm, tmp_path):
    model, tok = lm
    root = tmp_path / "p"
    root.mkdir()
    _crashed_folder(model, root)
    reg = Registry(root, Engine(model, tok))
    report = reg.recover()
    assert report["restored"] == ["ens"]
    assert listing(root) == ["demo.safetensors", "ens", "ens/a.safetensors", "pool_a.safetensors", "pool_b.safetensors",
                             "qa.safetensors", "topic.json"]
    sync = reg.sync()
    assert sync["errors"] == {} and sorted(sync["added"]) == ["demo", "ens", "pool_a", "pool_b", "qa", "topic"]


def test_serve_sweeps_leftovers_at_start_and_holds_the_folder(lm, tmp_path, monkeypatch):
    import uvicorn

    import softprompt.families.loading
    from softprompt.serve import FolderLock, FolderLockedError, serve

    root = tmp_path / "p"
    root.mkdir()
    _crashed_folder(lm[0], root)
    seen = {}

    def fake_run(app, **kw):
        seen["listing"] = listing(root)
        with pytest.raises(FolderLockedError, match="one server per folder"):  # a second server on the folder
            FolderLock(root).acquire()
    monkeypatch.setattr(softprompt.families.loading, "load_model", lambda name, device=None: lm)
    monkeypatch.setattr(uvicorn, "run", fake_run)
    serve("tiny", root, token=TOKEN)
    assert not [n for n in seen["listing"] if n.startswith((".upload-", ".trash-", ".replaced-"))], seen
    with FolderLock(root):  # released when the server stopped
        pass


def test_delete_answers_what_it_did_and_refuses_a_manifest_member(lm, tmp_path):
    root = tmp_path / "p"
    eng, reg, app = build(lm, root)
    with TestClient(app, raise_server_exceptions=False) as c:
        e = err(c.delete("/v1/tasks/pool_a", headers=AUTH), 409, "task_in_use")
        assert "topic" in e["message"] and "topic.json" in e["message"]
        assert (root / "pool_a.safetensors").exists() and "pool_a" in eng.tasks()
        err(c.delete("/v1/tasks/pool_b", headers=AUTH), 409, "task_in_use")  # named "./pool_b.safetensors" there
        r = c.delete("/v1/tasks/topic", headers=AUTH)
        assert r.status_code == 200 and r.json()["files"] == ["topic.json"], r.text
        assert r.json()["deleted"] == "topic"
        r = c.delete("/v1/tasks/pool_a", headers=AUTH)  # free now
        assert r.json()["files"] == ["pool_a.safetensors"]
        assert not [n for n in os.listdir(root) if n.startswith((".trash-", ".upload-", ".replaced-"))]


# ----------------------------------------------------------------------------- 9. the smaller holes
def test_protect_reads_covers_the_docs_and_schema(lm, tmp_path):
    eng, reg, app = build(lm, tmp_path / "p", protect_reads=True)
    with TestClient(app, raise_server_exceptions=False) as c:
        for path in ("/docs", "/openapi.json", "/redoc", "/docs/oauth2-redirect", "/nope"):
            err(c.get(path), 401)
            assert c.get(path, headers=AUTH).status_code in (200, 404), path
        assert c.get("/openapi.json", headers=AUTH).json()["paths"]
        assert c.get("/healthz").status_code == 200


def test_cli_serve_errors_are_clean(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from softprompt.cli import app as cli
    from softprompt.serve import FolderLock

    monkeypatch.delenv("SOFTPROMPT_SERVE_TOKEN", raising=False)
    (tmp_path / "p").mkdir()
    r = CliRunner().invoke(cli, ["serve", "--prompts", str(tmp_path / "p"), "--protect-reads"])
    assert r.exit_code == 2 and "needs a token" in r.output and "Traceback" not in r.output, r.output
    with FolderLock(tmp_path / "p"):
        r = CliRunner().invoke(cli, ["serve", "--prompts", str(tmp_path / "p"), "--token", "t"])
    assert r.exit_code == 2 and "already served by another softprompt server" in " ".join(r.output.split()), r.output
    assert "Traceback" not in r.output


def test_completions_limits_match_generate(lm, tmp_path):
    eng, reg, app = build(lm, tmp_path / "p")
    with TestClient(app, raise_server_exceptions=False) as c:
        e = err(c.post("/v1/completions", json={"model": "tiny:qa", "prompt": "x", "max_tokens": 10**9}), 422)
        assert "max_tokens" in e["message"] and "64" in e["message"]
        err(c.post("/v1/generate", json={"task": "qa", "input": "x", "max_new_tokens": 10**9}), 422)
        e = err(c.post("/v1/completions", json={"model": "tiny:qa", "prompt": "x", "logprobs": 2}), 422)
        assert "logprobs" in e["message"]
        ok = c.post("/v1/completions", json={"model": "tiny:qa", "prompt": "x", "max_tokens": 64})
        assert ok.status_code == 200, ok.text
        # classification answers carry their label log-probs, so logprobs stays accepted there
        assert c.post("/v1/completions", json={"model": "tiny:demo", "prompt": "x", "logprobs": 2}).status_code == 200


def test_a_dropped_stream_is_not_counted_as_ok(lm, tmp_path):
    eng, reg, app = build(lm, tmp_path / "p")
    eng.start()
    try:
        async def main():
            gone = asyncio.Event()
            data = json.dumps({"task": "qa", "input": "tell me a long story", "max_new_tokens": 64,
                               "stop_at_newline": False, "stream": True}).encode()
            chunks = []
            sent = [False]

            async def receive():
                if not sent[0]:
                    sent[0] = True
                    return {"type": "http.request", "body": data, "more_body": False}
                await gone.wait()
                return {"type": "http.disconnect"}

            async def send(msg):
                if msg["type"] == "http.response.body" and msg.get("body"):
                    chunks.append(msg["body"])
                    gone.set()  # the client reads one event and leaves

            scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                     "scheme": "http", "path": "/v1/generate", "raw_path": b"/v1/generate", "query_string": b"",
                     "root_path": "", "headers": [(b"content-type", b"application/json"),
                                                  (b"content-length", str(len(data)).encode())],
                     "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
            await asyncio.wait_for(app(scope, receive, send), 30)
            assert chunks

        asyncio.run(main())
        assert eng.classify("demo", ["next"], timeout=30)[0].label  # the worker got past the stream's batch
        m = eng.metrics.requests
        assert m.value(task="qa", kind="generate", status="ok") == 0
        assert m.value(task="qa", kind="generate", status="cancelled") == 1
        http = eng.metrics.http_requests
        assert http.value(route="/v1/generate", method="POST", status="499") == 1
        assert http.value(route="/v1/generate", method="POST", status="200") == 0
    finally:
        eng.stop()
