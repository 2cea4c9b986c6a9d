"""Shared test setup: Ray runs without token auth, and Ray workers can import this checkout."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# Ray >= 2.59 turns token auth on for local clusters; tests talk to their own throwaway cluster.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Replica processes import serve_app/deployments/models by name: make the checkout importable for them
# even when the package is not pip-installed (workers inherit the environment of the `ray.init` driver).
_path = os.environ.get("PYTHONPATH", "")
if str(REPO_ROOT) not in _path.split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), _path) if p)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Served by the Ray suites: a modular cross-encoder, a BERT sequence classifier, a tied Qwen3-Reranker.

    (tests/models has its own `tiny`, with every family.)
    """
    from tests.tiny_models import build_bert_seq_cls, build_modular, build_qwen3_reranker

    root = tmp_path_factory.mktemp("tiny-serve")
    return {"modular": build_modular(root / "modular"), "bert": build_bert_seq_cls(root / "bert"),
            "qwen": build_qwen3_reranker(root / "qwen", tied=True)}
