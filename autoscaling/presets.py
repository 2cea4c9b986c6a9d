"""Per-model autoscaling presets, derived from the model's size and the hardware it runs on.

Pure code (no Ray import at module level): ``AutoscalingSettings`` is what a model's ``autoscaling_config``
may say (one pydantic model: unknown keys rejected, Ray's field list read from Ray itself);
``autoscaling_options(...)`` returns the keyword arguments for a model
deployment's ``.options(...)``: its ``autoscaling_config`` (with the work-based policy of
``autoscaling.policy``), ``max_ongoing_requests`` and ``graceful_shutdown_timeout_s``.

Why the numbers depend on size: a 17M model loads in seconds, an 8B one in a minute or more. A burst
shorter than a replica's cold start is not helped by starting one, and a replica that is expensive to
reload should not be dropped at the first lull; so the larger the model, the longer both delays.
Why they depend on hardware: a replica on a fraction of a GPU is cheap to add (no new node while the
GPU has room), so the replica cap is set in GPUs: ``max_replicas = max_gpus / num_gpus``.
The per-replica target is counted in token budgets: a replica holding one budget of work scores all of
it in its next batch (latency), two keep one batch forming while one runs (balanced), four favour
full batches over latency (throughput).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, Mapping

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

POLICY_FUNCTION = "autoscaling.policy:WorkPolicy"

@dataclass(frozen=True)
class SizeClass:
    """Defaults that follow from how long a replica of this size takes to (re)load."""

    name: str
    max_parameters: float  # upper bound (exclusive) of the class
    max_gpus: float  # GPUs one model may grow to by default (max_replicas = max_gpus / num_gpus)
    cpu_max_replicas: int  # CPU replicas share a node's cores: few pay off
    upscale_delay_s: float
    downscale_delay_s: float
    downscale_to_zero_delay_s: float
    look_back_period_s: float
    graceful_shutdown_timeout_s: float  # a replica being removed finishes what it holds first


SIZE_CLASSES = (
    SizeClass("tiny", 100e6, 2, 2, 5, 120, 300, 15, 30),  # ettin-17m/32m/68m: seconds to load
    SizeClass("small", 1.5e9, 4, 2, 10, 300, 600, 30, 60),  # ettin-150m..1b, bge-m3, Qwen3-0.6B
    SizeClass("large", math.inf, 4, 2, 30, 600, 1800, 30, 120),  # Qwen3-4B/8B: a minute or more
)
UNKNOWN_SIZE = "small"  # when the parameter count cannot be found


@dataclass(frozen=True)
class Preset:
    name: str
    min_replicas: int
    target_budgets: float  # work one replica should hold, in token budgets
    upscale_delay_scale: float
    downscale_delay_scale: float
    max_ongoing_requests: int  # enough requests per replica for a batch to fill its token budget
    initial_replicas: int | None = None


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("balanced", 1, 2.0, 1.0, 1.0, 32),
    Preset("latency", 1, 1.0, 0.5, 2.0, 16),
    Preset("throughput", 1, 4.0, 2.0, 1.0, 64),
    # Starts with one replica, so the deploy still proves the model loads; idles down to zero.
    Preset("scale-to-zero", 0, 2.0, 1.0, 1.0, 32, initial_replicas=1),
)}
FIXED = "fixed"
UNBOUNDED_QUEUE = -1  # Ray's max_queued_requests for "no limit"
DEFAULT_PRESET = "balanced"
PRESET_NAMES = (*PRESETS, FIXED)


# Our own keys: which work to scale on and how much of it one replica should hold.
POLICY_FIELDS = frozenset({"metric", "target_work_per_replica", "target_budgets_per_replica"})


def ray_autoscaling_fields() -> frozenset[str]:
    """The fields of Ray's ``AutoscalingConfig`` (imported when first needed: this module has no Ray at import)."""
    from ray.serve.config import AutoscalingConfig

    return frozenset(AutoscalingConfig.model_fields)


def check_ray_keys(given: set[str], also: frozenset[str] = frozenset()) -> None:
    """Reject keys that are neither Ray's ``AutoscalingConfig`` fields nor in ``also`` (Ray would drop them
    silently, so a typo would go unnoticed)."""
    allowed = ray_autoscaling_fields() | also
    unknown = given - allowed
    if unknown:
        raise ValueError(f"unknown autoscaling setting(s) {sorted(unknown)}; allowed: {', '.join(sorted(allowed))}")


class RayAutoscalingSettings(BaseModel):
    """An ``autoscaling_config`` of Ray's own fields only (the ingress's: Ray's request-count policy), checked by
    Ray's ``AutoscalingConfig``; any other key is an error."""

    model_config = ConfigDict(extra="allow")  # the extras: Ray's fields, read lazily (no Ray at import)

    @model_validator(mode="after")
    def _check(self) -> "RayAutoscalingSettings":
        from ray.serve.config import AutoscalingConfig

        check_ray_keys(set(self.model_extra or {}))
        AutoscalingConfig(**self.given())
        return self

    def given(self) -> dict[str, Any]:
        """The settings as written: what Ray gets, and what /info shows."""
        return dict(self.model_extra or {})


PositiveNumber = Annotated[float, Field(gt=0, strict=True)]  # strict: no "2" or true for a number


class AutoscalingSettings(BaseModel):
    """A model's ``autoscaling_config``: a preset, our policy's settings, and overrides of Ray's fields.

    Any field of Ray's ``AutoscalingConfig`` (min_replicas, max_replicas, upscale_delay_s, policy, ...) is
    accepted as an override and checked by Ray once merged with the preset; any other key is an error (Ray
    itself would drop it silently, so a typo would go unnoticed).
    """

    model_config = ConfigDict(extra="allow")  # the extras: Ray's own fields, checked in _check

    preset: str | None = Field(default=None, description=f"one of {', '.join(PRESET_NAMES)}; default "
                                                         f"{DEFAULT_PRESET}")
    metric: str = Field(default="tokens", description="the work scaled on: 'tokens' or 'pairs'")
    target_work_per_replica: PositiveNumber | None = Field(
        default=None, description="work one replica should hold, in the metric's unit")
    target_budgets_per_replica: PositiveNumber | None = Field(
        default=None, description="work one replica should hold, in token budgets (default: the preset's)")
    num_replicas: Annotated[int, Field(ge=1, strict=True)] | None = Field(
        default=None, description="with preset 'fixed' only: the replica count (default 1)")

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str | None) -> str | None:
        if v is not None and v not in PRESET_NAMES:
            raise ValueError(f"unknown autoscaling preset {v!r}; choose one of {', '.join(PRESET_NAMES)}")
        return v

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, v: str) -> str:
        if v not in ("tokens", "pairs"):
            raise ValueError(f"metric must be 'tokens' or 'pairs', got {v!r}")
        return v

    @model_validator(mode="after")
    def _check(self) -> "AutoscalingSettings":
        given = self.model_fields_set
        if self.preset == FIXED:
            others = given - {"preset", "num_replicas"}
            if others:
                raise ValueError(f"preset 'fixed' takes only num_replicas, not {sorted(others)}")
            return self
        if "num_replicas" in given:
            raise ValueError("num_replicas (a fixed count) goes with preset 'fixed' only; autoscaling presets "
                             "take min_replicas / max_replicas")
        check_ray_keys(set(self.model_extra or {}), also=frozenset({"preset"}) | POLICY_FIELDS)
        if self.target_work_per_replica is not None and self.target_budgets_per_replica is not None:
            raise ValueError("give target_work_per_replica or target_budgets_per_replica, not both")
        if self.metric == "pairs" and self.target_work_per_replica is None:
            # A budget is counted in tokens; how many pairs fill it depends on the traffic: ask for it.
            raise ValueError("metric 'pairs' needs target_work_per_replica (pairs one replica should hold)")
        return self

    @property
    def ray_overrides(self) -> dict[str, Any]:
        """The fields of Ray's AutoscalingConfig given here, as given."""
        return dict(self.model_extra or {})

    def given(self) -> dict[str, Any]:
        """The settings as written (only the keys given): for /info and logs."""
        return self.model_dump(exclude_unset=True)



def size_class(num_parameters: int | None) -> SizeClass:
    """The size class of a model of ``num_parameters`` parameters (None: unknown -> "small")."""
    if num_parameters is None:
        return next(c for c in SIZE_CLASSES if c.name == UNKNOWN_SIZE)
    return next(c for c in SIZE_CLASSES if num_parameters < c.max_parameters)


def autoscaling_options(*, num_parameters: int | None, device: str, num_gpus: float,
                        preset: str | None = None,
                        overrides: AutoscalingSettings | Mapping[str, Any] | None = None,
                        token_budget: int | None = None,
                        max_ongoing_requests: int | None = None,
                        max_queued_requests: int | None = None) -> dict[str, Any]:
    """The Ray deployment options that make one model deployment scale on its work.

    Args:
        num_parameters: the model's parameter count (``models.hub.count_parameters``); None = unknown ("small").
        device: the model's device setting ("cpu", "cuda", "cuda:0", "auto"); with ``num_gpus`` it
            decides GPU vs CPU defaults (GPU when ``num_gpus > 0`` or the device is CUDA).
        num_gpus: the replica's GPU share (0.25 = a quarter GPU); caps ``max_replicas`` at
            ``max_gpus / num_gpus`` of the size class.
        preset: "balanced" (default), "latency", "throughput", "scale-to-zero" or "fixed".
        overrides: explicit settings that win over the preset: any field of Ray's ``AutoscalingConfig``
            (min_replicas, max_replicas, initial_replicas, upscale_delay_s, downscale_delay_s,
            downscale_to_zero_delay_s, look_back_period_s, metrics_interval_s, target_ongoing_requests,
            upscaling_factor, downscaling_factor, aggregation_function, policy), plus ``metric``
            ("tokens" | "pairs"), ``target_work_per_replica`` (in that unit) or
            ``target_budgets_per_replica`` (in token budgets), and ``preset`` (wins over the argument,
            so one YAML dict can carry both). With "fixed": only ``num_replicas`` (default 1).
            Validated as ``AutoscalingSettings``: unknown keys raise ValueError (pydantic's
            ValidationError; Ray itself would drop them silently).
        token_budget: the tokens one batch of this model may hold (the serving layer's batching budget).
            None when it is only resolved in the replica: the policy's target is then kept in budgets
            and each replica reports its budget (``WorkTracker(token_budget=...)``).
        max_ongoing_requests: the model's explicit setting, if any; else the preset's.
        max_queued_requests: the model's explicit setting, if any (-1 = unbounded). Returned unchanged
            when given; when not, a model that may scale to zero gets -1 (see below), others none (the
            caller keeps its own default).

    Returns:
        Autoscaling: ``{"autoscaling_config": {...}, "max_ongoing_requests": n,
        "graceful_shutdown_timeout_s": s}`` (+ ``"max_queued_requests"``, see above); "fixed":
        ``{"num_replicas": n, "max_ongoing_requests": n, "graceful_shutdown_timeout_s": s}``. Pass it to
        ``Deployment.options(**...)``, and do not pass ``num_replicas`` next to an ``autoscaling_config``
        (Ray rejects the pair, and ``num_replicas="auto"`` would merge Ray's own defaults in).

    A model allowed to scale to zero (``min_replicas: 0``) keeps its requests: while a deployment has no
    replica, Ray 2.60 queues each request at the caller's handle, pushes the handle's metrics to the
    controller at once, and the controller starts a replica without waiting for ``upscale_delay_s``;
    the request is sent when the replica is up. Meanwhile every request of the burst is "queued" at
    its handle, and Ray's router rejects (429) any request past ``max_queued_requests`` queued at one
    handle (``Router.wrap_request_assignment``): so such a model gets ``max_queued_requests: -1`` unless
    the caller sets a bound on purpose. The caller's own ``max_ongoing_requests`` (the ingress's)
    still bounds what one calling replica can hold.
    """
    if token_budget is not None and (not isinstance(token_budget, int) or isinstance(token_budget, bool)
                                     or token_budget <= 0):
        raise ValueError(f"token_budget must be a positive int or None, got {token_budget!r}")
    if num_gpus < 0:
        raise ValueError(f"num_gpus must be >= 0, got {num_gpus!r}")
    given = overrides.given() if isinstance(overrides, AutoscalingSettings) else dict(overrides or {})
    if preset is not None and not given.get("preset"):
        given["preset"] = preset  # the settings' own preset wins
    settings = AutoscalingSettings.model_validate(given)
    name = settings.preset or DEFAULT_PRESET
    size = size_class(num_parameters)
    on_gpu = num_gpus > 0 or device.startswith("cuda")

    if name == FIXED:
        fixed = {"num_replicas": settings.num_replicas or 1,
                 "max_ongoing_requests": max_ongoing_requests or PRESETS[DEFAULT_PRESET].max_ongoing_requests,
                 "graceful_shutdown_timeout_s": size.graceful_shutdown_timeout_s}
        if max_queued_requests is not None:
            fixed["max_queued_requests"] = max_queued_requests
        return fixed

    p = PRESETS[name]
    ongoing = max_ongoing_requests or p.max_ongoing_requests
    if on_gpu and num_gpus > 0:
        max_replicas = max(1, math.floor(size.max_gpus / num_gpus + 1e-9))
    else:
        max_replicas = size.cpu_max_replicas

    config: dict[str, Any] = {
        "min_replicas": p.min_replicas,
        "max_replicas": max_replicas,
        "upscale_delay_s": size.upscale_delay_s * p.upscale_delay_scale,
        "downscale_delay_s": size.downscale_delay_s * p.downscale_delay_scale,
        "look_back_period_s": size.look_back_period_s,
        # Only the fallback policy (no work reported yet) counts requests: half the replica's slots.
        "target_ongoing_requests": max(1.0, ongoing / 2),
    }
    if p.initial_replicas is not None:
        config["initial_replicas"] = p.initial_replicas
    policy_kwargs = _policy_kwargs(settings, p, token_budget)
    ray_given = settings.ray_overrides
    config.update(ray_given)
    # An explicit floor above the preset's cap lifts the cap, rather than failing Ray's min <= max check.
    if "max_replicas" not in ray_given:
        config["max_replicas"] = max(config["max_replicas"], config["min_replicas"],
                                     config.get("initial_replicas") or 0)
    if config["min_replicas"] == 0:
        config.setdefault("downscale_to_zero_delay_s", size.downscale_to_zero_delay_s)
        # Start with a replica anyway: the deploy then proves the model loads, as it does for the others.
        config.setdefault("initial_replicas", 1)
    config.setdefault("policy", {"policy_function": POLICY_FUNCTION, "policy_kwargs": policy_kwargs})
    options = {"autoscaling_config": config, "max_ongoing_requests": ongoing,
               "graceful_shutdown_timeout_s": size.graceful_shutdown_timeout_s}
    if max_queued_requests is not None:
        options["max_queued_requests"] = max_queued_requests
    elif config["min_replicas"] == 0:
        # A cold start queues the whole burst at the handle: a bound would turn its tail into 429s.
        options["max_queued_requests"] = UNBOUNDED_QUEUE
    return options


def _policy_kwargs(settings: AutoscalingSettings, p: Preset, token_budget: int | None) -> dict[str, Any]:
    """The WorkPolicy's arguments (settings already validated by AutoscalingSettings)."""
    if settings.target_work_per_replica is not None:
        return {"metric": settings.metric, "target_per_replica": float(settings.target_work_per_replica)}
    budgets = settings.target_budgets_per_replica or p.target_budgets
    if token_budget is None:
        return {"metric": settings.metric, "target_budgets_per_replica": float(budgets)}
    return {"metric": settings.metric, "target_per_replica": float(budgets) * token_budget}
