"""The vLLM backend's own logic, without vLLM: a stand-in transport runs a tiny random
Llama from input embeddings (what vLLM does with ``prompt_embeds``), so these tests check
what the backend sends and how it turns the answers into the engine's results.  The real
vLLM is compared with the engine in ``test_vllm_equivalence.py``."""
from __future__ import annotations

import base64
import io
import json

import pytest
import torch

from softprompt.core.calibration import Calibration
from softprompt.core.conditioning import newline_ids
from softprompt.core.prompts import ModelIdentity
from softprompt.serve import Engine, InvalidInputError, OverloadedError, PromptRejectedError
from softprompt.serve.engine import ShuttingDownError
from softprompt.serve.backends.vllm import FrontModel, VllmBackend, label_trie, trie_scores
from softprompt.serve.backends.vllm_transport import RemoteTransport, encode_embeds
from softprompt.serve.testing import ServerThread, random_prompt

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-4


class ModelTransport:
    """vLLM stand-in: next-token log-probs and greedy decoding from input embeddings."""

    def __init__(self, model, eos: int | None):
        self.model, self.eos = model, eos
        self.calls: list[tuple] = []
        self.alive = True

    async def start(self, **kw):
        pass

    async def close(self):
        pass

    def describe(self):
        return {"mode": "test"}

    @torch.no_grad()
    def logprobs(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.model(inputs_embeds=embeds[None]).logits[0, -1].float().log_softmax(-1)

    async def next_logprobs(self, embeds, token_ids):
        self.calls.append(("score", embeds.shape[0], tuple(token_ids)))
        lp = self.logprobs(embeds)
        return {t: float(lp[t]) for t in token_ids}

    async def generate(self, embeds, params, on_ids=None):
        self.calls.append(("generate", embeds.shape[0], dict(params)))
        emb = self.model.get_input_embeddings().weight.detach()
        stops = set(params.get("stop_token_ids") or ()) | ({self.eos} if self.eos is not None else set())
        ids: list[int] = []
        for _ in range(params["max_tokens"]):
            t = int(self.logprobs(torch.cat([embeds, emb[ids]]) if ids else embeds).argmax())
            ids.append(t)
            if on_ids is not None:
                on_ids(list(ids))
            if t in stops:
                return ids, "stop"
        return ids, "length"


def _front(model, tok) -> FrontModel:
    return FrontModel(tok, model.get_input_embeddings().weight.detach().float(), ModelIdentity.of(model), "",
                      int(model.config.max_position_embeddings))


@pytest.fixture(scope="module")
def pair(lm):
    model, tok = lm
    engine = Engine(model, tok, base_name="tiny").start()
    transport = ModelTransport(model, tok.eos_token_id)
    backend = VllmBackend(_front(model, tok), transport, base_name="tiny").start()
    yield engine, backend, transport
    backend.stop()
    engine.stop()


def _tasks(model):
    cls = random_prompt(model, "{soft:4} {text} is", verbalizer={"p": " good", "n": " bad"}, seed=1)
    multi = random_prompt(model, "{soft:3} {text} answer", verbalizer={"a": " not at all", "b": " not really",
                                                                        "c": " yes"}, seed=2)
    calib = random_prompt(model, "{soft:2}Q {text} A{soft:2}", verbalizer={"x": " one", "y": " two"}, seed=3)
    calib.calibration = Calibration("contextual", [-0.5, -1.5])
    ens = [random_prompt(model, "{soft:3} {text} so", verbalizer={"u": " up", "d": " down"}, seed=s) for s in (4, 5)]
    gen = random_prompt(model, "{soft:4} {text} =", kind="generation", seed=6)
    return {"cls": [cls], "multi": [multi], "calib": [calib], "ens": ens, "gen": [gen]}


def test_label_trie_scores_are_summed_token_logprobs():
    words = [(5,), (6, 7), (6, 8, 9)]
    trie = dict(label_trie(words))
    assert trie == {(): (5, 6), (6,): (7, 8), (6, 8): (9,)}
    lp = {(): {5: -1.0, 6: -2.0}, (6,): {7: -0.5, 8: -0.25}, (6, 8): {9: -3.0}}
    assert trie_scores(words, lp).tolist() == [-1.0, -2.5, -5.25]
    assert len(label_trie([(1, 2), (3, 4)])) == 3  # distinct first tokens, multi-token: root + two continuations
    assert len(label_trie([(1,), (3,)])) == 1


def test_backend_answers_like_the_engine(pair, lm):
    engine, backend, _ = pair
    model, _tok = lm
    for name, ps in _tasks(model).items():
        engine.register(name, ps)
        backend.register(name, ps)
    texts = ["a b c", "d e", "f g h i", "j"]
    for task in ("cls", "multi", "calib", "ens"):
        ref, got = engine.classify(task, texts), backend.classify(task, texts)
        for r, g in zip(ref, got):
            assert g.label == r.label and g.version == backend.task(task).version
            for lab, p in r.probabilities.items():
                assert abs(g.probabilities[lab] - p) <= TOL, (task, lab)
            if r.scores is not None:  # raw (uncalibrated) label scores too
                assert max(abs(g.scores[k] - v) for k, v in r.scores.items()) <= 1e-3
            assert (g.votes, [m["label"] for m in g.members or []]) == (r.votes, [m["label"] for m in r.members or []])
    for text in texts:
        for kw in (dict(max_new_tokens=6), dict(max_new_tokens=5, stop_at_newline=False)):
            r, g = engine.generate("gen", text, **kw), backend.generate("gen", text, **kw)
            assert (g.token_ids, g.text, g.finish_reason, g.prompt_tokens) == (r.token_ids, r.text, r.finish_reason,
                                                                              r.prompt_tokens)


def test_one_request_per_example_when_labels_differ_in_their_first_token(pair, lm):
    _, backend, transport = pair
    model, tok = lm
    p = random_prompt(model, "{soft:2} {text} is", verbalizer={"p": " good", "n": " bad"}, seed=9)
    backend.register("one", p)
    firsts = {tuple(w[:1]) for w in backend._members[backend.task("one")][0].label_ids}
    assert len(firsts) == 2
    transport.calls.clear()
    backend.classify("one", ["x y"])
    scored = [c for c in transport.calls if c[0] == "score"]
    n_nodes = len(backend._members[backend.task("one")][0].trie)
    assert len(scored) == n_nodes  # one request per trie node: the root, plus one per multi-token continuation


def test_prefix_tuned_prompts_are_refused_naming_the_backend(pair, lm):
    _, backend, _ = pair
    model, _ = lm
    good = random_prompt(model, "{soft:2} {text} is", verbalizer={"p": " good", "n": " bad"}, seed=1)
    backend.register("keep", good)
    v = backend.task("keep").version
    bad = random_prompt(model, "{soft:2} {text} is", verbalizer={"p": " good", "n": " bad"}, seed=2)
    cfg = model.config
    bad.kv = torch.zeros(cfg.num_hidden_layers, 2, cfg.num_key_value_heads, 3, cfg.hidden_size // cfg.num_attention_heads)
    bad.method = "prefix_tuning"
    with pytest.raises(PromptRejectedError, match="vLLM backend.*in-process engine") as e:
        backend.register("keep", bad)
    assert e.value.code == "unsupported_by_backend"
    assert backend.task("keep").version == v  # the old version keeps serving


class ScriptedTransport(ModelTransport):
    """Answers generate() from a script: (ids, finish) per call."""

    def __init__(self, model, eos, script):
        super().__init__(model, eos)
        self.script = list(script)

    async def generate(self, embeds, params, on_ids=None):
        self.calls.append(("generate", embeds.shape[0], dict(params)))
        return self.script.pop(0)


def test_leading_line_break_is_skipped_and_stop_token_dropped(lm):
    model, tok = lm
    nl = 5  # the tiny tokenizer has no line break: make token 5 one
    assert nl not in newline_ids(tok) and nl != tok.eos_token_id
    t = ScriptedTransport(model, tok.eos_token_id, [([nl], "stop"), ([7, 8, nl], "stop")])
    b = VllmBackend(_front(model, tok), t).start()
    b._newlines, b._stops_newline = frozenset({nl}), b._stops_newline | {nl}
    try:
        b.register("g", random_prompt(model, "{soft:2} {text} =", kind="generation"))
        r = b.generate("g", "a b", max_new_tokens=6)
        assert r.token_ids == [7, 8] and r.finish_reason == "stop"
        (_, n1, p1), (_, n2, p2) = t.calls
        assert n2 == n1 + 1 and p2["max_tokens"] == p1["max_tokens"] - 1  # continued past the line break
        assert nl in p1["stop_token_ids"]
    finally:
        b.stop()


def test_sampling_fields_reach_vllm_and_are_checked(lm):
    model, tok = lm
    t = ScriptedTransport(model, tok.eos_token_id, [([7], "length"), ([9], "length")])
    b = VllmBackend(_front(model, tok), t).start()
    try:
        b.register("g", random_prompt(model, "{soft:2} {text} =", kind="generation"))
        b.generate("g", "a", max_new_tokens=1, temperature=0.7, top_p=0.9, seed=3)
        b.generate("g", "a", max_new_tokens=1)
        (_, _, sampled), (_, _, greedy) = t.calls
        assert (sampled["temperature"], sampled["top_p"], sampled["seed"]) == (0.7, 0.9, 3)
        assert greedy["temperature"] == 0.0 and greedy["seed"] is None
        for bad in (dict(temperature=-1), dict(top_p=0), dict(temperature=float("nan")), dict(seed="x")):
            with pytest.raises(InvalidInputError):
                b.submit_generate("g", "a", max_new_tokens=1, **bad)
    finally:
        b.stop()


# ----------------------------------------------------------------------------- remote transport
def _fake_vllm_app(model, eos):
    """The parts of vLLM's OpenAI server the remote transport uses, on the tiny model."""
    from fastapi import FastAPI

    app = FastAPI()
    inner = ModelTransport(model, eos)
    app.state.served = 0

    @app.get("/health")
    async def health():
        return {}

    @app.get("/v1/models")
    async def models():
        return {"data": [{"id": "tiny"}]}

    @app.post("/v1/completions")
    async def completions(body: dict):
        app.state.served += 1
        assert body["model"] == "tiny"
        embeds = torch.load(io.BytesIO(base64.b64decode(body["prompt_embeds"])), weights_only=True)
        if body.get("logprob_token_ids"):
            assert body["return_tokens_as_token_ids"] and body["logprobs"] is not None
            lp = await inner.next_logprobs(embeds, body["logprob_token_ids"])
            return {"choices": [{"logprobs": {"top_logprobs": [{f"token_id:{k}": v for k, v in lp.items()}]}}]}
        ids, finish = await inner.generate(embeds, body)
        if body.get("stream"):  # vLLM's streaming shape: token_ids deltas, finish_reason on the last chunk
            from fastapi.responses import StreamingResponse

            async def events():
                for k, t in enumerate(ids):
                    last = k == len(ids) - 1
                    c = {"token_ids": [t], "text": "", "finish_reason": finish if last else None}
                    yield f"data: {json.dumps({'choices': [c]})}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        return {"choices": [{"token_ids": ids, "finish_reason": finish, "text": ""}]}

    return app


def test_remote_transport_balances_replicas_and_skips_dead_ones(lm):
    model, tok = lm
    apps = [_fake_vllm_app(model, tok.eos_token_id) for _ in range(2)]
    p = random_prompt(model, "{soft:3} {text} answer", verbalizer={"a": " not at all", "b": " yes"}, seed=2)
    g = random_prompt(model, "{soft:4} {text} =", kind="generation", seed=6)
    local = VllmBackend(_front(model, tok), ModelTransport(model, tok.eos_token_id)).start()
    with ServerThread(apps[0]) as s0, ServerThread(apps[1]) as s1:
        dead = "http://127.0.0.1:9"
        remote = VllmBackend(_front(model, tok), RemoteTransport([s0.url, dead, s1.url], health_interval_s=60)).start()
        try:
            for b in (local, remote):
                b.register("c", p)
                b.register("g", g)
            texts = [f"text number {i}" for i in range(8)]
            ref, got = local.classify("c", texts), remote.classify("c", texts)
            for r, q in zip(ref, got):
                assert r.label == q.label and q.probabilities == pytest.approx(r.probabilities, abs=1e-6)
            assert remote.generate("g", "a b", max_new_tokens=4).token_ids == local.generate("g", "a b", max_new_tokens=4).token_ids
            assert apps[0].state.served > 0 and apps[1].state.served > 0  # load-balanced
            state = {r["url"]: r for r in remote.describe()["replicas"]}
            assert not state[dead]["healthy"] and state[dead]["served"] == 0
            # streaming: the same tokens, delivered as they come
            seen: list[list[int]] = []
            r = remote.generate("g", "a b", max_new_tokens=4, stop_at_newline=False, on_token=seen.append)
            assert seen and seen[-1] == r.token_ids == local.generate("g", "a b", max_new_tokens=4,
                                                                      stop_at_newline=False).token_ids

            # a streaming client that goes away drops its request, not the replica
            def gone(ids):
                raise RuntimeError("client went away")

            res = remote.generate("g", "c d", max_new_tokens=4, stop_at_newline=False, on_token=gone, timeout=30)
            assert res.finish_reason == "abandoned"  # as the in-process engine answers it
            assert all(r["healthy"] for r in remote.describe()["replicas"] if r["url"] != dead)

            # a replica that goes away: its requests fail over to the other one, and it is marked down
            s0.__exit__(None, None, None)
            got = remote.classify("c", texts)
            assert [g.label for g in got] == [r.label for r in ref]
            state = {r["url"]: r for r in remote.describe()["replicas"]}
            assert not state[s0.url]["healthy"] and state[s1.url]["healthy"]
        finally:
            remote.stop()
    local.stop()


def test_encoded_embeddings_round_trip_and_size():
    x = torch.randn(60, 576)
    enc = encode_embeds(x)
    back = torch.load(io.BytesIO(base64.b64decode(enc)), weights_only=True)
    assert torch.equal(back, x)
    assert 60 * 576 * 4 * 4 / 3 <= len(enc) <= 60 * 576 * 4 * 4 / 3 + 4096  # what docs/benchmarks.md quotes


def test_serve_app_runs_on_the_backend(pair, lm):
    """The unchanged HTTP app over the backend: classify, streamed generate, sampling in completions."""
    import httpx

    from softprompt.serve import create_app

    _, backend, transport = pair
    model, _ = lm
    backend.register("hc", random_prompt(model, "{soft:2} {text} is", verbalizer={"p": " good", "n": " bad"}))
    backend.register("hg", random_prompt(model, "{soft:2} {text} =", kind="generation", seed=4))
    with ServerThread(create_app(backend, manage_engine=False)) as srv:
        r = httpx.post(f"{srv.url}/v1/classify", json={"task": "hc", "inputs": ["a b"]}).json()
        assert set(r["results"][0]["probabilities"]) == {"p", "n"}
        ref = backend.generate("hg", "c d", max_new_tokens=5, stop_at_newline=False)
        text = ""
        with httpx.stream("POST", f"{srv.url}/v1/generate", json={"task": "hg", "input": "c d", "max_new_tokens": 5,
                                                                  "stop_at_newline": False, "stream": True}) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: ") and '"done"' in line:
                    text = line
        assert ref.text in text
        transport.calls.clear()
        r = httpx.post(f"{srv.url}/v1/completions", json={"model": "tiny:hg", "prompt": "c d", "max_tokens": 3,
                                                           "temperature": 0.5, "seed": 11})
        assert r.status_code == 200, r.text
        gen_params = [c[2] for c in transport.calls if c[0] == "generate"]
        assert gen_params and gen_params[0]["temperature"] == 0.5 and gen_params[0]["seed"] == 11
        assert httpx.get(f"{srv.url}/healthz").json()["status"] == "ok"


class StuckTransport(ModelTransport):
    """Never answers a generation (a vLLM that is busy for good)."""

    async def generate(self, embeds, params, on_ids=None):
        import asyncio

        await asyncio.Event().wait()


def test_full_queue_is_refused_with_retry_after_and_stop_answers_the_rest(lm):
    model, tok = lm
    b = VllmBackend(_front(model, tok), StuckTransport(model, tok.eos_token_id), max_queue=1).start()
    b.register("g", random_prompt(model, "{soft:2} {text} =", kind="generation"))
    first = b.submit_generate("g", "a", max_new_tokens=2)
    with pytest.raises(OverloadedError) as e:
        b.submit_generate("g", "b", max_new_tokens=2)
    assert e.value.retry_after >= 1
    b.stop(drain=False, timeout=5)
    with pytest.raises(ShuttingDownError):
        first.result(5)


def test_serve_cli_backend_flags_reach_the_vllm_backend(lm, tmp_path, monkeypatch):
    """`softprompt serve --backend vllm --vllm-url A --vllm-url B ...` builds the vLLM backend
    with those replicas and limits; --vllm-url without --backend vllm is refused."""
    import uvicorn
    from typer.testing import CliRunner

    import softprompt.serve.backends.vllm as vllm_mod
    from softprompt.cli import app

    model, tok = lm
    seen = {}

    def fake_make(name, **kw):
        seen.update(kw, name=name)
        return VllmBackend(_front(model, tok), ModelTransport(model, tok.eos_token_id),
                           max_labels=kw["max_labels"])

    monkeypatch.setattr(vllm_mod, "make_vllm_backend", fake_make)
    monkeypatch.setattr(uvicorn, "run", lambda *a, **kw: None)
    (tmp_path / "p").mkdir()
    r = CliRunner().invoke(app, ["serve", "--prompts", str(tmp_path / "p"), "--backend", "vllm", "--vllm-url",
                                 "http://a:1", "--vllm-url", "http://b:2", "--max-labels", "7", "--vllm-eager"])
    assert r.exit_code == 0, r.output
    assert seen["urls"] == ["http://a:1", "http://b:2"] and seen["max_labels"] == 7 and seen["enforce_eager"]
    r = CliRunner().invoke(app, ["serve", "--prompts", str(tmp_path / "p"), "--vllm-url", "http://a:1"])
    assert r.exit_code != 0 and "--backend vllm" in r.output


def test_requests_in_flight_keep_their_version_across_a_swap(lm):
    """A request submitted before a replacement or removal is answered by the version it was
    resolved to (the engine's rule), and old versions are dropped once nothing holds them."""
    import gc

    model, tok = lm
    t = StuckTransport(model, tok.eos_token_id)
    b = VllmBackend(_front(model, tok), t).start()
    try:
        b.register("g", random_prompt(model, "{soft:2} {text} =", kind="generation", seed=1))
        fut = b.submit_generate("g", "a", max_new_tokens=2)  # held by the stuck transport
        b.register("g", random_prompt(model, "{soft:3} {text} =", kind="generation", seed=2))
        b.unregister("g")
        assert len(b._members) == 1  # only the version the pending request holds
        assert not fut.done()
    finally:
        b.stop(drain=False, timeout=5)
    del fut
    gc.collect()
    assert len(b._members) == 0
