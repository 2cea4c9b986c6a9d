"""Failover over real HTTP: one of two replicas of a model is killed under concurrent load, and no client sees
it (docs/API.md, Errors: a call lost with a replica that died is sent once more to another replica of the model).

Requests are cut into pieces (a small token budget, two replicas: the ingress fans out), so a killed replica
takes pieces of requests whose other pieces are scored elsewhere: only the lost piece is sent again, and every
score must still equal the reference (sentence-transformers, run here).
"""
from __future__ import annotations

import glob
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from tests.deployments import reference as ref
from tests.serve_helpers import running_replicas, wait_for
from tests.tiny_models import DOCS, QUERIES

pytestmark = pytest.mark.slow

TOL = 1e-5
APP, MODEL = "failover", "twin"
DEPLOYMENT = f"model-{MODEL}"
CLIENTS = 8
LOST_CALL_LOG = "was lost with a call"
# 36 texts whose reference scores all differ: a score given to the wrong text, or in the wrong place, shows.
POOL = [f"{word} {doc}" for word in ("paris", "berlin", "fox", "café", "yes", "machine") for doc in DOCS]


def replica_actors(app: str, deployment: str) -> list[dict]:
    import ray
    return [a for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{app}#{deployment}#")]


def lost_calls_logged(app: str) -> int:
    """How many times the app's ingress replicas logged a call lost with its replica (and sent again)."""
    import ray
    logs = os.path.join(ray._private.worker._global_node.get_logs_dir_path(), "serve")
    count = 0
    for path in glob.glob(os.path.join(logs, f"replica_{app}_*.log")):
        with open(path, errors="replace") as f:
            count += sum(LOST_CALL_LOG in line for line in f)
    return count


def test_a_replica_killed_under_load_costs_no_client_an_error(serve_url, tiny):
    import ray
    from ray import serve

    from tests.serve_helpers import run_app

    # Small budget: a request of ~12 pairs is several pieces, spread over both replicas; a batch waits up to
    # 0.2 s to fill, so both replicas always hold calls when the kill comes.
    run_app({"models": [{"name": MODEL, "model_id": str(tiny["bert"]), "num_replicas": 2, "num_cpus": 0.25,
                         "token_budget": 160, "max_batch_wait_s": 0.2}], "api_key": None},
            name=APP, route_prefix=f"/{APP}")
    url = f"{serve_url}/{APP}"
    try:
        wait_for(lambda: running_replicas(APP, DEPLOYMENT) == 2, 120, "two running replicas")
        query = QUERIES[0]
        expected = dict(zip(POOL, ref.cross_encoder_raw(tiny["bert"], [(query, t) for t in POOL])))
        logged_before = lost_calls_logged(APP)

        stop, results, lock = threading.Event(), [], threading.Lock()

        def client(seed: int) -> None:
            rng = random.Random(seed)
            while not stop.is_set():
                texts = rng.sample(POOL, rng.randint(8, 16))
                try:
                    r = requests.post(url + "/rerank", json={"query": query, "texts": texts, "raw_scores": True},
                                      timeout=120)
                    outcome = (r.status_code, r.json())
                except Exception as e:  # noqa: BLE001 - a dropped connection is a client-visible error too
                    outcome = (None, repr(e))
                with lock:
                    results.append((texts, *outcome))

        with ThreadPoolExecutor(CLIENTS) as executor:
            futures = [executor.submit(client, seed) for seed in range(CLIENTS)]
            wait_for(lambda: len(results) >= 3 * CLIENTS, 60, "the load to run")
            victims = replica_actors(APP, DEPLOYMENT)
            assert len(victims) == 2
            answered_before_kill = len(results)
            ray.kill(ray.get_actor(victims[0]["name"], namespace=victims[0]["namespace"]), no_restart=True)
            killed = time.monotonic()
            # Load goes on while Serve notices the death and starts a replacement.
            wait_for(lambda: len(results) >= answered_before_kill + 6 * CLIENTS and time.monotonic() - killed > 4,
                     120, "requests after the kill")
            stop.set()
            for f in futures:
                f.result()

        errors = [(status, body) for _, status, body in results if status != 200]
        assert errors == [], errors[:3]
        for texts, _, body in results:
            got = {x["index"]: x["score"] for x in body}
            assert got == pytest.approx({i: expected[t] for i, t in enumerate(texts)}, abs=TOL)
        # The kill did catch calls in flight (else this test proved nothing): the ingress re-sent them.
        retried = lost_calls_logged(APP) - logged_before
        print(f"{len(results)} requests ({len(results) - answered_before_kill} after the kill), all answered "
              f"correctly; {retried} lost calls sent again")
        assert retried >= 1
        assert replica_actors(APP, DEPLOYMENT) and requests.get(url + "/health", timeout=30).status_code == 200
    finally:
        serve.delete(APP)


def test_the_pool_tells_every_text_apart(tiny):
    """Guards the comparison above: the reference scores of the pool all differ (a wrong pairing would show)."""
    raw = ref.cross_encoder_raw(tiny["bert"], [(QUERIES[0], t) for t in POOL])
    assert len(set(np.round(raw, 6))) == len(POOL)
