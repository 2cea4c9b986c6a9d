"""GET /metrics of the service port: the cluster's Prometheus series of this application, gathered by the ingress.

Every metric of the project is a Ray metric, recorded where it happens (request counts, errors and HTTP latency in
the ingress, below; pairs, tokens, batches, queueing and replica latency in the model replicas,
deployments/model.py) and exported with Ray's `ray_` prefix by each node's metrics agent, which sums nothing and
keeps one series per replica. `ClusterMetrics` reads every alive node's agent (its metrics export port, from
`ray.nodes()`), keeps the project's series (`ray_rerank_*`) and Ray Serve's (`ray_serve_*`) of this application,
and serves them as one Prometheus text exposition: the same numbers a Prometheus scraping every node would hold,
from the port clients already know. Counts lag the requests by Ray's metrics report interval (seconds).
"""
from __future__ import annotations

import asyncio
import logging
import time
import urllib.request
from typing import Any, Awaitable, Callable, Iterable

from ray.serve.metrics import Counter, Histogram

from serve_app.schemas import ApiError

logger = logging.getLogger("ray.serve")

KEPT_PREFIXES = ("ray_rerank_", "ray_serve_")
# Labels the OpenTelemetry exporter adds to every series: constant, so they only lengthen each line.
DROPPED_LABELS = frozenset({"otel_scope_name", "otel_scope_schema_url", "otel_scope_version"})
SCRAPE_TIMEOUT_S = 5.0  # a node's agent that does not answer in this time is left out of this exposition
SCRAPE_TTL_S = 1.0  # several scrapers (or a refreshing dashboard) within this time share one gathering
NODES_TTL_S = 10.0  # nodes joining or leaving appear after this long
LATENCY_BUCKETS_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]


class IngressMetrics:
    """What the ingress sees of each answered request (serve_app.routes.RequestObserver), as Ray metrics."""

    def __init__(self) -> None:
        self.requests = Counter("rerank_requests", description="HTTP requests answered, by model, route and status.",
                                tag_keys=("model", "route", "status"))
        self.errors = Counter("rerank_errors", description="Error answers, by model, route and error_type "
                              "(docs/API.md, Errors).", tag_keys=("model", "route", "error_type"))
        self.latency = Histogram("rerank_http_latency_seconds", description="Request received by the ingress to "
                                 "answer sent: parsing, tokenizing, scoring, shaping.", boundaries=LATENCY_BUCKETS_S,
                                 tag_keys=("model", "route"))

    def observe(self, route: str, model: str, status: int, error_type: str, seconds: float) -> None:
        self.requests.inc(tags={"model": model, "route": route, "status": str(status)})
        if error_type:
            self.errors.inc(tags={"model": model, "route": route, "error_type": error_type})
        self.latency.observe(seconds, tags={"model": model, "route": route})


def node_metrics_urls() -> list[str]:
    """The metrics export endpoint of every alive Ray node (a blocking GCS call)."""
    import ray

    urls = []
    for node in ray.nodes():
        port = node.get("MetricsExportPort")
        if node.get("Alive") and isinstance(port, int) and port > 0:
            urls.append(f"http://{node['NodeManagerAddress']}:{port}/metrics")
    return urls


def fetch_text(url: str, timeout_s: float) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 - a cluster-internal http URL
        return response.read().decode("utf-8")


def merge_expositions(texts: Iterable[str], app_name: str | None) -> list[Any]:
    """The metric families of `texts` (one exposition per node) named with KEPT_PREFIXES, their samples of
    `app_name` (samples without an `application` label, such as the Serve controller's, are kept), one family per
    name with every node's samples."""
    from prometheus_client.parser import text_string_to_metric_families

    merged: dict[str, Any] = {}
    for text in texts:
        for family in text_string_to_metric_families(_kept_lines(text)):
            if not family.name.startswith(KEPT_PREFIXES):
                continue
            target = merged.get(family.name)
            if target is None:
                target = merged[family.name] = _empty_like(family)
            elif target.type != family.type:
                continue  # two nodes of different Ray versions disagreeing on a type: keep the first
            for sample in family.samples:
                if app_name is not None and sample.labels.get("application", app_name) != app_name:
                    continue
                labels = {k: v for k, v in sample.labels.items() if k not in DROPPED_LABELS}
                target.samples.append(sample._replace(labels=labels))
    return [family for family in merged.values() if family.samples]


def _kept_lines(text: str) -> str:
    """The lines of the kept families only: a node's exposition is mostly Ray's own system series, and parsing is
    the costly part."""
    kept = []
    for line in text.splitlines():
        name = line.split(" ", 3)[2] if line.startswith(("# HELP ", "# TYPE ")) and line.count(" ") >= 2 else line
        if name.startswith(KEPT_PREFIXES):
            kept.append(line)
    return "\n".join(kept) + "\n"


def _empty_like(family: Any) -> Any:
    from prometheus_client.metrics_core import Metric

    return Metric(family.name, family.documentation, family.type, family.unit)


def exposition(families: list[Any], scraped: int, failed: int) -> str:
    """Prometheus text of `families`, plus how many nodes were read (a scraper can alert on failed ones)."""
    from prometheus_client.exposition import generate_latest
    from prometheus_client.metrics_core import GaugeMetricFamily
    from prometheus_client.registry import CollectorRegistry

    nodes = GaugeMetricFamily("rerank_metrics_nodes", "Ray nodes whose metrics this exposition holds (scraped) or "
                              "lacks (failed: no answer in time).", labels=["state"])
    nodes.add_metric(["scraped"], scraped)
    nodes.add_metric(["failed"], failed)

    class _Collected:
        def collect(self):
            return [*families, nodes]

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collected())
    return generate_latest(registry).decode("utf-8")


class ClusterMetrics:
    """`await text()`: this application's metrics across all its replicas, read from every node's agent."""

    def __init__(self, app_name: str | None, *, urls: Callable[[], list[str]] = node_metrics_urls,
                 fetch: Callable[[str, float], str] = fetch_text, clock: Callable[[], float] = time.monotonic):
        self.app_name, self._urls, self._fetch, self._clock = app_name, urls, fetch, clock
        self._lock = asyncio.Lock()
        self._nodes: tuple[float, list[str]] | None = None
        self._text: tuple[float, str] | None = None

    async def text(self) -> str:
        async with self._lock:
            if self._text is None or self._clock() - self._text[0] > SCRAPE_TTL_S:
                self._text = (self._clock(), await self._gather())
            return self._text[1]

    async def _gather(self) -> str:
        urls = await self._node_urls()
        results = await asyncio.gather(*(self._bounded(url) for url in urls), return_exceptions=True)
        texts = [r for r in results if isinstance(r, str)]
        failed = {url: r for url, r in zip(urls, results) if not isinstance(r, str)}
        for url, error in failed.items():
            logger.warning("metrics of node %s not read: %r", url, error)
        if not texts:
            why = "; ".join(f"{u}: {type(e).__name__}" for u, e in failed.items()) or "no node exports metrics"
            raise ApiError(503, "Unhealthy", f"no Ray node's metrics could be read ({why}); Ray's metrics "
                                             "collection may be disabled (RAY_enable_metrics_collection)")
        families = await asyncio.to_thread(merge_expositions, texts, self.app_name)
        return exposition(families, scraped=len(texts), failed=len(failed))

    async def _node_urls(self) -> list[str]:
        if self._nodes is None or self._clock() - self._nodes[0] > NODES_TTL_S:
            self._nodes = (self._clock(), await asyncio.to_thread(self._urls))
        return self._nodes[1]

    def _bounded(self, url: str) -> Awaitable[str]:
        return asyncio.wait_for(asyncio.to_thread(self._fetch, url, SCRAPE_TIMEOUT_S), SCRAPE_TIMEOUT_S + 0.5)
