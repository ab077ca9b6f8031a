"""Prompts saved before the issue-13 redesign load and score identically after it.

The artifacts and their label scores in tests/fixtures/pre_redesign/ were written by the code at
commit 247263e (tests/fixtures/make_pre_redesign.py); the tiny models are rebuilt from their seeds.
"""
import json
import sys
from pathlib import Path

import pytest
import torch

from softprompt.core.bank import PromptBank
from softprompt.core.prompts import SoftPrompt
from softprompt.core.scoring import classify
from softprompt.data import Example
from softprompt.testing import tiny_causal_lm, tiny_t5, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURES = Path(__file__).parent / "fixtures" / "pre_redesign"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
PROBE = [Example({"text": t}) for t in ("good film", "bad film", "love love", "hate", "movie")]
MODELS = {"llama_prompt": lambda: tiny_causal_lm("llama"), "qwen2_ptuning": lambda: tiny_causal_lm("qwen2"),
          "gpt2_prefix": lambda: tiny_causal_lm("gpt2"), "t5_prompt": tiny_t5}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_old_prompt_scores_identically(name):
    model, tok = MODELS[name](), tiny_tokenizer()
    prompt = SoftPrompt.load(FIXTURES / f"{name}.safetensors", model=model)
    bank = PromptBank(model, tok)
    bank.add_prompt(prompt, name)
    res = classify(bank, name, PROBE, calibration=prompt.calibration)
    assert res.predictions == EXPECTED[name]["predictions"]
    torch.testing.assert_close(res.scores, torch.tensor(EXPECTED[name]["scores"]), atol=1e-5, rtol=1e-5)
    if name == "llama_prompt":
        assert prompt.calibration.method == "contextual"


def test_old_encoder_prompt_scores_identically():
    sys.path.insert(0, str(Path(__file__).parent))
    from test_encoder import tiny_bert, tiny_bert_tokenizer

    from softprompt.families.encoder import EncoderBank, classify as encoder_classify

    model, tok = tiny_bert(), tiny_bert_tokenizer()
    prompt = SoftPrompt.load(FIXTURES / "bert_prompt.safetensors", model=model)
    bank = EncoderBank(model, tok)
    bank.add_prompt(prompt, "bert_prompt")
    res = encoder_classify(bank, "bert_prompt", PROBE)
    assert res.predictions == EXPECTED["bert_prompt"]["predictions"]
    torch.testing.assert_close(res.scores, torch.tensor(EXPECTED["bert_prompt"]["scores"]), atol=1e-5, rtol=1e-5)
