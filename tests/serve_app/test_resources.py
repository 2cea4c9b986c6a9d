"""CPU sizing of the defaults (serve_app/resources.py) and where the builder applies it."""
from __future__ import annotations

import pytest

from serve_app import AppSettings
from serve_app.builder import ingress_options, ingress_replicas, with_ingress_sized
from serve_app.resources import cgroup_cpu_limit, gpu_ingress_replicas, model_torch_threads, usable_cpus


@pytest.fixture(autouse=True)
def _no_env_secrets(monkeypatch):
    monkeypatch.delenv("RERANK_API_KEY", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)


def test_cgroup_v2_quota(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path) is None


def test_cgroup_v1_quota(tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("300000")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert cgroup_cpu_limit(tmp_path) == 3.0
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1")
    assert cgroup_cpu_limit(tmp_path) is None
    assert cgroup_cpu_limit(tmp_path / "missing") is None


def test_usable_cpus_is_the_affinity_capped_by_the_quota():
    assert usable_cpus({0, 1, 2, 3}, limit=None) == 4
    assert usable_cpus({0, 1, 2, 3}, limit=1.5) == 2  # a fraction of a CPU still gets a thread
    assert usable_cpus({0, 1}, limit=8.0) == 2
    assert usable_cpus({0}, limit=0.2) == 1
    assert 1 <= usable_cpus() <= 4096


def test_model_threads_follow_num_cpus_when_set_else_the_visible_cpus():
    assert model_torch_threads(None, "cpu", 8) == (8, "node share")  # the default: up to the whole machine
    assert model_torch_threads(0.5, "cpu", 8) == (1, "num_cpus")      # explicit: as reserved (>= 1)
    assert model_torch_threads(2.7, "cpu", 8) == (2, "num_cpus")
    assert model_torch_threads(None, "cuda", 8) == (None, "default")


def test_gpu_ingress_replicas_from_the_node_cpus():
    assert gpu_ingress_replicas(1) == 1 and gpu_ingress_replicas(2) == 1
    assert gpu_ingress_replicas(16) == 8
    assert gpu_ingress_replicas(256) == 16


def test_ingress_replicas_default_one_on_cpu_sized_on_gpu_explicit_wins():
    cpu = AppSettings.model_validate({"models": [{"model_id": "org/a"}, {"model_id": "org/b"}]})
    assert cpu.ingress.num_replicas is None
    assert ingress_replicas(cpu, node_cpus=64) == 1
    gpu = AppSettings.model_validate({"models": [{"model_id": "org/a", "num_gpus": 1}]})
    assert ingress_replicas(gpu, node_cpus=16) == 8
    sized = with_ingress_sized(gpu, node_cpus=16)
    assert sized.ingress.num_replicas == 8 and gpu.ingress.num_replicas is None  # a copy: /info reports 8
    assert ingress_options(sized)["num_replicas"] == 8
    explicit = AppSettings.model_validate({"models": [{"model_id": "org/a", "num_gpus": 1}],
                                           "ingress": {"num_replicas": 3}})
    assert ingress_replicas(explicit, node_cpus=16) == 3 and with_ingress_sized(explicit, 16) is explicit
    scaled = AppSettings.model_validate({"models": [{"model_id": "org/a", "num_gpus": 1}],
                                         "ingress": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 4}}})
    assert with_ingress_sized(scaled, 16) is scaled and "num_replicas" not in ingress_options(scaled)
