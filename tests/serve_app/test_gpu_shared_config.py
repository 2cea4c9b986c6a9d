"""deploy/serve_gpu_shared.yaml: seven rerankers on one GPU, checked offline (Ray's schema, our settings, the
options and token budgets each replica gets, and the placement check on one GPU node and on too small a one)."""
from __future__ import annotations

import copy

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from models.device_share import share_token_budget
from serve_app import AppSettings, deployment_options
from serve_app.builder import check_placement, with_ingress_sized
from serve_app.placement import Node
from tests.conftest import REPO_ROOT

CONFIG = REPO_ROOT / "deploy" / "serve_gpu_shared.yaml"


@pytest.fixture(autouse=True)
def _no_env_secrets(monkeypatch):
    monkeypatch.delenv("RERANK_API_KEY", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)


@pytest.fixture(scope="module")
def args() -> dict:
    raw = yaml.safe_load(CONFIG.read_text())
    ServeDeploySchema.model_validate(raw)
    (app,) = raw["applications"]
    assert app["import_path"] == "serve_app:build_app"
    return app["args"]


def options_of(settings: AppSettings) -> dict:
    return {m.name: deployment_options(m, num_parameters=None) for m in settings.models}


def test_the_ettin_family_and_a_qwen3_reranker_share_one_gpu(args):
    settings = AppSettings.model_validate(args)
    ids = [m.model_id for m in settings.models]
    assert [i for i in ids if "ettin" in i] == [f"cross-encoder/ettin-reranker-{s}-v1"
                                                 for s in ("17m", "32m", "68m", "150m", "400m", "1b")]
    assert "Qwen/Qwen3-Reranker-0.6B" in ids
    assert all(m.resolved_device == "cuda" and 0 < m.num_gpus < 1 for m in settings.models)
    assert sum(m.num_gpus for m in settings.models) == pytest.approx(1.0)
    qwen = next(m for m in settings.models if m.model_id == "Qwen/Qwen3-Reranker-0.6B")
    assert share_token_budget(qwen.token_budget, "cuda", qwen.num_gpus) == 22528  # 65536 x 0.35, in 1024s


def test_it_fits_one_16_cpu_gpu_node_and_fails_naming_a_model_on_a_smaller_one(args):
    settings = with_ingress_sized(AppSettings.model_validate(args), node_cpus=16)
    check_placement(settings, options_of(settings), nodes=[Node(cpus=16, gpus=1)])
    bigger = copy.deepcopy(args)
    bigger["models"][-1]["num_gpus"] = 0.5  # the shares now sum to 1.15: one replica has no room
    settings = with_ingress_sized(AppSettings.model_validate(bigger), node_cpus=16)
    with pytest.raises(ValueError, match=r"model '[\w.-]+': 1 of 1 replica\(s\) \(1 CPU, 0\.\d+ GPU each\) do not fit"):
        check_placement(settings, options_of(settings), nodes=[Node(cpus=16, gpus=1)])
