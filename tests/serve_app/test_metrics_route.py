"""GET /metrics and the request metrics in process: the API key guards /metrics like every route, its errors are
JSON, and every answer (the guard's, a framework error, a route's) is reported with its route, model, status and
error_type. (The cluster-wide numbers through Ray: tests/deployments/test_metrics_e2e.py.)"""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from serve_app.routes import create_http_app
from serve_app.schemas import ApiError
from serve_app.service import RerankService
from serve_app.settings import AppSettings
from tests.serve_app.fakes import FakeBackend, FakeEncoder

EXPOSITION = "# HELP ray_rerank_pairs_scored_total Sequences scored.\n# TYPE ray_rerank_pairs_scored_total counter\n" \
             'ray_rerank_pairs_scored_total{model="bert"} 3.0\n'


def make(*, api_key=None, metrics=None, max_body_bytes=4096):
    settings = AppSettings(models=[{"name": "bert", "model_id": "fake/bert"}, {"name": "qwen", "model_id": "fake/q"}],
                           api_key=api_key, hf_token=None, max_body_bytes=max_body_bytes)
    service = RerankService(settings, {"bert": FakeEncoder(), "qwen": FakeEncoder()},
                            {"bert": FakeBackend({"paris": 1.0}), "qwen": FakeBackend()})
    seen: list[tuple] = []
    app = create_http_app(service, observe=lambda *answer: seen.append(answer), metrics=metrics)
    return TestClient(app, raise_server_exceptions=False), seen


async def _exposition() -> str:
    return EXPOSITION


def test_metrics_is_prometheus_text_and_needs_the_key_when_one_is_set():
    client, _ = make(api_key="k", metrics=_exposition)
    r = client.get("/metrics")
    assert r.status_code == 401 and r.json()["error_type"] == "Unauthorized"
    r = client.get("/metrics", headers={"Authorization": "Bearer k"})
    assert r.status_code == 200 and r.text == EXPOSITION
    assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    open_client, _ = make(metrics=_exposition)
    assert open_client.get("/metrics").text == EXPOSITION


def test_metrics_that_cannot_be_gathered_are_a_json_error():
    async def unreadable() -> str:
        raise ApiError(503, "Unhealthy", "no Ray node's metrics could be read")

    client, _ = make(metrics=unreadable)
    r = client.get("/metrics")
    assert r.status_code == 503 and r.json() == {"error": "no Ray node's metrics could be read",
                                                 "error_type": "Unhealthy"}
    r = make(metrics=None)[0].get("/metrics")
    assert r.status_code == 503 and r.json()["error_type"] == "Unhealthy"
    assert make(metrics=_exposition)[0].post("/metrics").json()["error_type"] == "MethodNotAllowed"


@pytest.mark.parametrize("method, path, kwargs, expected", [
    ("post", "/rerank", {"json": {"query": "q", "texts": ["paris", "x"]}}, ("/rerank", "bert", 200, "")),
    ("post", "/v1/rerank", {"json": {"model": "qwen", "query": "q", "documents": ["a"]}}, ("/v1/rerank", "qwen", 200,
                                                                                          "")),
    ("post", "/rerank", {"json": {"model": "gpt-9", "query": "q", "texts": ["a"]}},
     ("/rerank", "unknown", 404, "UnknownModel")),  # a made-up name never becomes a label value
    ("post", "/rerank", {"json": {"query": "q", "texts": []}}, ("/rerank", "bert", 400, "Empty")),
    ("post", "/predict", {"json": {"inputs": 3}}, ("/predict", "", 422, "Validation")),  # no route ran
    ("post", "/rerank", {"content": b"x" * 5000, "headers": {"Content-Type": "application/json"}},
     ("/rerank", "", 413, "PayloadTooLarge")),  # the guard's answer
    ("get", "/no/such/route", {}, ("other", "", 404, "NotFound")),
    ("get", "/health", {}, ("/health", "", 200, "")),
])
def test_every_answer_is_reported_with_route_model_status_and_error_type(method, path, kwargs, expected):
    client, seen = make(metrics=_exposition)
    getattr(client, method)(path, **kwargs)
    assert len(seen) == 1
    *answer, seconds = seen[0]
    assert tuple(answer) == expected and 0 <= seconds < 10


def test_a_failing_observer_never_fails_a_request():
    settings = AppSettings(models=[{"name": "bert", "model_id": "fake/bert"}], api_key=None, hf_token=None)
    service = RerankService(settings, {"bert": FakeEncoder()}, {"bert": FakeBackend({"paris": 1.0})})

    def broken(*_):
        raise RuntimeError("metrics backend down")

    client = TestClient(create_http_app(service, observe=broken), raise_server_exceptions=False)
    assert client.post("/rerank", json={"query": "q", "texts": ["paris"]}).status_code == 200
