"""One local Ray Serve instance for tests/deployments (Ray starts slowly on 2 cores); `tiny`: tests/conftest.py."""
from __future__ import annotations

import time

import pytest
import requests

from tests.serve_helpers import copy_model, local_serve, run_app  # noqa: F401 - copy_model: for test_failures


@pytest.fixture(scope="package")
def serve_url():
    """Base URL of the HTTP proxy of a throwaway Ray cluster (4 logical CPUs; replicas take fractions).

    Package-scoped: started once for tests/deployments and gone before other suites run. A Ray that
    another suite left running in this process is shared (Ray allows one per process).
    """
    with local_serve(num_cpus=4) as url:
        yield url


# Small token budgets on purpose: requests bigger than a budget must be split and still come back whole,
# and single sequences longer than a budget (bert: up to 64 tokens > 40) take the path around the batcher.
MAIN_MODELS = {
    "modular": {"token_budget": 256, "max_batch_wait_s": 0.02},
    "bert": {"token_budget": 40},
    "qwen": {},
}


@pytest.fixture(scope="package")
def main_url(serve_url, tiny):
    """The application under test: three families served at once, default settings otherwise."""
    models = [{"name": name, "model_id": str(tiny[name]), "num_cpus": 0.25, **extra}
              for name, extra in MAIN_MODELS.items()]
    start = time.perf_counter()
    run_app({"models": models, "api_key": None}, name="main", route_prefix="/")
    print(f"main app deployed in {time.perf_counter() - start:.1f}s")
    assert requests.get(f"{serve_url}/health", timeout=30).status_code == 200
    return serve_url
