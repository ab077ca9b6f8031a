"""The schema of a prompt artifact's metadata (the JSON under ``"softprompt"`` in the
safetensors header), checked before any of it is used.

An artifact can come from anywhere (an upload to the server, a file someone hands you), so
its header is untrusted input: a wrong type must be a clear :class:`PromptFileError`, not an
``AttributeError`` deep inside loading (which a server answers with 500).  One schema serves
every reader (``SoftPrompt.load``, hence ``PromptBank``, the CLI and the server).  Unknown keys
are kept and ignored, so newer writers stay readable.
"""
from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import (
    BaseModel, ConfigDict, Field, StrictInt, StrictStr, StringConstraints, ValidationError, field_validator,
)

from ..data.task import TaskKind
from .method import Method

#: the longest metadata JSON accepted (bytes); real headers are a few KB
MAX_META_CHARS = 4 << 20
#: nesting depth accepted in the metadata JSON (real headers nest 3-4 levels)
MAX_META_DEPTH = 64
#: the longest label name: every classify answer repeats each name, so this bounds answer size
MAX_LABEL_CHARS = 256
#: the longest verbalizer word (the server's token limit is far below: 16 tokens by default)
MAX_WORD_CHARS = 1024
#: the longest template (the server also limits its prefix to max_template_tokens)
MAX_TEMPLATE_CHARS = 1 << 18
#: the longest model name or path, task name and tensor name
MAX_NAME_CHARS = 1024
#: the longest short keyword (kind, method, init, pooling, calibration method, fingerprint)
MAX_WORD_KEY_CHARS = 128


def _str(n: int):
    """A strict string of at most ``n`` characters (every string a reader uses is bounded)."""
    return Annotated[StrictStr, StringConstraints(max_length=n)]


Label = _str(MAX_LABEL_CHARS)
Word = _str(MAX_WORD_CHARS)
Name = _str(MAX_NAME_CHARS)
Key = _str(MAX_WORD_KEY_CHARS)


class PromptFileError(ValueError):
    """A file that is not a readable softprompt artifact (also importable from ``prompts``)."""


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class BaseModelMeta(_Lenient):
    name: Name
    hidden_size: StrictInt = Field(ge=1)
    vocab_size: StrictInt = Field(ge=1)
    embedding_fingerprint: Key


class HeadMeta(_Lenient):
    pooling: Key | None = None
    tensors: list[Name] = Field(default=[], max_length=64)


class CalibrationMeta(_Lenient):
    """``calibration.Calibration.to_dict()``."""

    method: Key = "none"
    log_prior: list[float] | None = None


class PromptMeta(_Lenient):
    """What ``SoftPrompt.load`` reads; every other key is allowed and ignored."""

    format_version: StrictInt
    base_model: BaseModelMeta
    template: _str(MAX_TEMPLATE_CHARS)  # type: ignore[valid-type]
    verbalizer: dict[Label, Word] | None = None
    task: Name | None = ""
    kind: Key = TaskKind.CLASSIFICATION.value
    method: Key = Method.PROMPT_TUNING.value
    init: Key | None = ""
    training: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    head: HeadMeta | None = None
    calibration: CalibrationMeta | None = None  # absent = none

    @field_validator("method")
    @classmethod
    def _one_spelling(cls, v: str) -> str:
        return Method.normalize(v)  # "prompt", "PROMPT_TUNING" -> "prompt_tuning"; unknown words kept


def _depth(text: str) -> int:
    """Deepest bracket nesting outside strings (checked before ``json.loads``, which would
    recurse once per level and raise RecursionError on a 100k-deep document)."""
    depth = best = 0
    in_str = esc = False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth > best:
                best = depth
                if best > MAX_META_DEPTH:
                    return best
        elif ch in "]}":
            depth -= 1
    return best


def load_bounded_json(text: Any, where: str, what: str = "the softprompt metadata") -> Any:
    """``json.loads`` for untrusted text: at most MAX_META_CHARS characters and MAX_META_DEPTH
    levels, else PromptFileError (never RecursionError).  Shared by artifact metadata and the
    server's manifests, so every JSON a server reads from disk or a client has one set of bounds."""
    if not isinstance(text, str):
        raise PromptFileError(f"{where}: {what} must be a JSON string")
    if len(text) > MAX_META_CHARS:
        raise PromptFileError(f"{where}: {what} is {len(text)} characters; the limit is {MAX_META_CHARS}")
    if _depth(text) > MAX_META_DEPTH:
        raise PromptFileError(f"{where}: {what} nests deeper than {MAX_META_DEPTH} levels")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise PromptFileError(f"{where}: {what} is not valid JSON ({e})") from None


def parse_meta(text: Any, where: str) -> PromptMeta:
    """Parse and validate the metadata JSON of the artifact at ``where``."""
    raw = load_bounded_json(text, where)
    if not isinstance(raw, dict):
        raise PromptFileError(f"{where}: the softprompt metadata must be a JSON object, got {type(raw).__name__}")
    try:
        return PromptMeta.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(map(_short, err['loc'])) or 'metadata'}: {err['msg']}" for err in e.errors()[:5])
        raise PromptFileError(f"{where}: invalid softprompt metadata ({problems})") from None


def _short(part: Any, n: int = 40) -> str:
    """A location part for an error message (a 40,000-character label name is cut, not echoed)."""
    text = str(part)
    return text if len(text) <= n else f"{text[:n]}...({len(text)} characters)"
