"""A model that cannot be fetched stops `build_app` before anything deploys, with one short message: which model,
why, and how to serve a local directory instead. Also through Ray's own `serve run <import path>` CLI, which must
exit non-zero within seconds without starting Ray. (The config-file form builds in Ray's controller:
tests/deployments/test_failures.py.)"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from models.errors import ModelLoadError
from serve_app import build_app
from serve_app.builder import ModelUnavailableError, check_models_fetchable
from serve_app.settings import AppSettings
from tests.conftest import REPO_ROOT


def closed_port() -> int:
    with socket.socket() as s:  # a port nobody listens on: the Hub's connection is refused at once
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def no_hub(monkeypatch, tmp_path):
    """An unreachable Hub and an empty Hugging Face cache."""
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("RERANK_SKIP_FETCH_CHECK", raising=False)
    return tmp_path / "hf-cache"


def test_an_unfetchable_model_fails_the_build_in_seconds_with_one_line_per_model(no_hub, tmp_path):
    from tests.tiny_models import build_bert_seq_cls

    local = build_bert_seq_cls(tmp_path / "local-bert")
    start = time.monotonic()
    with pytest.raises(ModelUnavailableError) as e:
        build_app({"models": [{"name": "a", "model_id": "org/missing-a"}, {"name": "here", "model_id": str(local)},
                              {"name": "b", "model_id": "org/missing-b", "revision": "v2"}]})
    assert time.monotonic() - start < 5
    lines = str(e.value).splitlines()
    assert len(lines) == 3, lines  # one per model that cannot be fetched, then how to serve a directory
    assert lines[0].startswith("cannot fetch model 'a' (org/missing-a): cannot reach the Hugging Face Hub at http")
    assert lines[1].startswith("cannot fetch model 'b' (org/missing-b): cannot reach")
    assert "model_id=/path/to/model" in lines[2]
    assert isinstance(e.value, ModelLoadError)  # what Python callers already catch


def test_a_cached_model_needs_no_network(no_hub, tiny):
    """The Hub cache as huggingface_hub lays it out: refs/main -> snapshots/<commit>."""
    commit = "0" * 40
    root = no_hub / "models--org--tiny-bert"
    shutil.copytree(tiny["bert"], root / "snapshots" / commit)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    check_models_fetchable(AppSettings(models=[{"model_id": "org/tiny-bert"}]), timeout_s=1)


def test_offline_mode_names_the_cause(no_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailableError, match="HF_HUB_OFFLINE is set and the model is not in the local cache"):
        check_models_fetchable(AppSettings(models=[{"model_id": "org/x"}]))


def test_a_silent_hub_costs_one_bounded_wait(monkeypatch):
    """A lookup that never answers (a firewall dropping packets, DNS hanging) is given up after the timeout."""
    import serve_app.builder

    monkeypatch.delenv("RERANK_SKIP_FETCH_CHECK", raising=False)
    monkeypatch.setattr(serve_app.builder, "check_available", lambda *a, **k: time.sleep(30))
    settings = AppSettings(models=[{"model_id": f"org/m{i}"} for i in range(3)])
    start = time.monotonic()
    with pytest.raises(ModelUnavailableError, match="did not answer within 1s"):
        check_models_fetchable(settings, timeout_s=1.0)
    assert time.monotonic() - start < 2.5


def test_the_check_can_be_skipped(no_hub, monkeypatch):
    monkeypatch.setenv("RERANK_SKIP_FETCH_CHECK", "1")
    check_models_fetchable(AppSettings(models=[{"model_id": "org/x"}]))


def test_serve_run_import_path_exits_nonzero_with_the_message_alone(no_hub):
    """The first command of the README, on a machine that cannot reach the Hub: the message, exit status 1, no
    traceback, no Ray started."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    serve = shutil.which("serve") or pytest.fail("Ray's `serve` CLI is not installed")
    start = time.monotonic()
    done = subprocess.run([sys.executable, serve, "run", "serve_app:build_app", "model_id=org/no-such-reranker"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    out = done.stdout + done.stderr
    print(f"`serve run` exited {done.returncode} after {elapsed:.1f}s:\n{out}")
    assert done.returncode == 1
    assert "Error: cannot fetch model 'org/no-such-reranker': cannot reach the Hugging Face Hub" in out
    assert "model_id=/path/to/model" in out
    assert "Traceback" not in out and "Started a local Ray instance" not in out
    assert len([line for line in out.splitlines() if line.strip()]) <= 4  # Ray's "Running import path" + ours
    assert elapsed < 60  # importing Ray and torch dominates; the check itself takes milliseconds here
