"""The server's memory and latency guarantees: a token budget per forward pass, limits on
what a prompt may ask of every request (labels, label words, template length) checked at
upload and at load, prefix key/values computed off the inference path, and the resident
memory of a many-label, long-input classify bounded."""
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

import softprompt.core.conditioning as cond
import softprompt.serve.runner as runner_mod
from softprompt.core.bank import PromptBank
from softprompt.core.scoring import classify as ref_classify
from softprompt.core.scoring import generate as ref_generate
from softprompt.serve.engine import Engine, PromptRejectedError
from softprompt.serve.registry import Registry
from softprompt.serve.testing import random_prompt
from softprompt.data import Example
from softprompt.testing import TINY_WORDS

pytestmark = pytest.mark.usefixtures("one_thread")

SENT = "{soft:3} review : {text} label :"
TEXTS = [
    "the movie was good", "awful service , slow flight and broken order", "great", "why is my refund delayed please help",
    "it was not bad", "love this film", "help", "what a terrible , awful , slow , broken service it was",
]


def verbalizer(n: int, max_words: int = 4) -> dict[str, str]:
    """n labels whose words are 1..max_words tokens long (tiny tokenizer: one token per word)."""
    return {f"l{j}": " " + " ".join(TINY_WORDS[(j * 7 + k) % len(TINY_WORDS)] for k in range(1 + j % max_words))
            for j in range(n)}


def _ref_probs(model, tok, prompt, text):
    bank = PromptBank(model, tok)
    e = bank.add_prompt(prompt, "x")
    r = ref_classify(bank, e, [Example({"text": text})])
    return dict(zip(r.labels, r.probabilities[0].tolist()))


# ----------------------------------------------------------------------------- token budget
def test_small_token_budget_splits_passes_and_answers_as_one_by_one(lm, monkeypatch):
    """With a budget far below the batch, every context pass and every label pass fits it,
    the batch really is split, and the answers equal the one-by-one reference."""
    model, tok = lm
    budget = 160
    many = random_prompt(model, SENT, verbalizer=verbalizer(30), seed=1)
    few = random_prompt(model, "{soft:2} tweet : {text} answer :", verbalizer=verbalizer(3), seed=2)
    qa = random_prompt(model, "{soft:2} question : {text} answer :", kind="generation", seed=3)
    ctx_passes, lane_passes = [], []
    real_run, real_lanes = runner_mod.run_context, cond._lane_passes

    def run_context(bank, entry_idx, suffixes):
        ctx = real_run(bank, entry_idx, suffixes)
        ctx_passes.append((len(suffixes), ctx.mask.shape[1]))
        return ctx

    def lanes(width, rows, conts, multi, budget_, tree):
        out = real_lanes(width, rows, conts, multi, budget_, tree)
        lane_len = lambda lane: sum(len(conts[i]) - 1 for i in lane[1])  # noqa: E731
        lane_passes.extend((len(p), width + max(map(lane_len, p))) for p in out)
        return out

    monkeypatch.setattr(runner_mod, "run_context", run_context)
    monkeypatch.setattr(cond, "_lane_passes", lanes)
    with Engine(model, tok, max_batch_tokens=budget, max_batch_size=32, max_wait_ms=50, split_padding=None) as eng:
        for name, p in (("many", many), ("few", few), ("qa", qa)):
            eng.register(name, p)
        ctx_passes.clear()
        futs = [(p, t, eng.submit_classify(n, [t])[0]) for t in TEXTS for n, p in (("many", many), ("few", few))]
        gens = [eng.submit_generate("qa", t, max_new_tokens=4) for t in TEXTS[:3]]
        for p, t, f in futs:
            got, want = f.result(60).probabilities, _ref_probs(model, tok, p, t)
            assert max(abs(got[k] - want[k]) for k in want) < 1e-4
        for t, g in zip(TEXTS[:3], gens):
            bank = PromptBank(model, tok)
            want = ref_generate(bank, bank.add_prompt(qa, "qa"), [Example({"text": t})], max_new_tokens=4).texts[0]
            assert g.result(60).text == want
    assert len(ctx_passes) > 2, "the batch was split into several passes"
    assert all(rows * width <= budget for rows, width in ctx_passes if rows > 1), ctx_passes
    assert lane_passes and all(n * tokens <= budget for n, tokens in lane_passes if n > 1), lane_passes


def test_classify_respects_the_token_budget(lm, monkeypatch):
    """scoring.classify (eval, compare) forms batches within the budget and scores the same."""
    import softprompt.families.decoder as decoder  # where classify's decoder contexts are run

    model, tok = lm
    bank = PromptBank(model, tok)
    e = bank.add_prompt(random_prompt(model, SENT, verbalizer=verbalizer(20), seed=4), "x")
    exs = [Example({"text": t}) for t in TEXTS]
    seen = []
    real = decoder.run_context
    monkeypatch.setattr(decoder, "run_context", lambda b, ei, sfx: seen.append(real(b, ei, sfx).mask.shape[1] * len(sfx))
                        or real(b, ei, sfx))
    small = ref_classify(bank, e, exs, max_batch_tokens=40, context="cached")  # the path the spy watches
    assert len(seen) > 1 and all(n <= 40 for n in seen[:-1] if n)
    big = ref_classify(bank, e, exs, max_batch_tokens=1 << 20)
    torch.testing.assert_close(small.scores, big.scores, atol=2e-5, rtol=0)


# ----------------------------------------------------------------------------- registration limits
@pytest.mark.parametrize("what, prompt_kw, code", [
    ("labels", dict(verbalizer=verbalizer(21)), "too_many_labels"),
    ("label tokens", dict(verbalizer={"a": " good", "b": " bad bad bad bad bad"}), "label_too_long"),
    ("label chars", dict(verbalizer={"a": " good", "b": " x" * 200}), "label_too_long"),
    ("template tokens", dict(template="{soft:2} " + "the good movie " * 34 + "review : {text} label :"),
     "template_too_long"),
    ("template chars", dict(template="{soft:2} " + "a" * 7000 + " {text}"), "template_too_long"),
])
def test_prompts_over_the_limits_are_refused_at_upload_and_load(lm, tmp_path, what, prompt_kw, code):
    """An upload over a limit gets a clear 422 and leaves no file; the same file put in the
    folder is reported and never loaded; a prompt just within the limits is served."""
    model, tok = lm
    kw = dict(template=SENT, verbalizer=verbalizer(3)) | prompt_kw
    bad = random_prompt(model, kw["template"], verbalizer=kw["verbalizer"], seed=5)
    root = tmp_path / "prompts"
    root.mkdir()
    with Engine(model, tok, max_labels=20, max_label_tokens=4, max_template_tokens=100) as eng:
        reg = Registry(root, eng)
        path = tmp_path / "bad.safetensors"
        bad.save(path)
        with pytest.raises(PromptRejectedError) as err:
            reg.put("bad", path.read_bytes())
        assert err.value.code == code and err.value.status == 422
        assert "limit" in err.value.message, err.value.message
        assert reg.listing() == [] and "bad" not in eng.tasks()
        bad.save(root / "bad.safetensors")
        report = reg.sync()
        assert "bad" in report["errors"] and "bad" not in eng.tasks()
        # just within every limit: 98 prefix tokens, 20 labels, words of 4 tokens
        ok = random_prompt(model, "{soft:2} " + "the good movie " * 31 + "review : {text} label :",
                           verbalizer={"a": " good", "b": " bad bad bad bad"} | verbalizer(18), seed=6)
        ok_path = tmp_path / "ok.safetensors"
        ok.save(ok_path)
        reg.put("ok", ok_path.read_bytes())
        assert eng.tasks()["ok"].prefix_lens == (98,)
        assert eng.classify("ok", ["good"], timeout=60)[0].label


# ----------------------------------------------------------------------------- registration off the worker
def test_registering_a_long_template_does_not_stall_other_tasks(lm, monkeypatch):
    """The prefix of a new prompt is computed in the registering thread, not on the worker:
    while it is computed (made slow on purpose, as a long template on a big model is), a
    classify of another task answers in a small fraction of the registration time."""
    model, tok = lm
    slow = 2.0
    started, where = threading.Event(), []
    real = PromptBank._compute_prefix_kv

    def compute(self, entries):
        if any(len(self.entries[e].prefix_ids) > 300 for e in entries):
            where.append(threading.current_thread().name)
            started.set()
            time.sleep(slow)
        return real(self, entries)

    monkeypatch.setattr(PromptBank, "_compute_prefix_kv", compute)
    short = random_prompt(model, SENT, verbalizer=verbalizer(3), seed=7)
    long = random_prompt(model, "{soft:2} " + "the good movie " * 150 + "review : {text} label :",
                         verbalizer=verbalizer(4), seed=8)
    with Engine(model, tok, max_wait_ms=1) as eng:
        eng.register("short", short)
        eng.classify("short", ["warm up"], timeout=30)
        reg_time = []

        def register():
            t0 = time.perf_counter()
            eng.register("long", long)
            reg_time.append(time.perf_counter() - t0)

        th = threading.Thread(target=register, name="registering")
        th.start()
        assert started.wait(30)
        t0 = time.perf_counter()
        eng.classify("short", ["the movie was good"], timeout=60)
        latency = time.perf_counter() - t0
        th.join(60)
        assert reg_time and reg_time[0] >= slow
        assert latency < 0.25 * reg_time[0], f"classify took {latency:.2f} s during a {reg_time[0]:.2f} s registration"
        assert where == ["registering"], f"the prefix was computed on {where}"
        got = eng.classify("long", ["great film"], timeout=60)[0].probabilities
    want = _ref_probs(model, tok, long, "great film")
    assert max(abs(got[k] - want[k]) for k in want) < 1e-4


# ----------------------------------------------------------------------------- resident memory
PROBE = textwrap.dedent('''
    import json, os, sys, threading, time
    import psutil, torch
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, LlamaConfig
    from softprompt.serve.engine import Engine
    from softprompt.serve.testing import random_prompt
    from softprompt.testing import TINY_WORDS, tiny_tokenizer

    abort_at, budget, input_tokens, n_labels, n_inputs = map(int, sys.argv[1:6])
    # SmolLM2-135M's key/value shape (30 layers, 3 kv heads of 64, 9 query heads), tiny hidden/MLP
    cfg = LlamaConfig(vocab_size=160, hidden_size=72, intermediate_size=72, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    model.requires_grad_(False)
    model.softprompt_name = "kv-shaped-smollm2"
    tok = tiny_tokenizer()
    words = [w for w in TINY_WORDS]
    verb = {f"l{j}": " " + " ".join(words[(j * 7 + k) % len(words)] for k in range(1 + j % 4)) for j in range(n_labels)}
    prompt = random_prompt(model, "{soft:8} review : {text} label :", verbalizer=verb, seed=1)
    kw = {"max_batch_tokens": budget} if budget else {}
    eng = Engine(model, tok, max_input_tokens=input_tokens, max_batch_size=32, max_wait_ms=100, **kw)
    eng.register("many", prompt)
    eng.start()
    eng.classify("many", ["good"], timeout=600)
    g = torch.Generator().manual_seed(0)
    inputs = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (input_tokens - 4,), generator=g))
              for _ in range(n_inputs)]
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            rss = proc.memory_info().rss
            peak[0] = max(peak[0], rss)
            if rss - base > abort_at:  # the old code grows by many GB: stop before the box swaps
                print(json.dumps({"growth": rss - base, "aborted": True}), flush=True)
                os._exit(3)
            time.sleep(0.002)

    try:
        open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM: the kernel's own peak from here on
        hwm = True
    except OSError:
        hwm = False
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    res = eng.classify("many", inputs, timeout=600)
    seconds = time.perf_counter() - t0
    done.set()
    th.join()
    growth = peak[0] - base
    if hwm:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                growth = max(growth, int(line.split()[1]) * 1024 - base)
    print(json.dumps({"growth": growth, "seconds": seconds, "answers": len(res), "aborted": False}), flush=True)
    eng.stop()
''')


def kv_bytes_per_token() -> int:
    return 30 * 2 * 3 * 64 * 4  # layers x (k, v) x kv heads x head dim x fp32


def run_probe(budget: int, *, input_tokens=96, n_labels=50, n_inputs=32, abort_at=3 << 30) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(cond.__file__).parents[1])] + sys.path))
    out = subprocess.run([sys.executable, "-c", PROBE, str(abort_at), str(budget), str(input_tokens), str(n_labels),
                          str(n_inputs)], capture_output=True, text=True, timeout=600, env=env)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    assert lines, out.stderr[-3000:]
    return json.loads(lines[-1])


def test_many_label_long_input_classify_has_bounded_resident_memory():
    """The issue's attack: a 50-label task (label words of 1-4 tokens) and 32 inputs at the
    input-token limit, in one request, on a model with SmolLM2-135M's key/value size
    (46 KB per token in fp32).  Copying the context per label needed 32 x 50 x 100 tokens of
    key/values (~6 GB here); with a 2,048-token budget the peak resident growth must stay
    under 4 budgets' worth of key/values plus 100 MB of working memory (~480 MB)."""
    budget = 2048
    bound = 4 * budget * kv_bytes_per_token() + (100 << 20)
    r = run_probe(budget, abort_at=2 * bound)
    assert not r["aborted"], f"resident memory grew past {2 * bound / 2**20:.0f} MB (killed): {r}"
    assert r["answers"] == 32
    assert r["growth"] < bound, f"grew {r['growth'] / 2**20:.0f} MB; bound {bound / 2**20:.0f} MB"


def test_uploading_a_20000_label_verbalizer_is_refused_over_http(lm, tmp_path):
    """The issue's upload: a 20,000-label verbalizer was accepted and killed the server on
    its first classify (and again after a restart, as the file stayed).  With the default
    limits it is refused with 422 and leaves the folder as it was."""
    from fastapi.testclient import TestClient

    from softprompt.serve import create_app

    model, tok = lm
    root = tmp_path / "prompts"
    root.mkdir()
    random_prompt(model, SENT, verbalizer=verbalizer(3), seed=1).save(root / "sent.safetensors")
    huge = random_prompt(model, SENT, verbalizer={f"label{j}": f" word {j}" for j in range(20_000)}, seed=2)
    huge.save(tmp_path / "huge.safetensors")
    eng = Engine(model, tok)
    reg = Registry(root, eng)
    reg.sync()
    before = reg.listing()
    with TestClient(create_app(eng, registry=reg, token="secret"), raise_server_exceptions=False) as c:
        r = c.put("/v1/tasks/huge", content=(tmp_path / "huge.safetensors").read_bytes(),
                  headers={"Authorization": "Bearer secret"})
        assert r.status_code == 422, r.text[:300]
        assert r.json()["error"]["code"] == "too_many_labels" and "20000 labels" in r.json()["error"]["message"]
        assert reg.listing() == before and "huge" not in eng.tasks()
        assert c.post("/v1/classify", json={"task": "sent", "inputs": ["good"]}).status_code == 200


def test_serve_flags_reach_the_engine(lm, tmp_path, monkeypatch):
    """`softprompt serve --max-batch-tokens ... --max-labels ...` configures the engine it serves with."""
    import uvicorn
    from typer.testing import CliRunner

    import softprompt.families.loading
    import softprompt.serve as serve_pkg
    from softprompt.cli import app

    seen = {}

    class Spy(Engine):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            seen.update(vars(self.config))

    monkeypatch.setattr(softprompt.families.loading, "load_model", lambda *a, **kw: lm)
    monkeypatch.setattr(serve_pkg, "Engine", Spy)
    monkeypatch.setattr(uvicorn, "run", lambda *a, **kw: None)
    (tmp_path / "p").mkdir()
    r = CliRunner().invoke(app, ["serve", "--prompts", str(tmp_path / "p"), "--max-batch-tokens", "1234",
                                 "--max-labels", "7", "--max-label-tokens", "3", "--max-template-tokens", "99",
                                 "--max-input-tokens", "77", "--max-tasks", "7", "--max-prefix-cache-mb", "3",
                                 "--max-response-bytes", "12345"])
    assert r.exit_code == 0, r.output
    want = dict(max_batch_tokens=1234, max_labels=7, max_label_tokens=3, max_template_tokens=99, max_input_tokens=77,
                max_tasks=7, max_prefix_cache_bytes=3 << 20, max_response_bytes=12345)
    assert {k: seen[k] for k in want} == want
    r = CliRunner().invoke(app, ["serve", "--prompts", str(tmp_path / "p")])
    assert r.exit_code == 0, r.output
    assert (seen["max_tasks"], seen["max_prefix_cache_bytes"], seen["max_response_bytes"]) == (256, 2 << 30, 16 << 20)
