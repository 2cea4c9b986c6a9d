"""The work-based scaling decision: pure, then through the exact wrapper Ray 2.60 puts around it.

Ray wraps every custom policy (`_apply_autoscaling_config`) with its delays, scaling factors and the
cold-start fast path, and the controller then clamps to [min, max]. The `Controller` below replays that
sequence on a fake clock, so delay behaviour is tested on Ray's own code, not on a copy of it.
"""
from __future__ import annotations

import types

import pytest
from ray.serve import autoscaling_policy as ray_policy
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from autoscaling.policy import (
    TOKEN_BUDGET, WORK_PAIRS, WORK_REQUESTS, WORK_TOKENS, WorkPolicy, WorkSignal, WorkTarget, desired_replicas,
)

TARGET = WorkTarget(target_per_replica=4096, min_replicas=1, max_replicas=10, default_request_work=512,
                    target_ongoing_requests=8)


def held(work, requests, *, replicas=2, queued=0.0):
    return WorkSignal(current_replicas=replicas, replica_work=work, replica_requests=requests,
                      queued_requests=queued, total_requests=requests + queued)


# ---- the pure decision -------------------------------------------------------------------------------

def test_few_huge_requests_scale_like_many_small_ones_of_the_same_work():
    few_huge = desired_replicas(held(2 * 10_000, 2), TARGET)  # 2 requests x 10k tokens
    many_small = desired_replicas(held(200 * 100, 200), TARGET)  # 200 requests x 100 tokens
    assert few_huge.replicas == many_small.replicas == 5  # ceil(20,000 / 4,096)
    assert few_huge.basis == many_small.basis == "work"


def test_request_count_policy_would_not_tell_them_apart():
    # Why this module exists: Ray's default policy, fed the same two situations, sizes them 25x apart.
    config = AutoscalingConfig(min_replicas=1, max_replicas=100, target_ongoing_requests=8)
    few = ray_policy.replica_queue_length_autoscaling_policy(context(config, current=2, total_requests=2))[0]
    many = ray_policy.replica_queue_length_autoscaling_policy(context(config, current=2, total_requests=200))[0]
    assert (few, many) == (0.25, 25.0)


def test_requests_queued_at_the_handle_count_with_the_mean_work_per_request():
    # One 10k-token request reached the replica, the other waits at the handle for a slot.
    split = desired_replicas(held(10_000, 1, queued=1), TARGET)
    assert split.work == 20_000 and split.replicas == 5


def test_queued_requests_without_any_held_request_use_the_default_request_work():
    d = desired_replicas(held(0.0, 0.0, queued=16), TARGET)
    assert d.work == 16 * 512 and d.replicas == 2


def test_clamped_to_min_and_max():
    assert desired_replicas(held(10**9, 10), TARGET).replicas == 10
    assert desired_replicas(held(10.0, 1), TARGET).replicas == 1


def test_idle_goes_to_min_replicas_which_may_be_zero():
    assert desired_replicas(held(0.0, 0.0), TARGET).replicas == 1
    assert desired_replicas(held(0.0, 0.0), TARGET._replace(min_replicas=0)).replicas == 0


def test_cold_start_from_zero_wants_a_replica_as_soon_as_a_request_waits():
    scaled_to_zero = TARGET._replace(min_replicas=0)
    idle = WorkSignal(current_replicas=0, replica_work=None, replica_requests=None, queued_requests=0,
                      total_requests=0)
    assert desired_replicas(idle, scaled_to_zero).replicas == 0
    one = desired_replicas(idle._replace(queued_requests=1, total_requests=1), scaled_to_zero)
    assert (one.replicas, one.basis) == (1, "cold-start")
    # A big queue at zero is sized by the default work per request: 64 x 512 / 4096 = 8.
    assert desired_replicas(idle._replace(queued_requests=64, total_requests=64), scaled_to_zero).replicas == 8


def test_replicas_still_starting_are_never_cancelled():
    # Deploy time (or just after a cold start): 1 replica wanted, none running yet, no request waiting.
    starting = WorkSignal(current_replicas=0, replica_work=None, replica_requests=None, queued_requests=0,
                          total_requests=0, target_replicas=1)
    assert desired_replicas(starting, TARGET._replace(min_replicas=0)).replicas == 1


def test_without_work_reports_it_counts_requests_like_ray():
    unreported = WorkSignal(current_replicas=2, replica_work=None, replica_requests=None, queued_requests=0,
                            total_requests=24)
    d = desired_replicas(unreported, TARGET)
    assert (d.replicas, d.basis) == (3, "requests")  # 24 / target_ongoing_requests 8


def test_float_noise_does_not_add_a_replica():
    assert desired_replicas(held(3 * 0.1 * 40960, 3), TARGET).replicas == 3  # 12288.000000000002 / 4096


def test_rejects_nonpositive_targets():
    with pytest.raises(ValueError):
        desired_replicas(held(1.0, 1), TARGET._replace(target_per_replica=0))


# ---- the Ray adapter -----------------------------------------------------------------------------------

def context(config, *, current, target=None, total_requests=0.0, queued=0.0, metrics=None, state=None,
            now=0.0):
    """An AutoscalingContext as the controller builds it (Ray 2.60's public constructor)."""
    dep = DeploymentID(name="model-x", app_name="rerank")
    replicas = [ReplicaID(f"r{i}", deployment_id=dep) for i in range(current)]
    per_replica = {name: dict(zip(replicas, values)) for name, values in (metrics or {}).items()}
    return AutoscalingContext(
        deployment_id=dep, deployment_name=dep.name, app_name=dep.app_name, current_num_replicas=current,
        target_num_replicas=current if target is None else target, running_replicas=replicas,
        total_num_requests=total_requests, total_queued_requests=queued, aggregated_metrics=per_replica,
        raw_metrics={}, capacity_adjusted_min_replicas=config.min_replicas,
        capacity_adjusted_max_replicas=config.max_replicas, policy_state=state or {}, last_scale_up_time=None,
        last_scale_down_time=None, current_time=now, config=config)


def test_adapter_reads_the_replicas_reports():
    config = AutoscalingConfig(min_replicas=1, max_replicas=10, target_ongoing_requests=8)
    policy = WorkPolicy(metric="tokens", target_per_replica=4096)
    ctx = context(config, current=2, total_requests=3, queued=1,
                  metrics={WORK_TOKENS: [6000.0, 4000.0], WORK_REQUESTS: [1.0, 1.0], WORK_PAIRS: [60.0, 40.0]})
    desired, state = policy(ctx)
    assert desired == pytest.approx(15_000 / 4096, abs=1e-6) and state["rerank_work"] == 15_000  # 10k held + 1 queued x 5k mean


def test_adapter_scales_on_pairs_when_asked():
    config = AutoscalingConfig(min_replicas=1, max_replicas=10)
    policy = WorkPolicy(metric="pairs", target_per_replica=100)
    ctx = context(config, current=1, metrics={WORK_TOKENS: [10.0], WORK_PAIRS: [450.0], WORK_REQUESTS: [3.0]})
    assert policy(ctx)[0] == 4.5


def test_adapter_target_in_token_budgets_uses_the_budget_replicas_report():
    config = AutoscalingConfig(min_replicas=1, max_replicas=10, target_ongoing_requests=4)
    policy = WorkPolicy(metric="tokens", target_budgets_per_replica=2.0)
    ctx = context(config, current=2, total_requests=2,
                  metrics={WORK_TOKENS: [30_000.0, 10_000.0], WORK_REQUESTS: [1.0, 1.0],
                           TOKEN_BUDGET: [8192.0, 8192.0]})
    assert policy(ctx)[0] == pytest.approx(40_000 / 16_384, abs=1e-6)
    # Before any replica said its budget, the request count decides (2 requests / 4 -> the floor, 1).
    no_budget = context(config, current=2, total_requests=2, metrics={WORK_TOKENS: [30_000.0, 10_000.0]})
    assert policy(no_budget)[0] == 1.0


@pytest.mark.parametrize("kwargs", [
    {"metric": "requests", "target_per_replica": 1},
    {"target_per_replica": 0},
    {},
    {"target_per_replica": 10, "target_budgets_per_replica": 1},
    {"metric": "pairs", "target_budgets_per_replica": 1},
])
def test_adapter_rejects_bad_kwargs(kwargs):
    with pytest.raises(ValueError):
        WorkPolicy(**kwargs)


# ---- through Ray's own wrapper: delays, bounds, cold start --------------------------------------------

class Controller:
    """Replays what Ray's controller does each tick: wrapped policy -> clamp -> new target; fake clock."""

    def __init__(self, monkeypatch, config: AutoscalingConfig, policy, *, replicas: int):
        self.now = 0.0
        self.config = config
        self.target = replicas
        self.state: dict = {}
        self.wrapped = ray_policy._apply_autoscaling_config(policy)
        monkeypatch.setattr(ray_policy, "time", types.SimpleNamespace(time=lambda: self.now))

    def tick(self, *, work_per_replica=0.0, requests_per_replica=0.0, queued=0.0, dt=1.0, running=None) -> int:
        self.now += dt
        # Replicas start instantly here unless `running` says otherwise: the delays are what is under test.
        current = self.target if running is None else running
        ctx = context(self.config, current=current, target=self.target, queued=queued,
                      total_requests=requests_per_replica * current + queued, state=self.state, now=self.now,
                      metrics={WORK_TOKENS: [work_per_replica] * current,
                               WORK_REQUESTS: [requests_per_replica] * current})
        decision, self.state = self.wrapped(ctx)
        self.target = max(self.config.min_replicas, min(self.config.max_replicas, decision))
        return self.target


def config(**kw):
    base = dict(min_replicas=1, max_replicas=8, upscale_delay_s=5, downscale_delay_s=20,
                target_ongoing_requests=8)
    return AutoscalingConfig(**{**base, **kw})


def test_upscale_waits_its_delay_then_jumps_to_what_the_work_needs(monkeypatch):
    ctl = Controller(monkeypatch, config(), WorkPolicy(target_per_replica=1000), replicas=1)
    seen = [ctl.tick(work_per_replica=4000, requests_per_replica=2) for _ in range(6)]
    assert seen == [1, 1, 1, 1, 1, 4]  # wanted since t=1, granted at t=6 (5 s later)


def test_scale_down_waits_its_own_longer_delay(monkeypatch):
    ctl = Controller(monkeypatch, config(), WorkPolicy(target_per_replica=1000), replicas=4)
    seen = [ctl.tick(work_per_replica=0, requests_per_replica=0) for _ in range(21)]
    assert seen[:20] == [4] * 20 and seen[20] == 1


def test_a_blip_of_work_restarts_the_scale_down_delay(monkeypatch):
    ctl = Controller(monkeypatch, config(), WorkPolicy(target_per_replica=1000), replicas=4)
    for _ in range(15):
        ctl.tick()
    assert ctl.tick(work_per_replica=1000, requests_per_replica=1) == 4  # exactly the target: hold
    seen = [ctl.tick() for _ in range(21)]
    assert seen[:20] == [4] * 20 and seen[20] == 1  # a full delay again from the blip


def test_max_and_min_bound_the_result(monkeypatch):
    ctl = Controller(monkeypatch, config(upscale_delay_s=0), WorkPolicy(target_per_replica=1000), replicas=1)
    assert ctl.tick(work_per_replica=10**6, requests_per_replica=1) == 8
    ctl = Controller(monkeypatch, config(min_replicas=2, max_replicas=8, downscale_delay_s=0),
                     WorkPolicy(target_per_replica=1000), replicas=5)
    assert ctl.tick() == 2


def test_a_replica_still_loading_is_not_scaled_away(monkeypatch):
    # Found on a real Ray: with a short downscale_to_zero_delay_s, the deploy's first replica was
    # cancelled while loading, because "0 running + no request" read as "idle".
    cfg = config(min_replicas=0, downscale_delay_s=1, downscale_to_zero_delay_s=1)
    ctl = Controller(monkeypatch, cfg, WorkPolicy(target_per_replica=1000), replicas=1)
    assert [ctl.tick(running=0) for _ in range(10)] == [1] * 10


def test_scale_to_zero_after_idle_then_cold_start_on_the_next_request(monkeypatch):
    cfg = config(min_replicas=0, downscale_delay_s=10, downscale_to_zero_delay_s=30, upscale_delay_s=60)
    ctl = Controller(monkeypatch, cfg, WorkPolicy(target_per_replica=1000), replicas=3)
    idle = [ctl.tick() for _ in range(45)]
    assert idle[:10] == [3] * 10 and idle[10] == 1  # to one replica after downscale_delay_s
    assert idle[11:41] == [1] * 30 and idle[41] == 0  # then to zero after downscale_to_zero_delay_s
    # A request waits at the handle: Ray's cold-start path starts a replica at once, upscale delay or not.
    assert ctl.tick(queued=1) == 1
    # The replica holds the burst now, and the work decides from there on (after the upscale delay).
    seen = [ctl.tick(work_per_replica=5000, requests_per_replica=5) for _ in range(61)]
    assert seen[:60] == [1] * 60 and seen[60] == 5
