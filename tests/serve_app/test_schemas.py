"""Request parsing (every /predict input shape) and the exception -> HTTP error mapping of docs/API.md, Errors
(serve_app's part, without Ray; Ray's exceptions: tests/deployments/test_errors.py)."""
from __future__ import annotations

import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from models.errors import (DeviceMemoryError, InputTooLongError, InstructionNotSupportedError, ModelLoadError,
                           PairRequiredError)
from serve_app.schemas import (ApiError, CohereRerankRequest, PredictRequest, RerankRequest, map_exception,
                               predict_items)


@pytest.mark.parametrize("inputs, items, is_batch", [
    ("a", [("a", None)], False),
    (["a"], [("a", None)], False),
    (["a", "b"], [("a", "b")], False),
    ([["a"]], [("a", None)], True),
    ([["a", "b"], ["c"], ["d", ""]], [("a", "b"), ("c", None), ("d", "")], True),
])
def test_predict_input_shapes(inputs, items, is_batch):
    req = PredictRequest.model_validate({"inputs": inputs})
    assert predict_items(req.inputs) == (items, is_batch)


@pytest.mark.parametrize("inputs, status", [
    ("", 400), ([], 400), ([""], 400), ([["", "b"]], 400),
    (["a", "b", "c"], 422), ([["a", "b", "c"]], 422), ([["a"], []], 422),
])
def test_predict_bad_shapes(inputs, status):
    with pytest.raises(ApiError) as e:
        predict_items(PredictRequest.model_validate({"inputs": inputs}).inputs)
    assert e.value.status == status


@pytest.mark.parametrize("inputs", [["a", ["b"]], 3, None, [[1]], {"a": "b"}])
def test_predict_wrong_types(inputs):
    with pytest.raises(ValidationError):
        PredictRequest.model_validate({"inputs": inputs})


def test_rerank_request_defaults_and_direction_in_any_case():
    r = RerankRequest.model_validate({"query": "q", "texts": ["a"], "truncation_direction": "LeFt"})
    assert r.truncation_direction == "left" and r.truncate is None and r.raw_scores is False
    assert r.return_text is False and r.top_n is None and r.model is None and r.instruction is None


def test_cohere_documents_as_strings_or_objects():
    r = CohereRerankRequest.model_validate({"query": "q", "documents": ["a", {"text": "b", "id": 7}]})
    assert r.texts() == ["a", "b"] and r.return_documents is False
    with pytest.raises(ValidationError):
        CohereRerankRequest.model_validate({"query": "q", "documents": [{"title": "no text"}]})


def _validation_error(body) -> RequestValidationError:
    try:
        RerankRequest.model_validate(body)
    except ValidationError as e:
        return RequestValidationError(e.errors())
    raise AssertionError("valid")


@pytest.mark.parametrize("exc, status, error_type", [
    (ApiError(404, "UnknownModel", "x"), 404, "UnknownModel"),
    (RequestValidationError([{"type": "json_invalid", "loc": ("body", 3), "msg": "JSON decode error",
                              "ctx": {"error": "Expecting value"}}]), 400, "Validation"),
    (HTTPException(400, "There was an error parsing the body"), 400, "Validation"),
    (HTTPException(404), 404, "NotFound"),
    (HTTPException(405), 405, "MethodNotAllowed"),
    (InputTooLongError("too long", index=2), 422, "Validation"),
    (PairRequiredError("pair", index=0), 422, "Validation"),
    (InstructionNotSupportedError("no"), 422, "Validation"),
    (ModelLoadError("org/x", "no network"), 503, "Unhealthy"),
    (DeviceMemoryError("model 'x' ran out of device memory scoring one sequence"), 503, "Unhealthy"),
    (ZeroDivisionError(), 500, "Internal"),
])
def test_map_exception(exc, status, error_type):
    err = map_exception(exc)
    assert (err.status, err.error_type) == (status, error_type)
    assert err.message


def test_pydantic_errors_become_a_422_naming_the_field():
    err = map_exception(_validation_error({"query": "q", "texts": ["a", 3]}))
    assert (err.status, err.error_type) == (422, "Validation") and "texts[1]" in err.message
