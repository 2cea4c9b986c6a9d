"""Presets: what `autoscaling_options` asks Ray for, and whether Ray takes it."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from ray.serve.config import AutoscalingConfig

from autoscaling.presets import (
    POLICY_FUNCTION, PRESET_NAMES, AutoscalingSettings, autoscaling_options, size_class,
)

M17, M150, M600, B8 = 17_000_000, 150_000_000, 596_000_000, 8_190_000_000


def opts(num_parameters=M150, *, device="cuda", num_gpus=1.0, preset=None, overrides=None, token_budget=16384,
         **kw):
    return autoscaling_options(num_parameters=num_parameters, device=device, num_gpus=num_gpus, preset=preset,
                               overrides=overrides, token_budget=token_budget, **kw)


def ray_config(options) -> AutoscalingConfig:
    return AutoscalingConfig(**options["autoscaling_config"])


def test_every_field_of_rays_config_is_accepted_and_nothing_else():
    # The field list is Ray's own (AutoscalingConfig.model_fields), so a Ray upgrade cannot leave it stale.
    defaults = AutoscalingConfig()
    given = {name: getattr(defaults, name) for name in AutoscalingConfig.model_fields}
    assert AutoscalingSettings.model_validate(given).ray_overrides == given
    with pytest.raises(ValueError, match="min_replica"):
        AutoscalingSettings.model_validate({"min_replica": 1})


@pytest.mark.parametrize("preset", [p for p in PRESET_NAMES if p != "fixed"])
@pytest.mark.parametrize("size", [M17, M600, B8, None])
@pytest.mark.parametrize("device,num_gpus", [("cuda", 1.0), ("cuda", 0.25), ("cpu", 0.0)])
def test_every_preset_is_a_valid_ray_config_with_the_work_policy(preset, size, device, num_gpus):
    config = ray_config(opts(size, device=device, num_gpus=num_gpus, preset=preset))
    assert config.policy.policy_function == POLICY_FUNCTION
    assert 0 <= config.min_replicas <= config.max_replicas


def test_replica_cap_counts_gpus_so_fractions_get_more_replicas():
    assert ray_config(opts(M17, num_gpus=0.25)).max_replicas == 8  # tiny: up to 2 GPUs
    assert ray_config(opts(M17, num_gpus=1.0)).max_replicas == 2
    assert ray_config(opts(M150, num_gpus=0.5)).max_replicas == 8  # small: up to 4 GPUs
    assert ray_config(opts(M17, device="cpu", num_gpus=0)).max_replicas == 2


def test_bigger_models_wait_longer_before_scaling_either_way():
    tiny, small, large = (ray_config(opts(n)) for n in (M17, M600, B8))
    assert tiny.upscale_delay_s < small.upscale_delay_s < large.upscale_delay_s
    assert tiny.downscale_delay_s < small.downscale_delay_s < large.downscale_delay_s
    assert [size_class(n).name for n in (M17, M600, B8, None)] == ["tiny", "small", "large", "small"]


def test_presets_order_their_work_targets():
    targets = {p: opts(preset=p, token_budget=10_000)["autoscaling_config"]["policy"]["policy_kwargs"]
               for p in ("latency", "balanced", "throughput")}
    assert [targets[p]["target_per_replica"] for p in ("latency", "balanced", "throughput")] == [
        10_000, 20_000, 40_000]
    assert all(t["metric"] == "tokens" for t in targets.values())


def test_without_a_token_budget_the_target_stays_in_budgets_for_replicas_to_resolve():
    kwargs = opts(token_budget=None)["autoscaling_config"]["policy"]["policy_kwargs"]
    assert kwargs == {"metric": "tokens", "target_budgets_per_replica": 2.0}


def test_scale_to_zero_starts_with_one_replica_and_idles_to_zero():
    config = ray_config(opts(M600, preset="scale-to-zero"))
    assert (config.min_replicas, config.initial_replicas) == (0, 1)
    assert config.downscale_to_zero_delay_s == size_class(M600).downscale_to_zero_delay_s
    # The same through an explicit min_replicas: 0 on another preset.
    config = ray_config(opts(M600, overrides={"min_replicas": 0}))
    assert (config.min_replicas, config.initial_replicas) == (0, 1) and config.downscale_to_zero_delay_s


def test_overrides_win_and_a_raised_floor_lifts_the_cap():
    config = ray_config(opts(B8, overrides={"min_replicas": 6, "upscale_delay_s": 1, "look_back_period_s": 20}))
    assert (config.min_replicas, config.max_replicas, config.upscale_delay_s) == (6, 6, 1)
    assert ray_config(opts(B8, overrides={"max_replicas": 9})).max_replicas == 9


def test_preset_inside_overrides_wins_so_one_yaml_dict_carries_both():
    from_dict = opts(M600, preset="latency", overrides={"preset": "scale-to-zero"})
    assert from_dict == opts(M600, preset="scale-to-zero")


def test_explicit_targets_and_metric():
    kwargs = opts(overrides={"metric": "pairs", "target_work_per_replica": 256})["autoscaling_config"]["policy"]
    assert kwargs["policy_kwargs"] == {"metric": "pairs", "target_per_replica": 256.0}
    kwargs = opts(overrides={"target_budgets_per_replica": 3}, token_budget=1000)["autoscaling_config"]["policy"]
    assert kwargs["policy_kwargs"]["target_per_replica"] == 3000.0


def test_an_explicit_policy_replaces_ours():
    default = {"policy_function": "ray.serve.autoscaling_policy:default_autoscaling_policy"}
    config = ray_config(opts(overrides={"policy": default, "target_ongoing_requests": 4}))
    assert config.policy.is_default_policy_function() and config.target_ongoing_requests == 4


def test_fixed_preset_gives_plain_replicas():
    assert opts(preset="fixed", overrides={"num_replicas": 3}, max_ongoing_requests=12)["num_replicas"] == 3
    assert "autoscaling_config" not in opts(preset="fixed")


@pytest.mark.parametrize("preset,overrides,match", [
    ("balanced", {"min_replica": 2}, "min_replica"),  # Ray would drop the typo silently
    ("warp-speed", None, "unknown autoscaling preset"),
    ("fixed", {"max_replicas": 3}, "only num_replicas"),
    ("fixed", {"num_replicas": 0}, "num_replicas"),
    ("balanced", {"metric": "pairs"}, "target_work_per_replica"),
    ("balanced", {"metric": "requests"}, "metric"),
    ("balanced", {"target_work_per_replica": 0}, "target_work_per_replica"),
    ("balanced", {"target_work_per_replica": 5, "target_budgets_per_replica": 1}, "not both"),
    ("balanced", {"num_replicas": 2}, "preset 'fixed' only"),
    ("balanced", {"target_budgets_per_replica": "2"}, "target_budgets_per_replica"),  # no strings for numbers
])
def test_bad_settings_fail_with_a_message_naming_them(preset, overrides, match):
    with pytest.raises(ValueError, match=match):
        opts(preset=preset, overrides=overrides)


def test_bad_token_budget_fails():
    with pytest.raises(ValueError, match="token_budget"):
        opts(token_budget=0)


def test_policy_runs_in_a_process_that_cannot_import_this_project(tmp_path):
    # Ray pickles the policy BY VALUE into the Serve controller: it must not need the project there.
    serialized = ray_config(opts(token_budget=1000)).policy.get_serialized_policy_def()
    (tmp_path / "policy.pkl").write_bytes(serialized)
    script = textwrap.dedent("""
        import sys
        from types import SimpleNamespace

        class NoProject:  # the controller's view: `autoscaling` cannot be imported at all
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "autoscaling":
                    raise ImportError(f"blocked: {name}")

        sys.meta_path.insert(0, NoProject())
        from ray import cloudpickle
        Policy = cloudpickle.loads(open("policy.pkl", "rb").read())
        ctx = SimpleNamespace(
            deployment_name="model-x", current_num_replicas=2, target_num_replicas=2, total_num_requests=3,
            total_queued_requests=1,
            capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=10,
            config=SimpleNamespace(get_target_ongoing_requests=lambda: 8),
            aggregated_metrics={"rerank_work_tokens": {"a": 3000.0, "b": 1000.0},
                                "rerank_work_requests": {"a": 1.0, "b": 1.0}})
        print(Policy(metric="tokens", target_per_replica=1000)(ctx)[0])
        assert not any(m.split(".")[0] == "autoscaling" for m in sys.modules)
    """)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip().splitlines()[-1]) == 6.0  # 4000 held + 1 queued x 2000 mean, / 1000


# ---- max_queued_requests: what a cold start needs -------------------------------------------------------

def test_a_model_that_may_scale_to_zero_queues_without_bound_by_default():
    # Every request of a burst that arrives at zero replicas waits at the handle: a bound would 429 its tail.
    assert opts(preset="scale-to-zero")["max_queued_requests"] == -1
    assert opts(overrides={"min_replicas": 0})["max_queued_requests"] == -1
    assert opts(preset="scale-to-zero", max_queued_requests=100)["max_queued_requests"] == 100  # explicit wins
    assert "max_queued_requests" not in opts(preset="balanced")  # the caller's default stays
