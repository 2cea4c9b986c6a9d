"""`build_app`: one model deployment per configured model, and the HTTP ingress holding their handles.

No `from __future__ import annotations` here: Ray reads the builder's parameter annotation as a class
to validate `serve run` / `serve deploy` args into `AppSettings`.
"""
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import click
from ray.serve import Application
from ray.serve.exceptions import RayServeException

from autoscaling import autoscaling_options
from models.errors import ModelLoadError
from models.hub import check_available, count_parameters, is_local_path
from serve_app import placement
from serve_app.resources import gpu_ingress_replicas, gpu_node_cpus
from serve_app.settings import AppSettings, ModelSettings, deployment_name

logger = logging.getLogger(__name__)

COUNT_TIMEOUT_S = 5.0  # at most this long to size the models from the Hub (then: "unknown size")
UNCOUNTED = object()  # deployment_options: count the parameters itself
FETCH_CHECK_TIMEOUT_S = 10.0  # at most this long to learn that every Hub model can be fetched (all at once)
SKIP_FETCH_CHECK_ENV = "RERANK_SKIP_FETCH_CHECK"


class ModelUnavailableError(ModelLoadError, RayServeException, click.ClickException):
    """Models that cannot be fetched, found by `build_app` before anything deploys: one short message.

    Its bases are how each caller of the builder shows an error without a traceback: `serve run <import path>`
    (click) prints a ClickException's message alone and exits 1; Ray's build task of `serve run <config>` /
    `serve deploy` puts a RayServeException's message alone into the application's status (the controller logs it
    once); Python callers catch it as the ModelLoadError it is.
    """

    def __init__(self, message: str, model_id: str):
        ModelLoadError.__init__(self, model_id, message)
        click.ClickException.__init__(self, message)  # the message alone is what str() and click show

    def __str__(self) -> str:
        return self.message


def deployment_options(model: ModelSettings, hf_token: str | None = None,
                       num_parameters: int | None | object = UNCOUNTED) -> dict[str, Any]:
    """Ray Serve `.options(...)` of a model's deployment: the ONE place settings become Ray options.

    With `autoscaling_config` or `num_replicas: auto`, the autoscaling preset (autoscaling/presets.py)
    decides the replica bounds, delays, the work-based policy, `max_ongoing_requests` (unless set)
    and, for a model that may scale to zero, an unbounded `max_queued_requests` (unless set).
    `num_parameters` sizes the preset (None: unknown); by default it is counted here.
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
    if model.autoscales:
        # Never `num_replicas="auto"` next to it: Ray would merge its own defaults into the preset's.
        if num_parameters is UNCOUNTED:
            num_parameters = model_size(model, hf_token)
        options.update(model_autoscaling_options(model, num_parameters))
    else:
        options["num_replicas"] = model.num_replicas
    if options["max_queued_requests"] >= 0:
        # Over the queue limit a caller gets a 429 with Retry-After instead of waiting without end.
        options["backpressure_config"] = {"status_code": 429, "retry_after_s": model.retry_after_s}
    options["max_constructor_retry_count"] = constructor_tries(options)
    return options


def constructor_tries(options: dict[str, Any]) -> int:
    """Constructor failures that fail a new deployment: one per replica it starts with (Ray's default: three
    each, up to 20). A replica that cannot load its model (missing or corrupt files, a model too big for its
    device) fails the same way every time, and each failure prints a traceback. Once a replica has started,
    Ray keeps replacing failed ones regardless."""
    return max(1, placement.initial_replicas(options))


def model_size(model: ModelSettings, hf_token: str | None = None) -> int | None:
    """The parameter count that sizes an autoscaling preset, None when it cannot be had quickly.

    Safetensors headers only (a local directory, the local HF cache, or a few Hub requests bounded by
    COUNT_TIMEOUT_S); it never raises, so sizing can neither fail nor stall the build.
    """
    return count_parameters(model.model_id, revision=model.revision, token=hf_token, timeout_s=COUNT_TIMEOUT_S)


def model_sizes(models: list[ModelSettings], hf_token: str | None = None) -> dict[str, int | None]:
    """`model_size` of every autoscaling model, looked up concurrently (one timeout for all, not N)."""
    scaled = [m for m in models if m.autoscales]
    if not scaled:
        return {}
    with ThreadPoolExecutor(max_workers=min(8, len(scaled)), thread_name_prefix="model-size") as pool:
        return dict(zip([m.name for m in scaled], pool.map(lambda m: model_size(m, hf_token), scaled)))


def model_autoscaling_options(model: ModelSettings, num_parameters: int | None) -> dict[str, Any]:
    """The preset's options for an autoscaling model of `num_parameters` parameters (None: unknown)."""
    explicit = model.model_fields_set
    options = autoscaling_options(
        num_parameters=num_parameters, device=model.resolved_device, num_gpus=model.num_gpus,
        overrides=model.autoscaling_config, token_budget=model.token_budget,
        max_ongoing_requests=model.max_ongoing_requests if "max_ongoing_requests" in explicit else None,
        max_queued_requests=model.max_queued_requests if "max_queued_requests" in explicit else None)
    scaling = options.get("autoscaling_config")
    if scaling is not None and scaling["min_replicas"] == 0 and options.get("max_queued_requests", -1) >= 0:
        logger.warning("model %r scales to zero with max_queued_requests=%d: requests past that many, "
                       "queued during a cold start, get 429", model.name, options["max_queued_requests"])
    logger.info("model %r: %s parameters, autoscaling %s", model.name,
                f"{num_parameters:,}" if num_parameters else "unknown number of", scaling or options)
    return options


def ingress_replicas(settings: AppSettings, node_cpus: int | None = None) -> int | str:
    """The ingress replica count: as set, else 1 on CPU and, with a model on a GPU, sized from the GPU
    node's CPUs (`node_cpus`, default: looked up) so that tokenization keeps the GPU busy."""
    if settings.ingress.num_replicas is not None:
        return settings.ingress.num_replicas
    if not any(m.num_gpus > 0 for m in settings.models):
        return 1
    return gpu_ingress_replicas(gpu_node_cpus() if node_cpus is None else node_cpus)


def with_ingress_sized(settings: AppSettings, node_cpus: int | None = None) -> AppSettings:
    """`settings` with the ingress replica count resolved (what /info reports and Ray gets)."""
    if settings.ingress.num_replicas is not None or settings.ingress.autoscaling_config is not None:
        return settings
    n = ingress_replicas(settings, node_cpus)
    logger.info("ingress: %s replica(s) by default", n)
    return settings.model_copy(update={"ingress": settings.ingress.model_copy(update={"num_replicas": n})})


def ingress_options(settings: AppSettings) -> dict[str, Any]:
    ingress = settings.ingress
    options: dict[str, Any] = {
        "name": "ingress",
        "ray_actor_options": {"num_cpus": ingress.num_cpus},
        "max_ongoing_requests": ingress.max_ongoing_requests,
    }
    if ingress.autoscaling_config is not None:
        options["autoscaling_config"] = ingress.autoscaling_config.given()
    else:
        options["num_replicas"] = ingress_replicas(settings)
    options["max_constructor_retry_count"] = constructor_tries(options)
    return options


def check_model_source(model: ModelSettings) -> None:
    """Fail the deploy before any replica starts when a local model is missing or of no known family.

    Only local directories are checked here (cheap: config files only). Hub models are fetched by the
    replicas, whose constructors fail the deploy with a ModelLoadError naming the model and the cause.
    """
    from models import ModelLoadError, detect_family, families

    path = Path(model.model_id).expanduser()
    if path.is_dir():
        family = detect_family(path, model.model_id)
        logger.info("model %r: %s detected in %s", model.name, family, path)
        family = family if model.family == "auto" else model.family
        if model.long_documents == "chunk" and families.get(family).listwise:
            raise ModelLoadError(model.model_id, f"model {model.name!r}: long_documents 'chunk' does not apply to "
                                                 f"the listwise family {family!r} (its recipe cuts every document "
                                                 "at 2048 tokens); use 'truncate'")
    elif is_local_path(model.model_id):
        raise ModelLoadError(model.model_id, f"model {model.name!r}: no such local directory {str(path)!r}")


def check_models_fetchable(settings: AppSettings, timeout_s: float | None = None) -> None:
    """Every Hub model can be fetched (it is cached here, or the Hub lists its files), else one short
    ModelUnavailableError naming each model that cannot, why, and how to serve a local directory instead.

    Without it, a model that cannot be fetched fails in every replica constructor (the ingress's tokenizer and
    the model's weights), each printing a traceback, and the proxy answers plain text. The models are looked up
    at once; a lookup that has not answered within `timeout_s` counts as an unreachable Hub. Skipped when
    $RERANK_SKIP_FETCH_CHECK is set (a cluster whose builder node cannot reach the Hub but the model nodes can).
    """
    if os.environ.get(SKIP_FETCH_CHECK_ENV, "").lower() in ("1", "true", "yes", "on"):
        return
    timeout_s = FETCH_CHECK_TIMEOUT_S if timeout_s is None else timeout_s
    token = settings.hf_token.get_secret_value() if settings.hf_token else None
    remote = [m for m in settings.models if not Path(m.model_id).expanduser().is_dir()]
    if not remote:
        return
    failures: dict[str, str] = {}

    def check(model: ModelSettings) -> None:
        try:
            where = check_available(model.model_id, revision=model.revision, token=token)
            logger.info("model %r: %s found (%s)", model.name, model.model_id, where)
        except ModelLoadError as e:
            failures[model.name] = e.cause
        except Exception as e:  # noqa: BLE001 - anything else is still a model that cannot be fetched
            failures[model.name] = f"{type(e).__name__}: {e}"

    # Daemon threads: a lookup stuck in DNS past its own timeout never holds up the build or the exit.
    threads = [threading.Thread(target=check, args=(m,), name="fetch-check", daemon=True) for m in remote]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout_s
    for model, t in zip(remote, threads):
        t.join(max(0.0, deadline - time.monotonic()))
        if t.is_alive() and model.name not in failures:
            failures[model.name] = f"the Hugging Face Hub did not answer within {timeout_s:g}s"
    if failures:
        failed = {m.name: failures[m.name] for m in remote if m.name in failures}  # in the settings' order
        raise ModelUnavailableError(unavailable_message(settings, failed), settings.model(next(iter(failed))).model_id)


def unavailable_message(settings: AppSettings, failures: dict[str, str]) -> str:
    """What failed and why, one line per model, then how to serve a local directory instead."""
    lines = []
    for name, cause in failures.items():
        model_id = settings.model(name).model_id
        lines.append(f"cannot fetch model {name!r}{f' ({model_id})' if model_id != name else ''}: {cause}")
    lines.append("To serve a copy on disk instead, give its directory as the model_id "
                 "(serve run serve_app:build_app model_id=/path/to/model, or `model_id: /path/to/model` in the "
                 "config); a model downloaded before is served from the Hugging Face cache.")
    return "\n".join(lines)
def check_placement(settings: AppSettings, model_options: dict[str, dict[str, Any]],
                    nodes: list[placement.Node] | None = None) -> None:
    """Fail the build, naming the models, when Ray could never place every replica the deploy starts on the
    running cluster (`nodes`, default: looked up; only a cluster that cannot grow is checked): a replica that
    cannot be placed would stay pending for ever (serve_app/placement.py)."""
    nodes = placement.fixed_cluster_nodes() if nodes is None else nodes
    if nodes is None:
        return
    demands = [placement.demand_of(f"model {name!r}", options) for name, options in model_options.items()]
    demands.append(placement.demand_of("the ingress", ingress_options(settings)))
    placement.check(demands, nodes)


def build_app(args: AppSettings) -> Application:
    """The application of `serve run`/`serve deploy` (import path `serve_app:build_app`).

    `args` is an AppSettings or a plain dict of its fields (Python callers).
    """
    from deployments.ingress import Ingress
    from deployments.model import ModelDeployment

    settings = args if isinstance(args, AppSettings) else AppSettings.model_validate(args)
    settings = with_ingress_sized(settings)
    hf_token = settings.hf_token.get_secret_value() if settings.hf_token else None
    for model in settings.models:
        check_model_source(model)
    check_models_fetchable(settings)
    sizes = model_sizes(settings.models, hf_token)
    options = {m.name: deployment_options(m, hf_token, num_parameters=sizes.get(m.name)) for m in settings.models}
    check_placement(settings, options)
    handles = {m.name: ModelDeployment.options(**options[m.name]).bind(m, hf_token) for m in settings.models}
    return Ingress.options(**ingress_options(settings)).bind(settings, handles)
