"""A throwaway local Ray Serve instance for end-to-end tests, shared by the suites that need one.

Ray allows one instance per process: `local_serve` starts Ray only if none is running (and then shuts
it down again), so suites can each own theirs with a module- or package-scoped fixture.
"""
from __future__ import annotations

import shutil
import socket
import time
from contextlib import contextmanager
from typing import Callable, Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def local_serve(num_cpus: int = 4) -> Iterator[str]:
    """Base URL of the HTTP proxy of a local Ray Serve (`num_cpus` logical CPUs; replicas take fractions).

    A Ray that another suite left running in this process is shared, and left running.
    """
    import ray
    from ray import serve

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    port = serve.context._get_global_client().http_config.port  # an already running Serve keeps its port
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        if started_here:
            ray.shutdown()


def run_app(args: dict, name: str, route_prefix: str):
    """Deploy `build_app(args)` as application `name` and wait until it serves."""
    from ray import serve

    from serve_app import build_app

    serve.run(build_app(args), name=name, route_prefix=route_prefix)


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def replica_counts(app: str, deployment: str) -> dict[str, int]:
    """Serve's replica states of one deployment: {"RUNNING": 2, "STARTING": 1, ...}."""
    from ray import serve

    states = serve.status().applications[app].deployments[deployment].replica_states
    return {str(getattr(state, "value", state)): n for state, n in states.items()}


def running_replicas(app: str, deployment: str) -> int:
    return replica_counts(app, deployment).get("RUNNING", 0)


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.2) -> float:
    """Poll `predicate` until it holds; the seconds it took. Fails the test after `timeout_s`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if predicate():
            return time.monotonic() - start
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
