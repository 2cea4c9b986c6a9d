"""Per-model autoscaling: presets derived from model size and hardware, and a policy on queued + in-flight work.

- ``AutoscalingSettings``: what a model's ``autoscaling_config`` may say (pydantic; unknown keys rejected).
- ``autoscaling_options(...)``: the deployment options (autoscaling_config with the policy,
  max_ongoing_requests, graceful_shutdown_timeout_s) the app builder passes to each model deployment.
- ``WorkTracker``: what a model replica uses to report the work it holds (``record_autoscaling_stats``).
- ``WorkPolicy`` / ``desired_replicas``: the Ray Serve custom policy and its pure decision function.
"""
from autoscaling.policy import (
    METRIC_KEYS,
    WORK_PAIRS,
    WORK_REQUESTS,
    WORK_TOKENS,
    Decision,
    WorkPolicy,
    WorkSignal,
    WorkTarget,
    desired_replicas,
)
from autoscaling.presets import (
    DEFAULT_PRESET,
    POLICY_FUNCTION,
    PRESET_NAMES,
    PRESETS,
    AutoscalingSettings,
    autoscaling_options,
    size_class,
)
from autoscaling.work import WorkTracker

__all__ = [
    "AutoscalingSettings", "DEFAULT_PRESET", "Decision", "METRIC_KEYS", "POLICY_FUNCTION", "PRESETS",
    "PRESET_NAMES", "WORK_PAIRS", "WORK_REQUESTS", "WORK_TOKENS", "WorkPolicy", "WorkSignal", "WorkTarget", "WorkTracker",
    "autoscaling_options", "desired_replicas", "size_class",
]
