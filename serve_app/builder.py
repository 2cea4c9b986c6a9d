"""`build_app`: one model deployment per configured model, and the HTTP ingress holding their handles.

No `from __future__ import annotations` here: Ray reads the builder's parameter annotation as a class
to validate `serve run` / `serve deploy` args into `AppSettings`.
"""
import logging
from pathlib import Path
from typing import Any

from ray.serve import Application

from serve_app.settings import AppSettings, ModelSettings, deployment_name

logger = logging.getLogger(__name__)


def deployment_options(model: ModelSettings) -> dict[str, Any]:
    """Ray Serve `.options(...)` of a model's deployment: the ONE place settings become Ray options.

    (Autoscaling presets plug in here: they turn `model.autoscaling_config` into Ray's dict.)
    """
    actor: dict[str, Any] = {"num_cpus": model.resolved_num_cpus}
    if model.num_gpus > 0:
        actor["num_gpus"] = model.num_gpus
    if model.accelerator_type:
        actor["accelerator_type"] = model.accelerator_type
    options: dict[str, Any] = {
        "name": deployment_name(model.name),
        "ray_actor_options": actor,
        "max_ongoing_requests": model.max_ongoing_requests,
        "max_queued_requests": model.max_queued_requests,
        "health_check_period_s": model.health_check_period_s,
    }
    if model.max_queued_requests >= 0:
        # Over the queue limit a caller gets a 429 with Retry-After instead of waiting without end.
        options["backpressure_config"] = {"status_code": 429, "retry_after_s": model.retry_after_s}
    if model.autoscaling_config is not None:
        options["autoscaling_config"] = dict(model.autoscaling_config)
        if model.num_replicas == "auto":
            options["num_replicas"] = "auto"
    else:
        options["num_replicas"] = model.num_replicas
    return options


def ingress_options(settings: AppSettings) -> dict[str, Any]:
    ingress = settings.ingress
    options: dict[str, Any] = {
        "name": "ingress",
        "ray_actor_options": {"num_cpus": ingress.num_cpus},
        "max_ongoing_requests": ingress.max_ongoing_requests,
    }
    if ingress.autoscaling_config is not None:
        options["autoscaling_config"] = dict(ingress.autoscaling_config)
    else:
        options["num_replicas"] = ingress.num_replicas
    return options


def check_model_source(model: ModelSettings) -> None:
    """Fail the deploy before any replica starts when a local model is missing or of no known family.

    Only local directories are checked here (cheap: config files only). Hub models are fetched by the
    replicas, whose constructors fail the deploy with a ModelLoadError naming the model and the cause.
    """
    from models import ModelLoadError, detect_family

    path = Path(model.model_id).expanduser()
    if path.is_dir():
        family = detect_family(path, model.model_id)
        logger.info("model %r: %s detected in %s", model.name, family, path)
    elif model.model_id.startswith(("/", ".", "~")):
        raise ModelLoadError(model.model_id, f"model {model.name!r}: no such local directory {str(path)!r}")


def build_app(args: AppSettings) -> Application:
    """The application of `serve run`/`serve deploy` (import path `serve_app:build_app`).

    `args` is an AppSettings or a plain dict of its fields (Python callers).
    """
    from deployments.ingress import Ingress
    from deployments.model import ModelDeployment

    settings = args if isinstance(args, AppSettings) else AppSettings.model_validate(args)
    hf_token = settings.hf_token.get_secret_value() if settings.hf_token else None
    handles = {}
    for model in settings.models:
        check_model_source(model)
        handles[model.name] = ModelDeployment.options(**deployment_options(model)).bind(model, hf_token)
    return Ingress.options(**ingress_options(settings)).bind(settings, handles)
