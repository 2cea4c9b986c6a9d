"""The policy and WorkTracker wired into a real local Ray Serve 2.60 (CPU, fractional CPUs, short delays).

A stand-in deployment holds "tokens" for a while, exactly as a model replica would through WorkTracker,
so this checks the Ray wiring itself (custom metrics hook -> controller -> WorkPolicy pickled by value),
not the models. What it shows:
- two requests carrying a lot of work scale their deployment up (a request-count policy would not:
  two requests are far below its per-replica target), while an idle deployment next to it stays put;
- replicas come back down once the work is done, and no request fails meanwhile;
- a scale-to-zero deployment goes to zero when idle, and a request sent then waits through the cold
  start and succeeds.
"""
from __future__ import annotations

import asyncio
import os
import socket
import time

import pytest

pytestmark = pytest.mark.slow

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402
from ray import serve  # noqa: E402
from ray.serve._private.common import ReplicaState  # noqa: E402

from autoscaling import WorkTracker, autoscaling_options  # noqa: E402

APP = "autoscaling-wiring"


class Holder:
    """Holds `tokens` of work for `seconds`, reporting it like a model replica does."""

    def __init__(self):
        self._work = WorkTracker(token_budget=1000)

    async def __call__(self, tokens: int, seconds: float) -> int:
        with self._work.track(tokens=tokens, pairs=1):
            await asyncio.sleep(seconds)
        return tokens

    def record_autoscaling_stats(self) -> dict[str, float]:
        return self._work.autoscaling_stats()


# Short delays and a fast metrics loop so the test takes seconds (metrics_interval_s is deprecated in
# favour of env vars, but it is what Ray 2.60 still reads for both replica and handle pushes).
FAST = {"metrics_interval_s": 0.25, "look_back_period_s": 1.0, "upscale_delay_s": 0.5, "downscale_delay_s": 3.0}


def options(**overrides) -> dict:
    return autoscaling_options(num_parameters=None, device="cpu", num_gpus=0, token_budget=1000,
                               overrides={**FAST, **overrides})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def serve_instance():
    # Share a Ray another suite already started; otherwise own one (2 logical CPUs, as on CI).
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    yield
    serve.delete(APP)
    if started_here:
        serve.shutdown()
        ray.shutdown()


def running(deployment: str) -> int:
    status = serve.status().applications[APP].deployments[deployment]
    return status.replica_states.get(ReplicaState.RUNNING, 0)


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


@serve.deployment
class Ingress:
    """Two model-like deployments behind one app, as the real app has."""

    def __init__(self, busy, idle):
        self.busy, self.idle = busy, idle


def test_work_scales_one_deployment_up_and_down_without_failing_a_request(serve_instance):
    deployment = serve.deployment(Holder)
    busy = deployment.options(name="busy", ray_actor_options={"num_cpus": 0.1},
                              **options(min_replicas=1, max_replicas=3, target_work_per_replica=1000))
    idle = deployment.options(name="idle", ray_actor_options={"num_cpus": 0.1},
                              **options(min_replicas=1, max_replicas=3, target_work_per_replica=1000))
    serve.run(Ingress.options(ray_actor_options={"num_cpus": 0.1}).bind(busy.bind(), idle.bind()),
              name=APP, route_prefix="/wiring")
    handle = serve.get_deployment_handle("busy", APP)
    assert running("busy") == running("idle") == 1

    # Two requests, 2,500 tokens each: 5,000 tokens held / 1,000 per replica -> the cap, 3 replicas.
    # Ray's request-count rule would keep 1 replica: 2 requests are under its target of 16 per replica.
    assert options()["autoscaling_config"]["target_ongoing_requests"] >= 2
    responses = [handle.remote(2500, 12.0) for _ in range(2)]
    wait_for(lambda: running("busy") == 3, 15, "the busy deployment to reach 3 replicas")
    assert running("idle") == 1

    assert [r.result(timeout_s=30) for r in responses] == [2500, 2500]
    # Work done: back to the floor after downscale_delay_s; requests sent meanwhile all succeed.
    during_downscale = [handle.remote(10, 0.05) for _ in range(20)]
    wait_for(lambda: running("busy") == 1, 20, "the busy deployment to come back to 1 replica")
    assert [r.result(timeout_s=30) for r in during_downscale] == [10] * 20
    assert running("idle") == 1


def test_scale_to_zero_then_a_request_waits_through_the_cold_start(serve_instance):
    deployment = serve.deployment(Holder).options(
        name="sleepy", ray_actor_options={"num_cpus": 0.1},
        **options(min_replicas=0, max_replicas=2, downscale_delay_s=0.5, downscale_to_zero_delay_s=4.0,
                  target_work_per_replica=1000))
    serve.run(deployment.bind(), name=APP, route_prefix="/wiring")
    assert running("sleepy") == 1  # initial_replicas 1: the deploy proves the replica starts
    wait_for(lambda: running("sleepy") == 0, 20, "the idle deployment to scale to zero")

    handle = serve.get_deployment_handle("sleepy", APP)
    started = time.monotonic()
    assert handle.remote(42, 0.0).result(timeout_s=60) == 42  # queued at the handle, not rejected
    assert running("sleepy") == 1
    assert time.monotonic() - started > 0.1  # it really waited for a replica to start
