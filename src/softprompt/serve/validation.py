"""What the engine checks before anything reaches the model: a task's prompts when they are
registered, and each request's input fields and token counts when it is submitted.

The checks read their limits from ``owner``: the :class:`~softprompt.serve.engine.Engine` or
the vLLM backend, anything with ``identity``, ``tokenizer``, ``tokenizer_lock``,
``max_positions``, ``input_embeddings`` and the ``max_*`` limits of
:class:`~softprompt.serve.config.EngineConfig`.  Prompt values are checked against the
model's own scale (``values.py``), not only for finiteness: 3e38 is finite but overflows.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ..core.bank import check_soft_fit
from ..core.calibration import Calibration
from ..core.prompt_meta import MAX_LABEL_CHARS
from ..core.prompts import PromptMismatchError, SoftPrompt
from ..core.templates import Template, TemplateError, encode_text
from ..data.task import TaskKind
from .spec import VOTES, InputTooLongError, InvalidInputError, ModelMismatchError, PromptRejectedError, TaskSpec
from .values import check_values


def check_prompts(owner: Any, name: str, prompts: list[SoftPrompt], member_names: list[str], vote: str) -> dict:
    """The parts of a TaskSpec that ``prompts`` give, or PromptRejectedError (nothing is changed)."""
    if not prompts:
        raise PromptRejectedError(f"task {name!r}: no prompts given")
    if len(member_names) != len(prompts):
        raise PromptRejectedError(f"task {name!r}: {len(member_names)} member names for {len(prompts)} prompts")
    if vote not in VOTES:
        raise PromptRejectedError(f"task {name!r}: vote must be one of {VOTES}, got {vote!r}")
    kinds = {p.kind for p in prompts}
    if len(kinds) != 1 or next(iter(kinds)) not in (TaskKind.CLASSIFICATION, TaskKind.GENERATION):
        raise PromptRejectedError(
            f"task {name!r}: prompts must share one kind (classification or generation), got {sorted(map(str, kinds))}")
    kind = next(iter(kinds))
    templates, member_labels, prefix_lens, fields = [], [], [], None
    for p, mname in zip(prompts, member_names):
        what = f"task {name!r} prompt {mname!r}"
        try:
            p.identity.check(owner.identity, what=what)
        except PromptMismatchError as e:
            raise ModelMismatchError(str(e)) from None
        if isinstance(p.template, str) and len(p.template) > 64 * owner.max_template_tokens:
            raise PromptRejectedError(  # refused before tokenizing megabytes (a token is rarely over 64 chars)
                f"{what}: its template has {len(p.template)} characters; the limit is "
                f"{owner.max_template_tokens} tokens (max_template_tokens)", code="template_too_long")
        if kind == TaskKind.CLASSIFICATION and p.verbalizer and len(p.verbalizer) > owner.max_labels:
            raise PromptRejectedError(
                f"{what}: {len(p.verbalizer)} labels; the limit is {owner.max_labels} (max_labels)",
                code="too_many_labels")
        long_label = next((lab for lab in p.verbalizer or {} if not isinstance(lab, str) or len(lab) > MAX_LABEL_CHARS), None)
        if long_label is not None:  # every answer repeats each label name (the artifact schema refuses it too)
            raise PromptRejectedError(
                f"{what}: a label name is not a string of at most {MAX_LABEL_CHARS} characters "
                f"({len(str(long_label))} characters)", code="label_too_long")
        try:
            t = Template(p.template)
        except TemplateError as e:
            raise PromptRejectedError(f"{what}: bad template: {e}") from None
        emb = p.embeddings
        check_soft_fit(what, t, emb, owner.identity.hidden_size, PromptRejectedError)
        check_values(owner, what, p)
        if p.calibration is not None and p.calibration.active:
            try:  # validated again: the object may have been changed since it was built
                Calibration(p.calibration.method, p.calibration.log_prior)
            except ValueError as e:
                raise PromptRejectedError(f"{what}: bad calibration ({e})", code="values_out_of_range") from None
            if len(p.calibration.log_prior or ()) != len(p.labels):
                raise PromptRejectedError(f"{what}: calibration has {len(p.calibration.log_prior or ())} "
                                          f"log-priors for {len(p.labels)} labels")
        if not t.fields:
            raise PromptRejectedError(f"{what}: template {t.text!r} has no input field such as {{text}}")
        if fields is None:
            fields = t.fields
        elif set(t.fields) != set(fields):
            raise PromptRejectedError(f"{what}: input fields {list(t.fields)} differ from the other members' {list(fields)}")
        with owner.tokenizer_lock:
            plen = len(t.prefix_ids(owner.tokenizer))
            fixed = len(t.suffix_ids(owner.tokenizer, {f: "" for f in t.fields}))  # the template's share of an input
            if kind == TaskKind.CLASSIFICATION:
                if not p.verbalizer:
                    raise PromptRejectedError(f"{what}: a classification prompt needs a verbalizer")
                for lab, word in p.verbalizer.items():
                    if isinstance(word, str) and len(word) > 64 * owner.max_label_tokens:
                        raise PromptRejectedError(
                            f"{what}: verbalizer word for label {lab!r} has {len(word)} characters; the limit "
                            f"is {owner.max_label_tokens} tokens (max_label_tokens)", code="label_too_long")
                    n_word = len(encode_text(owner.tokenizer, word)) if isinstance(word, str) else 0
                    if not n_word:
                        raise PromptRejectedError(f"{what}: verbalizer word for label {lab!r} has no tokens")
                    if n_word > owner.max_label_tokens:
                        raise PromptRejectedError(
                            f"{what}: verbalizer word for label {lab!r} is {n_word} tokens; the limit is "
                            f"{owner.max_label_tokens} (max_label_tokens)", code="label_too_long")
        head = plen + p.n_prefix
        if head > owner.max_template_tokens:
            raise PromptRejectedError(
                f"{what}: its fixed prefix (template head{' and learned prefix' if p.n_prefix else ''}) is "
                f"{head} tokens; the limit is {owner.max_template_tokens} (max_template_tokens)",
                code="template_too_long")
        if plen >= owner.max_positions:
            raise PromptRejectedError(
                f"{what}: its prefix ({plen} tokens) does not fit the model's {owner.max_positions} positions")
        if fixed >= owner.max_input_tokens or plen + fixed >= owner.max_positions:
            raise PromptRejectedError(  # else every request would be refused as too long
                f"{what}: with an empty input its template already takes {fixed} input tokens ({plen + fixed} "
                f"positions with its prefix), leaving no room for an input: the limits are {owner.max_input_tokens} "
                f"tokens (max_input_tokens) and the model's {owner.max_positions} positions", code="template_too_long")
        templates.append(t)
        prefix_lens.append(plen)
        member_labels.append(tuple(p.labels))
    if kind == TaskKind.CLASSIFICATION and len({frozenset(m) for m in member_labels}) != 1:
        raise PromptRejectedError(
            f"task {name!r}: ensemble members have different label sets {[list(m) for m in member_labels]}")
    return dict(
        kind=kind, member_names=tuple(member_names), templates=tuple(templates),
        member_labels=tuple(member_labels), labels=member_labels[0], fields=tuple(fields or ()),
        prefix_lens=tuple(prefix_lens),
    )


def input_fields(owner: Any, spec: TaskSpec, value: str | Mapping[str, str]) -> dict[str, str]:
    """A request's input as the task's fields (a bare string fills a one-field template)."""
    if isinstance(value, str):
        if len(spec.fields) != 1:
            raise InvalidInputError(
                f"task {spec.name!r} takes the fields {list(spec.fields)}; send an object with each of them, not a string")
        fields = {spec.fields[0]: value}
    elif isinstance(value, Mapping):
        fields = dict(value)
        missing = [f for f in spec.fields if f not in fields]
        extra = [f for f in fields if f not in spec.fields]
        if missing or extra:
            raise InvalidInputError(
                f"task {spec.name!r} takes the fields {list(spec.fields)}"
                + (f"; missing {missing}" if missing else "") + (f"; unknown {extra}" if extra else ""))
    else:
        raise InvalidInputError(f"an input must be a string or an object of strings, got {type(value).__name__}")
    for k, v in fields.items():
        if not isinstance(v, str):
            raise InvalidInputError(f"field {k!r} must be a string, got {type(v).__name__}")
        if not v.strip():
            raise InvalidInputError(f"field {k!r} is empty")
        if len(v) > owner.max_input_chars:
            raise InputTooLongError(f"field {k!r} has {len(v)} characters; the limit is {owner.max_input_chars}")
    return fields

def suffixes(owner: Any, spec: TaskSpec, fields: dict[str, str], extra_tokens: int = 0) -> list[list[int]]:
    """Each member's rendered input ids, within the input and position limits."""
    with owner.tokenizer_lock:
        suffixes = [t.suffix_ids(owner.tokenizer, fields) for t in spec.templates]
    n = max(len(s) for s in suffixes)
    if n > owner.max_input_tokens:
        raise InputTooLongError(f"the input is {n} tokens long after the template; the limit is {owner.max_input_tokens}")
    total = max(p + len(s) for p, s in zip(spec.prefix_lens, suffixes)) + extra_tokens
    if total > owner.max_positions:
        raise InputTooLongError(
            f"prompt + input + new tokens = {total} positions; the model has {owner.max_positions}")
    return suffixes


#: bytes of one JSON number with its separators ("name": -1.2345678901234567e-05, )
_NUMBER_BYTES = 32


def response_bytes(spec: TaskSpec, n_inputs: int) -> int:
    """An upper estimate of the JSON answer to ``n_inputs`` classify inputs (``/v1/classify`` or
    ``/v1/completions``): every per-label map repeats every label name, so the answer grows
    as inputs x labels x name length (x members for an ensemble's per-member maps)."""
    names = [len(json.dumps(lab)) for lab in spec.labels]
    per_map = sum(names) + _NUMBER_BYTES * len(names)
    longest = max(names, default=2)
    if spec.ensemble:  # probabilities and votes, then each member's name, label and probabilities
        per_input = 2 * per_map + sum(len(json.dumps(m)) + longest + 64 + per_map for m in spec.member_names)
    else:  # probabilities, scores (or the completion's top_logprobs), and the label up to three times
        per_input = 3 * per_map + 3 * longest
    return n_inputs * (per_input + 256)


def check_response_size(owner: Any, spec: TaskSpec, n_inputs: int) -> None:
    """Refuse a classify request whose answer would exceed ``owner.max_response_bytes``, before any work."""
    if spec.kind != TaskKind.CLASSIFICATION:
        return
    size, limit = response_bytes(spec, n_inputs), owner.max_response_bytes
    if size > limit:
        raise InvalidInputError(
            f"the answer to {n_inputs} inputs of task {spec.name!r} ({len(spec.labels)} labels"
            + (f", {len(spec.members)} members" if spec.ensemble else "")
            + f") would be about {size} bytes; the limit is {limit} (max_response_bytes): send fewer inputs",
            code="response_too_large")
