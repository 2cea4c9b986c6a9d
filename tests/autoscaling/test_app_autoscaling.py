"""Autoscaling of the real application: `build_app` on a local Ray Serve, driven over real HTTP.

Tiny models on CPU, fractional CPUs per replica, short delays. What it shows:
- two clients sending requests of 500 pairs scale THEIR model to its maximum (a request-count policy
  would not: two requests are far below its per-replica target), while the model next to it stays put;
- the replicas come back down after the load, and no request fails or returns a wrong score while
  replicas are added or removed (every score is checked against sentence-transformers, run here);
- a scale-to-zero model goes to zero when idle, still counts as healthy, and a burst sent then waits
  through the cold start and is answered in full; with a bounded `max_queued_requests` the same burst
  would be partly turned away (429), which is why the scale-to-zero preset leaves the queue unbounded.
"""
from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from serve_app.settings import deployment_name
from tests.deployments import reference as ref
from tests.serve_helpers import local_serve, run_app, running_replicas, wait_for
from tests.tiny_models import DOCS, QUERIES

pytestmark = [pytest.mark.slow,
              # FAST's metrics_interval_s: deprecated in Ray 2.60 (for env vars) yet still what it reads.
              pytest.mark.filterwarnings("ignore:The `metrics_interval_s` field:DeprecationWarning")]

APP = "autoscaling"
TOL = 1e-5
# Fast control loop: replicas and handles report every 0.25 s (metrics_interval_s is deprecated for env
# vars in Ray 2.60 but still what it reads for both), over a 1 s window; short delays both ways.
FAST = {"metrics_interval_s": 0.25, "look_back_period_s": 1.0, "upscale_delay_s": 0.5, "downscale_delay_s": 3.0}
MAX_REPLICAS = 2  # a replica start (process, torch + transformers imports) takes 10-20 s on 2 cores
TARGET_TOKENS = 2000  # per replica; one 500-pair request holds several times that
CLIENTS = 2
QUERY = QUERIES[0]
POOL = [f"{DOCS[i % len(DOCS)]} {i}" for i in range(1000)]  # distinct texts: each score is checkable


def scaled(**overrides) -> dict:
    return {"num_cpus": 0.2, "autoscaling_config": {**FAST, **overrides}}


@pytest.fixture(scope="module")
def app_url(tiny):
    models = [
        {"name": "busy", "model_id": str(tiny["modular"]), "token_budget": 1024,
         **scaled(max_replicas=MAX_REPLICAS, target_work_per_replica=TARGET_TOKENS)},
        {"name": "quiet", "model_id": str(tiny["bert"]),
         **scaled(max_replicas=MAX_REPLICAS, target_work_per_replica=TARGET_TOKENS)},
        {"name": "sleepy", "model_id": str(tiny["modular"]),
         **scaled(preset="scale-to-zero", max_replicas=1, downscale_to_zero_delay_s=3.0)},
        # The same with a bounded handle queue, to show what the preset's unbounded queue avoids; it
        # starts at zero (nothing to prove by starting it, and a replica start is the costliest step here).
        {"name": "sleepy-bounded", "model_id": str(tiny["modular"]), "max_queued_requests": 1,
         **scaled(preset="scale-to-zero", max_replicas=1, initial_replicas=0)},
    ]
    with local_serve(num_cpus=4) as url:
        start = time.monotonic()
        run_app({"models": models, "api_key": None}, name=APP, route_prefix="/")
        print(f"app deployed in {time.monotonic() - start:.1f}s")
        yield url


@pytest.fixture(scope="module")
def reference(tiny) -> dict[str, dict[str, float]]:
    """Raw scores of (QUERY, text) for every text of POOL, from sentence-transformers."""
    pairs = [(QUERY, t) for t in POOL]
    return {"modular": dict(zip(POOL, ref.cross_encoder_raw(tiny["modular"], pairs))),
            "bert": dict(zip(POOL, ref.cross_encoder_raw(tiny["bert"], pairs)))}


def deployed_config(model: str):
    """The DeploymentConfig the Serve controller runs the model's deployment with."""
    from ray import serve

    info, _ = serve.context._get_global_client().get_deployment_info(deployment_name(model), APP)
    return info.deployment_config


def running(model: str) -> int:
    return running_replicas(APP, deployment_name(model))


def rerank(url: str, model: str, texts: list[str]) -> requests.Response:
    return requests.post(f"{url}/rerank", json={"query": QUERY, "texts": texts, "model": model,
                                                "raw_scores": True}, timeout=120)


def check(response: requests.Response, texts: list[str], expected: dict[str, float]) -> None:
    assert response.status_code == 200, response.text
    got = {item["index"]: item["score"] for item in response.json()}
    assert got == pytest.approx({i: expected[t] for i, t in enumerate(texts)}, abs=TOL)


class Load:
    """`clients` threads, each sending a request of `size` texts, then pausing, until stopped; every
    response kept. The pause leaves CPU for new replicas to start on a 2-core machine."""

    def __init__(self, url: str, model: str, clients: int, size: int, seed: int, pause_s: float = 0.0):
        self.url, self.model, self.size, self.pause_s = url, model, size, pause_s
        self.rng, self.stop, self.sent = random.Random(seed), threading.Event(), []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def _client(self):
        while not self.stop.is_set():
            with self.lock:
                texts = self.rng.sample(POOL, self.size)
            response = rerank(self.url, self.model, texts)
            with self.lock:
                self.sent.append((texts, response))
            self.stop.wait(self.pause_s)

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)


def test_work_scales_the_loaded_model_alone_and_back_down_without_a_wrong_answer(app_url, reference):
    busy = deployed_config("busy")
    assert busy.autoscaling_config.policy.policy_function == "autoscaling.policy:WorkPolicy"
    assert busy.autoscaling_config.policy.policy_kwargs == {"metric": "tokens", "target_per_replica": 2000.0}
    assert running("busy") == running("quiet") == 1
    # Ray's request-count rule would keep one replica: CLIENTS requests at a time are under its target.
    assert CLIENTS < busy.autoscaling_config.target_ongoing_requests

    quiet_seen = set()
    with Load(app_url, "busy", clients=CLIENTS, size=500, seed=1, pause_s=1.0) as heavy:
        took = wait_for(lambda: quiet_seen.add(running("quiet")) or running("busy") == MAX_REPLICAS, 60,
                        f"busy to reach {MAX_REPLICAS} replicas")
        print(f"busy at {MAX_REPLICAS} replicas {took:.1f}s into the load")
        time.sleep(2)  # keep the load on the grown deployment a little
    assert quiet_seen == {1} and running("quiet") == 1  # the other model never moved

    # Light traffic while the busy model shrinks: replicas are removed under live requests.
    with Load(app_url, "busy", clients=1, size=3, seed=2) as light:
        took = wait_for(lambda: running("busy") == 1, 60, "busy to come back to 1 replica")
        print(f"busy back to 1 replica {took:.1f}s after the load")
        time.sleep(1)
    assert running("quiet") == 1

    print(f"{len(heavy.sent)} heavy and {len(light.sent)} light requests")
    assert len(heavy.sent) >= CLIENTS and light.sent
    for texts, response in heavy.sent + light.sent:
        check(response, texts, reference["modular"])
    check(rerank(app_url, "quiet", POOL[:20]), POOL[:20], reference["bert"])


def test_scale_to_zero_then_a_burst_waits_through_the_cold_start(app_url, reference):
    sleepy = deployed_config("sleepy")
    assert (sleepy.autoscaling_config.min_replicas, sleepy.max_queued_requests) == (0, -1)  # the preset's
    wait_for(lambda: running("sleepy") == 0 and running("sleepy-bounded") == 0, 60, "both idle to scale to zero")
    # A model at zero replicas is not broken: the service stays healthy.
    assert requests.get(f"{app_url}/health", timeout=30).status_code == 200

    # One burst to each model at once (their cold starts overlap): 8 requests of 5 texts.
    texts = [POOL[i:i + 5] for i in range(0, 40, 5)]
    start = time.monotonic()
    with ThreadPoolExecutor(2 * len(texts)) as pool:
        unbounded = [pool.submit(rerank, app_url, "sleepy", t) for t in texts]
        bounded = [pool.submit(rerank, app_url, "sleepy-bounded", t) for t in texts]
        unbounded, bounded = [f.result() for f in unbounded], [f.result() for f in bounded]
    print(f"cold start bursts answered in {time.monotonic() - start:.1f}s")

    for t, response in zip(texts, unbounded):
        check(response, t, reference["modular"])  # every request of the burst waited and got its scores
    assert running("sleepy") == 1

    codes = sorted(r.status_code for r in bounded)
    print(f"bounded queue at zero replicas: {codes}")
    assert 429 in codes and set(codes) <= {200, 429}, codes  # past 1 queued request: turned away
    for t, response in zip(texts, bounded):
        if response.status_code == 200:
            check(response, t, reference["modular"])
