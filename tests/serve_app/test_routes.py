"""The HTTP contract of docs/API.md over fake encoders and backends, in process (no Ray, no model weights).

Scores come from tables the tests declare, so every expected order and value here is written by hand.
"""
from __future__ import annotations

import json
import math

import pytest
from fastapi.testclient import TestClient
from ray.exceptions import ActorDiedError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from deployments.errors import map_ray_exception
from serve_app.routes import create_http_app
from serve_app.service import RerankService
from serve_app.settings import AppSettings
from tests.serve_app.fakes import FakeBackend, FakeEncoder

TABLE = {"paris": 2.0, "berlin": -1.0, "fox": 2.0, "dog": 0.5, "cat": -3.0}


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def make(*, api_key=None, max_candidates=1000, max_body_bytes=4 * 1024 * 1024, bert_backend=None,
         qwen_backend=None, qwen_scaling=None):
    qwen = {"name": "qwen", "model_id": "fake/qwen"}
    if qwen_scaling is not None:
        qwen["autoscaling_config"] = qwen_scaling
    settings = AppSettings(
        models=[{"name": "bert", "model_id": "fake/bert"}, qwen],
        api_key=api_key, hf_token=None, max_candidates=max_candidates, max_body_bytes=max_body_bytes)
    encoders = {"bert": FakeEncoder(with_types=True, id2label={0: "relevant"}),
                "qwen": FakeEncoder(family="qwen3", accepts_single=False, accepts_instruction=True,
                                    default_instruction="find it")}
    backends = {"bert": bert_backend or FakeBackend(TABLE), "qwen": qwen_backend or FakeBackend({"paris": 5.0})}
    service = RerankService(settings, encoders, backends)
    # The ingress's error mapping, so Ray's exceptions raised by a backend are mapped as in a replica.
    app = create_http_app(service, request_id=lambda: "req-1", map_error=map_ray_exception)
    return TestClient(app, raise_server_exceptions=False), \
        service


@pytest.fixture()
def client():
    return make()[0]


def error_of(response, status: int, error_type: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "error_type"} and body["error_type"] == error_type, body
    assert body["error"]
    return body["error"]


# ------------------------------------------------------------------------------------------------ /rerank

def test_rerank_sorts_by_score_then_index_and_applies_sigmoid(client):
    texts = ["berlin", "paris", "cat", "fox", "dog"]
    r = client.post("/rerank", json={"query": "capital", "texts": texts})
    assert r.status_code == 200
    got = r.json()
    # paris (1) and fox (3) tie at 2.0: the lower index first.
    assert [x["index"] for x in got] == [1, 3, 4, 0, 2]
    for x in got:
        assert x["score"] == pytest.approx(sig(TABLE[texts[x["index"]]]), abs=1e-7)
        assert "text" not in x


def test_rerank_raw_scores_return_text_top_n(client):
    texts = ["berlin", "paris", "cat"]
    r = client.post("/rerank", json={"query": "q", "texts": texts, "raw_scores": True, "return_text": True,
                                     "top_n": 2})
    assert r.json() == [{"index": 1, "score": 2.0, "text": "paris"}, {"index": 0, "score": -1.0, "text": "berlin"}]


def test_rerank_top_n_larger_than_texts_returns_all(client):
    assert len(client.post("/rerank", json={"query": "q", "texts": ["a", "b"], "top_n": 5}).json()) == 2


def test_rerank_is_one_backend_call_with_every_pair():
    client, service = make()
    client.post("/rerank", json={"query": "q", "texts": ["paris", "berlin", "cat"]})
    calls = service.backends["bert"].calls
    assert len(calls) == 1 and len(calls[0]) == 3


def test_rerank_passes_truncation_options_to_the_encoder():
    client, service = make()
    client.post("/rerank", json={"query": "q", "texts": ["paris"], "truncate": False,
                                 "truncation_direction": "LEFT"})
    call = service.encoders["bert"].calls[-1]
    assert call["truncate"] is False and call["direction"] == "left"
    client.post("/rerank", json={"query": "q", "texts": ["paris"], "truncate": None})
    assert service.encoders["bert"].calls[-1]["truncate"] is True


def test_rerank_picks_the_model_by_name(client):
    r = client.post("/rerank", json={"query": "q", "texts": ["berlin", "paris"], "model": "qwen",
                                     "raw_scores": True})
    assert r.json() == [{"index": 1, "score": 5.0}, {"index": 0, "score": 0.0}]


def test_instruction_goes_to_instruction_aware_models_only():
    client, service = make()
    r = client.post("/rerank", json={"query": "q", "texts": ["paris"], "model": "qwen", "instruction": "do it"})
    assert r.status_code == 200 and service.encoders["qwen"].calls[-1]["instruction"] == "do it"
    message = error_of(client.post("/rerank", json={"query": "q", "texts": ["paris"], "instruction": "do it"}),
                       422, "Validation")
    assert "takes no `instruction`" in message and "Qwen3-Reranker" in message and "mxbai" in message
    assert service.backends["bert"].calls == []


def test_a_single_text_goes_to_models_that_take_one_only():
    client, service = make()
    for inputs, where in (("paris", "`inputs[0]`"), ([["q", "paris"], ["rome"]], "`inputs[1]`")):
        message = error_of(client.post("/predict", json={"inputs": inputs, "model": "qwen"}), 422, "Validation")
        assert message.startswith(where) and "pairs only" in message, message
    assert service.backends["qwen"].calls == []
    assert client.post("/predict", json={"inputs": "paris", "model": "bert"}).status_code == 200


# ----------------------------------------------------------------------------------------------- /predict

@pytest.mark.parametrize("inputs, expected", [
    ("paris", [{"score": 0.0, "label": "relevant"}]),  # a single text: doc part empty -> table miss -> 0.0
    (["paris"], [{"score": 0.0, "label": "relevant"}]),
    (["q", "paris"], [{"score": 2.0, "label": "relevant"}]),
    ([["q", "paris"], ["dog"], ["q", "cat"]],
     [[{"score": 2.0, "label": "relevant"}], [{"score": 0.0, "label": "relevant"}],
      [{"score": -3.0, "label": "relevant"}]]),
])
def test_predict_shapes(client, inputs, expected):
    r = client.post("/predict", json={"inputs": inputs, "raw_scores": True})
    assert r.status_code == 200, r.text
    assert r.json() == expected


def test_predict_sigmoid_and_default_label():
    client, _ = make()
    r = client.post("/predict", json={"inputs": ["q", "paris"], "model": "qwen"})
    assert r.json() == [{"score": pytest.approx(sig(5.0)), "label": "LABEL_0"}]


def test_predict_passes_items_in_order():
    client, service = make()
    client.post("/predict", json={"inputs": [["a", "b"], ["c"]]})
    assert service.encoders["bert"].calls[-1]["items"] == [("a", "b"), ("c", None)]


@pytest.mark.parametrize("inputs", [["a", "b", "c"], [["a", "b", "c"]], [["a"], []], ["a", ["b"]], 3, [[1, 2]]])
def test_predict_bad_shapes_are_422(client, inputs):
    error_of(client.post("/predict", json={"inputs": inputs}), 422, "Validation")


@pytest.mark.parametrize("inputs", ["", [], [""], [["", "doc"]]])
def test_predict_empty_is_400(client, inputs):
    error_of(client.post("/predict", json={"inputs": inputs}), 400, "Empty")


def test_predict_single_text_on_pair_only_model_is_422():
    client, service = make()
    msg = error_of(client.post("/predict", json={"inputs": [["q", "paris"], ["alone"]], "model": "qwen"}),
                   422, "Validation")
    assert "inputs[1]" in msg
    assert service.backends["qwen"].calls == []


# --------------------------------------------------------------------------------------- /v1, /v2 /rerank

@pytest.mark.parametrize("route", ["/v1/rerank", "/v2/rerank"])
def test_cohere_rerank(client, route):
    docs = ["berlin", {"text": "paris", "title": "ignored"}, "cat"]
    r = client.post(route, json={"query": "capital city", "documents": docs, "top_n": 2, "return_documents": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == "req-1" and body["model"] == "bert"
    assert [x["index"] for x in body["results"]] == [1, 0]
    assert body["results"][0]["relevance_score"] == pytest.approx(sig(2.0))
    assert body["results"][1]["document"] == {"text": "berlin"}
    # [CLS] capital city [SEP] + one document word: 3 x 5 tokens, scored even when cut by top_n.
    assert body["meta"] == {"billed_units": {"search_units": 1}, "tokens": {"input_tokens": 15}}
    assert body["usage"] == {"total_tokens": 15}


def test_cohere_without_return_documents_and_max_tokens_per_doc():
    client, service = make()
    r = client.post("/v2/rerank", json={"query": "q", "documents": ["cat dog fox"], "max_tokens_per_doc": 1,
                                        "model": "bert"})
    assert service.encoders["bert"].calls[-1]["max_tokens_per_doc"] == 1
    result = r.json()["results"][0]
    assert set(result) == {"index", "relevance_score"}
    assert result["relevance_score"] == pytest.approx(sig(-3.0))  # only "cat" is left of the document
    assert r.json()["usage"]["total_tokens"] == 4


# ---------------------------------------------------------------------------------------------- /tokenize

def test_tokenize(client):
    r = client.post("/tokenize", json={"inputs": [["what is", "paris"], ["hello"]]})
    assert r.status_code == 200
    first, second = r.json()
    assert first["tokens"] == ["[CLS]", "what", "is", "[SEP]", "paris"]
    assert first["num_tokens"] == 5 == len(first["ids"]) and first["ids"][0] == 1
    assert first["token_type_ids"] == [0] * 5
    assert second["tokens"] == ["[CLS]", "hello", "[SEP]"]


def test_tokenize_shows_truncation():
    client, _ = make()
    long_doc = " ".join(f"w{i}" for i in range(40))
    r = client.post("/tokenize", json={"inputs": ["q", long_doc], "model": "qwen"})
    assert r.json()[0]["num_tokens"] == 32
    error_of(client.post("/tokenize", json={"inputs": ["q", long_doc], "truncate": False}), 422, "Validation")


# ------------------------------------------------------------------------------------------ service routes

def test_info(client):
    info = client.get("/info").json()
    assert info["default_model"] == "bert" and info["version"]
    bert, qwen = info["models"]
    assert bert["name"] == "bert" and bert["model_id"] == "fake/bert" and bert["family"] == "seq_cls"
    assert bert["max_input_length"] == 32 and bert["id2label"] == {"0": "relevant"}
    assert bert["dtype"] == "float32" and bert["device"] == "cpu" and bert["batching"]["token_budget"] == 4096
    assert bert["execution"] == "padded"  # as the loaded model says (describe)
    assert bert["batching"]["max_fanout"] == 8
    assert qwen["accepts_instruction"] is True and qwen["default_instruction"] == "find it"
    assert info["max_client_batch_size"] == 1000 and info["model_id"] == "fake/bert"


def test_info_shows_the_autoscaling_config_as_written():
    client, _ = make(qwen_scaling={"preset": "latency", "max_replicas": 3})
    bert, qwen = client.get("/info").json()["models"]
    assert qwen["serving"]["autoscaling_config"] == {"preset": "latency", "max_replicas": 3}
    assert qwen["serving"]["num_replicas"] is None
    assert bert["serving"]["autoscaling_config"] is None and bert["serving"]["num_replicas"] == 1


def test_info_survives_a_model_that_cannot_describe_itself():
    class Down(FakeBackend):
        async def describe(self):
            raise DeploymentUnavailableError("x")
    client, _ = make(qwen_backend=Down())
    info = client.get("/info").json()
    assert info["models"][1]["loaded"] is False and info["models"][0]["loaded"] is True


def test_models_list(client):
    body = client.get("/v1/models").json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == ["bert", "qwen"]


def test_health_ok_and_unhealthy():
    client, _ = make()
    assert client.get("/health").json() == {"status": "ok"}
    client, _ = make(qwen_backend=FakeBackend(ready=(False, "no running replica")))
    msg = error_of(client.get("/health"), 503, "Unhealthy")
    assert "qwen" in msg and "bert" not in msg


def test_docs_and_openapi(client):
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/rerank", "/predict", "/v1/rerank", "/v2/rerank", "/tokenize", "/info", "/health",
            "/v1/models"} <= set(spec["paths"])
    # /docs describes the bodies the routes send: optional keys are not required (they are absent, never null).
    schemas = spec["components"]["schemas"]
    assert sorted(schemas["RerankResult"]["required"]) == ["index", "score"] and "text" in schemas["RerankResult"][
        "properties"]
    assert sorted(schemas["CohereResult"]["required"]) == ["index", "relevance_score"]
    assert "token_type_ids" not in schemas["TokenizedInput"]["required"]
    ok = spec["paths"]["/rerank"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok["items"] == {"$ref": "#/components/schemas/RerankResult"}


@pytest.mark.parametrize("path, body, shape", [
    ("/rerank", {"query": "q", "texts": ["paris", "berlin"], "return_text": True}, "RerankResponse"),
    ("/predict", {"inputs": [["q", "paris"], ["q", "rome"]]}, "PredictResponse"),
    ("/predict", {"inputs": ["q", "paris"]}, "PredictResponse"),
    ("/v2/rerank", {"query": "q", "documents": ["paris"], "return_documents": True}, "CohereRerankResponse"),
    ("/tokenize", {"inputs": ["q", "paris"]}, "TokenizeResponse"),
])
def test_every_body_is_its_described_shape(client, path, body, shape):
    """The description in schemas.py is the body: validating the response against it keeps every key."""
    from pydantic import TypeAdapter

    from serve_app import schemas

    r = client.post(path, json=body)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert TypeAdapter(getattr(schemas, shape)).validate_json(r.content) == r.json()


# ---------------------------------------------------------------------------------------- the error table

def test_empty_texts_and_query_are_400(client):
    error_of(client.post("/rerank", json={"query": "q", "texts": []}), 400, "Empty")
    error_of(client.post("/rerank", json={"query": "", "texts": ["a"]}), 400, "Empty")
    error_of(client.post("/v1/rerank", json={"query": "q", "documents": []}), 400, "Empty")
    error_of(client.post("/v2/rerank", json={"query": "", "documents": ["a"]}), 400, "Empty")


@pytest.mark.parametrize("body", [b"{not json", b'{"query": "q", "texts": ["a"]', b"\xff\xfe{}", b"  "])
def test_body_that_is_not_json_or_utf8_is_400(client, body):
    r = client.post("/rerank", content=body, headers={"content-type": "application/json"})
    error_of(r, 400, "Validation")


def test_bad_utf8_inside_a_string_is_400(client):
    body = b'{"query": "q", "texts": ["caf\xe9"]}'  # latin-1 bytes, not UTF-8
    error_of(client.post("/rerank", content=body, headers={"content-type": "application/json"}), 400, "Validation")


def test_unknown_model_is_404_listing_served(client):
    msg = error_of(client.post("/rerank", json={"query": "q", "texts": ["a"], "model": "nope"}), 404,
                   "UnknownModel")
    assert "bert" in msg and "qwen" in msg


def test_unknown_route_and_wrong_method(client):
    error_of(client.post("/nope", json={}), 404, "NotFound")
    error_of(client.get("/rerank"), 405, "MethodNotAllowed")
    error_of(client.post("/health"), 405, "MethodNotAllowed")


def test_payload_too_large_by_content_length_and_by_actual_size():
    client, service = make(max_body_bytes=200)
    big = json.dumps({"query": "q", "texts": ["x" * 300]}).encode()
    error_of(client.post("/rerank", content=big, headers={"content-type": "application/json"}), 413,
             "PayloadTooLarge")

    def chunks():  # no Content-Length: sent chunked, counted as it arrives
        for i in range(0, len(big), 50):
            yield big[i:i + 50]
    error_of(client.post("/rerank", content=chunks(), headers={"content-type": "application/json"}), 413,
             "PayloadTooLarge")
    small = json.dumps({"query": "q", "texts": ["paris"]}).encode()
    assert client.post("/rerank", content=small, headers={"content-type": "application/json"}).status_code == 200


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_content_type_other_than_json_is_415(client, content_type):
    headers = {"content-type": content_type} if content_type else {}
    r = client.post("/rerank", content=b'{"query": "q", "texts": ["a"]}', headers=headers)
    error_of(r, 415, "Validation")


def test_json_content_type_with_charset_is_fine(client):
    r = client.post("/rerank", content=b'{"query": "q", "texts": ["a"]}',
                    headers={"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 200


@pytest.mark.parametrize("body", [
    {"query": "q", "texts": "paris"},                   # not a list
    {"query": "q", "texts": ["a", 3]},                  # not a string
    {"query": 1, "texts": ["a"]},
    {"query": "q"},                                     # missing field
    {"query": "q", "texts": ["a"], "unknown": 1},       # unknown field
    {"query": "q", "texts": ["a"], "top_n": 0},         # top_n < 1
    {"query": "q", "texts": ["a"], "top_n": "2"},       # no string-to-int coercion
    {"query": "q", "texts": ["a"], "raw_scores": "yes"},
    {"query": "q", "texts": ["a"], "truncation_direction": "middle"},
    [1, 2],
])
def test_wrong_types_or_fields_are_422(client, body):
    error_of(client.post("/rerank", json=body), 422, "Validation")


def test_too_many_candidates_is_422():
    client, service = make(max_candidates=3)
    msg = error_of(client.post("/rerank", json={"query": "q", "texts": ["a"] * 4}), 422, "Validation")
    assert "3" in msg
    error_of(client.post("/v1/rerank", json={"query": "q", "documents": ["a"] * 4}), 422, "Validation")
    error_of(client.post("/predict", json={"inputs": [["a"]] * 4}), 422, "Validation")
    assert client.post("/rerank", json={"query": "q", "texts": ["a"] * 3}).status_code == 200


def test_over_long_input_without_truncation_is_422_naming_the_item():
    client, service = make()
    long_doc = " ".join(["w"] * 40)
    msg = error_of(client.post("/rerank", json={"query": "q", "texts": ["ok", long_doc], "truncate": False}),
                   422, "Validation")
    assert "texts[1]" in msg
    assert service.backends["bert"].calls == []  # rejected before anything reached a model


def test_encoder_input_error_is_422_and_never_reaches_the_model():
    client, service = make()
    msg = error_of(client.post("/v1/rerank", json={"query": "q", "documents": ["ok", "BAD INPUT"]}), 422,
                   "Validation")
    assert "documents[1]" in msg
    assert service.backends["bert"].calls == []


def test_api_key():
    client, _ = make(api_key="s3cret")
    body = {"query": "q", "texts": ["paris"]}
    error_of(client.post("/rerank", json=body), 401, "Unauthorized")
    error_of(client.post("/rerank", json=body, headers={"Authorization": "Bearer wrong"}), 401, "Unauthorized")
    error_of(client.get("/info"), 401, "Unauthorized")
    error_of(client.get("/v1/models", headers={"Authorization": "s3cret"}), 401, "Unauthorized")
    assert client.post("/rerank", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/v1/models", headers={"Authorization": "bearer s3cret"}).status_code == 200
    assert client.get("/health").status_code == 200  # never needs a key


def test_backpressure_is_429_with_retry_after():
    client, _ = make(bert_backend=FakeBackend(error=BackPressureError(
        num_queued_requests=5, max_queued_requests=5, status_code=429, retry_after_s=2.5)))
    r = client.post("/rerank", json={"query": "q", "texts": ["a"]})
    error_of(r, 429, "Overloaded")
    assert r.headers["retry-after"] == "3"


@pytest.mark.parametrize("exc", [DeploymentUnavailableError("model-bert"), ActorDiedError()])
def test_gone_replicas_are_503(exc):
    client, _ = make(bert_backend=FakeBackend(error=exc))
    error_of(client.post("/rerank", json={"query": "q", "texts": ["a"]}), 503, "Unhealthy")


def test_unexpected_error_is_json_500():
    client, _ = make(bert_backend=FakeBackend(error=RuntimeError("boom")))
    error_of(client.post("/rerank", json={"query": "q", "texts": ["a"]}), 500, "Internal")


def test_a_backend_returning_the_wrong_number_of_scores_is_an_error_not_a_wrong_answer():
    class Short(FakeBackend):
        async def score(self, batch):
            return (await super().score(batch))[:-1]
    client, _ = make(bert_backend=Short(TABLE))
    error_of(client.post("/rerank", json={"query": "q", "texts": ["a", "b"]}), 500, "Internal")


# ------------------------------------------------------------------------------- long documents (docs/API.md)
# The fake model: max_length 64, "[CLS] q [SEP] doc" — a one-word query leaves W = 61 document tokens a window,
# overlap min(64, 61 // 2) = 30, stride 31. A document's raw score = its words' scores summed.
LONG = " ".join(["x"] * 95 + ["gold"] + ["x"] * 4)  # 100 words: windows [0:61], [31:92], [62:100]; gold in the 3rd
WORDS = {"gold": 3.0, "x": -0.01}


def make_long(*, model_settings=None, **kw):
    bert = {"name": "bert", "model_id": "fake/bert", **(model_settings or {})}
    settings = AppSettings(models=[bert], api_key=None, hf_token=None, **kw)
    backend = FakeBackend(word_scores=WORDS)
    service = RerankService(settings, {"bert": FakeEncoder(with_types=True, max_length=64)}, {"bert": backend})
    return TestClient(create_http_app(service, request_id=lambda: "req-1"), raise_server_exceptions=False), backend


def test_chunk_scores_a_long_document_by_its_best_window():
    client, backend = make_long()
    texts = [LONG, "gold x", "x x"]
    body = {"query": "q", "texts": texts, "raw_scores": True}
    truncated = {x["index"]: x["score"] for x in client.post("/rerank", json=body).json()}
    assert truncated[0] == pytest.approx(-0.61, abs=1e-5)  # only the first 61 words were seen
    chunked = {x["index"]: x["score"] for x in client.post("/rerank", json={**body, "long_documents": "chunk"}).json()}
    assert chunked[0] == pytest.approx(3.0 - 0.37, abs=1e-5)  # window 3: 37 x + gold
    assert chunked[1] == truncated[1] == pytest.approx(2.99, abs=1e-5) and chunked[2] == truncated[2]
    # All windows of the request are sequences of one batch: 3 windows + 2 fitting pairs.
    assert [len(b) for b in backend.calls] == [3, 5]
    normalised = client.post("/rerank", json={**body, "raw_scores": False, "long_documents": "chunk"}).json()
    assert {x["index"]: x["score"] for x in normalised}[0] == pytest.approx(sig(2.63), abs=1e-6)  # sigmoid of the max


def test_chunk_on_cohere_routes_counts_every_window_token():
    client, _ = make_long()
    for route in ("/v1/rerank", "/v2/rerank"):
        body = {"query": "q", "documents": [LONG, {"text": "gold"}], "long_documents": "chunk"}
        r = client.post(route, json=body).json()
        assert [x["index"] for x in r["results"]] == [1, 0]
        assert r["results"][1]["relevance_score"] == pytest.approx(sig(2.63), abs=1e-6)
        # windows of 3 + 61, 3 + 61 and 3 + 38 tokens, and [CLS] q [SEP] gold
        assert r["usage"]["total_tokens"] == r["meta"]["tokens"]["input_tokens"] == 64 + 64 + 41 + 4
        plain = client.post(route, json={**body, "long_documents": "truncate"}).json()
        assert plain["usage"]["total_tokens"] == 64 + 4


def test_chunk_max_tokens_per_doc_cuts_before_the_windows():
    client, backend = make_long()
    body = {"query": "q", "documents": [LONG], "long_documents": "chunk", "max_tokens_per_doc": 70}
    r = client.post("/v1/rerank", json=body).json()
    # 70 tokens: windows [0:61], [31:70]; gold (word 95) is gone
    assert r["usage"]["total_tokens"] == 64 + 42
    assert r["results"][0]["relevance_score"] == pytest.approx(sig(-0.39), abs=1e-6)


def test_chunk_on_predict_pairs_only():
    client, _ = make_long()
    inputs = [["q", LONG], ["gold x"], ["q", "gold"]]
    r = client.post("/predict", json={"inputs": inputs, "raw_scores": True, "long_documents": "chunk"}).json()
    assert [x[0]["score"] for x in r] == pytest.approx([2.63, 0.0, 3.0], abs=1e-5)  # a single text: as usual
    single = client.post("/predict", json={"inputs": ["q", LONG], "raw_scores": True,
                                           "long_documents": "chunk"}).json()
    assert single[0]["score"] == pytest.approx(2.63, abs=1e-5)


def test_the_model_setting_is_the_default_and_a_request_overrides_it():
    client, _ = make_long(model_settings={"long_documents": "chunk", "chunk_overlap": 0, "max_chunks": 1})
    body = {"query": "q", "texts": [LONG], "raw_scores": True}
    assert client.post("/rerank", json=body).json()[0]["score"] == pytest.approx(-0.61, abs=1e-5)  # 1 window
    client, _ = make_long(model_settings={"long_documents": "chunk", "chunk_overlap": 0})
    # overlap 0: windows [0:61], [61:100]
    assert client.post("/rerank", json=body).json()[0]["score"] == pytest.approx(3.0 - 0.38, abs=1e-5)
    assert client.post("/rerank", json={**body, "long_documents": "truncate"}).json()[0]["score"] == \
        pytest.approx(-0.61, abs=1e-5)


def test_chunk_windows_fan_out_like_any_sequences():
    # A token budget of 40 puts the windows of one request into several concurrent pieces.
    client, backend = make_long(model_settings={"token_budget": 40, "max_fanout": 8})
    r = client.post("/rerank", json={"query": "q", "texts": [LONG, LONG, "gold"], "raw_scores": True,
                                     "long_documents": "chunk"}).json()
    assert len(backend.calls) > 1 and sum(len(b) for b in backend.calls) == 7
    assert {x["index"]: x["score"] for x in r} == pytest.approx({0: 2.63, 1: 2.63, 2: 3.0}, abs=1e-5)


@pytest.mark.parametrize("route, body", [
    ("/rerank", {"query": "q", "texts": ["a"]}),
    ("/v1/rerank", {"query": "q", "documents": ["a"]}),
    ("/v2/rerank", {"query": "q", "documents": ["a"]}),
    ("/predict", {"inputs": ["q", "a"]}),
    ("/tokenize", {"inputs": ["q", "a"]}),
])
@pytest.mark.parametrize("value", ["bogus", "Chunk", 1, True])
def test_bad_long_documents_is_a_422(route, body, value):
    client, _ = make_long()
    assert "long_documents" in error_of(client.post(route, json={**body, "long_documents": value}),
                                        422, "Validation")


def test_tokenize_ignores_long_documents():
    client, _ = make_long()
    plain = client.post("/tokenize", json={"inputs": ["q", LONG]}).json()
    assert client.post("/tokenize", json={"inputs": ["q", LONG], "long_documents": "chunk"}).json() == plain
    assert plain[0]["num_tokens"] == 64


def test_chunk_keeps_truncate_false_for_unchunked_pairs_only():
    client, _ = make_long()
    body = {"query": "q", "texts": [LONG], "truncate": False}
    error_of(client.post("/rerank", json=body), 422, "Validation")
    assert client.post("/rerank", json={**body, "long_documents": "chunk"}).status_code == 200


def test_info_shows_long_document_settings():
    client, _ = make_long(model_settings={"long_documents": "chunk", "chunk_overlap": 16, "max_chunks": 4})
    bert = client.get("/info").json()["models"][0]
    assert (bert["long_documents"], bert["chunk_overlap"], bert["max_chunks"]) == ("chunk", 16, 4)
    defaults = make()[0].get("/info").json()["models"][0]
    assert (defaults["long_documents"], defaults["chunk_overlap"], defaults["max_chunks"]) == ("truncate", 64, 32)


def test_chunk_for_a_family_without_windows():
    settings = AppSettings(models=[{"name": "m", "model_id": "fake/m", "long_documents": "chunk"}], api_key=None,
                           hf_token=None)
    with pytest.raises(ValueError, match="long_documents"):
        RerankService(settings, {"m": FakeEncoder(supports_windows=False)}, {"m": FakeBackend()})
    settings = AppSettings(models=[{"name": "m", "model_id": "fake/m"}], api_key=None, hf_token=None)
    service = RerankService(settings, {"m": FakeEncoder(supports_windows=False)}, {"m": FakeBackend()})
    client = TestClient(create_http_app(service), raise_server_exceptions=False)
    assert "windows" in error_of(client.post("/rerank", json={"query": "q", "texts": ["a"],
                                                                "long_documents": "chunk"}), 422, "Validation")


@pytest.mark.parametrize("field, value", [("chunk_overlap", 8), ("max_chunks", 2)])
def test_a_request_may_pass_long_documents_only(field, value):
    client, _ = make_long()
    body = {"query": "q", "texts": ["a"], "long_documents": "chunk", field: value}
    assert field in error_of(client.post("/rerank", json=body), 422, "Validation")


def test_chunk_refuses_an_over_long_single_text_with_truncate_false():
    """Windows apply to the documents of pairs only (docs/API.md): an over-long single text with truncate=false is
    the over-long 422 of docs/API.md, Errors in either mode, naming the input (tests/serve_app/test_bad_input.py: with
    truncation it is cut as usual, on real encoders)."""
    client, backend = make_long()
    for inputs, where in ((LONG, "`inputs[0]`"), ([["q", "gold"], [LONG]], "`inputs[1]`")):
        for mode in ("truncate", "chunk"):
            body = {"inputs": inputs, "truncate": False, "long_documents": mode}
            assert where in error_of(client.post("/predict", json=body), 422, "Validation")
    assert backend.calls == []
