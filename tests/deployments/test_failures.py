"""Failure paths against the real Ray Serve instance, each in its own application so `main` is unaffected:
API key, overload (429 + Retry-After), replicas gone (/health 503), and a model that cannot load."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.deployments.conftest import copy_model, run_app
from tests.serve_helpers import running_replicas, wait_for
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
    """Config and tokenizer fine (passes the build-time check), weights corrupt: the replica fails to load. The
    application's other model keeps serving."""
    from ray import serve

    model_dir = copy_model(tiny["bert"], tmp_path / "broken-bert")
    (model_dir / "model.safetensors").write_bytes(b"definitely not safetensors")
    start = time.monotonic()
    with pytest.raises(Exception) as e:
        run_app({"models": [{"name": "broken", "model_id": str(model_dir), "num_cpus": 0.25},
                            {"name": "sound", "model_id": str(tiny["bert"]), "num_cpus": 0.25}],
                 "api_key": None}, name="broken", route_prefix="/broken")
    elapsed = time.monotonic() - start
    url = serve_url + "/broken"
    try:
        assert "model-broken" in str(e.value)  # the deployment of the model named "broken"
        deployment = serve.status().applications["broken"].deployments["model-broken"]
        print(f"failed deploy reported in {elapsed:.1f}s: {str(e.value)[:200]} / {deployment.message[-800:]}")
        assert "cannot load model" in deployment.message and str(model_dir) in deployment.message
        # A load failure is the same on every try: one constructor run per replica, one traceback in the logs.
        assert "failed to start 1 times in a row" in deployment.message
        assert elapsed < 120
        # The other model may still be starting when the broken one has failed: /health names only the broken one
        # once the sound one runs.
        wait_for(lambda: running_replicas("broken", "model-sound") >= 1, 120, "the sound model's replica")
        # The ingress runs: every answer is JSON, and /health names the model and the error (not a traceback).
        r = wait_for_json(url + "/health")
        why = error_of(r, 503, "Unhealthy")
        assert "broken (no running replica (deployment DEPLOY_FAILED: " in why and "cannot load model" in why, why
        assert "Traceback" not in why
        assert "sound" not in why
        error_of(requests.post(url + "/rerank", json={"query": "q", "texts": ["a"]}, timeout=60), 503, "Unhealthy")
        error_of(requests.get(url + "/nowhere", timeout=30), 404, "NotFound")
        ok = requests.post(url + "/rerank", json={"model": "sound", "query": "q", "texts": ["a", "b"]}, timeout=60)
        assert ok.status_code == 200 and len(ok.json()) == 2, ok.text
    finally:
        serve.delete("broken")


def wait_for_json(url: str, timeout_s: float = 60):
    """The first answer that is the ingress's (JSON), not the proxy's while the ingress replica starts."""
    deadline, r = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        r = requests.get(url, timeout=30)
        if r.headers.get("content-type", "").startswith("application/json"):
            return r
        time.sleep(0.5)
    raise AssertionError(f"no JSON answer from {url} in {timeout_s}s: {r.status_code if r else None} "
                         f"{r.text if r else ''}")


def test_a_config_whose_model_cannot_be_fetched_fails_with_the_message_alone(serve_url, tmp_path):
    """`serve run <config>` / `serve deploy` build the app in Ray's controller: an unreachable Hub fails the build
    with build_app's short message as the application's status (no traceback), and nothing is deployed: the
    proxy holds no route for it (alone on the port, it answers Ray's plain-text 404, as the README says)."""
    import socket

    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    with socket.socket() as sock:  # a port nobody listens on: the Hub refuses at once
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = ServeDeploySchema.model_validate({"applications": [{
        "name": "unfetchable", "route_prefix": "/unfetchable", "import_path": "serve_app:build_app",
        "args": {"model_id": "org/no-such-reranker", "api_key": None},
        "runtime_env": {"env_vars": {"HF_ENDPOINT": f"http://127.0.0.1:{port}",
                                     "HF_HUB_CACHE": str(tmp_path / "empty-cache")}}}]})
    client = serve.context._get_global_client()
    start = time.monotonic()
    client.deploy_apps(config, _blocking=False)
    try:
        def failed():
            app = serve.status().applications.get("unfetchable")
            return app is not None and str(getattr(app.status, "value", app.status)) == "DEPLOY_FAILED"

        wait_for(failed, 90, "the build of app 'unfetchable' to fail")
        print(f"build failed {time.monotonic() - start:.1f}s after the deploy")
        app = serve.status().applications["unfetchable"]
        message = app.message
        assert message.startswith("Deploying app 'unfetchable' failed with exception:\n"
                                  "cannot fetch model 'org/no-such-reranker': cannot reach the Hugging Face Hub at "
                                  f"http://127.0.0.1:{port}"), message
        assert "model_id=/path/to/model" in message and "Traceback" not in message
        assert len(message.splitlines()) == 3
        assert not app.deployments
        r = requests.get(serve_url + "/-/routes", timeout=30)  # Ray's proxy: route prefix -> app
        routes = r.json() if r.status_code == 200 else {}  # else 503 text: "Route table is not populated yet."
        assert "/unfetchable" not in routes and "unfetchable" not in routes.values(), routes
    finally:
        serve.delete("unfetchable")


def test_a_model_that_loads_but_cannot_run_fails_the_deploy_at_warm_up(serve_url, tiny, tmp_path):
    """Weights and config agree, but no forward can run (a kernel the installed torch lacks): the
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
