"""Model files: turn a model id (a local directory or a Hub repo id) into a local directory, fetching only what
is needed, and count a model's parameters from its safetensors headers (no weights loaded).

Fails fast: the file list comes from ONE request with a short timeout and no retries, so a missing network
or repository becomes a ModelLoadError in seconds instead of huggingface_hub's minute of backoff.
"""
from __future__ import annotations

import json
import os
import posixpath
import re
import threading
from pathlib import Path
from typing import Callable

from .errors import ModelLoadError

# Files a model needs besides weights: configs, tokenizer files of every kind, module configs, and chat templates
# (transformers saves them as chat_template.jinja; the causal CrossEncoders' prompts are rendered from them).
_SMALL_FILE = re.compile(r"(\.json|\.txt|\.model|\.tiktoken|\.jinja|merges\.txt|vocab\.[a-z]+)$")
_REPO_ID = re.compile(r"^[\w.\-]+(/[\w.\-]+)?$")
# Folders of exports and training leftovers that never hold what the PyTorch model needs.
_SKIP_DIRS = ("onnx/", "openvino/", "coreml/", "tf/", "flax/", "checkpoint-", "runs/", ".")


def is_local_path(model_id: str) -> bool:
    """Whether a model id names a filesystem path rather than a Hub `org/name`: absolute, relative, home, Windows,
    or deeper than org/name. Decided from the string alone, so settings validated on one machine agree with the
    replicas on another (a Hub-like id that happens to exist on disk is still served from that directory)."""
    return model_id.startswith(("/", ".", "~")) or model_id.count("/") > 1 or "\\" in model_id


def needed_files(files: list[str], weights: bool = True) -> list[str]:
    """The subset of a repository listing to download: small config/tokenizer files everywhere, and per folder
    the safetensors weights, or the pytorch *.bin weights only where a folder has no safetensors.
    `weights=False`: the small files only (what detection and tokenization read)."""
    files = [f for f in files if not f.startswith(_SKIP_DIRS)]
    if not weights:
        return [f for f in files if _SMALL_FILE.search(f) and not f.endswith("training_args.bin")]
    with_safetensors = {posixpath.dirname(f) for f in files if f.endswith(".safetensors")}
    keep = []
    for f in files:
        folder = posixpath.dirname(f)
        if _SMALL_FILE.search(f) and not f.endswith("training_args.bin"):
            keep.append(f)
        elif f.endswith(".safetensors"):
            keep.append(f)
        elif f.endswith(".bin") and folder not in with_safetensors and "training_args" not in f \
                and "optimizer" not in f:
            keep.append(f)
    return keep


def _list_files(model_id: str, revision: str | None, token: str | None, endpoint: str) -> list[str]:
    """The repository's file list from one model-info request (the library's auth and error types)."""
    from huggingface_hub import HfApi, constants

    timeout = float(os.environ.get("HF_HUB_ETAG_TIMEOUT", constants.DEFAULT_ETAG_TIMEOUT))
    info = HfApi(endpoint=endpoint).model_info(model_id, revision=revision or "main", token=token, timeout=timeout)
    return [s.rfilename for s in info.siblings or []]


def _cache_dir() -> str | None:
    """The standard cache, read when called (huggingface_hub reads HF_HUB_CACHE / HF_HOME once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None  # huggingface_hub's default


def _cached_snapshot(model_id: str, revision: str | None, token: str | None) -> Path | None:
    """The model's snapshot in the local cache (no network), None when it is not there."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model_id, revision=revision, token=token, local_files_only=True,
                                      cache_dir=_cache_dir()))
    except Exception:  # nothing usable in the cache
        return None


def resolve_model_dir(model_id: str, revision: str | None = None, token: str | None = None,
                      weights: bool = True) -> Path:
    """A local directory holding the model: `model_id` itself when it is a directory, else a Hub snapshot in
    the standard cache (HF_HOME / HF_HUB_CACHE), limited to the files the model needs. `weights=False` fetches
    no weights (the ingress only tokenizes: a 9B model's 18 GB stay on the nodes that score)."""
    local = Path(model_id).expanduser()
    if local.is_dir():
        return local
    _check_id(model_id, local)
    token = token or os.environ.get("HF_TOKEN") or None
    if _offline():
        return _cached_or_offline_error(model_id, revision, token)
    endpoint = _endpoint()
    try:
        files = _hub_files(model_id, revision, token, endpoint)
    except _HubUnreachable:  # no network, DNS, TLS, timeouts, 5xx: use the cache if it has the model
        cached = _cached_snapshot(model_id, revision, token)
        if cached is None:
            raise
        return cached
    wanted = needed_files(files, weights=weights)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model_id, revision=revision, token=token, allow_patterns=wanted,
                                      endpoint=endpoint, cache_dir=_cache_dir()))
    except Exception as e:  # the cause is in the message: no chained traceback of the HTTP stack in the logs
        raise ModelLoadError(model_id, f"download failed ({type(e).__name__}: {e})") from None


def check_available(model_id: str, revision: str | None = None, token: str | None = None) -> str:
    """Whether the model can be fetched, without downloading it: "local" (a directory), "cache" (a snapshot in
    the local Hub cache) or "hub" (the Hub lists its files, a config among them). A ModelLoadError otherwise, with
    the same causes and messages as `resolve_model_dir`; one request, bounded by HF_HUB_ETAG_TIMEOUT."""
    local = Path(model_id).expanduser()
    if local.is_dir():
        return "local"
    _check_id(model_id, local)
    token = token or os.environ.get("HF_TOKEN") or None
    if _offline():
        _cached_or_offline_error(model_id, revision, token)
        return "cache"
    if _cached_snapshot(model_id, revision, token) is not None:
        return "cache"
    _hub_files(model_id, revision, token, _endpoint())
    return "hub"


def _check_id(model_id: str, local: Path) -> None:
    if is_local_path(model_id) or local.exists() or not _REPO_ID.match(model_id):
        raise ModelLoadError(model_id, "no such local directory, and not a valid Hugging Face Hub repo id")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _endpoint() -> str:
    return os.environ.get("HF_ENDPOINT") or "https://huggingface.co"


def _cached_or_offline_error(model_id: str, revision: str | None, token: str | None) -> Path:
    cached = _cached_snapshot(model_id, revision, token)
    if cached is None:
        raise ModelLoadError(model_id, "HF_HUB_OFFLINE is set and the model is not in the local cache")
    return cached


class _HubUnreachable(ModelLoadError):
    """The Hub did not answer (the caller may still find the model in the local cache)."""


def _hub_files(model_id: str, revision: str | None, token: str | None, endpoint: str) -> list[str]:
    """The repository's file list, checked to hold a config. Each failure is a ModelLoadError whose message
    carries the cause, raised `from None`: the HTTP library's chained tracebacks would bury it in the logs."""
    from huggingface_hub import errors as hf_errors

    try:
        files = _list_files(model_id, revision, token, endpoint)
    except hf_errors.RepositoryNotFoundError:
        raise ModelLoadError(model_id, "repository not found on the Hub (or private: set HF_TOKEN)") from None
    except hf_errors.RevisionNotFoundError:
        raise ModelLoadError(model_id, f"revision {revision!r} not found") from None
    except hf_errors.GatedRepoError:
        raise ModelLoadError(model_id, "gated repository: accept its terms and set HF_TOKEN") from None
    except Exception as e:  # no network, DNS, TLS, timeouts, 5xx
        raise _HubUnreachable(model_id, f"cannot reach the Hugging Face Hub at {endpoint} "
                                       f"({type(e).__name__}: {e}) and the model is not cached") from None
    wanted = needed_files(files)
    if "config.json" not in wanted and "modules.json" not in wanted:
        raise ModelLoadError(model_id, "the repository has no config.json", file="config.json")
    return files


def count_parameters(model: str | Path, revision: str | None = None, token: str | None = None,
                     timeout_s: float = 5.0) -> int | None:
    """The parameter count of a model, read from its safetensors headers only (no weights loaded).

    ``model`` is a local directory (every ``*.safetensors`` under it, sub-modules such as
    ``1_Dense/`` included) or a Hub id: first the local Hugging Face cache (no network), else the Hub's
    header requests (``huggingface_hub.get_safetensors_metadata``), given at most ``timeout_s`` in all.
    Returns None when it cannot be found (no safetensors, no network, too slow, any error): autoscaling
    presets then use "small". Never raises, so sizing can never fail or stall an app build.
    """
    try:
        path = Path(model).expanduser()
        if path.is_dir():
            return _count_dir(path)
        cached = _cached_snapshot(str(model), revision, token)
        if cached is not None and _complete(cached):  # e.g. on a node that served the model before
            return _count_dir(cached)
        return _bounded(lambda: _count_on_hub(str(model), revision, token, timeout_s), timeout_s)
    except Exception:  # noqa: BLE001 - any failure just means "unknown size"
        return None


def _count_dir(path: Path) -> int | None:
    from huggingface_hub import parse_local_safetensors_file_metadata

    files = sorted(path.rglob("*.safetensors"))
    if not files:
        return None
    return sum(sum(parse_local_safetensors_file_metadata(f).parameter_count.values()) for f in files)


def _complete(snapshot: Path) -> bool:
    """Whether every shard a cached sharded checkpoint names is there (the cache may hold only some)."""
    for index in snapshot.rglob("*.safetensors.index.json"):
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        if not all((index.parent / shard).is_file() for shard in shards):
            return False
    return True


def _count_on_hub(repo_id: str, revision: str | None, token: str | None, timeout_s: float) -> int:
    from huggingface_hub import get_safetensors_metadata

    metadata = get_safetensors_metadata(repo_id, revision=revision, token=token, timeout=timeout_s)
    return int(sum(metadata.parameter_count.values()))


def _bounded(fn: Callable[[], int], timeout_s: float) -> int | None:
    """``fn()`` in a daemon thread, None if it fails or has not returned within ``timeout_s``.

    The Hub timeout is per request and a lookup makes several; a daemon thread left behind by an
    unresponsive network never holds up the build (nor the interpreter's exit).
    """
    result: list[int] = []

    def run() -> None:
        try:
            result.append(fn())
        except Exception:  # noqa: BLE001 - no network, no such repo, no safetensors: "unknown"
            pass

    worker = threading.Thread(target=run, name="count-parameters", daemon=True)
    worker.start()
    worker.join(timeout_s)
    return result[0] if result else None
