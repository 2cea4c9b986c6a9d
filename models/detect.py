"""Which family a model directory belongs to, read from its files (no weights loaded)."""
from __future__ import annotations

from pathlib import Path

from .common import read_json
from .errors import ModelLoadError

FAMILIES = ("modular", "seq_cls", "qwen3")

# Causal-LM architectures scored as yes/no rerankers.
_QWEN3_ARCHS = {"Qwen3ForCausalLM"}


def _module_class(type_string: str) -> str:
    return str(type_string).rsplit(".", 1)[-1]


def detect_family(path, model_id: str | None = None) -> str:
    """One of FAMILIES, or a ModelLoadError saying why none fits.

    A modules.json with more than a lone Transformer is a modular Sentence Transformers cross-encoder
    (its chain is validated when loading); else config.json's architectures decide.
    """
    path = Path(path)
    model_id = model_id or str(path)
    if not path.is_dir():
        raise ModelLoadError(model_id, "not a directory", file=str(path))
    modules = read_json(model_id, path / "modules.json", required=False)
    config_dir = path
    if modules is not None:
        if not isinstance(modules, list) or not modules:
            raise ModelLoadError(model_id, "modules.json is not a non-empty list", file="modules.json")
        if len(modules) > 1:
            return "modular"
        # A lone Transformer module (a classifier saved by sentence-transformers): its config decides.
        config_dir = path / modules[0].get("path", "")
    config = read_json(model_id, config_dir / "config.json")
    archs = list(config.get("architectures") or [])
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "seq_cls"
    if _QWEN3_ARCHS & set(archs):
        return "qwen3"
    raise ModelLoadError(
        model_id, f"unsupported architecture {archs or None} (model_type {config.get('model_type')!r}); supported: "
                  "modular Sentence Transformers cross-encoders (modules.json), *ForSequenceClassification, "
                  "Qwen3ForCausalLM (Qwen3-Reranker)", file="config.json")
