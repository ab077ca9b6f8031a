"""Tiny, randomly initialised models and tokenizers for fast, exact tests.

Mechanics (padding, mixed batches, save/load, caching) are checked on these in
milliseconds; behaviour (loss falls, accuracy beats a baseline) is checked on the
embedded real model.  Nothing here touches the network.
"""
from __future__ import annotations

import os
import string

import torch


def tiny_device() -> torch.device:
    """Where the tiny models live: ``SOFTPROMPT_TEST_DEVICE`` (default ``cpu``).  Running the
    suite with ``SOFTPROMPT_TEST_DEVICE=cuda`` on a GPU machine checks that no code path
    mixes devices."""
    return torch.device(os.environ.get("SOFTPROMPT_TEST_DEVICE", "cpu"))

TINY_WORDS = (
    "the a an is was not no yes good bad great awful movie film tweet complaint service "
    "label answer question context positive negative neutral love hate slow fast broken "
    "help please thanks why what who where when how delayed flight order refund support "
    "happy sad terrible amazing world sports business science tech true false maybe "
    "entailment contradiction passage premise hypothesis sentence text review it this that"
).split()


def tiny_tokenizer():
    """A word-level fast tokenizer with BOS/EOS/PAD/UNK, lowercase words and punctuation.

    Leading spaces are dropped by the whitespace pre-tokenizer, so " good" and "good"
    tokenize alike, which is all the mechanics tests need.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for w in list(TINY_WORDS) + list(string.ascii_lowercase) + list(string.digits) + list(
        string.punctuation
    ):
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def tiny_causal_lm(
    family: str = "llama", *, vocab_size: int = 160, hidden: int = 32, layers: int = 2, seed: int = 0, init_std: float = 0.3
):
    """A frozen, fp32, eval-mode decoder-only LM of the given family with random weights.

    ``init_std`` is much larger than the usual 0.02 so that the tiny network is far from a
    uniform predictor and a few soft tokens can move its outputs (training tests need that).
    """
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

    torch.manual_seed(seed)
    if family == "llama":
        cfg = LlamaConfig(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, tie_word_embeddings=True,
            bos_token_id=1, eos_token_id=2, pad_token_id=3, initializer_range=init_std,
        )
    elif family == "qwen2":
        cfg = Qwen2Config(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=3, initializer_range=init_std,
        )
    elif family == "gpt2":
        cfg = GPT2Config(
            vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=4, n_positions=512,
            bos_token_id=1, eos_token_id=2, pad_token_id=3, initializer_range=init_std,
        )
    else:
        raise ValueError(f"unknown tiny family {family!r}; use llama, qwen2 or gpt2")
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).to(tiny_device())
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.softprompt_name = f"tiny-{family}-{seed}"
    return model


def tiny_t5(*, vocab_size: int = 160, hidden: int = 32, layers: int = 2, seed: int = 0, init_factor: float = 1.5):
    """A frozen, fp32, eval-mode T5ForConditionalGeneration with random weights, sized for
    :func:`tiny_tokenizer` (pad 3 is also the decoder start token, EOS 2).

    ``init_factor`` scales T5's own initialisation (like ``init_std`` above) so that the
    tiny encoder-decoder is far from a uniform predictor.  No pre-trained T5 weights are
    available offline; this model checks mechanics only.
    """
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=vocab_size, d_model=hidden, d_kv=hidden // 4, d_ff=2 * hidden, num_layers=layers,
        num_decoder_layers=layers, num_heads=4, relative_attention_num_buckets=8,
        relative_attention_max_distance=32, dropout_rate=0.0, initializer_factor=init_factor,
        pad_token_id=3, eos_token_id=2, bos_token_id=1, decoder_start_token_id=3,
    )
    model = T5ForConditionalGeneration(cfg).to(torch.float32).to(tiny_device())
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.softprompt_name = f"tiny-t5-{seed}"
    return model
