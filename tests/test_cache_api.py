"""The package's own forward passes use whatever name the installed transformers gives the
key/value cache (``cache`` from 5.x releases that renamed it, ``past_key_values`` on 5.0),
so they raise no deprecation warning on either end of the range pyproject admits.

The forward-pass checks import nothing from ``softprompt.core.cache_api``, so they also run (and
fail) against the code from before it existed."""
import logging
import warnings
from dataclasses import dataclass

import pytest
import torch

from softprompt.families import seq2seq
from softprompt.core.bank import PromptBank
from softprompt.core.conditioning import full_context, greedy_generate, label_logprobs, run_context
from softprompt.data import Task
from softprompt.testing import tiny_causal_lm, tiny_t5, tiny_tokenizer
from softprompt.training.prompt import TrainConfig, initial_prefix_kv

pytestmark = pytest.mark.usefixtures("one_thread")


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _cache_complaints(run) -> list[str]:
    """Every warning (``warnings`` module, or the transformers logger's once-per-process
    deprecation lines, re-armed here) that mentions the old cache name while ``run()`` runs."""
    from transformers.utils import logging as hf_logging

    clear = getattr(getattr(hf_logging, "warning_once", None), "cache_clear", None)
    if clear is not None:
        clear()
    handler = _Records()
    root = logging.getLogger("transformers")
    root.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            run()
    finally:
        root.removeHandler(handler)
    texts = [str(w.message) for w in caught] + handler.messages
    return [t for t in texts if "past_key_values" in t or "cache_params" in t]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_decoder_forward_passes_use_the_current_cache_name(family):
    model, tok = tiny_causal_lm(family), tiny_tokenizer()
    bank = PromptBank(model, tok)
    g = torch.Generator().manual_seed(1)
    bank.add("a", "{soft:3} review : {text} label :", torch.randn(3, 32, generator=g),
             verbalizer={"pos": " good", "neg": " not good"})
    bank.add("p", "review : {text} label :", kv=torch.randn(bank.kv_shape(2), generator=g),
             verbalizer={"pos": " good", "neg": " not good"})
    bank.add("c", "question : {text} answer :", kind="generation")
    task = Task(name="t", kind="classification", template="{soft:2} {text} :", verbalizer={"pos": " good"})

    def run():
        for e in range(3):
            sfx = [bank.suffix_ids(e, {"text": "the movie was good"})]
            ctx = run_context(bank, torch.tensor([e]), sfx)  # prefix cache in, context cache out
            if bank.entries[e].verbalizer:
                label_logprobs(bank, ctx)  # continuation lanes on top of the context's cache
            else:
                greedy_generate(bank, ctx, max_new_tokens=3, stop_ids=set())  # decode_step
                greedy_generate(bank, full_context(bank, torch.tensor([e]), sfx), max_new_tokens=2, stop_ids=set())
        initial_prefix_kv(model, tok, task, TrainConfig(method="prefix", prefix_tokens=2))

    assert _cache_complaints(run) == []


def test_t5_forward_passes_use_the_current_cache_name():
    model, tok = tiny_t5(), tiny_tokenizer()
    bank = PromptBank(model, tok)
    bank.add("c", "{soft:2} question : {text} answer :", torch.randn(2, 32), kind="generation")
    bank.add("a", "{soft:2} review : {text} label :", torch.randn(2, 32), verbalizer={"pos": " good", "neg": " bad"})

    def run():
        for e in range(2):
            enc = seq2seq.encode(bank, torch.tensor([e]), [bank.suffix_ids(e, {"text": "why is my refund delayed"})])
            seq2seq.greedy_generate(bank, enc, max_new_tokens=3, stop_ids=set(), use_cache=True)
            seq2seq.label_logprobs(bank, enc) if e == 1 else None

    assert _cache_complaints(run) == []


def test_the_name_is_read_from_the_forward_signature_and_output_fields():
    """Both ends of the range, without installing both: a 5.0-style module and output use
    ``past_key_values``, a current one ``cache``."""
    from softprompt.core.cache_api import cache_arg, output_cache

    class Old(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, use_cache=None, **kwargs):
            return past_key_values

    class New(torch.nn.Module):
        def forward(self, input_ids=None, cache=None, use_cache=None, **kwargs):
            return cache

    assert cache_arg(Old(), "kv") == {"past_key_values": "kv"}
    assert cache_arg(New(), "kv") == {"cache": "kv"}
    assert Old()(**cache_arg(Old(), "kv")) == "kv" and New()(**cache_arg(New(), "kv")) == "kv"

    @dataclass
    class OldOut:
        last_hidden_state: int = 0
        past_key_values: str | None = None

    @dataclass
    class NewOut:
        last_hidden_state: int = 0
        cache: str | None = None

    assert output_cache(OldOut(past_key_values="kv")) == "kv"
    assert output_cache(NewOut(cache="kv")) == "kv"


def test_make_test_oldest_pins_pyprojects_lower_bound():
    """`make test-oldest` must test the release pyproject says is the oldest supported."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    bound = re.search(r'"transformers>=([0-9.]+),', (root / "pyproject.toml").read_text()).group(1)
    pinned = re.search(r"^OLDEST_TRANSFORMERS \?= ([0-9.]+)$", (root / "Makefile").read_text(), re.M).group(1)
    assert pinned.split(".")[:2] == bound.split(".")[:2], (pinned, bound)
