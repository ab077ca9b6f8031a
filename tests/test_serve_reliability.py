"""The real server under load, fuzzing, overload and kill -9 (issue 12's acceptance).

Starts ``softprompt serve`` as a subprocess on 127.0.0.1 over a tiny random model saved to a
temporary folder, with a prompts folder of six tasks (single prompts, a two-field task, a
generation task, an ensemble folder and an ensemble manifest), and checks:

* 500+ fuzzed requests (hypothesis) with no 5xx;
* an overload burst answered with 503 (or 429) + Retry-After, resident memory bounded;
* clients that trickle their request heads or bodies hold no request slot and are cut off;
* kill -9 during an upload and during a delete, then a restart: the folder is consistent
  (every task loads, the interrupted operation either happened wholly or not at all) with
  no leftovers.

The 1,000+ requests from 32 concurrent clients, every answer equal to the one-by-one answer, are
``test_serve_concurrency.py``'s (a real uvicorn server in-process).  Each test here holds run
alone and in any order.  Run them with ``pytest -m reliability``.  Loopback traffic only; every
loop is bounded.
"""
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from softprompt.serve.testing import random_prompt
from softprompt.testing import TINY_WORDS, tiny_causal_lm, tiny_tokenizer

pytestmark = pytest.mark.reliability

TOKEN = "reliability-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SENT = "{soft:3} review : {text} label :"
VERB = {"pos": " good", "neg": " bad"}
NLI = "{soft:2} premise : {premise} hypothesis : {hypothesis} ?"
QA = "{soft:4} question : {text} answer :"
TASKS = ["sent", "nli", "qa", "ens", "topic", "pool_a", "pool_b", "victim"]
SRC = Path(__file__).resolve().parents[1] / "src"

# the server, with two test-only pauses so that kill -9 lands inside an upload and a delete,
# and a slow decode step on request
WRAPPER = textwrap.dedent('''
    import os, sys, time, pathlib
    markers = pathlib.Path(os.environ["SP_TEST_MARKERS"])
    import softprompt.serve.engine as E
    import softprompt.serve.runner as R
    real_replace = os.replace
    def replace(src, dst, *a, **kw):  # an upload of 'ens' about to land (the old folder is set aside)
        if str(dst).endswith(os.sep + "ens.safetensors") and ".upload-" in str(src):
            (markers / "upload").touch(); time.sleep(600)
        return real_replace(src, dst, *a, **kw)
    os.replace = replace
    real_unregister = E.Engine.unregister
    def unregister(self, name):  # a delete of 'victim' waiting for the engine
        if name == "victim":
            (markers / "delete").touch(); time.sleep(600)
        return real_unregister(self, name)
    E.Engine.unregister = unregister
    real_step = R.decode_step
    def decode_step(*a, **kw):  # 10 ms a token while the test asks for it, so generations take a while
        if (markers / "slow").exists():
            time.sleep(0.01)
        return real_step(*a, **kw)
    R.decode_step = decode_step
    from softprompt.cli import app
    sys.argv = ["softprompt", "serve", *sys.argv[1:]]
    app()
''')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One ``softprompt serve`` subprocess."""

    def __init__(self, world, **flags):
        self.world, self.port = world, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, str(world["wrapper"]), "--model", str(world["model"]), "--prompts", str(world["prompts"]),
                "--port", str(self.port), "--token", TOKEN, "--max-wait-ms", "2", "--max-inputs", "8",
                "--max-new-tokens", "400", "--max-queue", "96", "--max-concurrent-requests", "64"]
        for k, v in flags.items():
            args += [f"--{k.replace('_', '-')}", str(v)]
        env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               "OMP_NUM_THREADS": "1", "SP_TEST_MARKERS": str(world["markers"])}
        self.log = open(world["root"] / f"server-{self.port}.log", "wb")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None, self.output()
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start\n" + self.output()
            time.sleep(0.2)

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-4000:]

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self.log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self.log.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    model, tok = tiny_causal_lm("llama"), tiny_tokenizer()
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    prompts = root / "prompts"
    prompts.mkdir()
    random_prompt(model, SENT, verbalizer=VERB, seed=1).save(prompts / "sent.safetensors")
    random_prompt(model, NLI, verbalizer={"yes": " yes", "no": " no"}, seed=2).save(prompts / "nli.safetensors")
    random_prompt(model, QA, kind="generation", seed=6).save(prompts / "qa.safetensors")
    (prompts / "ens").mkdir()
    for k in range(3):
        random_prompt(model, SENT, verbalizer=VERB, seed=10 + k).save(prompts / "ens" / f"m{k}.safetensors")
    random_prompt(model, SENT, verbalizer=VERB, seed=20).save(prompts / "pool_a.safetensors")
    random_prompt(model, SENT, verbalizer=VERB, seed=21).save(prompts / "pool_b.safetensors")
    (prompts / "topic.json").write_text(json.dumps({"members": ["pool_a.safetensors", "pool_b.safetensors"],
                                                    "vote": "majority"}))
    random_prompt(model, SENT, verbalizer=VERB, seed=30).save(prompts / "victim.safetensors")
    (root / "markers").mkdir()
    (root / "wrapper.py").write_text(WRAPPER)
    w = {"root": root, "model": root / "model", "prompts": prompts, "markers": root / "markers",
         "wrapper": root / "wrapper.py"}
    srv = Server(w)
    w["server"] = srv
    yield w
    w["server"].stop()


# ----------------------------------------------------------------------------- fuzz
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3), max_leaves=8)
texts = st.text(max_size=40) | st.sampled_from(["good", " ", "", "why is my refund delayed", "a " * 200])
task_names = st.sampled_from(["sent", "nli", "qa", "ens", "topic", "nope", "", "../sent", "sent.safetensors"]) | json_values
bodies = (
    st.fixed_dictionaries({"task": task_names, "inputs": st.lists(texts | json_values, max_size=10) | json_values},
                          optional={"vote": st.sampled_from(["mean", "majority"]) | json_values})
    | st.fixed_dictionaries({"task": task_names, "input": texts | json_values},
                            optional={"max_new_tokens": st.integers(-3, 80) | json_values, "stream": st.booleans(),
                                      "stop": st.lists(st.text(max_size=4), max_size=5) | json_values})
    | st.fixed_dictionaries({"model": st.sampled_from(["qa", "sent", "x:qa", ":", ""]) | json_values,
                             "prompt": texts | st.lists(texts, max_size=10) | json_values},
                            optional={"max_tokens": st.integers(-3, 10**9) | json_values, "logprobs": json_values,
                                      "stream": st.booleans(), "echo": st.booleans()})
    | json_values)
# never a name of a served task: the fuzz must not delete what the other tests use
fuzz_names = st.text(st.characters(codec="ascii"), max_size=12).filter(
    lambda s: s.strip() not in TASKS and not set(s) & set("#?/%\\"))


FUZZ_CASES = st.one_of(
    st.tuples(st.just("json"), st.sampled_from(["/v1/classify", "/v1/generate", "/v1/completions"]), bodies),
    st.tuples(st.just("raw"), st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
              st.tuples(st.sampled_from(["/v1/tasks", "/v1/tasks/", "/v1/models", "/metrics", "/v1/admin/reload",
                                         "/openapi.json", "/v1/classify", "/nope"]) | fuzz_names.map(lambda n: "/v1/tasks/" + n),
                        st.binary(max_size=300), st.sampled_from([{}, AUTH, {"Authorization": "Bearer x"}]))))


def test_fuzzed_requests_never_5xx_and_leave_the_folder_intact(world):
    """The fuzzing and the checks on what it did in one test, so that it holds run alone too."""
    srv, sent = world["server"], []

    @settings(max_examples=600, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(case=FUZZ_CASES)
    def fuzz(case):
        if case[0] == "json":
            _, path, body = case
            r = c.post(path, content=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        else:
            _, method, (path, raw, auth) = case
            try:
                r = c.request(method, path, content=raw, headers=auth)
            except httpx.InvalidURL:
                return
        sent.append(case)
        assert r.status_code < 500 or r.status_code == 503 and "retry-after" in r.headers, (case, r.status_code, r.text)

    with httpx.Client(base_url=srv.url, timeout=30) as c:
        fuzz()
    assert len(sent) >= 500, len(sent)
    r = httpx.get(srv.url + "/v1/tasks", timeout=30)
    assert sorted(t["name"] for t in r.json()["tasks"]) == sorted(TASKS)


# ----------------------------------------------------------------------------- overload
def test_overload_burst_gets_retry_after_with_bounded_memory(world):
    srv = world["server"]
    before = srv.rss_mb()

    async def burst():
        limits = httpx.Limits(max_connections=400, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=srv.url, timeout=120, limits=limits) as c:
            reqs = [c.post("/v1/classify", json={"task": "ens", "inputs": [f"burst {i} " + "good movie " * 20] * 8})
                    for i in range(300)]
            return await asyncio.gather(*reqs, return_exceptions=True)

    results = asyncio.run(burst())
    errors = [r for r in results if isinstance(r, Exception)]
    assert not errors, errors[:3]
    codes = {}
    for r in results:
        codes[r.status_code] = codes.get(r.status_code, 0) + 1
        if r.status_code in (429, 503):
            assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["type"] == "overloaded_error"
    assert set(codes) <= {200, 429, 503} and codes.get(200) and codes.get(503, 0) + codes.get(429, 0) >= 100, codes

    # 40 unauthenticated 8 MiB uploads: refused from the headers, nothing is buffered
    socks = []
    for _ in range(40):
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
        s.sendall(b"PUT /v1/tasks/x HTTP/1.1\r\nHost: x\r\nContent-Length: 8388608\r\n\r\n" + b"\0" * 16384)
        socks.append(s)
    for s in socks:
        assert s.recv(64).startswith(b"HTTP/1.1 401"), "an unauthenticated upload was not refused at once"
        s.close()
    grown = srv.rss_mb() - before
    assert grown < 150, f"the server grew by {grown:.0f} MB during the burst"
    assert httpx.post(srv.url + "/v1/classify", json={"task": "sent", "inputs": ["fine"]}, timeout=30).status_code == 200
    print(f"burst: {codes}; resident memory {before:.0f} MB -> {before + grown:.0f} MB")


# ----------------------------------------------------------------------------- clients that give up
def metric(srv, name: str, **labels) -> float:
    want = name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
    for line in httpx.get(srv.url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    return 0.0


def test_clients_that_give_up_free_the_server(world):
    """Eight clients give up on long generations; their work is cancelled, not finished."""
    from softprompt.families.loading import load_model
    from softprompt.serve import Engine, Registry

    srv = world["server"]
    model, tok = load_model(str(world["model"]))
    eng = Engine(model, tok, max_batch_size=64, max_new_tokens_limit=400)
    Registry(world["prompts"], eng).sync()
    rng = random.Random(5)
    with eng:  # the inputs with the longest generations
        cands = [" ".join(rng.choice(TINY_WORDS) for _ in range(rng.randint(2, 8))) for _ in range(96)]
        futs = [eng.submit_generate("qa", c, max_new_tokens=400, stop_at_newline=False) for c in cands]
        lengths = sorted(((len(f.result(120).token_ids), c) for c, f in zip(cands, futs)), reverse=True)[:8]
    assert lengths[-1][0] >= 60, lengths
    long = [c for _, c in lengths]
    uncancelled = lengths[0][0] * 0.01  # what the batch takes at 10 ms a token when nobody cancels it
    before = {s: metric(srv, "softprompt_requests_total", kind="generate", status=s, task="qa") for s in ("ok", "cancelled")}
    (world["markers"] / "slow").touch()

    def give_up(text):
        with pytest.raises(httpx.TimeoutException):
            httpx.post(srv.url + "/v1/generate", json={"task": "qa", "input": text, "max_new_tokens": 400,
                                                       "stop_at_newline": False}, timeout=0.15)

    try:
        t0 = time.monotonic()
        with ThreadPoolExecutor(8) as ex:
            list(ex.map(give_up, long))
        r = httpx.post(srv.url + "/v1/classify", json={"task": "sent", "inputs": ["next"]}, timeout=60)
        waited = time.monotonic() - t0
    finally:
        (world["markers"] / "slow").unlink()
    assert r.status_code == 200
    assert waited < uncancelled, (waited, uncancelled)
    deadline = time.monotonic() + 30
    while metric(srv, "softprompt_requests_total", kind="generate", status="cancelled", task="qa") < before["cancelled"] + 8:
        assert time.monotonic() < deadline, httpx.get(srv.url + "/metrics").text[-3000:]
        time.sleep(0.1)
    assert metric(srv, "softprompt_requests_total", kind="generate", status="ok", task="qa") == before["ok"]
    print(f"8 clients gave up on {lengths[-1][0]}-{lengths[0][0]}-token generations; the next request was answered "
          f"{waited:.2f}s after they came (uncancelled: >= {uncancelled:.2f}s)")


# ----------------------------------------------------------------------------- slow clients
def _drip(socks: dict, seconds: float, every: float) -> dict:
    """Send each socket's bytes one at a time, every ``every`` s, until the server closes it
    or ``seconds`` pass; returns {name: (seconds until closed or None, what the server said)}."""
    t0, out = time.monotonic(), {n: [None, b"", 0] for n in socks}
    for s, _ in socks.values():
        s.setblocking(False)
    while time.monotonic() - t0 < seconds and any(o[0] is None for o in out.values()):
        for name, (s, data) in socks.items():
            o = out[name]
            if o[0] is not None:
                continue
            try:
                if o[2] < len(data):
                    s.send(data[o[2]:o[2] + 1])
                    o[2] += 1
                while chunk := s.recv(4096):
                    o[1] += chunk
                o[0] = time.monotonic() - t0  # recv returned b"": closed by the server
            except BlockingIOError:
                pass
            except OSError:  # reset or broken pipe: closed by the server
                o[0] = time.monotonic() - t0
        time.sleep(every)
    return {n: (o[0], o[1]) for n, o in out.items()}


def test_slow_clients_do_not_stop_normal_ones(world, tmp_path):
    """Two request slots; six trickling bodies, four trickling heads and two silent connections
    hold none of them, and the server closes each after its 1 s deadline."""
    prompts = tmp_path / "prompts"  # a second server needs its own folder (the first one holds a lock)
    prompts.mkdir()
    (prompts / "sent.safetensors").write_bytes((world["prompts"] / "sent.safetensors").read_bytes())
    srv = Server({**world, "prompts": prompts}, max_concurrent_requests=2, header_timeout=1, body_timeout=1,
                 min_body_rate=1024, max_connections=100)
    try:
        body = json.dumps({"task": "sent", "inputs": ["fine"]})
        head = (b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100000\r\n\r\n")
        socks = {}
        for i in range(6):
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
            s.sendall(head)
            socks[f"body{i}"] = (s, b"x" * 1000)
        for i in range(4):
            socks[f"head{i}"] = (socket.create_connection(("127.0.0.1", srv.port), timeout=10), head)
        for i in range(2):
            socks[f"silent{i}"] = (socket.create_connection(("127.0.0.1", srv.port), timeout=10), b"")
        with ThreadPoolExecutor(1) as ex:
            dripped = ex.submit(_drip, socks, 6.0, 0.1)
            latencies = []
            with httpx.Client(base_url=srv.url, timeout=10) as c:
                for _ in range(20):  # normal clients, while the slow ones hold their connections
                    t0 = time.monotonic()
                    r = c.post("/v1/classify", content=body, headers={"Content-Type": "application/json"})
                    latencies.append(time.monotonic() - t0)
                    assert r.status_code == 200, r.text
                    time.sleep(0.05)
            closed = dripped.result(30)
        for s, _ in socks.values():
            s.close()
        assert max(latencies) < 1.0, latencies
        for name, (took, said) in closed.items():
            assert took is not None and 0.8 < took < 3.0, (name, took, said[:200])
            if name.startswith(("body", "head")):
                assert said.startswith(b"HTTP/1.1 408"), (name, said[:200])
            else:
                assert said == b"", (name, said[:200])
        assert metric(srv, "softprompt_rejected_total", reason="slow_body") == 6
        print(f"slow clients closed after {sorted(round(t, 2) for t, _ in closed.values())} s; "
              f"normal requests took at most {max(latencies) * 1000:.0f} ms")
    finally:
        srv.stop()


# ----------------------------------------------------------------------------- kill -9
def leftovers(world) -> list[str]:
    return [p.name for p in world["prompts"].rglob(".*") if p.name != ".softprompt-serve.lock"]


def wait_for(marker: Path, srv: Server, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not marker.exists():
        assert srv.proc.poll() is None and time.monotonic() < deadline, srv.output()
        time.sleep(0.05)


def consistent(world, srv) -> dict:
    r = httpx.post(srv.url + "/v1/admin/reload", headers=AUTH, timeout=30).json()
    assert r["errors"] == {} and not r["added"] and not r["removed"], r
    tasks = {t["name"]: t for t in httpx.get(srv.url + "/v1/tasks", timeout=30).json()["tasks"]}
    for name, t in tasks.items():  # every task answers
        if t["kind"] == "classification":
            body = {"task": name, "inputs": [{f: "good" for f in t["fields"]}]}
            assert httpx.post(srv.url + "/v1/classify", json=body, timeout=30).status_code == 200, name
    return tasks


def doomed(send, url, **kw):
    """A request whose server is killed while it runs: no answer is the expected outcome."""
    with contextlib.suppress(httpx.HTTPError):
        send(url, headers=AUTH, timeout=120, **kw)


def test_kill9_during_upload_and_delete_then_restart(world):
    srv = world["server"]
    markers, prompts = world["markers"], world["prompts"]
    # 1. an upload that replaces the ensemble folder 'ens' by a single prompt, killed just before it lands
    data = (prompts / "sent.safetensors").read_bytes()
    t = threading.Thread(target=doomed, args=(httpx.put, srv.url + "/v1/tasks/ens"), kwargs={"content": data}, daemon=True)
    t.start()
    wait_for(markers / "upload", srv)
    assert any(n.startswith(".upload-ens.") for n in leftovers(world)) and any(".replaced-" in n for n in leftovers(world))
    srv.kill9()
    srv = world["server"] = Server(world)
    assert leftovers(world) == [], leftovers(world)
    tasks = consistent(world, srv)
    assert tasks["ens"]["ensemble"] and len(tasks["ens"]["members"]) == 3  # the upload never happened, wholly
    assert sorted(tasks) == sorted(TASKS)

    # 2. a delete that waits for the engine, killed there
    t = threading.Thread(target=doomed, args=(httpx.delete, srv.url + "/v1/tasks/victim"), daemon=True)
    t.start()
    wait_for(markers / "delete", srv)
    srv.kill9()
    srv = world["server"] = Server(world)
    assert leftovers(world) == [], leftovers(world)
    tasks = consistent(world, srv)
    assert "victim" in tasks and (prompts / "victim.safetensors").exists()  # not deleted: the client had no answer
    # a second server on the same folder refuses to start, with a clear message
    port = free_port()
    second = subprocess.run([sys.executable, "-m", "softprompt.cli", "serve", "--model", str(world["model"]), "--prompts",
                             str(prompts), "--port", str(port)], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"})
    assert second.returncode == 2 and "already served" in " ".join(second.stderr.split()), second.stderr[-2000:]
    assert "Traceback" not in second.stderr
