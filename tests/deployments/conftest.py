"""One local Ray Serve instance for the whole session (Ray starts slowly on 2 cores), tiny models on disk."""
from __future__ import annotations

import shutil
import socket
import time

import pytest
import requests

from tests.tiny_models import build_bert_seq_cls, build_modular, build_qwen3_reranker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Three families: a modular cross-encoder, a BERT sequence classifier, a tied Qwen3-Reranker."""
    root = tmp_path_factory.mktemp("tiny-serve")
    return {"modular": build_modular(root / "modular"), "bert": build_bert_seq_cls(root / "bert"),
            "qwen": build_qwen3_reranker(root / "qwen", tied=True)}


@pytest.fixture(scope="package")
def serve_url():
    """Base URL of the HTTP proxy of a throwaway Ray cluster (4 logical CPUs; replicas take fractions).

    Package-scoped: started once for tests/deployments and gone before other suites run. A Ray that
    another suite left running in this process is shared (Ray allows one per process).
    """
    import ray
    from ray import serve

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    port = serve.context._get_global_client().http_config.port  # an already running Serve keeps its port
    yield f"http://127.0.0.1:{port}"
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
