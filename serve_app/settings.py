"""The one argument of `build_app`: what to serve and how (docs/API.md, Deployment arguments).

The same pydantic model is filled from a `serve run`/`serve deploy` YAML (`applications[].args`), from
Python (a dict or an `AppSettings`), and is what the ingress and model replicas receive.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import (BaseModel, ConfigDict, Field, PositiveInt, SecretStr, ValidationError, ValidationInfo,
                      ValidatorFunctionWrapHandler, field_validator, model_validator)

from autoscaling.presets import AutoscalingSettings, RayAutoscalingSettings, autoscaling_options
from models.families import FAMILIES
from models.hub import is_local_path

DEFAULT_MODEL_ID = "cross-encoder/ettin-reranker-17m-v1"
API_KEY_ENV = "RERANK_API_KEY"
HF_TOKEN_ENV = "HF_TOKEN"

# Several CPU models plus the ingress must start on a 2-core machine under a plain `serve run`
# (Ray's default of 1 CPU per replica would leave the third replica pending forever). These are Ray's LOGICAL
# reservations only: a CPU replica left at the default runs a share of its node's CPUs, per forward, among the
# replicas busy there (serve_app/cpu_share.py), so one model alone uses the whole machine.
DEFAULT_MODEL_CPUS = 0.5
DEFAULT_GPU_MODEL_CPUS = 1.0
DEFAULT_INGRESS_CPUS = 0.25
MIN_GPU_SHARE = 0.0001  # Ray's resource resolution

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$")


def _env_secret(name: str) -> SecretStr | None:
    value = os.environ.get(name, "").strip()
    return SecretStr(value) if value else None


class ModelSettings(BaseModel):
    """One served model: what to load (models/) and how its deployment runs (Ray Serve)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    # What to load.
    name: str = Field(default="", description="Name clients put in `model`; default: the model_id.")
    model_id: str = Field(description="Hugging Face Hub id or local directory.")
    revision: str | None = None
    family: Literal[("auto", *FAMILIES)] = "auto"  # models/families/__init__.py: every registered family
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    max_length: PositiveInt | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"

    # Long documents (docs/API.md): what a pair longer than max_length gets when a request does not say.
    long_documents: Literal["truncate", "chunk"] = Field(default="truncate", description=(
        "truncate: an over-long pair is cut. chunk: its document is scored as overlapping windows of its tokens "
        "and the pair gets the max of their scores. A request's `long_documents` overrides it."))
    chunk_overlap: int = Field(default=64, ge=0, description=(
        "Tokens shared by consecutive windows (at most half a window)."))
    max_chunks: PositiveInt = Field(default=32, description="Windows scored per document at most; later text "
                                                            "is not scored.")
    # Shared prefix (docs/API.md): a request's prompt before the documents computed once, scores unchanged.
    shared_prefix: Literal["auto", "off"] = Field(default="auto", description=(
        "auto: for models whose input puts the query before the document (the causal-LM families), the tokens every "
        "pair of a request starts with run once per forward batch and each document attends to them; pairs whose "
        "tokens do not start with them run whole. off: every pair runs whole."))

    # How it is served.
    num_replicas: Union[PositiveInt, Literal["auto"]] = Field(default=1, description=(
        "Fixed replica count, or 'auto': autoscaling with the default preset."))
    autoscaling_config: AutoscalingSettings | None = Field(default=None, description=(
        "Autoscaling on the work held (docs/AUTOSCALING.md): `preset` (balanced | latency | throughput | "
        "scale-to-zero | fixed) and overrides of it (any field of Ray's AutoscalingConfig, `metric`, "
        "`target_work_per_replica`, `target_budgets_per_replica`). Unknown keys are an error."))
    num_cpus: float | None = Field(default=None, ge=0, description=(
        f"CPUs Ray reserves per replica; default {DEFAULT_MODEL_CPUS} on CPU, {DEFAULT_GPU_MODEL_CPUS} with a GPU. "
        "Set: the replica runs floor(num_cpus) torch threads (at least 1). Unset on CPU: a share of its node's "
        "CPUs, per forward, among the CPU replicas busy there (all of them when it is alone). Either way a CPU "
        "replica waits for free CPUs of its node before a forward: together they never run more compute threads "
        "than the node has CPUs."))
    num_gpus: float = Field(default=0, ge=0, description=(
        "GPU share per replica; > 0 serves on CUDA. A fraction (at most 1) lets Ray place several model replicas "
        "on one device; each then caps its memory at that share of the device and sizes its default token "
        "budget to it. Above 1: whole GPUs only."))
    accelerator_type: str | None = None
    token_budget: PositiveInt | None = Field(default=None, description=(
        "Tokens per forward batch across requests; default chosen by models/ for the device."))
    max_batch_wait_s: float = Field(default=0.005, ge=0, le=10)
    max_fanout: PositiveInt = Field(default=8, le=64, description=(
        "A request of several token budgets goes to the model as up to this many length-sorted pieces, scored "
        "concurrently (by several replicas when there are), never more than max_ongoing_requests; 1: each "
        "request as one call. Ray's request limits (max_ongoing_requests, max_queued_requests) count these calls."))
    max_ongoing_requests: PositiveInt = 32
    max_queued_requests: int = Field(default=256, ge=-1, description="-1: unbounded (no 429s).")
    retry_after_s: float = Field(default=1.0, ge=0, description="`Retry-After` sent with a 429.")
    health_check_period_s: float = Field(default=10.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _default_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("name") and data.get("model_id"):
            data = {**data, "name": default_model_name(str(data["model_id"]))}
        return data

    @field_validator("autoscaling_config", mode="wrap")
    @classmethod
    def _name_the_model(cls, v: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> Any:
        """AutoscalingSettings' errors, on one line naming the model (a config may serve several)."""
        try:
            return handler(v)
        except ValidationError as exc:
            name = info.data.get("name", "?")
            raise ValueError(f"model {name!r}: invalid autoscaling_config: {_one_line(exc)}") from None

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError(f"model name {v!r} must be 1-128 characters of letters, digits and ._:/@+- "
                             "starting with a letter or digit")
        return v

    @model_validator(mode="after")
    def _check_scaling(self) -> "ModelSettings":
        if self.autoscaling_config is not None and "num_replicas" in self.model_fields_set \
                and self.num_replicas != "auto":
            raise ValueError(f"model {self.name!r}: set either num_replicas or autoscaling_config, not both")
        if self.device == "cuda" and self.num_gpus == 0:
            raise ValueError(f"model {self.name!r}: device 'cuda' needs num_gpus > 0 so Ray gives the "
                             "replica a GPU")
        if self.device == "cpu" and self.num_gpus > 0:
            raise ValueError(f"model {self.name!r}: num_gpus > 0 with device 'cpu' would reserve an unused GPU")
        self._check_gpu_share()
        if self.autoscales:
            self._check_autoscaling()
        return self

    def _check_gpu_share(self) -> None:
        """A GPU share Ray can place: a fraction of ONE device (several models then share it, each replica capped
        at its share of the device memory: models/device_share.py), or whole devices. Ray would accept 1.5 and
        never schedule it (a fraction must fit one device); a share finer than its resolution is refused later."""
        g = self.num_gpus
        if g > 1 and g != int(g):
            raise ValueError(f"model {self.name!r}: num_gpus {g:g} cannot be placed: a replica takes a share of one "
                             f"GPU (at most 1) or whole GPUs ({math.floor(g)} or {math.ceil(g)})")
        if 0 < g < MIN_GPU_SHARE:
            raise ValueError(f"model {self.name!r}: num_gpus {g:g} is below Ray's resolution of {MIN_GPU_SHARE} GPU")

    def _check_autoscaling(self) -> None:
        """Fail at validation (before anything deploys) on settings Ray would reject once merged with the
        preset (min > max, a policy that does not import). Runs the preset with an unknown size: whether the
        settings are valid does not depend on it."""
        from ray.serve.config import AutoscalingConfig

        try:
            options = autoscaling_options(num_parameters=None, device=self.resolved_device, num_gpus=self.num_gpus,
                                          overrides=self.autoscaling_config, token_budget=self.token_budget)
            if "autoscaling_config" in options:
                AutoscalingConfig(**options["autoscaling_config"])
        except Exception as exc:  # noqa: BLE001 - Ray's ValidationError or the policy's ImportError
            raise ValueError(f"model {self.name!r}: invalid autoscaling_config: {_one_line(exc)}") from None

    @property
    def autoscales(self) -> bool:
        """Whether the model's replicas come from the autoscaling presets (autoscaling/presets.py)."""
        return self.autoscaling_config is not None or self.num_replicas == "auto"

    @property
    def resolved_device(self) -> str:
        """The device the replica loads onto: CUDA exactly when Ray gives the replica a GPU share."""
        if self.device != "auto":
            return self.device
        return "cuda" if self.num_gpus > 0 else "cpu"

    @property
    def resolved_num_cpus(self) -> float:
        if self.num_cpus is not None:
            return self.num_cpus
        return DEFAULT_GPU_MODEL_CPUS if self.num_gpus > 0 else DEFAULT_MODEL_CPUS


class IngressSettings(BaseModel):
    """The HTTP ingress: tokenization and templating run here, so it scales separately from the models."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: Union[PositiveInt, Literal["auto"], None] = Field(default=None, description=(
        "Tokenizing replicas. Default: 1 when every model is on CPU; with a model on a GPU, one per "
        "2 CPUs of the GPU node (at most 16), so tokenization keeps the GPU busy (serve_app/resources.py)."))
    autoscaling_config: RayAutoscalingSettings | None = Field(default=None, description=(
        "Ray's own request-count autoscaling (its AutoscalingConfig fields only)."))
    num_cpus: float = Field(default=DEFAULT_INGRESS_CPUS, ge=0)
    max_ongoing_requests: PositiveInt = 256

    @field_validator("autoscaling_config", mode="wrap")
    @classmethod
    def _name_the_ingress(cls, v: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        """RayAutoscalingSettings' errors (Ray's included), on one line naming the ingress."""
        try:
            return handler(v)
        except ValidationError as exc:
            raise ValueError(f"ingress: invalid autoscaling_config: {_one_line(exc)}") from None


class AppSettings(BaseModel):
    """Arguments of `serve_app:build_app`."""

    model_config = ConfigDict(extra="forbid")

    models: list[ModelSettings] = Field(
        default_factory=lambda: [ModelSettings(model_id=DEFAULT_MODEL_ID)], min_length=1)
    default_model: str | None = Field(default=None, description="Name of the default model; else the first.")
    api_key: SecretStr | None = Field(
        default_factory=lambda: _env_secret(API_KEY_ENV),
        description=f"Bearer key required on every route but /health; default from ${API_KEY_ENV}.")
    hf_token: SecretStr | None = Field(
        default_factory=lambda: _env_secret(HF_TOKEN_ENV),
        description=f"Hugging Face token for gated/private models; default from ${HF_TOKEN_ENV}.")
    max_body_bytes: PositiveInt = 4 * 1024 * 1024
    max_candidates: PositiveInt = 1000
    ingress: IngressSettings = Field(default_factory=IngressSettings)

    @model_validator(mode="before")
    @classmethod
    def _one_model_shorthand(cls, data: Any) -> Any:
        """`model_id=...` (and any other model field) at the top level: serve that one model.

        What `serve run serve_app:build_app model_id=BAAI/bge-reranker-v2-m3 num_gpus=1` passes (Ray hands
        the builder its key=value pairs as a dict of strings; pydantic converts "1" where a number is due).
        """
        if not isinstance(data, dict):
            return data
        shorthand = {k: v for k, v in data.items() if k in ModelSettings.model_fields}
        if not shorthand:
            return data
        if "models" in data:
            raise ValueError(f"give either `models` or the one-model shorthand ({', '.join(sorted(shorthand))} at "
                             "the top level), not both")
        rest = {k: v for k, v in data.items() if k not in shorthand}
        return {**rest, "models": [{"model_id": DEFAULT_MODEL_ID, **shorthand}]}

    @field_validator("api_key", "hf_token", mode="before")
    @classmethod
    def _blank_is_none(cls, v: Any) -> Any:
        return None if isinstance(v, str) and not v.strip() else v

    @model_validator(mode="after")
    def _check_names(self) -> "AppSettings":
        seen: dict[str, str] = {}
        for m in self.models:
            key = deployment_name(m.name)
            if key in seen:
                raise ValueError(f"model names {seen[key]!r} and {m.name!r} map to the same deployment "
                                 f"{key!r}: give each model a distinct name")
            seen[key] = m.name
        names = [m.name for m in self.models]
        if self.default_model is None:
            self.default_model = names[0]
        elif self.default_model not in names:
            raise ValueError(f"default_model {self.default_model!r} is not one of the served models {names}")
        return self

    def model(self, name: str) -> ModelSettings:
        return next(m for m in self.models if m.name == name)


def _one_line(exc: Exception) -> str:
    """An error's message on one line; of a pydantic error, what each check says after the field it names."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        return "; ".join(_located(e) for e in errors())
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def _located(error: dict) -> str:
    msg = str(error.get("msg", error)).removeprefix("Value error, ")
    loc = ".".join(str(part) for part in error.get("loc", ()))
    return f"{loc}: {msg}" if loc else msg


def default_model_name(model_id: str) -> str:
    """A Hub id names itself ("org/name"); a local directory is named by its last component.

    Decided from the string alone: settings are validated on the machine that builds the app, which
    need not be the one that holds the model.
    """
    return Path(model_id.rstrip("/")).name if is_local_path(model_id) else model_id


def deployment_name(model_name: str) -> str:
    """The Ray Serve deployment name of a model: `model-<name>` with characters Ray dislikes replaced."""
    return "model-" + re.sub(r"[^A-Za-z0-9._-]", "-", model_name)
