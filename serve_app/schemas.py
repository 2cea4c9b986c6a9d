"""Request/response bodies (docs/API.md) and the mapping of an exception to its HTTP error (Ray's: deployments/errors.py).

Requests are strict (no "3" for 3, no "yes" for true) and reject unknown fields, so a typo is a 422
naming the field instead of a silently ignored option.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator
from typing_extensions import NotRequired, TypedDict  # pydantic needs typing_extensions' TypedDict before 3.12

from models.errors import DeviceMemoryError, InputError, ModelLoadError

# ----------------------------------------------------------------------------------------------- requests

Direction = Literal["right", "left"]
LongDocuments = Literal["truncate", "chunk"]


def _long_documents():
    return Field(default=None, description='"truncate" or "chunk" (docs/API.md); null: the model\'s setting.')


def _top_n():
    # Integers of any size are taken (JSON has no limit) and clamped where applied, the same on every family.
    return Field(default=None, description="only the best top_n results; >= 1, any size (more than the candidates "
                                           "returns them all)")


PredictInputs = Union[str, list[str], list[list[str]]]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Truncation(_Request):
    truncate: bool | None = Field(default=None, description="null: server default (true). false: an over-long "
                                                            "input is a 422 instead of being cut.")
    truncation_direction: Direction = Field(default="right", description='"Right" or "Left", any case.')

    @field_validator("truncation_direction", mode="before")
    @classmethod
    def _any_case(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v


class RerankRequest(_Truncation):
    """POST /rerank (text-embeddings-inference)."""

    query: str
    texts: list[str]
    raw_scores: bool = False
    return_text: bool = False
    model: str | None = None
    instruction: str | None = None
    top_n: PositiveInt | None = _top_n()
    long_documents: LongDocuments | None = _long_documents()


class PredictRequest(_Truncation):
    """POST /predict (text-embeddings-inference): one input or a batch of inputs of one or two texts."""

    inputs: PredictInputs = Field(description='"a", ["a"], ["a", "b"] (one pair) or [["a"], ["a", "b"], ...]')
    raw_scores: bool = False
    model: str | None = None
    instruction: str | None = None
    long_documents: LongDocuments | None = _long_documents()


class TokenizeRequest(_Truncation):
    """POST /tokenize: what the model sees for `inputs` (same shapes as /predict)."""

    inputs: PredictInputs
    model: str | None = None
    instruction: str | None = None
    long_documents: LongDocuments | None = Field(default=None, description="accepted and ignored: /tokenize "
                                                                          "shows the truncated input")


class Document(BaseModel):
    """A Cohere document object; only `text` is ranked, other fields are accepted and ignored."""

    model_config = ConfigDict(extra="allow", strict=True)
    text: str


class CohereRerankRequest(_Request):
    """POST /v1/rerank and /v2/rerank (Cohere, Jina, vLLM)."""

    model: str | None = None
    query: str
    documents: list[Union[str, Document]]
    top_n: PositiveInt | None = _top_n()
    return_documents: bool = False
    max_tokens_per_doc: PositiveInt | None = Field(
        default=None, description="each document cut to at most this many tokens; >= 1, any size (more than a "
                                  "document has cuts nothing)")
    instruction: str | None = None
    long_documents: LongDocuments | None = _long_documents()

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


def predict_items(inputs: PredictInputs) -> tuple[list[tuple[str, str | None]], bool]:
    """(items, is_batch) of a /predict `inputs`; shape errors raise ApiError (docs/API.md, POST /predict)."""
    if isinstance(inputs, str):
        groups, is_batch = [[inputs]], False
    elif inputs and all(isinstance(x, str) for x in inputs):
        groups, is_batch = [inputs], False
    else:
        groups, is_batch = list(inputs), True
    if not groups or (not is_batch and not groups[0]):
        raise ApiError(400, "Empty", "`inputs` is empty: send a text, a pair of texts, or a list of them")
    items: list[tuple[str, str | None]] = []
    for i, group in enumerate(groups):
        where = f"`inputs[{i}]`" if is_batch else "`inputs`"
        if len(group) not in (1, 2):
            raise ApiError(422, "Validation", f"{where} has {len(group)} texts: an input is one text or a pair "
                                              "of two; send a batch as [[\"a\"], [\"a\", \"b\"], ...]")
        if not group[0]:
            raise ApiError(400, "Empty", f"the first text of {where} is empty")
        items.append((group[0], group[1] if len(group) == 2 else None))
    return items, is_batch


# ---------------------------------------------------------------------------------------------- responses
# The one description of each response body: the service builds these dicts, the routes serialise them through
# the same types (`TypeAdapter.dump_json`, in Rust; a key that is not declared here is never written) and /docs
# shows them. A `NotRequired` key is absent unless the request asks for it (docs/API.md, Routes).

Score = Annotated[float | None, Field(description="null when not finite (JSON has no NaN)")]


class RerankResult(TypedDict):
    index: int
    score: Score
    text: NotRequired[Annotated[str, Field(description="only with return_text")]]


class PredictScore(TypedDict):
    score: Score
    label: str


class TokenizedInput(TypedDict):
    ids: list[int]
    tokens: list[str]
    token_type_ids: NotRequired[Annotated[list[int], Field(description="only for models that use them")]]
    num_tokens: int


class CohereDocument(TypedDict):
    text: str


class CohereResult(TypedDict):
    index: int
    relevance_score: Score
    document: NotRequired[Annotated[CohereDocument, Field(description="only with return_documents")]]


class CohereBilledUnits(TypedDict):
    search_units: int


class CohereTokens(TypedDict):
    input_tokens: int


class CohereMeta(TypedDict):
    billed_units: CohereBilledUnits
    tokens: CohereTokens


class CohereUsage(TypedDict):
    total_tokens: int


class CohereRerankResponse(TypedDict):
    id: str
    model: str
    results: list[CohereResult]
    meta: CohereMeta
    usage: CohereUsage


RerankResponse = list[RerankResult]
PredictResponse = Union[list[PredictScore], list[list[PredictScore]]]  # one input / a batch of inputs
TokenizeResponse = list[TokenizedInput]


class ErrorBody(BaseModel):
    error: str
    error_type: str


# ------------------------------------------------------------------------------------------------- errors

class ApiError(Exception):
    """An error response of docs/API.md, Errors raised anywhere in request handling."""

    def __init__(self, status: int, error_type: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(status, error_type, message, headers)
        self.status, self.error_type, self.message = status, error_type, message
        self.headers = dict(headers or {})

    def __str__(self) -> str:
        return f"{self.status} {self.error_type}: {self.message}"


_STATUS_TYPES = {400: "Validation", 401: "Unauthorized", 404: "NotFound", 405: "MethodNotAllowed",
                 413: "PayloadTooLarge", 415: "Validation", 422: "Validation", 429: "Overloaded",
                 503: "Unhealthy"}


def _format_loc(loc: tuple) -> str:
    parts = [str(p) for p in loc if p != "body"]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or "body"


def validation_message(errors: list[dict]) -> str:
    """One line per pydantic error: `texts[2]: Input should be a valid string`."""
    lines = []
    for e in errors[:10]:
        loc = _format_loc(tuple(e.get("loc", ())))
        lines.append(f"{loc}: {e.get('msg', 'invalid')}")
    if len(errors) > 10:
        lines.append(f"... and {len(errors) - 10} more")
    return "; ".join(lines)


def map_exception(exc: BaseException) -> ApiError:
    """The HTTP error for an exception of the HTTP layer or of models/ (docs/API.md, Errors); no Ray here.

    Bad input becomes a 4xx; a model that could not load, or a sequence its device had no memory for even alone, a
    503; anything else a JSON 500 (a bug, never caused by the request's content). Ray's exceptions are mapped at
    the Ray boundary (deployments/errors.py), which falls back on this.
    """
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, RequestValidationError):
        errors = list(exc.errors())
        if any(e.get("type") == "json_invalid" for e in errors):
            detail = next((e.get("ctx", {}).get("error") for e in errors if e.get("type") == "json_invalid"), "")
            return ApiError(400, "Validation", f"the body is not valid JSON ({detail})".replace(" ()", ""))
        return ApiError(422, "Validation", validation_message(errors))
    if isinstance(exc, HTTPException):
        error_type = _STATUS_TYPES.get(exc.status_code, "Error")
        message = str(exc.detail)
        if exc.status_code == 400 and "parsing the body" in message:
            message = "the body could not be decoded: send UTF-8 encoded JSON"
        return ApiError(exc.status_code, error_type, message, dict(exc.headers or {}))
    if isinstance(exc, InputError):
        return ApiError(422, "Validation", str(exc))
    if isinstance(exc, ModelLoadError):
        return ApiError(503, "Unhealthy", str(exc))
    if isinstance(exc, DeviceMemoryError):  # this request, on this deployment's device share, now
        return ApiError(503, "Unhealthy", f"{exc}; retry later, or send shorter texts")
    return ApiError(500, "Internal", f"internal error ({type(exc).__name__}); the request itself may be fine")
