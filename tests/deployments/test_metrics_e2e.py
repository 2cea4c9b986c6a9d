"""GET /metrics against the real Ray Serve instance: after a known set of requests, the service port's exposition
holds this application's series with exactly those counts (requests, errors by type, pairs, tokens, batches,
latencies), gathered from Ray's metrics agent, and it needs the API key."""
from __future__ import annotations

import json
import re
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REPO_ROOT
from tests.deployments.conftest import run_app

pytestmark = pytest.mark.slow

KEY = {"Authorization": "Bearer metrics-key"}
MODEL = "metered-bert"
DOCS = ["paris is the capital of france", "berlin", "the quick brown fox jumps over the lazy dog", "madrid"]


def total(families: dict, name: str, **labels) -> float:
    """Sum of the samples `name` whose labels include `labels` (over replicas, nodes and other labels)."""
    family = next((families[f] for f in families if name in (f, f + "_total", f + "_count", f + "_sum", f + "_bucket")),
                  [])
    return sum(s.value for s in family if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def scrape(url: str) -> dict:
    r = requests.get(url + "/metrics", headers=KEY, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return {f.name: f.samples for f in text_string_to_metric_families(r.text)}


@pytest.fixture(scope="module")
def metered_url(serve_url, tiny):
    from ray import serve

    run_app({"models": [{"name": MODEL, "model_id": str(tiny["bert"]), "num_cpus": 0.25}], "api_key": "metrics-key"},
            name="metered", route_prefix="/metered")
    yield serve_url + "/metered"
    serve.delete("metered")


def test_metrics_count_this_apps_requests_across_its_replicas(metered_url):
    tokens = 0
    for i in range(3):
        r = requests.post(metered_url + "/v1/rerank", headers=KEY, timeout=60,
                          json={"query": f"capital number {i}", "documents": DOCS})
        assert r.status_code == 200, r.text
        tokens += r.json()["usage"]["total_tokens"]
    bad = requests.post(metered_url + "/rerank", headers=KEY, json={"query": "q", "texts": [1]}, timeout=30)
    assert bad.status_code == 422
    unknown = requests.post(metered_url + "/rerank", headers=KEY, json={"model": "nope", "query": "q", "texts": ["a"]},
                            timeout=30)
    assert unknown.status_code == 404
    assert requests.get(metered_url + "/metrics", timeout=30).json()["error_type"] == "Unauthorized"

    # Ray's workers report to the node's agent every few seconds, each metric on its own: wait until the last
    # count of every one is in.
    last_counts = [("ray_rerank_http_latency_seconds_count", {"route": "/v1/rerank", "model": MODEL}, 3),
                   ("ray_rerank_pairs_scored_total", {"model": MODEL}, 12),
                   ("ray_rerank_batch_sequences_count", {"model": MODEL}, 3),
                   ("ray_rerank_request_latency_seconds_count", {"model": MODEL}, 3),
                   ("ray_rerank_errors_total", {"error_type": "UnknownModel"}, 1),
                   ("ray_rerank_errors_total", {"error_type": "Validation"}, 1),
                   ("ray_serve_deployment_request_counter_total", {"deployment": "model-" + MODEL}, 3)]
    start, deadline = time.monotonic(), time.monotonic() + 90
    while True:
        families = scrape(metered_url)
        if all(total(families, name, **labels) >= n for name, labels, n in last_counts):
            break
        assert time.monotonic() < deadline, [(name, total(families, name, **labels)) for name, labels, _ in last_counts]
        time.sleep(1)
    print(f"counts complete in /metrics {time.monotonic() - start:.1f}s after the requests")

    assert total(families, "ray_rerank_requests_total", model=MODEL, route="/v1/rerank", status="200") == 3
    assert total(families, "ray_rerank_errors_total", model="", route="/rerank", error_type="Validation") == 1
    assert total(families, "ray_rerank_errors_total", model="unknown", route="/rerank", error_type="UnknownModel") == 1
    assert total(families, "ray_rerank_requests_total", route="/rerank", status="404") == 1
    assert total(families, "ray_rerank_pairs_scored_total", model=MODEL) == 12
    assert total(families, "ray_rerank_tokens_scored_total", model=MODEL) == tokens
    assert total(families, "ray_rerank_request_latency_seconds_count", model=MODEL) == 3  # replica side
    assert total(families, "ray_rerank_queue_wait_seconds_count", model=MODEL) == 3
    # One batch per request (they came one after the other), each of 4 sequences: the (2, 4] bucket. (Ray exports a
    # histogram's _sum from its bucket midpoints, so only the buckets and the count are exact.)
    assert total(families, "ray_rerank_batch_sequences_count", model=MODEL) == 3
    assert total(families, "ray_rerank_batch_sequences_bucket", model=MODEL, le="4.0") == 3
    assert total(families, "ray_rerank_batch_sequences_bucket", model=MODEL, le="2.0") == 0
    assert total(families, "ray_rerank_batch_token_fill_count", model=MODEL) >= 1
    # Ray Serve's own series of this application's deployments are there too, and no other application's.
    assert total(families, "ray_serve_deployment_request_counter_total", application="metered",
                 deployment="model-" + MODEL) == 3
    apps = {s.labels.get("application") for samples in families.values() for s in samples} - {None}
    assert apps == {"metered"}, apps
    assert {s.labels["state"]: s.value for s in families["rerank_metrics_nodes"]} == {"scraped": 1.0, "failed": 0.0}


def test_the_grafana_dashboard_queries_series_the_service_exports(metered_url):
    """Every metric deploy/grafana-dashboard.json queries is in /metrics once the app has served requests."""
    dashboard = json.loads((REPO_ROOT / "deploy" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert exprs and all(exprs)
    wanted = {name for expr in exprs for name in re.findall(r"\b(?:ray|rerank)_[a-z_]+\b", expr)}
    for _ in range(2):  # something for every series: a scored request, a batch, an error
        requests.post(metered_url + "/rerank", headers=KEY, json={"query": "q", "texts": DOCS}, timeout=60)
    requests.post(metered_url + "/rerank", headers=KEY, json={"query": "", "texts": ["a"]}, timeout=30)
    deadline = time.monotonic() + 90
    while True:
        families = scrape(metered_url)
        exported = {s.name for samples in families.values() for s in samples}
        missing = wanted - exported
        if not missing:
            break
        assert time.monotonic() < deadline, f"the dashboard queries series /metrics does not have: {sorted(missing)}"
        time.sleep(1)
