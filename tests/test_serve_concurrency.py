"""The acceptance test of the server: a real uvicorn server on a free 127.0.0.1 port, more
than 1,000 requests over 5 tasks (single prompts, a two-field task, an ensemble and a
generation task) from 32 concurrent clients.  Every response must equal the one-by-one
answer for its task and input (computed beforehand on an independent bank): nothing lost,
nothing swapped.  A second test replaces a prompt over HTTP while clients are using it."""
import asyncio
import json
import random

import httpx
import pytest

from softprompt.core.bank import PromptBank
from softprompt.core.scoring import classify as ref_classify
from softprompt.core.scoring import generate as ref_generate
from softprompt.serve import Engine, Registry, create_app
from softprompt.serve.testing import ServerThread, random_prompt
from softprompt.data import Example
from softprompt.testing import TINY_WORDS, tiny_causal_lm, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

N_CLIENTS = 32
N_REQUESTS = 1056  # 33 per client
ATOL = 1e-4
TOKEN = "concurrency-token"


def make_prompts(model):
    sent = {"pos": " good", "neg": " not good"}
    return {
        "sent": random_prompt(model, "{soft:4} review : {text} label :", verbalizer=sent, seed=1),
        "tweet": random_prompt(model, "{soft:3} tweet : {text} {soft:2} complaint ? answer :",
                               verbalizer={"yes": " yes", "no": " no", "maybe": " maybe not"}, seed=2),
        "nli": random_prompt(model, "{soft:3} premise : {premise} hypothesis : {hypothesis} answer :",
                             verbalizer={"entailment": " yes", "contradiction": " no"}, seed=3),
        "ens": [random_prompt(model, "{soft:3} review : {text} label :", verbalizer=sent, seed=10 + k) for k in range(3)],
        "qa": random_prompt(model, "{soft:5} question : {text} answer :", kind="generation", seed=4),
    }


class Reference:
    """One-by-one answers on an independent bank (not the server's)."""

    def __init__(self, model, tok, prompts):
        self.bank = PromptBank(model, tok)
        self.idx = {}
        for name, p in prompts.items():
            for k, q in enumerate(p if isinstance(p, list) else [p]):
                self.idx[(name, k)] = self.bank.add_prompt(q, f"{name}/{k}")
        self.prompts = prompts
        self.cache = {}

    def probs(self, task, fields):
        key = ("c", task, json.dumps(fields, sort_keys=True))
        if key not in self.cache:
            members = self.prompts[task] if isinstance(self.prompts[task], list) else [self.prompts[task]]
            per = []
            for k in range(len(members)):
                r = ref_classify(self.bank, self.idx[(task, k)], [Example(fields)])
                per.append(dict(zip(r.labels, r.probabilities[0].tolist())))
            mean = {lab: sum(p[lab] for p in per) / len(per) for lab in per[0]}
            self.cache[key] = (max(mean, key=mean.get), mean)
        return self.cache[key]

    def text(self, task, fields, n, stop_at_newline):
        key = ("g", task, json.dumps(fields, sort_keys=True), n, stop_at_newline)
        if key not in self.cache:
            self.cache[key] = ref_generate(self.bank, self.idx[(task, 0)], [Example(fields)], max_new_tokens=n,
                                           stop_at_newline=stop_at_newline).texts[0]
        return self.cache[key]


def sentences(n, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(TINY_WORDS) for _ in range(rng.randint(1, 14))) for _ in range(n)]


def plan(n, seed=0):
    """Deterministic mixed traffic: (kind, path, body, expected-answer key)."""
    rng = random.Random(seed)
    pool = sentences(40, seed)
    out = []
    for j in range(n):
        kind = j % 6
        if kind in (0, 1, 3):
            task = {0: "sent", 1: "tweet", 3: "ens"}[kind]
            out.append(("classify", {"task": task, "inputs": rng.sample(pool, rng.randint(1, 3))}))
        elif kind == 2:
            out.append(("classify", {"task": "nli", "inputs": [
                {"premise": rng.choice(pool), "hypothesis": rng.choice(pool)} for _ in range(rng.randint(1, 2))]}))
        elif kind == 4:
            out.append(("generate", {"task": "qa", "input": rng.choice(pool), "max_new_tokens": rng.randint(1, 6),
                                     "stream": rng.random() < 0.3}))
        else:
            if rng.random() < 0.5:
                out.append(("completions", {"model": "tiny:sent", "prompt": rng.choice(pool)}))
            else:
                out.append(("completions", {"model": "tiny:qa", "prompt": rng.choice(pool), "max_tokens": rng.randint(1, 5)}))
    return out


def expected(ref, kind, body):
    if kind == "classify":
        fields = [x if isinstance(x, dict) else {"text": x} for x in body["inputs"]]
        return [ref.probs(body["task"], f) for f in fields]
    if kind == "generate":
        return ref.text("qa", {"text": body["input"]}, body["max_new_tokens"], True)
    task = body["model"].split(":")[1]
    if task == "sent":
        return ref.probs("sent", {"text": body["prompt"]})
    return ref.text("qa", {"text": body["prompt"]}, body["max_tokens"], False)


async def call(client, kind, body):
    if kind == "generate" and body["stream"]:
        async with client.stream("POST", "/v1/generate", json=body) as r:
            assert r.status_code == 200, await r.aread()
            events = [json.loads(line[6:]) async for line in r.aiter_lines() if line.startswith("data: ")]
        assert "".join(e["text"] for e in events[:-1]) == events[-1]["text"]
        return events[-1]
    r = await client.post(f"/v1/{kind}", json=body)
    assert r.status_code == 200, (kind, body, r.status_code, r.text)
    return r.json()


def check(kind, body, got, want):
    if kind == "classify":
        assert len(got["results"]) == len(want)
        for res, (label, probs) in zip(got["results"], want):
            assert res["label"] == label, (body, res, probs)
            assert all(abs(res["probabilities"][k] - v) <= ATOL for k, v in probs.items()), (body, res, probs)
    elif kind == "generate":
        assert got["text"] == want, (body, got)
    elif body["model"] == "tiny:sent":
        label, probs = want
        assert got["choices"][0]["text"] == label
        assert all(abs(got["choices"][0]["probabilities"][k] - v) <= ATOL for k, v in probs.items())
    else:
        assert got["choices"][0]["text"] == want, (body, got)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model, tok = tiny_causal_lm("llama"), tiny_tokenizer()
    prompts = make_prompts(model)
    root = tmp_path_factory.mktemp("prompts")
    for name, p in prompts.items():
        if isinstance(p, list):
            (root / name).mkdir()
            for k, q in enumerate(p):
                q.save(root / name / f"m{k}.safetensors")
        else:
            p.save(root / f"{name}.safetensors")
    return model, tok, prompts, root


def test_1000_requests_from_32_clients_all_correct(setup):
    model, tok, prompts, root = setup
    ref = Reference(model, tok, prompts)
    traffic = plan(N_REQUESTS)
    wants = [expected(ref, kind, body) for kind, body in traffic]  # one-by-one, before the server starts

    engine = Engine(model, tok, base_name="tiny", max_batch_size=32, max_wait_ms=2, max_queue=4096)
    registry = Registry(root, engine)
    assert not registry.sync()["errors"]
    app = create_app(engine, registry=registry, token=TOKEN)

    async def run(url):
        todo = asyncio.Queue()
        for j in range(len(traffic)):
            todo.put_nowait(j)
        answers = {}

        async def client_loop():
            async with httpx.AsyncClient(base_url=url, timeout=120) as client:
                while True:
                    try:
                        j = todo.get_nowait()
                    except asyncio.QueueEmpty:
                        return
                    answers[j] = await call(client, *traffic[j])
        await asyncio.gather(*(client_loop() for _ in range(N_CLIENTS)))
        async with httpx.AsyncClient(base_url=url) as client:
            metrics = (await client.get("/metrics")).text
        return answers, metrics

    with ServerThread(app) as srv:
        answers, metrics = asyncio.run(run(srv.url))
    assert len(answers) == N_REQUESTS, "nothing lost"
    for j, (kind, body) in enumerate(traffic):
        check(kind, body, answers[j], wants[j])
    # the traffic was really batched across tasks
    lines = metrics.splitlines()
    count = float(next(x for x in lines if x.startswith("softprompt_batch_tasks_count")).split()[-1])
    single = float(next(x for x in lines if x.startswith('softprompt_batch_tasks_bucket{le="1"}')).split()[-1])
    assert single < count, "some batches mixed several tasks"
    rows = sum(len(b["inputs"]) if k == "classify" else 1 for k, b in traffic)
    served = sum(float(x.split()[-1]) for x in lines if x.startswith("softprompt_requests_total{") and 'status="ok"' in x)
    assert served == rows


def test_replace_over_http_while_serving(setup):
    """PUT new versions of a task while 8 clients use it: every answer equals the
    one-by-one answer of the version it reports, and no request fails."""
    model, tok, prompts, root = setup
    alt = random_prompt(model, "{soft:2} other template : {text} label :", verbalizer={"pos": " good", "neg": " not good"}, seed=77)
    alt_path = root.parent / "alt.safetensors"
    alt.save(alt_path)
    artifacts = [(root / "sent.safetensors").read_bytes(), alt_path.read_bytes()]
    refs = [Reference(model, tok, {"sent": prompts["sent"]}), Reference(model, tok, {"sent": alt})]
    pool = sentences(12, seed=5)
    engine = Engine(model, tok, base_name="tiny", max_batch_size=16, max_wait_ms=1)
    registry = Registry(root, engine)
    registry.sync()
    app = create_app(engine, registry=registry, token=TOKEN)
    which = {engine.task("sent").version: 0}

    async def run(url):
        stop = asyncio.Event()
        seen = []

        async def user(k):
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                i = k
                while not stop.is_set():
                    text = pool[i % len(pool)]
                    r = await client.post("/v1/classify", json={"task": "sent", "inputs": [text]})
                    assert r.status_code == 200, r.text
                    seen.append((text, r.json()))
                    i += 1

        users = [asyncio.create_task(user(k)) for k in range(8)]
        async with httpx.AsyncClient(base_url=url, timeout=60, headers={"Authorization": f"Bearer {TOKEN}"}) as admin:
            for s in range(6):
                await asyncio.sleep(0.05)
                r = await admin.put("/v1/tasks/sent", content=artifacts[(s + 1) % 2])
                assert r.status_code == 200, r.text
                which[r.json()["task"]["version"]] = (s + 1) % 2
        await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(*users)
        return seen

    with ServerThread(app) as srv:
        seen = asyncio.run(run(srv.url))
    assert len({body["version"] for _, body in seen}) >= 2
    for text, body in seen:
        label, probs = refs[which[body["version"]]].probs("sent", {"text": text})
        res = body["results"][0]
        assert res["label"] == label
        assert all(abs(res["probabilities"][k] - v) <= ATOL for k, v in probs.items())
    (root / "sent.safetensors").write_bytes(artifacts[0])  # leave the folder as the module found it
