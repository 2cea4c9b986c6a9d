"""Loading the weights: the device and dtype a scorer runs in, and `from_pretrained` that fails loudly (a
ModelLoadError naming the model) instead of initialising missing weights at random."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator

from .errors import ModelLoadError

_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "half": "float16",
           "bfloat16": "bfloat16", "bf16": "bfloat16"}


def resolve_device(model_id: str, device: str) -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(model_id, f"device {device!r} requested but CUDA is not available")
    return str(device)


def resolve_dtype(model_id: str, dtype: str, device: str) -> str:
    """The dtype name: 'auto' is bf16 on CUDA (fp16 where bf16 is unsupported), fp32 elsewhere."""
    import torch

    if dtype in (None, "auto"):
        if device.startswith("cuda"):
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return "float32"
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ModelLoadError(model_id, f"unknown dtype {dtype!r}; use auto, float32, float16 or bfloat16") from None


def from_pretrained(model_id: str, model_cls, path: Path, *, quiet_unexpected: bool = False, **kwargs):
    """`model_cls.from_pretrained` that fails loudly when the checkpoint lacks weights the model needs
    (transformers would initialise them at random and scores would be garbage)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    if quiet_unexpected:  # e.g. the lm_head we deliberately skip: not worth a load report in the logs
        hf_logging.set_verbosity_error()
    try:
        model, info = model_cls.from_pretrained(str(path), output_loading_info=True, **kwargs)
    except Exception as e:
        # The cause is in the message; transformers' chained traceback would only bury it in the replica's log.
        raise ModelLoadError(model_id, f"cannot load the weights: {type(e).__name__}: {e}", file=str(path)) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise ModelLoadError(model_id, f"weights missing from the checkpoint: {missing[:5]}"
                                       f"{' ...' if len(missing) > 5 else ''}", file=str(path))
    return model


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def safetensors_holding(model_dir: Path, wanted: Callable[[str], bool]) -> list[Path] | None:
    """The checkpoint's safetensors files that may hold the tensors `wanted` accepts: the shards the index maps
    them to (none: no such tensor), or the single model.safetensors; None when there is neither (*.bin only)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted({model_dir / f for n, f in weight_map.items() if wanted(n)})
    single = model_dir / "model.safetensors"
    return [single] if single.is_file() else None


def bin_state_dicts(model_dir: Path) -> Iterator[dict]:
    """The state dicts of the checkpoint's pytorch_model*.bin files, memory-mapped, one at a time."""
    import torch

    for path in sorted(model_dir.glob("pytorch_model*.bin")):
        yield torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
