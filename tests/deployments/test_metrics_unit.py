"""GET /metrics' gathering without Ray running: node expositions merged into one, this application's series only."""
from __future__ import annotations

import asyncio

import pytest
from prometheus_client.parser import text_string_to_metric_families

from deployments.metrics import ClusterMetrics, exposition, merge_expositions
from serve_app.schemas import ApiError

# What a node's Ray metrics agent serves (trimmed): a counter and a histogram of two apps, and other series.
NODE_A = """# HELP ray_rerank_pairs_scored_total Sequences scored.
# TYPE ray_rerank_pairs_scored_total counter
ray_rerank_pairs_scored_total{NodeAddress="10.0.0.1",application="rerank",deployment="model-a",model="a",otel_scope_name="x",otel_scope_version="",replica="r1"} 12.0
ray_rerank_pairs_scored_total{NodeAddress="10.0.0.1",application="other",deployment="model-z",model="z",replica="r9"} 5.0
# HELP ray_rerank_queue_wait_seconds Arrival at the replica to start of the forward batch.
# TYPE ray_rerank_queue_wait_seconds histogram
ray_rerank_queue_wait_seconds_bucket{application="rerank",le="0.01",model="a",replica="r1"} 1.0
ray_rerank_queue_wait_seconds_bucket{application="rerank",le="+Inf",model="a",replica="r1"} 3.0
ray_rerank_queue_wait_seconds_count{application="rerank",model="a",replica="r1"} 3.0
ray_rerank_queue_wait_seconds_sum{application="rerank",model="a",replica="r1"} 0.5
# HELP ray_serve_controller_num_control_loops The number of control loops.
# TYPE ray_serve_controller_num_control_loops gauge
ray_serve_controller_num_control_loops{SessionName="s"} 42.0
# HELP ray_node_cpu_utilization CPU use.
# TYPE ray_node_cpu_utilization gauge
ray_node_cpu_utilization{ip="10.0.0.1"} 12.5
"""
NODE_B = """# HELP ray_rerank_pairs_scored_total Sequences scored.
# TYPE ray_rerank_pairs_scored_total counter
ray_rerank_pairs_scored_total{NodeAddress="10.0.0.2",application="rerank",deployment="model-a",model="a",replica="r2"} 30.0
"""


def parsed(text: str) -> dict[str, list]:
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def test_merge_keeps_this_apps_series_of_every_node_under_one_family():
    text = exposition(merge_expositions([NODE_A, NODE_B], "rerank"), scraped=2, failed=0)
    families = parsed(text)
    pairs = families["ray_rerank_pairs_scored"]
    assert sorted((s.labels["replica"], s.value) for s in pairs) == [("r1", 12.0), ("r2", 30.0)]
    assert all("otel_scope_name" not in s.labels for s in pairs)  # constant exporter labels dropped
    assert text.count("# TYPE ray_rerank_pairs_scored_total counter") == 1  # one family, both nodes' samples
    assert [s.value for s in families["ray_rerank_queue_wait_seconds"] if s.name.endswith("_count")] == [3.0]
    assert families["ray_serve_controller_num_control_loops"][0].value == 42.0  # no application label: kept
    assert "ray_node_cpu_utilization" not in families  # not the project's nor Ray Serve's
    assert "model=\"z\"" not in text  # another application's replicas
    assert {s.labels["state"]: s.value for s in families["rerank_metrics_nodes"]} == {"scraped": 2.0, "failed": 0.0}


def test_cluster_metrics_reads_every_node_once_a_second_and_leaves_out_a_silent_one():
    calls = []
    now = [100.0]

    def fetch(url, timeout_s):
        calls.append(url)
        if url == "http://dead:1/metrics":
            raise OSError("connection refused")
        return {"http://a:1/metrics": NODE_A, "http://b:1/metrics": NODE_B}[url]

    metrics = ClusterMetrics("rerank", urls=lambda: ["http://a:1/metrics", "http://b:1/metrics",
                                                     "http://dead:1/metrics"], fetch=fetch, clock=lambda: now[0])

    text = asyncio.run(metrics.text())
    assert len(calls) == 3
    assert {s.labels["state"]: s.value for s in parsed(text)["rerank_metrics_nodes"]} == {"scraped": 2.0,
                                                                                         "failed": 1.0}
    assert asyncio.run(metrics.text()) == text and len(calls) == 3  # within SCRAPE_TTL_S: the same gathering
    now[0] += 2
    asyncio.run(metrics.text())
    assert len(calls) == 6


def test_no_readable_node_is_a_json_503():
    def fetch(url, timeout_s):
        raise OSError("refused")

    metrics = ClusterMetrics("rerank", urls=lambda: ["http://a:1/metrics"], fetch=fetch)
    with pytest.raises(ApiError) as e:
        asyncio.run(metrics.text())
    assert e.value.status == 503 and e.value.error_type == "Unhealthy" and "http://a:1/metrics" in e.value.message
    with pytest.raises(ApiError, match="no node exports metrics"):
        asyncio.run(ClusterMetrics("rerank", urls=lambda: [], fetch=fetch).text())
