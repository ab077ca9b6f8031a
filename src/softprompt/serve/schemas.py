"""The HTTP API's request and response bodies (pydantic), as the OpenAPI schema shows them."""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

SCHEMA_MAX_CHARS = 100_000  # hard ceiling in the schema; the engine enforces its (smaller) configured limit


# ----------------------------------------------------------------------------- schemas
Text = Annotated[StrictStr, Field(min_length=1, max_length=SCHEMA_MAX_CHARS)]
Fields = Annotated[dict[Annotated[StrictStr, Field(max_length=64)], Text], Field(min_length=1, max_length=16)]
InputValue = Union[Text, Fields]
# JSON's NaN / Infinity (which Python's json module accepts) are no numbers a request may carry
FiniteNumber = Annotated[float, Field(strict=True, allow_inf_nan=False)]
TaskName = Annotated[StrictStr, Field(min_length=1, max_length=64, description="a task name, see GET /v1/tasks")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClassifyRequest(_Strict):
    task: TaskName
    inputs: Annotated[list[InputValue], Field(min_length=1, description=(
        "texts, or objects mapping each of the task's input fields to text"))]
    vote: Literal["mean", "vote", "majority"] | None = Field(None, description=(
        "ensembles: override the task's vote (\"majority\" is an alias of \"vote\")"))


class LabelResult(BaseModel):
    label: str
    probabilities: dict[str, float]
    scores: dict[str, float] | None = Field(None, description="summed log-probs of each label word (single prompts)")
    votes: dict[str, int] | None = Field(None, description="ensembles: members voting for each label")
    members: list[dict[str, Any]] | None = None


class ClassifyResponse(BaseModel):
    task: str
    version: int
    model: str
    results: list[LabelResult]


class GenerateRequest(_Strict):
    task: TaskName
    input: InputValue
    max_new_tokens: StrictInt = Field(32, ge=1, description="upper bound on new tokens (server limit applies)")
    stop_at_newline: StrictBool = True
    stop: Annotated[list[Annotated[StrictStr, Field(min_length=1, max_length=64)]], Field(max_length=4)] | None = None
    stream: StrictBool = Field(False, description="stream tokens as server-sent events")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerateResponse(BaseModel):
    task: str
    version: int
    model: str
    text: str
    finish_reason: str
    usage: Usage
    members: list[dict[str, Any]] | None = None


class CompletionRequest(BaseModel):
    """The OpenAI legacy completions request; unknown OpenAI fields are accepted and ignored.
    Decoding is greedy (``temperature``/``top_p`` are ignored), except on the vLLM backend,
    which samples when ``temperature`` > 0 (with ``top_p`` and ``seed``)."""

    model_config = ConfigDict(extra="allow")
    model: Annotated[StrictStr, Field(min_length=1, max_length=200, description='"<base>:<task>", see GET /v1/models')]
    prompt: Union[Text, Annotated[list[Text], Field(min_length=1)]]
    max_tokens: StrictInt | None = Field(16, ge=1)
    temperature: Annotated[FiniteNumber, Field(ge=0, le=2)] | None = None  # OpenAI's range
    top_p: Annotated[FiniteNumber, Field(gt=0, le=1)] | None = None
    seed: StrictInt | None = Field(None, ge=0, le=2**63 - 1, description="vLLM backend: the sampling seed")
    n: StrictInt = Field(1, ge=1, le=1, description="only 1 is supported (decoding is greedy)")
    stream: StrictBool = False
    stop: Union[Annotated[StrictStr, Field(min_length=1, max_length=64)],
                Annotated[list[Annotated[StrictStr, Field(min_length=1, max_length=64)]], Field(max_length=4)], None] = None
    logprobs: StrictInt | None = Field(None, ge=0, le=5, description=(
        "classification tasks: the labels' log-probabilities are returned; generation tasks: not supported (422)"))
    echo: StrictBool = False
    user: StrictStr | None = None
