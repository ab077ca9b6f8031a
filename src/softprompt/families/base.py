"""What every model family shares: the capability table and the one error for what a family
cannot do.  Kept apart from ``families/__init__.py`` so the family modules can build on it
without importing the package that imports them."""
from __future__ import annotations

PREFIX_UNSUPPORTED = (
    "prefix tuning (per-layer key/values) is not supported for encoder-decoder models such as T5; "
    "use prompt tuning (method 'prompt': {soft:N} tokens in the template, which feed the encoder)"
)


#: Training methods (``TrainConfig.method``, and compare's ``hybrid``: instruction text + soft tokens).
METHODS = ("prompt", "ptuning", "prefix", "hybrid")
#: Every capability a family may have, in table order.
CAPABILITY_NAMES = (*METHODS, "reparam", "rank_classification", "head_classification", "generation", "ensemble",
                    "serve", "vllm", "peft")
#: One-line meaning of each capability (the CLI prints it under the table).
CAPABILITY_HELP = {
    "prompt": "prompt tuning: soft tokens in the template",
    "ptuning": "P-tuning: soft tokens produced by a small trained encoder network",
    "prefix": "prefix tuning: learned key/values at every layer",
    "hybrid": "instruction text and soft tokens in one template",
    "reparam": "soft tokens trained through a residual MLP (the default recipe's reparam 'mlp')",
    "rank_classification": "classify by scoring each label word (verbalizer)",
    "head_classification": "classify with a linear head trained with the prompt",
    "generation": "greedy answers (generation tasks)",
    "ensemble": "several prompts voting in one pass (ensemble.py, compare's ensemble)",
    "serve": "the in-process server (softprompt serve, backend 'engine')",
    "vllm": "the vLLM serving backend (softprompt serve --backend vllm)",
    "peft": "HF PEFT prompt-tuning adapters (softprompt export / import)",
}

#: What each family supports.  This table is the code the checks read; tests hold it to behaviour.
CAPABILITIES: dict[str, frozenset[str]] = {
    "decoder": frozenset({"prompt", "ptuning", "prefix", "hybrid", "reparam", "rank_classification", "generation", "ensemble",
                          "serve", "vllm", "peft"}),
    "seq2seq": frozenset({"prompt", "ptuning", "hybrid", "reparam", "rank_classification", "generation"}),
    "encoder": frozenset({"prompt", "head_classification"}),
}

#: Why a combination is missing, where there is more to say than "not supported".
REASONS: dict[tuple[str, str], str] = {
    ("seq2seq", "prefix"): PREFIX_UNSUPPORTED,
    ("seq2seq", "ensemble"): "ensembles score all members on a decoder's shared prompt cache; encoder-decoder "
                             "models are not supported yet",
    ("seq2seq", "serve"): "the server batches on a decoder's prompt cache; encoder-decoder models cannot be served yet",
    ("seq2seq", "vllm"): "vLLM serves decoder-only models here",
    ("encoder", "serve"): "the server reads answers from a language-model head; encoder classifiers cannot be served",
    ("encoder", "vllm"): "vLLM serves decoder-only models here",
    ("seq2seq", "peft"): "PEFT interop supports decoder-only (CAUSAL_LM) models; this is an encoder-decoder "
                         "model, where PEFT prompt tuning also prepends virtual tokens to the decoder, which our "
                         "prompts do not have",
    ("encoder", "peft"): "PEFT interop supports decoder-only (CAUSAL_LM) models; an encoder prompt carries a trained "
                         "classification head, which a PEFT prompt-tuning adapter cannot hold",
    ("encoder", "generation"): "encoder models have no head to generate text with",
    ("encoder", "rank_classification"): "encoder models read classes with a trained head, not a verbalizer",
}


class UnsupportedError(ValueError):
    """A model family asked for something it does not support (see ``CAPABILITIES``)."""

    def __init__(self, family: str, capability: str, reason: str | None = None):
        self.family, self.capability = family, capability
        supported = ", ".join(c for c in CAPABILITY_NAMES if c in CAPABILITIES.get(family, ()))
        head = reason or f"{capability!r} is not supported for {FAMILY_TITLES.get(family, family)} models"
        super().__init__(f"{head} (family {family!r} does not support {capability!r}; it supports: {supported})")


#: How the families are named in messages and the CLI table.
FAMILY_TITLES = {
    "decoder": "decoder-only",
    "seq2seq": "encoder-decoder",
    "encoder": "encoder-only",
}


class FamilyBase:
    """The capability checks every family class inherits; ``name`` keys ``CAPABILITIES``."""

    name: str = ""
    examples: str = ""  # model types, for the CLI table

    @property
    def capabilities(self) -> frozenset[str]:
        return CAPABILITIES[self.name]

    def supports(self, capability: str) -> bool:
        if capability not in CAPABILITY_NAMES:
            raise ValueError(f"unknown capability {capability!r}; one of {', '.join(CAPABILITY_NAMES)}")
        return capability in self.capabilities

    def require(self, capability: str) -> None:
        """Raise :class:`UnsupportedError` unless this family supports ``capability``."""
        if not self.supports(capability):
            raise UnsupportedError(self.name, capability, REASONS.get((self.name, capability)))

    def classify_with_head(self, bank, entry, examples, *, batch_size: int = 32, progress: bool | str = False):
        """Classification by a head trained with the prompt (``scoring.classify`` asks families
        without rank classification)."""
        self.require("head_classification")

    def make_bank(self, model, tokenizer):
        """The bank that holds this family's prompts (decoder and encoder-decoder: a ``PromptBank``)."""
        from ..core.bank import PromptBank

        return PromptBank(model, tokenizer, family=self)

    #: Which trainable of ``training/`` trains this family's prompts (``training.prompt.TRAINERS``).
    trainable = "prompt"

    def check_method(self, method: str) -> None:
        """Refuse, before any work, a training method the family cannot run; an unknown method is
        the trainer's to report (``training.prompt.encoders_for``)."""
        if method in METHODS:
            self.require(method)

    def __repr__(self) -> str:
        return f"<{FAMILY_TITLES.get(self.name, self.name)} family>"
