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


# --- failover: a call lost with its replica is sent once more -----------------------------------------------------

class FakeHandle:
    """A deployment handle whose calls answer, in turn, with `outcomes` (an exception is raised, else returned)."""

    app_name, deployment_name = "app", "model-a"

    def __init__(self, outcomes):
        self.outcomes, self.sent = list(outcomes), []
        handle = self

        class Method:
            @staticmethod
            def remote(batch):
                handle.sent.append(batch)
                outcome = handle.outcomes.pop(0)

                class Response:
                    def __await__(self):
                        async def answer():
                            if isinstance(outcome, BaseException):
                                raise outcome
                            return outcome
                        return answer().__await__()

                    def cancel(self):
                        pass

                return Response()

        self.score = Method()


def _remote(exc):
    from ray.exceptions import RayTaskError
    try:
        raise exc
    except Exception as e:
        return RayTaskError("score", "Traceback ...", e).as_instanceof_cause()


def _lost_errors():
    from ray.exceptions import ActorDiedError, ActorUnavailableError, ObjectLostError
    from ray.serve.exceptions import ReplicaUnavailableError
    return [ActorDiedError(), ActorUnavailableError("unreachable", None), ReplicaUnavailableError("r1"),
            ObjectLostError("ab" * 14, "owner", "call site"), _remote(ActorDiedError())]


def _score(handle):
    import asyncio

    from deployments.ingress import HandleBackend, _ServeStatusCache
    from models.encoded import EncodedBatch

    backend = HandleBackend(handle, _ServeStatusCache())
    return asyncio.run(backend.score(EncodedBatch.from_lists([[1, 2], [3]])))


@pytest.mark.parametrize("lost", range(5))
def test_a_call_lost_with_its_replica_is_sent_once_more(lost):
    import numpy as np

    scores = np.array([0.5, -1.0], dtype=np.float32)
    handle = FakeHandle([_lost_errors()[lost], scores])
    got = _score(handle)
    assert got is scores and len(handle.sent) == 2 and handle.sent[0] is handle.sent[1]


def test_a_second_loss_is_the_callers_error_and_there_is_no_third_call():
    from ray.exceptions import ActorDiedError

    from deployments.errors import map_ray_exception

    handle = FakeHandle([ActorDiedError(), ActorDiedError(), None])
    with pytest.raises(ActorDiedError) as err:
        _score(handle)
    assert len(handle.sent) == 2
    assert (map_ray_exception(err.value).status, map_ray_exception(err.value).error_type) == (503, "Unhealthy")


@pytest.mark.parametrize("error", [
    lambda: _remote(ValueError("the model's own error")),
    lambda: __import__("ray.serve.exceptions", fromlist=["x"]).BackPressureError(
        num_queued_requests=1, max_queued_requests=1),
    lambda: __import__("ray.serve.exceptions", fromlist=["x"]).DeploymentUnavailableError("model-a"),
    lambda: RuntimeError("anything else"),
])
def test_other_failures_are_not_sent_again(error):
    exc = error()
    handle = FakeHandle([exc, None])
    with pytest.raises(type(exc)):
        _score(handle)
    assert len(handle.sent) == 1
