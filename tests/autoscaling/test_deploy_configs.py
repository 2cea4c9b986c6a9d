"""The cluster files, checked offline with Ray's own validators.

- deploy/serve_gpu_cluster.yaml: Ray's serve deploy schema (+ no key Ray would silently drop), its args
  through our AppSettings, and the app `build_app` makes of them (offline, no model loaded): each model's
  autoscaling config, policy and actor options as Ray receives them;
- deploy/kuberay-rayservice.yaml: the same applications, same schema;
- cluster.yaml: Ray's cluster-launcher validation, and room in its node types for every model's maximum.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import ray
import yaml
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import HTTPOptionsSchema, ServeApplicationSchema, ServeDeploySchema


ROOT = Path(__file__).resolve().parents[2]
SERVE_YAML = ROOT / "deploy" / "serve_gpu_cluster.yaml"
KUBERAY_YAML = ROOT / "deploy" / "kuberay-rayservice.yaml"
CLUSTER_YAML = ROOT / "cluster.yaml"

# Parameter counts of the served checkpoints (model cards / safetensors headers): test data for the presets.
NUM_PARAMETERS = {
    "cross-encoder/ettin-reranker-17m-v1": 17_000_000,
    "cross-encoder/ettin-reranker-150m-v1": 150_000_000,
    "BAAI/bge-reranker-v2-m3": 568_000_000,
    "Qwen/Qwen3-Reranker-0.6B": 596_000_000,
    "Qwen/Qwen3-Reranker-8B": 8_190_000_000,
}


def load(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def serve_config() -> dict:
    return load(SERVE_YAML)


@pytest.fixture(scope="module")
def models(serve_config) -> list[dict]:
    (app,) = serve_config["applications"]
    return app["args"]["models"]


def build_offline(args: dict, sizes: dict[str, int] | None = None):
    """`build_app(args)` as `serve deploy` runs it, without loading a model or asking the Hub.

    `sizes` (model_id -> parameter count) stands in for the safetensors headers the builder reads on a
    cluster; without it every size is unknown, as on a machine without the network.
    Returns the ingress deployment and each model's deployment, as bound for Ray.
    """
    from serve_app import build_app
    import serve_app.builder

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RERANK_SKIP_FETCH_CHECK", "1")  # the Hub ids here are real but this machine has no network
        if sizes is not None:
            mp.setattr(serve_app.builder, "model_size", lambda model, hf_token=None: sizes[model.model_id])
        else:
            mp.setattr(serve_app.builder, "COUNT_TIMEOUT_S", 2.0)
        app = build_app(args)
    ingress = app._bound_deployment
    _settings, handles = ingress.init_args
    return ingress, {name: handle._bound_deployment for name, handle in handles.items()}


@pytest.fixture(scope="module")
def deployed(serve_config) -> dict:
    """Each model's Ray deployment as `serve deploy deploy/serve_gpu_cluster.yaml` builds it."""
    _ingress, deployments = build_offline(serve_config["applications"][0]["args"], NUM_PARAMETERS)
    return deployments


def unknown_keys(data: dict, schema) -> set[str]:
    # Ray's serve schemas ignore unknown keys: a misspelt option would vanish without a word.
    return set(data) - set(schema.model_fields)


# ---- deploy/serve_gpu_cluster.yaml ---------------------------------------------------------------------

def test_serve_yaml_is_a_valid_serve_deploy_config(serve_config):
    parsed = ServeDeploySchema.model_validate(serve_config)
    (app,) = parsed.applications
    assert app.import_path == "serve_app:build_app" and app.route_prefix == "/"
    assert not unknown_keys(serve_config, ServeDeploySchema)
    assert not unknown_keys(serve_config["http_options"], HTTPOptionsSchema)
    assert not unknown_keys(serve_config["applications"][0], ServeApplicationSchema)


def test_schema_check_catches_a_misspelt_key(serve_config):
    broken = copy.deepcopy(serve_config)
    broken["applications"][0]["rout_prefix"] = "/x"
    ServeDeploySchema.model_validate(broken)  # Ray accepts it...
    assert unknown_keys(broken["applications"][0], ServeApplicationSchema) == {"rout_prefix"}  # ...we do not


def test_serve_yaml_serves_the_five_models_on_the_intended_gpus(models):
    by_id = {m["model_id"]: m for m in models}
    assert set(by_id) == set(NUM_PARAMETERS)
    small = [by_id["cross-encoder/ettin-reranker-17m-v1"], by_id["cross-encoder/ettin-reranker-150m-v1"]]
    # The two ettins share a GPU by fractions that fit one GPU together.
    assert all(0 < m["num_gpus"] < 1 for m in small) and sum(m["num_gpus"] for m in small) <= 1
    assert len({m["accelerator_type"] for m in small}) == 1
    for model_id in ("BAAI/bge-reranker-v2-m3", "Qwen/Qwen3-Reranker-0.6B", "Qwen/Qwen3-Reranker-8B"):
        assert by_id[model_id]["num_gpus"] == 1


def test_serve_yaml_args_parse_as_app_settings(serve_config):
    settings_module = pytest.importorskip("serve_app.settings", reason="serve_app.settings not landed yet")
    (app,) = serve_config["applications"]
    settings = settings_module.AppSettings.model_validate(app["args"])
    assert [m.name for m in settings.models] == [m["name"] for m in app["args"]["models"]]
    assert settings.default_model == app["args"]["default_model"]
    for m in settings.models:
        assert m.resolved_device == "cuda" and m.num_replicas == "auto" and m.autoscaling_config


# Token budgets one replica should hold, per preset (docs/AUTOSCALING.md).
PRESET_BUDGETS = {"latency": 1, "balanced": 2, "throughput": 4, "scale-to-zero": 2}


def test_build_app_gives_each_model_its_own_autoscaling(models, deployed):
    seen = {}
    for model in models:
        deployment = deployed[model["name"]]
        assert deployment.name == f"model-{model['name']}"
        assert deployment.ray_actor_options == {"num_cpus": model["num_cpus"], "num_gpus": model["num_gpus"],
                                                "accelerator_type": model["accelerator_type"]}
        config = deployment._deployment_config
        scaling = config.autoscaling_config
        assert isinstance(scaling, AutoscalingConfig)
        assert scaling.policy.policy_function == "autoscaling.policy:WorkPolicy"
        assert callable(scaling.policy.get_policy())
        budgets = PRESET_BUDGETS[model["autoscaling_config"]["preset"]]
        assert scaling.policy.policy_kwargs == {"metric": "tokens",
                                                "target_per_replica": budgets * model["token_budget"]}
        assert scaling.max_replicas == model["autoscaling_config"]["max_replicas"]  # the YAML's bound wins
        assert config.max_ongoing_requests == model["max_ongoing_requests"]
        assert config.max_queued_requests == model["max_queued_requests"]
        seen[model["name"]] = config
    # The presets differ where they should: size class (17M tiny, 8B large) x preset.
    tiny, large = seen["ettin-17m"], seen["qwen3-reranker-8b"]
    assert tiny.autoscaling_config.upscale_delay_s == 5 * 0.5  # tiny, latency: half the class's delay
    assert large.autoscaling_config.upscale_delay_s == 30 * 2  # large, throughput: twice it
    assert tiny.autoscaling_config.downscale_delay_s == 120 * 2 and large.autoscaling_config.downscale_delay_s == 600
    assert (tiny.graceful_shutdown_timeout_s, large.graceful_shutdown_timeout_s) == (30, 120)
    zero = seen["qwen3-reranker-0.6b"]
    assert (zero.autoscaling_config.min_replicas, zero.autoscaling_config.initial_replicas) == (0, 1)
    assert zero.autoscaling_config.downscale_to_zero_delay_s == 900
    for name, config in seen.items():
        if name != "qwen3-reranker-0.6b":
            assert config.autoscaling_config.min_replicas == 1
            assert config.backpressure_config.status_code == 429


def test_the_ingress_scales_on_rays_request_count_policy(serve_config):
    ingress, _ = build_offline(serve_config["applications"][0]["args"], NUM_PARAMETERS)
    wanted = serve_config["applications"][0]["args"]["ingress"]
    scaling = ingress._deployment_config.autoscaling_config
    assert scaling.policy.is_default_policy_function()
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (
        wanted["autoscaling_config"]["min_replicas"], wanted["autoscaling_config"]["max_replicas"],
        wanted["autoscaling_config"]["target_ongoing_requests"])
    assert ingress.ray_actor_options == {"num_cpus": wanted["num_cpus"]}


def test_without_the_hub_the_yaml_still_builds_with_unknown_sizes(serve_config):
    """The build never fails for want of a parameter count: every model gets the "small" defaults."""
    import time

    start = time.monotonic()
    _, deployments = build_offline(serve_config["applications"][0]["args"])
    assert time.monotonic() - start < 10
    ettin = deployments["ettin-17m"]._deployment_config.autoscaling_config
    assert ettin.policy.policy_function == "autoscaling.policy:WorkPolicy"
    assert ettin.upscale_delay_s == 10 * 0.5  # "small" (unknown) instead of "tiny"


def test_scale_to_zero_model_never_rejects_while_it_cold_starts(models):
    # At zero replicas requests queue at the handle; a bounded queue would answer 429 during the start.
    for model in models:
        if model["autoscaling_config"].get("preset") == "scale-to-zero":
            assert model["max_queued_requests"] == -1


# ---- deploy/kuberay-rayservice.yaml --------------------------------------------------------------------

def test_kuberay_serve_config_is_the_gpu_yaml(serve_config):
    manifest = load(KUBERAY_YAML)
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayService")
    served = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(served)
    assert served["applications"] == serve_config["applications"]
    assert served == serve_config


def test_kuberay_cluster_runs_this_ray_with_token_auth_and_the_gpu_types(models):
    cluster = load(KUBERAY_YAML)["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["authOptions"] == {"mode": "token"}
    declared = " ".join(g["rayStartParams"].get("resources", "") for g in cluster["workerGroupSpecs"])
    for model in models:
        assert f'accelerator_type:{model["accelerator_type"]}' in declared


# ---- cluster.yaml ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster() -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(load(CLUSTER_YAML))  # merges the AWS defaults as `ray up` does
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_ray_validation(cluster):
    assert cluster["provider"]["type"] == "aws"
    assert cluster["available_node_types"][cluster["head_node_type"]]["resources"].get("GPU", 0) == 0


def test_cluster_validation_rejects_unknown_keys():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = load(CLUSTER_YAML)
    broken["available_node_types"]["gpu.l4"]["max_worker"] = 3
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_cluster_nodes_run_this_ray_and_install_the_project(cluster):
    version = ray.__version__
    assert cluster["docker"]["image"].endswith(f":{version}-py311-gpu")
    assert cluster["docker"]["head_image"].endswith(f":{version}-py311-cpu")
    for commands in (cluster["head_setup_commands"], cluster["worker_setup_commands"]):
        joined = "\n".join(commands)
        assert joined.index("torch") < joined.index("pip install -e")  # torch first, then the project
        assert "ray-3.0.0.dev0" not in joined  # none of the launcher's default nightly-wheel commands
    assert "[gpu]" in "\n".join(cluster["worker_setup_commands"])
    assert cluster["file_mounts"]["~/rerank-serve"] == "."


def test_cluster_turns_on_token_auth_everywhere(cluster):
    assert cluster["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "--env RAY_AUTH_MODE=token" in cluster["docker"]["run_options"]
    for commands in (cluster["head_start_ray_commands"], cluster["worker_start_ray_commands"]):
        assert any("RAY_AUTH_MODE=token ray start" in c for c in commands)


def test_cluster_has_room_for_every_model_at_its_maximum(cluster, models, deployed):
    nodes = {name: t for name, t in cluster["available_node_types"].items() if name != cluster["head_node_type"]}
    gpus_needed: dict[str, float] = {}
    for model in models:
        accel = f'accelerator_type:{model["accelerator_type"]}'
        fitting = [t for t in nodes.values() if t["resources"].get(accel)
                   and t["resources"]["GPU"] >= model["num_gpus"] and t["resources"]["CPU"] >= model["num_cpus"]]
        assert fitting, f"no node type can hold one replica of {model['name']}"
        max_replicas = deployed[model["name"]]._deployment_config.autoscaling_config.max_replicas
        gpus_needed[accel] = gpus_needed.get(accel, 0) + max_replicas * model["num_gpus"]
    for accel, needed in gpus_needed.items():
        available = sum(t["max_workers"] * t["resources"]["GPU"] for t in nodes.values() if t["resources"].get(accel))
        assert available >= math.ceil(needed), f"{accel}: {needed} GPUs needed at peak, {available} launchable"
    assert cluster["max_workers"] >= sum(t["max_workers"] for t in nodes.values())
