"""What the serving engine passes around: its errors, a task's spec, the answers, and the
queued items (one example, one row per ensemble member) with their cancellable futures."""
from __future__ import annotations

import concurrent.futures as cf
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..apps.ensemble import COMBINE
from ..core.prompts import SoftPrompt
from ..core.templates import Template

# The ensemble vote's names are ensemble.py's; "majority" (the server's old name for "vote")
# is still accepted in manifests and requests, and kept as spelled in a task's spec.
VOTE_ALIASES = {"majority": "vote"}
VOTES = (*COMBINE, *VOTE_ALIASES)


def canonical_vote(vote: str) -> str:
    """``vote`` in ensemble.py's vocabulary (``"majority"`` -> ``"vote"``)."""
    return VOTE_ALIASES.get(vote, vote)


# ----------------------------------------------------------------------------- errors
class ServeError(Exception):
    """An error with an HTTP-ish status and a stable machine-readable code."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, code: str | None = None, **extra: Any):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.extra = extra


class UnknownTaskError(ServeError):
    status, code = 404, "unknown_task"


class InvalidInputError(ServeError):
    status, code = 422, "invalid_input"


class InputTooLongError(InvalidInputError):
    code = "input_too_long"


class WrongKindError(InvalidInputError):
    code = "wrong_task_kind"


class OverloadedError(ServeError):
    status, code = 503, "overloaded"

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message, retry_after=retry_after)
        self.retry_after = retry_after


class CancelledByClientError(ServeError):
    """The client went away (or cancelled the future); its work was dropped."""

    status, code = 499, "cancelled"


class ShuttingDownError(ServeError):
    status, code = 503, "shutting_down"


class NonFiniteResultError(ServeError):
    """The model's numbers came out NaN or infinite: refused rather than sent as null or NaN."""

    status, code = 422, "non_finite_result"


class PromptRejectedError(ServeError):
    status, code = 422, "prompt_rejected"


class ModelMismatchError(PromptRejectedError):
    code = "model_mismatch"


# ----------------------------------------------------------------------------- tasks
@dataclass(frozen=True, eq=False)
class TaskSpec:
    """One servable task: one prompt, or several (an ensemble) that vote."""

    name: str
    kind: str  # a TaskKind
    version: int
    members: tuple[str, ...]  # bank entry names, one per member prompt
    member_names: tuple[str, ...]  # human names of the members (file stems)
    templates: tuple[Template, ...]
    member_labels: tuple[tuple[str, ...], ...]  # each member's labels in its verbalizer order
    labels: tuple[str, ...]  # the task's labels (first member's order)
    fields: tuple[str, ...]  # input fields, shared by every member
    prefix_lens: tuple[int, ...]
    vote: str = "mean"
    source: str | None = None
    prompts: tuple[SoftPrompt, ...] = field(default=(), repr=False)

    @property
    def ensemble(self) -> bool:
        return len(self.members) > 1

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "version": self.version,
            "labels": list(self.labels),
            "fields": list(self.fields),
            "members": list(self.member_names),
            "ensemble": self.ensemble,
            "vote": self.vote if self.ensemble else None,
            "templates": [t.text for t in self.templates],
            "soft_tokens": [t.n_soft for t in self.templates],
            "prefix_tokens": list(self.prefix_lens),
            "method": self.prompts[0].method if self.prompts else None,
        }


@dataclass
class ClassifyResult:
    task: str
    version: int
    label: str
    probabilities: dict[str, float]
    scores: dict[str, float] | None = None  # summed label log-probs (single prompt only)
    votes: dict[str, int] | None = None  # ensembles: members voting for each label
    members: list[dict[str, Any]] | None = None  # ensembles: each member's label and probabilities


@dataclass
class GenerateResult:
    task: str
    version: int
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    members: list[dict[str, Any]] | None = None


# ----------------------------------------------------------------------------- items
class ItemFuture(cf.Future):
    """A future whose ``cancel()`` also stops work that is already running: a queued item
    is skipped when a batch is formed (plain future cancellation), a running one is marked
    abandoned and its generation rows leave the decode loop at the next step.  asyncio's
    ``wrap_future`` calls ``cancel()`` here when the awaiting task is cancelled.  It holds
    the flag, not the item, so item and future form no reference cycle (an item pins its
    task version until it is collected)."""

    def __init__(self, task: str, op: str):
        super().__init__()
        self.task, self.op = task, op
        self.abandoned = False

    def cancel(self) -> bool:
        self.abandoned = True
        return super().cancel()


class Item:
    """One example waiting for (or being run in) a batch: one row per ensemble member."""

    __slots__ = (
        "op", "task", "fields", "spec", "suffixes", "rows", "future", "t_submit", "vote",
        "max_new_tokens", "stop_at_newline", "stop_strings", "on_token",
    )

    def __init__(self, op: str, task: str, fields: dict[str, str], spec: TaskSpec, suffixes: list[list[int]]):
        self.op = op
        self.task = task
        self.fields = fields
        self.spec = spec
        self.suffixes = suffixes
        self.rows = len(suffixes)
        self.future: ItemFuture = ItemFuture(task, op)
        self.t_submit = time.perf_counter()
        self.vote: str | None = None
        self.max_new_tokens = 0
        self.stop_at_newline = True
        self.stop_strings: tuple[str, ...] = ()
        self.on_token: Callable[[list[int]], None] | None = None

    @property
    def abandoned(self) -> bool:
        """The client went away (its future was cancelled): drop the work, answer nobody."""
        return self.future.abandoned

    @abandoned.setter
    def abandoned(self, value: bool) -> None:
        self.future.abandoned = value

