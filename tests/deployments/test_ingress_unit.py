"""When the ingress considers a model able to serve (from Serve's status), without Ray running."""
from __future__ import annotations

from types import SimpleNamespace as NS

import pytest
from ray.serve._private.common import DeploymentStatus, ReplicaState

from deployments.ingress import deployment_readiness


def status(dep_status, running=0, starting=0, app="app", name="model-a"):
    states = {ReplicaState.RUNNING: running, ReplicaState.STARTING: starting}
    deployment = NS(status=dep_status, replica_states={k: v for k, v in states.items() if v}, message="why")
    return NS(applications={app: NS(deployments={name: deployment})})


@pytest.mark.parametrize("dep_status, running, ok", [
    (DeploymentStatus.HEALTHY, 1, True),
    (DeploymentStatus.UNHEALTHY, 1, True),       # one replica of several failing: the others still serve
    (DeploymentStatus.HEALTHY, 0, True),         # scaled to zero: a request starts a replica (cold start)
    (DeploymentStatus.UPSCALING, 0, True),       # that replica is starting
    (DeploymentStatus.UNHEALTHY, 0, False),      # replicas died and none came back
    (DeploymentStatus.DEPLOY_FAILED, 0, False),
    (DeploymentStatus.UPDATING, 0, False),       # not loaded yet
])
def test_deployment_readiness(dep_status, running, ok):
    got, why = deployment_readiness(status(dep_status, running), "app", "model-a")
    assert got is ok
    if not ok:
        assert dep_status.value in why


def test_a_failed_start_is_explained_by_its_error_not_its_traceback():
    """Ray's message after a failed start ends with the constructor's traceback; /health carries the error line."""
    message = ("The deployment failed to start 1 times in a row. This may be due to a problem with its constructor "
               "or initial health check failing. See controller logs for details. Error:\n"
               "Traceback (most recent call last):\n  File \"/x/replica.py\", line 3, in initialize\n    raise\n"
               "models.errors.ModelLoadError: cannot load model '/m/broken' (file model.safetensors): corrupt\n")
    failed = status(DeploymentStatus.DEPLOY_FAILED)
    failed.applications["app"].deployments["model-a"].message = message
    ok, why = deployment_readiness(failed, "app", "model-a")
    assert not ok
    assert why == ("no running replica (deployment DEPLOY_FAILED: models.errors.ModelLoadError: cannot load model "
                   "'/m/broken' (file model.safetensors): corrupt)")


def test_missing_deployment_or_app_is_not_ready():
    assert deployment_readiness(status(DeploymentStatus.HEALTHY, 1), "app", "model-b")[0] is False
    assert deployment_readiness(status(DeploymentStatus.HEALTHY, 1), "other", "model-a")[0] is False


def test_running_replicas_counts_running_only():
    from deployments.ingress import running_replicas
    assert running_replicas(status(DeploymentStatus.HEALTHY, 3, starting=1), "app", "model-a") == 3
    assert running_replicas(status(DeploymentStatus.UPSCALING, 0, starting=1), "app", "model-a") == 0
    assert running_replicas(status(DeploymentStatus.HEALTHY, 1), "app", "model-b") is None


def test_the_replica_count_never_waits_on_a_stuck_controller(monkeypatch):
    """serve.status() has no timeout of its own: a stuck controller must not hold up the requests that ask."""
    import asyncio
    import threading
    import time

    from deployments import ingress

    release = threading.Event()

    def stuck_status():
        release.wait(5)
        return None

    monkeypatch.setattr(ingress.serve, "status", stuck_status)
    monkeypatch.setattr(ingress, "REPLICAS_WAIT_S", 0.2)

    class Handle:
        app_name, deployment_name = "app", "model-a"

    backend = ingress.HandleBackend(Handle(), ingress._ServeStatusCache())

    async def ask() -> float:
        start = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            await backend.replicas()
        elapsed = time.monotonic() - start
        release.set()  # let the status thread end, so the loop's shutdown does not wait for it
        return elapsed

    try:
        # Timed inside the loop: asyncio.run's shutdown then waits for the stuck status thread itself.
        assert asyncio.run(ask()) < 2
    finally:
        release.set()
