"""Failure paths against the real Ray Serve instance, each in its own application so `main` is unaffected:
API key, overload (429 + Retry-After), replicas gone (/health 503), and a model that cannot load."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.deployments.conftest import copy_model, run_app
from tests.tiny_models import DOCS

pytestmark = pytest.mark.slow


def error_of(r, status: int, error_type: str) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error", "error_type"} and body["error_type"] == error_type, body
    return body["error"]


@pytest.fixture(scope="module")
def guarded_url(serve_url, tiny):
    """A keyed app under a route prefix whose model takes one request at a time and queues one more."""
    from ray import serve

    run_app({"models": [{"name": "bert", "model_id": str(tiny["bert"]), "num_cpus": 0.25,
                         "max_ongoing_requests": 1, "max_queued_requests": 1, "retry_after_s": 2}],
             "api_key": "test-key"}, name="guarded", route_prefix="/guarded")
    yield serve_url + "/guarded"
    serve.delete("guarded")


KEY = {"Authorization": "Bearer test-key"}


def test_api_key_is_required_on_every_route_but_health(guarded_url):
    body = {"query": "q", "texts": ["a"]}
    error_of(requests.post(guarded_url + "/rerank", json=body, timeout=30), 401, "Unauthorized")
    error_of(requests.post(guarded_url + "/rerank", json=body, headers={"Authorization": "Bearer nope"},
                           timeout=30), 401, "Unauthorized")
    for path in ("/info", "/v1/models"):
        error_of(requests.get(guarded_url + path, timeout=30), 401, "Unauthorized")
        assert requests.get(guarded_url + path, headers=KEY, timeout=30).status_code == 200
    for path in ("/predict", "/v1/rerank", "/v2/rerank", "/tokenize"):
        error_of(requests.post(guarded_url + path, json={}, timeout=30), 401, "Unauthorized")
    assert requests.post(guarded_url + "/rerank", json=body, headers=KEY, timeout=30).status_code == 200
    assert requests.get(guarded_url + "/health", timeout=30).json() == {"status": "ok"}


def test_overload_is_429_with_retry_after(guarded_url):
    # Requests of many long pairs keep the single slot busy; with one queued request allowed the rest of a
    # burst is turned away at once instead of waiting.
    body = {"query": "what is the capital of france", "texts": [DOCS[5]] * 1000, "model": "bert"}

    def call(_):
        return requests.post(guarded_url + "/rerank", json=body, headers=KEY, timeout=120)

    with ThreadPoolExecutor(12) as ex:
        responses = list(ex.map(call, range(12)))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429} and 200 in codes and 429 in codes, codes
    for r in responses:
        if r.status_code == 429:
            error_of(r, 429, "Overloaded")
            assert r.headers["Retry-After"] == "2"
        else:
            assert len(r.json()) == 1000


def test_health_turns_503_when_a_models_replicas_are_gone(serve_url, tiny, tmp_path):
    """Kill the only replica of a model whose files are gone: it cannot come back, and /health says so."""
    import ray
    from ray import serve

    model_dir = copy_model(tiny["bert"], tmp_path / "fragile-bert")
    run_app({"models": [{"name": "fragile", "model_id": str(model_dir), "num_cpus": 0.25,
                         "health_check_period_s": 1}], "api_key": None}, name="fragile", route_prefix="/fragile")
    url = serve_url + "/fragile"
    try:
        assert requests.get(url + "/health", timeout=30).status_code == 200
        for f in model_dir.iterdir():  # replacement replicas now fail in their constructor
            f.unlink()
        replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                    if a["name"].startswith("SERVE_REPLICA::fragile#model-fragile#")]
        assert len(replicas) == 1
        ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
        killed = time.monotonic()

        deadline, r = time.monotonic() + 90, None
        while time.monotonic() < deadline:
            r = requests.get(url + "/health", timeout=30)
            if r.status_code == 503:
                break
            time.sleep(0.5)
        assert "fragile" in error_of(r, 503, "Unhealthy")
        print(f"/health 503 {time.monotonic() - killed:.1f}s after the kill")
        r = requests.post(url + "/rerank", json={"query": "q", "texts": ["a"]}, timeout=60)
        error_of(r, 503, "Unhealthy")  # not a hang: the ingress sees there is no replica to wait for
    finally:
        serve.delete("fragile")


def test_a_model_that_cannot_load_fails_the_deploy_with_its_name(serve_url, tiny, tmp_path):
    """Config and tokenizer fine (passes the build-time check), weights corrupt: the replica fails to load."""
    from ray import serve

    model_dir = copy_model(tiny["bert"], tmp_path / "broken-bert")
    (model_dir / "model.safetensors").write_bytes(b"definitely not safetensors")
    start = time.monotonic()
    with pytest.raises(Exception) as e:
        run_app({"models": [{"name": "broken", "model_id": str(model_dir), "num_cpus": 0.25}], "api_key": None},
                name="broken", route_prefix="/broken")
    elapsed = time.monotonic() - start
    try:
        assert "model-broken" in str(e.value)  # the deployment of the model named "broken"
        deployment = serve.status().applications["broken"].deployments["model-broken"]
        print(f"failed deploy reported in {elapsed:.1f}s: {str(e.value)[:200]} / {deployment.message[-800:]}")
        assert "cannot load model" in deployment.message and str(model_dir) in deployment.message
        assert elapsed < 120
    finally:
        serve.delete("broken")


def test_a_model_that_loads_but_cannot_run_fails_the_deploy_at_warm_up(serve_url, tiny, tmp_path):
    """Weights and config agree, but no forward can run (issue 9: a kernel the installed torch lacks): the
    replica's warm-up forward fails the deploy with the model and the cause, instead of a healthy deployment
    that answers 500 to every request."""
    from ray import serve

    from tests.deployments.test_model_unit import unrunnable_copy

    model_dir = unrunnable_copy(tiny["bert"], tmp_path / "unrunnable-bert")
    with pytest.raises(Exception) as e:
        run_app({"models": [{"name": "unrunnable", "model_id": str(model_dir), "num_cpus": 0.25}],
                 "api_key": None}, name="unrunnable", route_prefix="/unrunnable")
    try:
        assert "model-unrunnable" in str(e.value)
        message = serve.status().applications["unrunnable"].deployments["model-unrunnable"].message
        assert "warm-up forward failed" in message and str(model_dir) in message and "IndexError" in message
    finally:
        serve.delete("unrunnable")
