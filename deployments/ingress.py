"""The HTTP ingress deployment: serve_app's FastAPI app, with Ray Serve handles as model backends.

Per replica it loads every model's tokenizer once (models.load_encoder) and builds the app of
serve_app.routes over them; each request then makes one handle call to its model's deployment.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.errors import map_ray_exception, replica_lost
from deployments.metrics import ClusterMetrics, IngressMetrics
from models.encoded import EncodedBatch
from serve_app.routes import create_http_app
from serve_app.schemas import ApiError
from serve_app.service import RerankService
from serve_app.settings import AppSettings

logger = logging.getLogger("ray.serve")

STATUS_TTL_S = 1.0
REPLICAS_TTL_S = 10.0  # the fan-out's replica count may lag a scaling step by this much (pieces still complete)
READY_POLL_S = 2.0  # a score call this slow checks that its model still has a running replica
REPLICAS_WAIT_S = 0.5  # the fan-out never waits longer than this for the replica count (then: max_fanout)


class _ServeStatusCache:
    """Serve's view of replica states, from the controller, fetched at most once a second."""

    def __init__(self) -> None:
        self._at, self._status, self._lock = 0.0, None, asyncio.Lock()

    async def get(self, max_age_s: float = STATUS_TTL_S) -> Any:
        async with self._lock:
            if self._status is None or time.monotonic() - self._at > max_age_s:
                self._status = await asyncio.to_thread(serve.status)  # a blocking controller call
                self._at = time.monotonic()
            return self._status


class HandleBackend:
    """A model's deployment seen through a Ray Serve handle (serve_app.service.ModelBackend)."""

    def __init__(self, handle: DeploymentHandle, status: _ServeStatusCache):
        self.handle, self._status = handle, status

    async def score(self, batch: EncodedBatch) -> np.ndarray:
        """One handle call, sent once more if its replica was lost with it (`replica_lost`: died, unreachable);
        scoring is idempotent, and this is one request's call (or one piece of it), so nothing else is re-sent
        and nothing is scored twice into a response. A second loss, or no replica left, is the caller's error
        (a 503).

        The retry lands on another replica: Ray's router drops a replica whose call failed with ActorDiedError,
        and in any case sends a call only once the chosen replica has accepted it (it queries the replica first,
        Serve's strict max_ongoing_requests), re-routing by itself when that query fails because the replica is
        gone."""
        try:
            return await self._score_once(batch)
        except Exception as exc:
            if not replica_lost(exc):
                raise
            logger.warning("model deployment %r: a replica was lost with a call of %d sequences (%s: %s); "
                           "sending it to another replica", self.handle.deployment_name, len(batch),
                           type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return await self._score_once(batch)

    async def _score_once(self, batch: EncodedBatch) -> np.ndarray:
        """One handle call; while it waits, make sure the model still has a replica to wait for.

        Ray's router waits without end for a replica of a deployment that has none, so a request to a
        model whose replicas are gone would hang: it gets a 503 instead.
        """
        response = self.handle.score.remote(batch)
        pending = asyncio.ensure_future(response)
        while True:
            done, _ = await asyncio.wait({pending}, timeout=READY_POLL_S)
            if done:
                return pending.result()
            ok, why = await self.ready()
            if not ok:
                response.cancel()
                pending.cancel()
                raise ApiError(503, "Unhealthy", f"model deployment {self.handle.deployment_name!r} cannot "
                                                 f"serve: {why}; check /health")

    async def describe(self) -> dict[str, Any]:
        return await self.handle.describe.remote()

    async def ready(self) -> tuple[bool, str]:
        return deployment_readiness(await self._status.get(), self.handle.app_name, self.handle.deployment_name)

    async def replicas(self) -> int | None:
        """RUNNING replicas of the model, from a status at most REPLICAS_TTL_S old: asked on every request, and
        `serve.status()` is costly (profiled: ~7% of the ingress's CPU when fetched every second)."""
        # Bounded: a slow or restarting controller must not hold every request up; the caller then cuts by
        # max_fanout alone.
        status = await asyncio.wait_for(self._status.get(REPLICAS_TTL_S), timeout=REPLICAS_WAIT_S)
        return running_replicas(status, self.handle.app_name, self.handle.deployment_name)


def running_replicas(status: Any, app_name: str, deployment_name: str) -> int | None:
    """RUNNING replicas of a deployment in `serve.status()`, None when it is not there."""
    app = status.applications.get(app_name)
    deployment = app.deployments.get(deployment_name) if app else None
    return None if deployment is None else int(deployment.replica_states.get("RUNNING", 0))


# A deployment the controller calls healthy can serve even with no replica running: scaled to zero, or
# starting one for a request that waits at the handle (Ray's cold-start path).
_SERVING_STATUSES = ("HEALTHY", "UPSCALING", "DOWNSCALING")


def deployment_readiness(status: Any, app_name: str, deployment_name: str) -> tuple[bool, str]:
    """(can serve, why not) of a deployment, from `serve.status()`: a running replica, or a healthy
    deployment that will start one. Replicas that died and cannot come back leave it UNHEALTHY."""
    app = status.applications.get(app_name)
    deployment = app.deployments.get(deployment_name) if app else None
    if deployment is None:
        return False, f"deployment {deployment_name!r} does not exist"
    state = getattr(deployment.status, "value", deployment.status)  # a str Enum in Ray
    if deployment.replica_states.get("RUNNING", 0) > 0 or state in _SERVING_STATUSES:
        return True, "ok"
    return False, f"no running replica (deployment {state}: {_brief(deployment.message)})"


def _brief(message: str) -> str:
    """A deployment's status message without the traceback Ray puts in it after a failed start: the error itself
    (the traceback's last line) says why, in one line that /health and a 503 can carry."""
    lines = [line.strip() for line in (message or "").splitlines() if line.strip()]
    if not any("Traceback (most recent call last)" in line for line in lines):
        return " ".join(lines)
    return lines[-1]


def _serve_request_id() -> str:
    from ray.serve.context import _get_serve_request_context
    return _get_serve_request_context().request_id


@serve.deployment
@serve.ingress()  # the app is built per replica in __serve_build_asgi_app__, over this replica's encoders
class Ingress:
    def __init__(self, settings: AppSettings, handles: dict[str, DeploymentHandle]):
        from models import load_encoder

        token = settings.hf_token.get_secret_value() if settings.hf_token else None
        encoders = {}
        for m in settings.models:
            start = time.perf_counter()
            encoders[m.name] = load_encoder(m.model_id, revision=m.revision, family=m.family,
                                            max_length=m.max_length, token=token)
            logger.info("tokenizer of %r (%s, max input length %d) loaded in %.2fs", m.name,
                        encoders[m.name].family, encoders[m.name].max_length, time.perf_counter() - start)
        status = _ServeStatusCache()
        backends = {name: HandleBackend(handle, status) for name, handle in handles.items()}
        self.service = RerankService(settings, encoders, backends)
        # GET /metrics: this application's series, gathered from every node (deployments/metrics.py).
        self.request_metrics = IngressMetrics()
        self.cluster_metrics = ClusterMetrics(serve.get_replica_context().app_name)

    def __serve_build_asgi_app__(self):
        return create_http_app(self.service, request_id=_serve_request_id, map_error=map_ray_exception,
                               observe=self.request_metrics.observe, metrics=self.cluster_metrics.text)
