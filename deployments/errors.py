"""Ray's exceptions as the HTTP errors of docs/API.md, Errors, at the Ray boundary (the ingress replica).

serve_app/ maps its own and models/' exceptions without knowing Ray (serve_app.schemas.map_exception); what a
handle call can raise besides them (a replica's exception wrapped in a RayTaskError, backpressure, replicas
gone) is mapped here, and everything else falls through to serve_app's mapping.
"""
from __future__ import annotations

from ray.exceptions import ActorUnavailableError, ObjectLostError, RayActorError, RayTaskError
from ray.serve.exceptions import (BackPressureError, DeploymentUnavailableError, RayServeException,
                                  ReplicaUnavailableError)

from serve_app.schemas import ApiError, map_exception


def map_ray_exception(exc: BaseException) -> ApiError:
    """The HTTP error for any exception raised while serving a request through Ray Serve handles.

    Ray's backpressure is a 429 with `Retry-After`; a model whose replicas are gone a 503; an exception
    raised in a replica is unwrapped and mapped as if raised here.
    """
    if isinstance(exc, RayTaskError):
        # An exception raised in a replica arrives wrapped (its message is the remote traceback).
        cause = getattr(exc, "cause", None)
        if cause is not None and cause is not exc:
            return map_ray_exception(cause)
    if isinstance(exc, BackPressureError):
        retry = exc.retry_after_s if exc.retry_after_s is not None else 1
        return ApiError(429, "Overloaded", "the service is saturated; retry after the `Retry-After` delay",
                        {"Retry-After": str(max(1, int(-(-retry // 1))))})
    if isinstance(exc, (DeploymentUnavailableError, RayActorError, ActorUnavailableError)):
        return ApiError(503, "Unhealthy", f"a model replica is unavailable ({type(exc).__name__}); "
                                          "retry shortly or check /health")
    if isinstance(exc, RayServeException):
        return ApiError(503, "Unhealthy", f"the model deployment could not serve the request: {exc}")
    return map_exception(exc)


# What a handle call raises when the replica that took it is gone (Ray 2.60): the actor died with the call in flight
# (ActorDiedError), it cannot be reached (ActorUnavailableError, also what a lost gRPC connection to a replica
# becomes), both RayActorErrors; the replica chosen for it left before the call was sent (ReplicaUnavailableError);
# the result went with the replica's node (ObjectLostError). Not here: DeploymentUnavailableError, raised before any
# replica is chosen when the deployment itself cannot serve (no replica would take the call again).
_REPLICA_LOST = (RayActorError, ReplicaUnavailableError, ObjectLostError)


def replica_lost(exc: BaseException) -> bool:
    """Whether a handle call failed because its replica was lost, not because of the call (a retry elsewhere can
    succeed): also when Ray wraps such an error in a RayTaskError."""
    if isinstance(exc, RayTaskError):
        cause = getattr(exc, "cause", None)
        return cause is not None and cause is not exc and replica_lost(cause)
    return isinstance(exc, _REPLICA_LOST)
