"""Ray's exceptions -> the HTTP errors of docs/API.md, Errors (deployments/errors.py), without Ray running."""
from __future__ import annotations

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from deployments.errors import map_ray_exception
from models.errors import DeviceMemoryError, InputError, InputTooLongError, ModelLoadError
from serve_app.schemas import ApiError


def _remote(exc: Exception) -> RayTaskError:
    """What a handle raises when the replica raised `exc`."""
    try:
        raise exc
    except Exception as e:
        return RayTaskError("score", "Traceback ...", e).as_instanceof_cause()


@pytest.mark.parametrize("exc, status, error_type", [
    (BackPressureError(num_queued_requests=3, max_queued_requests=3, status_code=429, retry_after_s=1),
     429, "Overloaded"),
    (DeploymentUnavailableError("model-a"), 503, "Unhealthy"),
    (ActorDiedError(), 503, "Unhealthy"),
    (ActorUnavailableError("gone", None), 503, "Unhealthy"),
    # What is not Ray's falls through to serve_app's mapping.
    (ApiError(404, "UnknownModel", "x"), 404, "UnknownModel"),
    (InputTooLongError("too long", index=2), 422, "Validation"),
    (ModelLoadError("org/x", "no network"), 503, "Unhealthy"),
    (ZeroDivisionError(), 500, "Internal"),
])
def test_map_ray_exception(exc, status, error_type):
    err = map_ray_exception(exc)
    assert (err.status, err.error_type) == (status, error_type)
    assert err.message


def test_backpressure_carries_retry_after():
    err = map_ray_exception(BackPressureError(num_queued_requests=1, max_queued_requests=1, status_code=429,
                                              retry_after_s=0.2))
    assert err.headers == {"Retry-After": "1"}
    err = map_ray_exception(BackPressureError(num_queued_requests=1, max_queued_requests=1))
    assert err.status == 429 and err.headers["Retry-After"] == "1"


def test_errors_raised_in_a_replica_are_unwrapped():
    err = map_ray_exception(_remote(InputTooLongError("input 4 is too long", index=4)))
    assert (err.status, err.error_type) == (422, "Validation") and err.message == "input 4 is too long"
    assert map_ray_exception(_remote(RuntimeError("kernel bug"))).status == 500


def test_a_sequence_the_device_had_no_memory_for_is_a_503_from_a_replica():
    """Raised in a model replica (it crosses Ray pickled) and mapped in the ingress; the replica stays healthy."""
    import pickle

    exc = pickle.loads(pickle.dumps(DeviceMemoryError("model 'm' ran out of device memory scoring one sequence")))
    err = map_ray_exception(_remote(exc))
    assert (err.status, err.error_type) == (503, "Unhealthy") and "ran out of device memory" in err.message


def test_input_errors_keep_their_place_across_ray():
    exc = pickle_round_trip(InputError("the query is not valid Unicode", index=3, field="query"))
    assert (exc.index, exc.field, str(exc)) == (3, "query", "the query is not valid Unicode")


def pickle_round_trip(exc):
    import pickle
    return pickle.loads(pickle.dumps(exc))
