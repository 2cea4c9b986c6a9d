"""Scale a model deployment on the WORK it holds (tokens or pairs), not on its request count.

Ray Serve's default policy sizes a deployment as ``ongoing requests / target_ongoing_requests``. For a
reranker that is the wrong unit: one request may carry 1 pair or 1,000, so two huge requests look idle
and a hundred one-pair requests look overloaded. Here every model replica reports the work it holds
(queued inside the replica + being scored, see ``autoscaling.work.WorkTracker``) and the policy sizes
the deployment as ``total work / target work per replica``.

Two layers:

- ``desired_replicas`` — the pure decision (no Ray, no clock, no state): work in, replica count out.
- ``WorkPolicy`` — the thin adapter Ray Serve 2.60 calls with an ``AutoscalingContext`` on every control
  loop tick (``autoscaling_config={"policy": {"policy_function": "autoscaling.policy:WorkPolicy",
  "policy_kwargs": {...}}}``; Ray instantiates the class once with ``policy_kwargs``).

What Ray keeps doing around the policy (``ray.serve.autoscaling_policy._apply_autoscaling_config`` wraps
every custom policy in 2.60): ``upscale_delay_s`` / ``downscale_delay_s`` / ``downscale_to_zero_delay_s``
(a change must be wanted continuously for its delay), ``upscaling_factor`` / ``downscaling_factor``,
the ``min_replicas`` / ``max_replicas`` bounds, and the cold-start fast path (0 replicas + a queued
request -> 1 replica at once, no delay). Re-implementing delays here would double them, so this module
only answers "how many replicas does this much work need".

Ray pickles this module BY VALUE into the Serve controller (``AutoscalingPolicy.serialize_policy``), so it
imports only the standard library: nothing here may depend on the rest of the project at import time.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping, NamedTuple

logger = logging.getLogger("ray.serve")

# Keys of the custom autoscaling metrics a model replica reports from ``record_autoscaling_stats``
# (``WorkTracker.autoscaling_stats``). Namespaced so they never collide with Ray's own metric keys.
WORK_TOKENS = "rerank_work_tokens"
WORK_PAIRS = "rerank_work_pairs"
WORK_REQUESTS = "rerank_work_requests"
TOKEN_BUDGET = "rerank_token_budget"  # the replica's batching budget, for targets counted in budgets
METRIC_KEYS = {"tokens": WORK_TOKENS, "pairs": WORK_PAIRS}

# Work figures are means of float samples: round before ceil() so 2.0000000001 replicas is 2, not 3.
_ROUND_DIGITS = 6


class WorkSignal(NamedTuple):
    """What the cluster currently holds for one deployment (already averaged over Ray's look-back window).

    ``replica_work`` / ``replica_requests`` are summed over the replicas that reported (None when no
    running replica has reported yet). ``queued_requests`` are requests waiting at handles for a replica
    slot (they have not reached any replica, so their work is unknown and estimated per request).
    ``total_requests`` is Ray's own count (queued + running), used only when no work is reported.
    ``target_replicas`` is the count Ray is currently moving to (replicas still starting included).
    """

    current_replicas: int
    replica_work: float | None
    replica_requests: float | None
    queued_requests: float
    total_requests: float
    target_replicas: int = 0


class WorkTarget(NamedTuple):
    """How much work one replica should hold, and the bounds.

    ``default_request_work``: the work assumed for a queued request when no replica holds a request to
    average over. ``target_ongoing_requests``: the request-count target of the fallback used while no
    replica reports work (a deployment without the reporting hook scales exactly like Ray's default).
    """

    target_per_replica: float
    min_replicas: int
    max_replicas: int
    default_request_work: float
    target_ongoing_requests: float


class Decision(NamedTuple):
    desired: float  # replicas wanted, clamped to [min, max]; fractional so Ray's scaling factors stay exact
    replicas: int  # ceil(desired): what Ray will move towards once its delay has passed
    work: float  # the total work the decision was based on (requests, in the fallback)
    basis: str  # "work", "requests" (no work reports yet) or "cold-start"


def desired_replicas(signal: WorkSignal, target: WorkTarget) -> Decision:
    """The replica count ``signal``'s work needs: ``total work / target work per replica``, clamped.

    - total work = work reported by the replicas + queued requests x the mean work per request the
      replicas hold (a burst of two 5,000-token requests counts like a hundred 100-token ones);
    - no work and nothing queued -> ``min_replicas`` (0 when the model may scale to zero);
    - at zero running replicas, any queued request -> at least 1 replica (the cold start); with nothing
      queued -> keep the current target (its replicas may still be starting: never cancel them);
    - while no replica reports work -> Ray's request-count rule, so nothing is left unscaled.
    """
    if target.target_per_replica <= 0 or target.target_ongoing_requests <= 0:
        raise ValueError("targets must be positive")
    if signal.current_replicas == 0:
        # No replica runs, so none reports: hold the target (replicas may be loading), and size a cold
        # start from the queue at the handles.
        waiting = max(signal.queued_requests, signal.total_requests)
        held_target = float(signal.target_replicas)
        if waiting <= 0:
            return _clamped(held_target, 0.0, "cold-start", target)
        work = waiting * target.default_request_work
        return _clamped(max(1.0, held_target, work / target.target_per_replica), work, "cold-start", target)
    if signal.replica_work is None:
        raw = signal.total_requests / target.target_ongoing_requests
        return _clamped(raw, signal.total_requests, "requests", target)
    held = signal.replica_requests or 0.0
    per_request = signal.replica_work / held if held > 0 else target.default_request_work
    work = signal.replica_work + max(0.0, signal.queued_requests) * per_request
    return _clamped(work / target.target_per_replica, work, "work", target)


def _clamped(raw: float, work: float, basis: str, target: WorkTarget) -> Decision:
    desired = min(float(target.max_replicas), max(float(target.min_replicas), round(raw, _ROUND_DIGITS)))
    return Decision(desired, math.ceil(desired), work, basis)


def _sum_reports(per_replica: Mapping[Any, float] | None) -> float | None:
    if not per_replica:
        return None
    return float(sum(per_replica.values()))


class WorkPolicy:
    """Ray Serve 2.60 deployment-scoped autoscaling policy: ``__call__(ctx) -> (replicas, policy_state)``.

    ``policy_kwargs`` (JSON values, set by ``autoscaling.presets.autoscaling_options``):
      metric: "tokens" or "pairs" — which reported work to scale on;
      target_per_replica: work one replica should hold (queued + in flight), in that unit; or
      target_budgets_per_replica: the same counted in token budgets, each replica reporting its own
        budget (``WorkTracker(token_budget=...)``) — for budgets only resolved when the model loads;
      default_request_work: work assumed per queued request when no replica holds any (default:
        target / target_ongoing_requests, i.e. consistent with the request-count fallback).
    Bounds and the fallback's request target come from the deployment's own ``autoscaling_config``.
    """

    def __init__(self, metric: str = "tokens", target_per_replica: float | None = None,
                 target_budgets_per_replica: float | None = None, default_request_work: float | None = None):
        if metric not in METRIC_KEYS:
            raise ValueError(f"metric must be one of {sorted(METRIC_KEYS)}, got {metric!r}")
        if (target_per_replica is None) == (target_budgets_per_replica is None):
            raise ValueError("give exactly one of target_per_replica and target_budgets_per_replica")
        if target_budgets_per_replica is not None and metric != "tokens":
            raise ValueError("target_budgets_per_replica counts tokens: use it with metric 'tokens'")
        for value in (target_per_replica, target_budgets_per_replica, default_request_work):
            if value is not None and not value > 0:
                raise ValueError(f"targets must be > 0, got {value!r}")
        self.metric = metric
        self.target_per_replica = target_per_replica
        self.target_budgets_per_replica = target_budgets_per_replica
        self.default_request_work = default_request_work
        self._last: tuple[int, str] | None = None

    def _target_work(self, reports: Mapping[str, Mapping[Any, float]]) -> float | None:
        if self.target_per_replica is not None:
            return float(self.target_per_replica)
        budgets = [b for b in (reports.get(TOKEN_BUDGET) or {}).values() if b > 0]
        if not budgets:
            return None  # no replica has said its budget yet
        return self.target_budgets_per_replica * sum(budgets) / len(budgets)

    def inputs(self, ctx) -> tuple[WorkSignal, WorkTarget]:
        """The pure decision's inputs, read out of an ``AutoscalingContext`` (metrics: window aggregates)."""
        reports = ctx.aggregated_metrics or {}
        request_target = float(ctx.config.get_target_ongoing_requests())
        target_work = self._target_work(reports)
        signal = WorkSignal(
            current_replicas=int(ctx.current_num_replicas),
            # Work without a target to divide it by is no signal: fall back to counting requests.
            replica_work=_sum_reports(reports.get(METRIC_KEYS[self.metric])) if target_work else None,
            replica_requests=_sum_reports(reports.get(WORK_REQUESTS)),
            queued_requests=float(ctx.total_queued_requests or 0.0),
            total_requests=float(ctx.total_num_requests or 0.0),
            target_replicas=int(ctx.target_num_replicas),
        )
        per_replica = target_work or request_target  # unused by the fallback but for its own ratio
        target = WorkTarget(
            target_per_replica=per_replica,
            min_replicas=int(ctx.capacity_adjusted_min_replicas),
            max_replicas=int(ctx.capacity_adjusted_max_replicas),
            default_request_work=float(self.default_request_work or per_replica / request_target),
            target_ongoing_requests=request_target,
        )
        return signal, target

    def __call__(self, ctx) -> tuple[float, dict]:
        decision = desired_replicas(*self.inputs(ctx))
        if (decision.replicas, decision.basis) != self._last:
            # Logged on change only: the controller calls this every control-loop tick.
            logger.info(
                "WorkPolicy %s: %.0f %s held -> %d replica(s) wanted (basis: %s, now %d)",
                ctx.deployment_name, decision.work, self.metric if decision.basis == "work" else "requests",
                decision.replicas, decision.basis, ctx.current_num_replicas)
            self._last = (decision.replicas, decision.basis)
        # Returned state is kept by Ray between ticks and merged with its own delay bookkeeping.
        return decision.desired, {"rerank_work": decision.work, "rerank_basis": decision.basis}
