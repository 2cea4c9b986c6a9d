"""Layouts that cannot run fail before anything deploys, naming the models: GPU shares in the settings, and the
build-time placement check against a cluster that cannot grow (serve_app/placement.py)."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from serve_app import AppSettings, ModelSettings, deployment_options
from serve_app.builder import check_placement, ingress_options
from serve_app.placement import Demand, Node, check, demand_of, unplaced


@pytest.fixture(autouse=True)
def _no_env_secrets(monkeypatch):
    monkeypatch.delenv("RERANK_API_KEY", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)


@pytest.mark.parametrize("num_gpus, message", [
    (1.5, "num_gpus 1.5 cannot be placed: a replica takes a share of one GPU (at most 1) or whole GPUs (1 or 2)"),
    (2.25, "whole GPUs (2 or 3)"),
    (0.00004, "below Ray's resolution"),
])
def test_gpu_shares_ray_cannot_place_fail_validation_naming_the_model(num_gpus, message):
    with pytest.raises(ValidationError) as e:
        AppSettings.model_validate({"models": [{"name": "small", "model_id": "org/a", "num_gpus": num_gpus}]})
    assert "model 'small'" in str(e.value) and message in str(e.value)


@pytest.mark.parametrize("num_gpus", [0.0001, 0.05, 0.5, 1, 2, 8])
def test_placeable_gpu_shares_pass(num_gpus):
    assert ModelSettings(model_id="org/a", num_gpus=num_gpus).num_gpus == num_gpus


def gpu_models(*shares, **extra):
    return [Demand(f"model '{chr(ord('a') + i)}'", 1, 1.0, s, extra.get("accelerator")) for i, s in enumerate(shares)]


ONE_GPU_NODE = [Node(cpus=16, gpus=1)]


def test_shares_that_fill_one_device_fit():
    assert unplaced(gpu_models(0.5, 0.25, 0.25), ONE_GPU_NODE) == {}
    assert unplaced(gpu_models(0.35, 0.2, 0.15, 0.1, 0.1, 0.05, 0.05), ONE_GPU_NODE) == {}


def test_a_share_too_many_for_the_device_fails_naming_it():
    with pytest.raises(ValueError) as e:
        check(gpu_models(0.5, 0.5, 0.5), ONE_GPU_NODE)
    msg = str(e.value)
    assert "model 'c': 1 of 1 replica(s) (1 CPU, 0.5 GPU each) do not fit" in msg
    assert "model 'a'" not in msg.split("The deploy asks")[0]  # only what does not fit is named as failing
    assert "asks for 3 CPU and 1.5 GPU" in msg and "16 CPU and 1 GPU over 1 node(s)" in msg


def test_fractions_must_fit_one_device_each():
    # 1.8 GPU in total on 2 GPUs, but no device holds two 0.6 shares.
    assert unplaced(gpu_models(0.6, 0.6, 0.6), [Node(cpus=8, gpus=2)]) == {"model 'c'": 1}
    # Best fit: 0.7 and 0.3 share a device, so the second 0.7 finds a whole one.
    assert unplaced(gpu_models(0.3, 0.7, 0.7), [Node(cpus=8, gpus=2)]) == {}


def test_whole_gpus_come_from_one_node_and_accelerator_types_must_exist():
    two_small_nodes = [Node(cpus=8, gpus=1), Node(cpus=8, gpus=1)]
    assert unplaced([Demand("model 'big'", 1, 1.0, 2)], two_small_nodes) == {"model 'big'": 1}
    assert unplaced([Demand("model 'big'", 1, 1.0, 2)], [Node(cpus=8, gpus=2)]) == {}
    l4 = [Node(cpus=8, gpus=1, accelerator="L4")]
    assert unplaced(gpu_models(0.5, accelerator="H100"), l4) == {"model 'a'": 1}
    assert unplaced(gpu_models(0.5, accelerator="L4"), l4) == {}


def test_cpu_reservations_must_fit_the_logical_cpus():
    settings = AppSettings.model_validate({"models": [{"model_id": f"org/m{i}"} for i in range(8)]})
    options = {m.name: deployment_options(m) for m in settings.models}
    with pytest.raises(ValueError) as e:
        check_placement(settings, options, nodes=[Node(cpus=2)])
    msg = str(e.value)
    assert "model 'org/m" in msg and "asks for 4.25 CPU" in msg and "ray start --head --num-cpus" in msg
    check_placement(settings, options, nodes=[Node(cpus=5)])  # 8 x 0.5 + the ingress's 0.25 fit


def test_a_model_scaled_to_zero_must_fit_the_cluster_alone():
    zero = Demand("model 'lazy'", 0, 1.0, 2)
    assert unplaced([zero], [Node(cpus=8, gpus=1)]) == {}  # nothing to start at deploy time...
    with pytest.raises(ValueError, match="model 'lazy': one replica .* fits no node"):
        check([zero], [Node(cpus=8, gpus=1)])  # ...but its first request would wait for ever


def test_demand_follows_the_deployment_options():
    fixed = ModelSettings(model_id="org/a", num_gpus=0.25, num_replicas=3, accelerator_type="L4")
    assert demand_of("m", deployment_options(fixed)) == Demand("m", 3, 1.0, 0.25, "L4")
    scaled = ModelSettings(model_id="org/a", num_gpus=0.5,
                           autoscaling_config={"preset": "balanced", "min_replicas": 2, "max_replicas": 5})
    assert demand_of("m", deployment_options(scaled, num_parameters=None)).replicas == 2
    to_zero = ModelSettings(model_id="org/a", autoscaling_config={"preset": "scale-to-zero"})
    assert demand_of("m", deployment_options(to_zero, num_parameters=None)).replicas == 1  # the preset starts one
    cold = ModelSettings(model_id="org/a", autoscaling_config={"preset": "scale-to-zero", "initial_replicas": 0})
    assert demand_of("m", deployment_options(cold, num_parameters=None)).replicas == 0
    # The ingress's own Ray autoscaling_config: Ray starts min_replicas, 1 when not given.
    assert demand_of("i", {"ray_actor_options": {"num_cpus": 0.25}, "autoscaling_config": {"max_replicas": 4}}) \
        == Demand("i", 1, 0.25)
    # An ingress of `num_replicas: auto`: Ray's default autoscaling starts one.
    auto = AppSettings.model_validate({"models": [{"model_id": "org/a"}], "ingress": {"num_replicas": "auto"}})
    assert demand_of("i", ingress_options(auto)).replicas == 1


def test_no_check_without_a_fixed_cluster():
    """Ray is not up in this process (`serve run` of an import path builds before it starts Ray)."""
    settings = AppSettings.model_validate({"models": [{"model_id": "org/a", "num_gpus": 0.5}]})
    check_placement(settings, {m.name: deployment_options(m) for m in settings.models})
