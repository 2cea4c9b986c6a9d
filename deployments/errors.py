"""Ray's exceptions as the HTTP errors of API.md section 3, at the Ray boundary (the ingress replica).

serve_app/ maps its own and models/' exceptions without knowing Ray (serve_app.schemas.map_exception); what a
handle call can raise besides them (a replica's exception wrapped in a RayTaskError, backpressure, replicas
gone) is mapped here, and everything else falls through to serve_app's mapping.
"""
from __future__ import annotations

from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RayServeException

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
