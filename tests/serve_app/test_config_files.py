"""The shipped serve config (and its commented multi-model example) is valid for Ray and for build_app."""
from __future__ import annotations

import textwrap

import yaml
from ray.serve.schema import ServeDeploySchema

from serve_app import AppSettings, build_app, deployment_options
from tests.conftest import REPO_ROOT

CONFIG = REPO_ROOT / "serve_config.yaml"


def test_serve_config_serves_ettin_17m_through_build_app(monkeypatch):
    monkeypatch.delenv("RERANK_API_KEY", raising=False)
    raw = yaml.safe_load(CONFIG.read_text())
    ServeDeploySchema.model_validate(raw)  # Ray's own schema of `serve run` / `serve deploy` configs
    (app,) = raw["applications"]
    assert app["import_path"] == "serve_app:build_app" and app["route_prefix"] == "/"
    module, attr = app["import_path"].split(":")
    assert getattr(__import__(module), attr) is build_app
    settings = AppSettings.model_validate(app["args"])
    assert [m.model_id for m in settings.models] == ["cross-encoder/ettin-reranker-17m-v1"]
    assert settings.models[0].resolved_device == "cpu" and settings.api_key is None


def test_commented_multi_model_example_is_valid():
    lines = CONFIG.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "#     args:")
    block = textwrap.dedent("\n".join(line[1:] for line in lines[start:] if line.startswith("#")))
    settings = AppSettings.model_validate(yaml.safe_load(block)["args"])
    ids = [m.model_id for m in settings.models]
    assert {"Qwen/Qwen3-Reranker-0.6B", "BAAI/bge-reranker-v2-m3"} <= set(ids)
    for m in settings.models:
        assert m.resolved_device == "cuda" and deployment_options(m)["ray_actor_options"]["num_gpus"] > 0
