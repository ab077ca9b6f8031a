"""A hand-written prompt in the model's own chat format, built from its tokenizer's chat template.

Why: an instruction-tuned model reads a question best in the format it was tuned on; scoring
a plain "Instruction\\nTweet: ...\\nAnswer:" against a chat model undersells hand-written
prompts.  The format is taken from ``tokenizer.apply_chat_template`` (never hard-coded tokens):
one user turn holding the hard prompt, then the generation prompt (e.g. SmolLM2's
``<|im_start|>assistant\\n``), after which the label words are scored.  Label words after a
line break take no leading space (``templates.continue_with``), as the model writes them.
"""
from __future__ import annotations

from ..core.templates import Template, continue_with

__all__ = ["chat_template", "chat_verbalizer", "has_chat_template"]

_MARK = "\x00SOFTPROMPT_USER_TURN\x00"


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def chat_template(tokenizer, hard_template: str) -> str:
    """``hard_template`` (a template string with fields, no soft slots needed) as the content of one
    user turn, followed by the assistant's turn opening.  The BOS the chat template may start
    with is dropped: templates add BOS themselves."""
    if not has_chat_template(tokenizer):
        raise ValueError("this tokenizer has no chat template")
    text = tokenizer.apply_chat_template([{"role": "user", "content": _MARK}], tokenize=False,
                                         add_generation_prompt=True)
    if text.count(_MARK) != 1:
        raise ValueError("the chat template does not render the user message verbatim")
    before, after = text.split(_MARK)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and before.startswith(bos):
        before = before[len(bos):]
    Template(hard_template)  # fail early on a bad template
    return _escape(before) + hard_template.strip() + _escape(after)


def chat_verbalizer(verbalizer: dict[str, str], template: str) -> dict[str, str]:
    """The task's label words, spaced as they continue the chat template's assistant turn."""
    return {lab: continue_with(template, w.strip()) for lab, w in verbalizer.items()}
