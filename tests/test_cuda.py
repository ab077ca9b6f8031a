"""The same answers on a GPU as on the CPU (skipped where no CUDA device is present).

The rest of the suite can also run with its tiny models on a GPU
(``SOFTPROMPT_TEST_DEVICE=cuda pytest``); these checks compare the two devices directly:
scores within fp32 rounding (TF32 matmuls off), greedy tokens equal, and a prompt trained on
the GPU loads onto the CPU copy of the model (the identity fingerprint does not depend on
the device).
"""
import os

import pytest
import torch

from softprompt.core.bank import PromptBank
from softprompt.core.prompts import SoftPrompt
from softprompt.core.scoring import classify, generate
from softprompt.serve.engine import Engine
from softprompt.serve.testing import random_prompt
from softprompt.data import Example, Task
from softprompt.testing import tiny_causal_lm, tiny_tokenizer
from softprompt.training.prompt import TrainConfig, train_prompt

GPU = os.environ.get("SOFTPROMPT_TEST_GPU", "cuda")  # "cpu" checks these tests' own logic without a GPU
pytestmark = pytest.mark.skipif(GPU.startswith("cuda") and not torch.cuda.is_available(), reason="needs a CUDA device")

TEXTS = ["the movie was good", "awful service , slow flight", "great", "why is my refund delayed please help",
         "it was not bad", "love this film"]
CLS = "{soft:4} review : {text} {soft:2} label :"
VERB = {"pos": " good", "neg": " not good"}


@pytest.fixture(scope="module")
def pair():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cpu = tiny_causal_lm().to("cpu")
    gpu = tiny_causal_lm().to(GPU)
    return cpu, gpu, tiny_tokenizer()


def banks(pair, *prompts):
    cpu, gpu, tok = pair
    out = []
    for model in (cpu, gpu):
        bank = PromptBank(model, tok)
        for name, p in prompts:
            bank.add_prompt(p, name)
        out.append(bank)
    return out


def test_scores_and_tokens_match_the_cpu(pair):
    cpu, gpu, tok = pair
    cls = random_prompt(cpu, CLS, verbalizer=VERB, seed=1)
    gen = random_prompt(cpu, "{soft:3} question : {text} answer :", kind="generation", seed=2)
    b_cpu, b_gpu = banks(pair, ("cls", cls), ("gen", gen))
    exs = [Example({"text": t}, "pos") for t in TEXTS]
    s_cpu = classify(b_cpu, "cls", exs, batch_size=4).scores
    s_gpu = classify(b_gpu, "cls", exs, batch_size=4).scores
    torch.testing.assert_close(s_gpu.cpu(), s_cpu, atol=1e-4, rtol=1e-4)
    g_cpu = generate(b_cpu, "gen", exs, max_new_tokens=6, stop_at_newline=False).texts
    g_gpu = generate(b_gpu, "gen", exs, max_new_tokens=6, stop_at_newline=False).texts
    assert g_cpu == g_gpu


@pytest.mark.parametrize("method", ["prompt", "ptuning", "prefix"])
def test_training_on_the_gpu(pair, method, tmp_path):
    cpu, gpu, tok = pair
    template = "review : {text} label :" if method == "prefix" else CLS
    task = Task(name="toy", kind="classification", template=template, verbalizer=VERB)
    train = [Example({"text": t}, "pos" if i % 2 else "neg") for i, t in enumerate(TEXTS)]
    cfg = TrainConfig(epochs=6, lr=0.05 if method == "prompt" else 1e-2, batch_size=3, init="vocab", warmup_steps=1,
                      method=method, prefix_tokens=3)
    res = train_prompt(gpu, tok, task, train, train, cfg, out_dir=tmp_path, progress=False)
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    saved = SoftPrompt.load(tmp_path / "prompt.safetensors", model=cpu)  # the GPU-trained prompt fits the CPU model
    b_cpu, b_gpu = banks(pair, ("t", saved))
    s_cpu = classify(b_cpu, "t", train).scores
    s_gpu = classify(b_gpu, "t", train).scores
    torch.testing.assert_close(s_gpu.cpu(), s_cpu, atol=1e-4, rtol=1e-4)


def test_engine_on_the_gpu_equals_scoring(pair):
    cpu, gpu, tok = pair
    cls = random_prompt(gpu, CLS, verbalizer=VERB, seed=3)
    gen = random_prompt(gpu, "{soft:3} question : {text} answer :", kind="generation", seed=4)
    b_gpu = banks((gpu, gpu, tok), ("cls", cls), ("gen", gen))[1]
    eng = Engine(gpu, tok, max_batch_size=8, max_wait_ms=2.0)
    assert eng.prefix_cache is (torch.device(GPU).type == "cpu")  # "auto": recompute prompts on a GPU
    eng.register("cls", cls)
    eng.register("gen", gen)
    eng.start()
    try:
        cls_futs = eng.submit_classify("cls", TEXTS)
        gen_futs = [eng.submit_generate("gen", t, max_new_tokens=5) for t in TEXTS]
        ref_cls = classify(b_gpu, "cls", [Example({"text": t}) for t in TEXTS])
        ref_gen = generate(b_gpu, "gen", [Example({"text": t}) for t in TEXTS], max_new_tokens=5)
        assert [f.result(timeout=60).label for f in cls_futs] == ref_cls.predictions
        assert [f.result(timeout=60).text for f in gen_futs] == ref_gen.texts
    finally:
        eng.stop()
