"""The HTTP API (in-process, FastAPI TestClient): answers, errors, OpenAI compatibility,
metrics, auth and upload security, and a malformed-request fuzz that must never get a 5xx."""
import json
import threading

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from softprompt.serve import Engine, Registry, create_app
from softprompt.serve.testing import error_of as err, random_prompt
from softprompt.testing import tiny_causal_lm

pytestmark = pytest.mark.usefixtures("one_thread")

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SENT = "{soft:3} review : {text} label :"


def populate(model, root):
    random_prompt(model, SENT, verbalizer={"pos": " good", "neg": " bad"}, seed=1).save(root / "sent.safetensors")
    random_prompt(model, "{soft:2} premise : {premise} hypothesis : {hypothesis} ?",
                  verbalizer={"yes": " yes", "no": " no"}, seed=2).save(root / "nli.safetensors")
    random_prompt(model, "{soft:4} question : {text} answer :", kind="generation", seed=3).save(root / "qa.safetensors")
    (root / "ens").mkdir()
    for k in range(3):
        random_prompt(model, SENT, verbalizer={"pos": " good", "neg": " bad"}, seed=10 + k).save(root / "ens" / f"m{k}.safetensors")


def build(lm, root, **kw):
    model, tok = lm
    root.mkdir(exist_ok=True)
    if not any(root.iterdir()):
        populate(model, root)
    eng = Engine(model, tok, base_name="tiny", max_wait_ms=1, max_new_tokens_limit=64,
                 max_input_tokens=kw.pop("max_input_tokens", 64), max_queue=kw.pop("max_queue", 256))
    reg = Registry(root, eng, max_upload_bytes=kw.pop("max_upload_bytes", 64_000))
    reg.sync()
    app = create_app(eng, registry=reg, token=kw.pop("token", TOKEN), max_inputs=8, max_body_bytes=32_000, **kw)
    return eng, reg, app


@pytest.fixture(scope="module")
def client(lm, tmp_path_factory):
    eng, reg, app = build(lm, tmp_path_factory.mktemp("prompts"))
    with TestClient(app, raise_server_exceptions=False) as c:
        c.engine = eng
        yield c


# ----------------------------------------------------------------------------- answers
def test_classify_generate_and_tasks(client):
    eng = client.engine
    r = client.post("/v1/classify", json={"task": "sent", "inputs": ["good movie", "bad service"]})
    assert r.status_code == 200
    body = r.json()
    direct = eng.classify("sent", ["good movie", "bad service"])
    for got, want in zip(body["results"], direct):
        assert got["label"] == want.label
        assert all(abs(got["probabilities"][k] - want.probabilities[k]) < 1e-5 for k in want.probabilities)
    r = client.post("/v1/classify", json={"task": "nli", "inputs": [{"premise": "a good film", "hypothesis": "good"}]})
    assert r.status_code == 200 and r.json()["results"][0]["label"] in ("yes", "no")
    r = client.post("/v1/classify", json={"task": "ens", "inputs": ["good"], "vote": "majority"})
    res = r.json()["results"][0]
    assert sum(res["votes"].values()) == 3 and len(res["members"]) == 3
    g = client.post("/v1/generate", json={"task": "qa", "input": "why is my refund delayed", "max_new_tokens": 5}).json()
    assert g["text"] == eng.generate("qa", "why is my refund delayed", max_new_tokens=5).text
    assert g["usage"]["completion_tokens"] <= 5
    tasks = client.get("/v1/tasks").json()["tasks"]
    assert {t["name"] for t in tasks} == {"sent", "nli", "qa", "ens"}
    assert client.get("/v1/tasks/ens").json()["members"] == ["m0", "m1", "m2"]
    assert client.get("/healthz").json()["status"] == "ok"


def test_streaming_generation(client):
    body = {"task": "qa", "input": "what is the answer", "max_new_tokens": 8, "stop_at_newline": False}
    final = client.post("/v1/generate", json=body).json()
    r = client.post("/v1/generate", json={**body, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1]["done"] and events[-1]["text"] == final["text"]
    assert "".join(e["text"] for e in events[:-1]) == final["text"]


def test_openai_completions(client):
    r = client.post("/v1/completions", json={"model": "tiny:qa", "prompt": "why", "max_tokens": 4, "temperature": 0})
    body = r.json()
    assert r.status_code == 200 and body["object"] == "text_completion" and body["model"] == "tiny:qa"
    assert body["choices"][0]["text"] == client.engine.generate("qa", "why", max_new_tokens=4, stop_at_newline=False).text
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    r = client.post("/v1/completions", json={"model": "tiny:sent", "prompt": ["good", "bad"]})
    choices = r.json()["choices"]
    assert [c["text"] for c in choices] == [x.label for x in client.engine.classify("sent", ["good", "bad"])]
    assert choices[0]["logprobs"]["top_logprobs"][0].keys() == {"pos", "neg"}
    r = client.post("/v1/completions", json={"model": "tiny:qa", "prompt": "why", "max_tokens": 3, "stream": True})
    lines = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]" and json.loads(lines[-2])["choices"][0]["finish_reason"] in ("stop", "length")
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tiny:ens", "tiny:nli", "tiny:qa", "tiny:sent"]
    err(client.post("/v1/completions", json={"model": "gpt-4:qa", "prompt": "x"}), 404, "model_not_found")
    err(client.post("/v1/completions", json={"model": "tiny:nope", "prompt": "x"}), 404, "model_not_found")
    err(client.post("/v1/completions", json={"model": "tiny:qa", "prompt": "x", "n": 2}), 422)
    err(client.post("/v1/completions", json={"model": "tiny:qa", "prompt": "x", "echo": True}), 422)
    # sampling parameters in OpenAI's ranges, checked on every backend (vLLM uses them)
    for bad in ({"temperature": 2.5}, {"temperature": -0.1}, {"top_p": 0}, {"top_p": 1.5}, {"seed": -1},
                {"seed": "7"}, {"seed": 1.5}):
        err(client.post("/v1/completions", json={"model": "tiny:qa", "prompt": "x", **bad}), 422)
    ok = client.post("/v1/completions", json={"model": "tiny:qa", "prompt": "x", "max_tokens": 2, "temperature": 2,
                                               "top_p": 1, "seed": 3, "presence_penalty": 0})
    assert ok.status_code == 200, ok.text  # unknown OpenAI fields are still accepted and ignored


def test_bad_input_gets_a_clear_4xx(client):
    err(client.post("/v1/classify", content=b"{not json", headers={"Content-Type": "application/json"}), 400, "malformed_json")
    err(client.post("/v1/classify", content=b"[1, 2]", headers={"Content-Type": "application/json"}), 422)
    err(client.post("/v1/classify", content=b"task=sent"), 422, "invalid_body")
    assert "unknown task 'nope'" in err(client.post("/v1/classify", json={"task": "nope", "inputs": ["x"]}), 404, "unknown_task")["message"]
    err(client.post("/v1/classify", json={"task": "sent", "inputs": []}), 422)
    err(client.post("/v1/classify", json={"task": "sent", "inputs": [""]}), 422)
    assert "empty" in err(client.post("/v1/classify", json={"task": "sent", "inputs": ["   "]}), 422)["message"]
    too_many = err(client.post("/v1/classify", json={"task": "sent", "inputs": ["a"] * 9}), 422, "too_many_inputs")
    assert "too many inputs" in too_many["message"]
    err(client.post("/v1/classify", json={"task": "sent", "inputs": ["good " * 200]}), 422, "input_too_long")
    err(client.post("/v1/classify", json={"task": "sent", "inputs": [5]}), 422)
    err(client.post("/v1/classify", json={"task": 5, "inputs": ["x"]}), 422)
    err(client.post("/v1/classify", json={"task": "sent", "inputs": ["x"], "surprise": 1}), 422)
    err(client.post("/v1/classify", json={"task": "nli", "inputs": ["one string for two fields"]}), 422)
    err(client.post("/v1/classify", json={"task": "qa", "inputs": ["x"]}), 422, "wrong_task_kind")
    err(client.post("/v1/generate", json={"task": "qa", "input": "x", "max_new_tokens": "5"}), 422)
    err(client.post("/v1/generate", json={"task": "qa", "input": "x", "max_new_tokens": 10_000}), 422)
    err(client.post("/v1/generate", json={"task": "sent", "input": "x"}), 422, "wrong_task_kind")
    err(client.post("/v1/classify", content=b'{"task": "sent", "inputs": ["' + b"a" * 40_000 + b'"]}',
                    headers={"Content-Type": "application/json"}), 413, "body_too_large")
    err(client.get("/v1/nothing-here"), 404)
    err(client.delete("/v1/classify"), 405)


def test_metrics(client):
    client.post("/v1/classify", json={"task": "sent", "inputs": ["good", "bad"]})
    text = client.get("/metrics").text
    for needle in ("softprompt_queue_depth_rows ", "softprompt_batch_size_rows_bucket{le=",
                   "softprompt_request_latency_seconds_bucket{le=", "softprompt_http_request_latency_seconds_bucket{",
                   'softprompt_requests_total{kind="classify",status="ok",task="sent"}',
                   'softprompt_http_requests_total{method="POST",route="/v1/classify",status="200"}'):
        assert needle in text, needle


def test_overload_answers_503_with_retry_after(lm, tmp_path):
    eng, reg, app = build(lm, tmp_path / "p", max_queue=2)
    entered, release = threading.Event(), threading.Event()

    def hook(items):
        entered.set()
        release.wait(30)
    with TestClient(app, raise_server_exceptions=False) as c:
        eng.batch_hook = hook
        eng.submit_classify("sent", ["x"])
        assert entered.wait(30)
        queued = eng.submit_classify("sent", ["a", "b"])  # the queue is full now
        r = c.post("/v1/classify", json={"task": "sent", "inputs": ["c"]})
        err(r, 503, "overloaded")
        assert int(r.headers["Retry-After"]) >= 1
        release.set()
        eng.batch_hook = None
        assert all(f.result(30).label for f in queued)
        assert c.post("/v1/classify", json={"task": "sent", "inputs": ["c"]}).status_code == 200


# ----------------------------------------------------------------------------- security
def test_admin_needs_the_token(lm, tmp_path):
    eng, reg, app = build(lm, tmp_path / "p")
    data = (tmp_path / "p" / "sent.safetensors").read_bytes()
    with TestClient(app, raise_server_exceptions=False) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": "Basic " + TOKEN},
                        {"Authorization": "Bearer"}, {"Authorization": f"Bearer {TOKEN}x"}):
            err(c.put("/v1/tasks/new", content=data, headers=headers), 401, "unauthorized")
            err(c.delete("/v1/tasks/sent", headers=headers), 401)
            err(c.post("/v1/admin/reload", headers=headers), 401)
        assert "new" not in eng.tasks() and "sent" in eng.tasks()
        assert c.post("/v1/classify", json={"task": "sent", "inputs": ["x"]}).status_code == 200, "reads are open by default"
        assert c.put("/v1/tasks/new", content=data, headers=AUTH).status_code == 201
        assert c.put("/v1/tasks/new", content=data, headers=AUTH).status_code == 200
        assert c.delete("/v1/tasks/new", headers=AUTH).json()["deleted"] == "new"
        assert c.post("/v1/admin/reload", headers=AUTH).json()["unchanged"]
    eng, reg, app = build(lm, tmp_path / "p", token=None)
    with TestClient(app, raise_server_exceptions=False) as c:
        err(c.put("/v1/tasks/new", content=data, headers=AUTH), 403, "admin_disabled")


def test_protected_reads(lm, tmp_path):
    eng, reg, app = build(lm, tmp_path / "p", protect_reads=True)
    with TestClient(app, raise_server_exceptions=False) as c:
        for method, path, body in [("post", "/v1/classify", {"task": "sent", "inputs": ["x"]}), ("get", "/v1/tasks", None),
                                   ("get", "/metrics", None), ("get", "/v1/models", None),
                                   ("post", "/v1/completions", {"model": "tiny:sent", "prompt": "x"})]:
            kw = {"json": body} if body else {}
            err(getattr(c, method)(path, **kw), 401)
            err(getattr(c, method)(path, headers={"Authorization": "Bearer nope"}, **kw), 401)
            assert getattr(c, method)(path, headers=AUTH, **kw).status_code == 200
        assert c.get("/healthz").status_code == 200


def test_uploads_are_checked_and_rejections_change_nothing(lm, tmp_path):
    model, tok = lm
    root = tmp_path / "p"
    eng, reg, app = build(lm, root)
    good = (root / "sent.safetensors").read_bytes()
    other = tmp_path / "other.safetensors"
    random_prompt(tiny_causal_lm("llama", seed=9), SENT, verbalizer={"pos": " good", "neg": " bad"}).save(other)
    (tmp_path / "victim.safetensors").write_bytes(b"keep me")

    def state():
        return sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")), \
            {n: s.version for n, s in eng.tasks().items()}, len(eng.bank)

    with TestClient(app, raise_server_exceptions=False) as c:
        before = state()
        names = ["..", "...", ".hidden", "..%2Fvictim", "..%2F..%2Fetc%2Fpasswd", "a%2Fb", "%2e%2e", "a%5Cb",
                 "x" * 65, "a%00b", "sent.safetensors%2F..", "%20"]
        for name in names:
            r = c.put(f"/v1/tasks/{name}", content=good, headers=AUTH)
            assert 400 <= r.status_code < 500, (name, r.status_code)
            r = c.delete(f"/v1/tasks/{name}", headers=AUTH)
            assert 400 <= r.status_code < 500, (name, r.status_code)
            assert state() == before, name
        bad_bodies = {
            "pickle": (b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94.", 415),
            "zip": (b"PK\x03\x04" + b"\x00" * 40, 415),
            "json": (b'{"prompt": [1, 2, 3]}', 415),
            "empty": (b"", 415),
            "truncated": (good[:-10], 422),
            "other-model": (other.read_bytes(), 422),
            "oversized": (good + b"\x00" * 70_000, 413),
        }
        for what, (data, status) in bad_bodies.items():
            for name in ("sent", "brand_new"):
                r = c.put(f"/v1/tasks/{name}", content=data, headers=AUTH)
                assert r.status_code == status, (what, r.status_code, r.text)
                assert state() == before, what
        assert (tmp_path / "victim.safetensors").read_bytes() == b"keep me"
        assert c.post("/v1/classify", json={"task": "sent", "inputs": ["x"]}).json()["version"] == before[1]["sent"]


# ----------------------------------------------------------------------------- fuzz
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
    max_leaves=8,
)

texts = st.text(max_size=40) | st.sampled_from(["good", "  ", "", "why is my refund delayed", "a" * 300])
tasks = st.sampled_from(["sent", "nli", "qa", "ens", "nope", "", "../sent", "sent\x00"]) | json_values
field_objs = st.dictionaries(st.sampled_from(["text", "premise", "hypothesis", "x", ""]), texts | json_values, max_size=3)
inputs = st.lists(texts | field_objs | json_values, max_size=10) | json_values
classify_bodies = st.fixed_dictionaries(
    {"task": tasks, "inputs": inputs},
    optional={"vote": st.sampled_from(["mean", "majority", "MEAN"]) | json_values, "junk": json_values})
generate_bodies = st.fixed_dictionaries(
    {"task": tasks, "input": texts | field_objs | json_values},
    optional={"max_new_tokens": st.integers(-3, 80) | json_values, "stop_at_newline": st.booleans() | json_values,
              "stop": st.lists(st.text(max_size=5), max_size=6) | json_values, "stream": st.booleans() | json_values})
completion_bodies = st.fixed_dictionaries(
    {"model": st.sampled_from(["tiny:sent", "tiny:qa", "tiny:ens", "tiny:nope", "x:qa", "qa", ":", ""]) | json_values,
     "prompt": texts | st.lists(texts, max_size=10) | json_values},
    optional={"max_tokens": st.integers(-3, 80) | json_values, "n": st.integers(-1, 3) | json_values,
              "stream": st.booleans() | json_values, "stop": st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=5) | json_values,
              "echo": st.booleans() | json_values, "temperature": json_values, "logprobs": json_values})
ENDPOINTS = ["/v1/classify", "/v1/generate", "/v1/completions"]
FUZZ = settings(max_examples=130, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(path=st.sampled_from(ENDPOINTS), body=classify_bodies | generate_bodies | completion_bodies | json_values)
def test_fuzz_json_bodies_never_5xx(client, path, body):
    r = client.post(path, content=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    assert r.status_code < 500, (path, body, r.status_code, r.text)
    assert r.headers["content-type"].startswith(("application/json", "text/event-stream"))


@FUZZ
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
       path=st.sampled_from(ENDPOINTS + ["/v1/tasks", "/v1/tasks/sent", "/v1/tasks/%2e%2e", "/healthz", "/metrics",
                                         "/v1/models", "/v1/admin/reload", "/nope"]),
       body=st.binary(max_size=200),
       ctype=st.sampled_from(["application/json", "text/plain", "application/octet-stream", "", "application/json; charset=latin-1"]),
       auth=st.sampled_from([{}, {"Authorization": "Bearer x"}, {"Authorization": "\x00"}]))
def test_fuzz_raw_requests_never_5xx(client, method, path, body, ctype, auth):
    headers = {**auth, **({"Content-Type": ctype} if ctype else {})}
    r = client.request(method, path, content=body, headers=headers)
    assert r.status_code < 500, (method, path, body, r.status_code, r.text)


# ----------------------------------------------------------------------------- wiring
def test_openapi_and_docs(client):
    schema = client.get("/openapi.json").json()
    for path in ("/v1/classify", "/v1/generate", "/v1/completions", "/v1/tasks", "/v1/tasks/{name}", "/healthz", "/metrics"):
        assert path in schema["paths"], path
    assert "application/octet-stream" in schema["paths"]["/v1/tasks/{name}"]["put"]["requestBody"]["content"]
    assert client.get("/docs").status_code == 200


def test_serve_wires_model_folder_and_uvicorn(lm, tmp_path, monkeypatch):
    import uvicorn

    import softprompt.families.loading
    from softprompt.serve import EngineConfig, serve

    root = tmp_path / "prompts"
    root.mkdir()
    populate(lm[0], root)
    (root / "broken.safetensors").write_bytes(b"not a prompt")
    seen = {}
    monkeypatch.setattr(softprompt.families.loading, "load_model", lambda name, device=None: lm)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    monkeypatch.setenv("SOFTPROMPT_SERVE_TOKEN", "from-env")
    serve("tiny", root, "127.0.0.1", 8123, None, EngineConfig(max_batch_size=4, max_wait_ms=2.0), True)
    assert (seen["host"], seen["port"]) == ("127.0.0.1", 8123)
    with TestClient(seen["app"], raise_server_exceptions=False) as c:
        assert c.post("/v1/classify", json={"task": "sent", "inputs": ["x"]}).status_code == 401
        r = c.get("/v1/tasks", headers={"Authorization": "Bearer from-env"})
        assert sorted(t["name"] for t in r.json()["tasks"]) == ["ens", "nli", "qa", "sent"]
        assert c.app.state.engine.max_batch_size == 4
