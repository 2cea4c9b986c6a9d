"""The registry of reranker families: which exist, in which order detection tries them, and where each lives;
and detection itself (`detect_family`), which tries each family's own rule in that order.

A family is one module of models/families/ that ends with `FAMILY = Family(...)`: its name, its detection rule,
its encoder loader and its scorer class. Detection, `load_encoder` / `load_scorer` (models/__init__.py), the
settings' `family` values and `/info` all read this registry. Adding a family = its module + one line below.

The names are plain data: a family's module is imported only when `get` asks for it.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

from ..config import read_json
from ..errors import ModelLoadError

# name -> module of models/families/, in DETECTION ORDER: the first family whose rule matches a model wins.
_MODULES = {
    "st_causal": "st_causal",  # modules.json with a LogitScore: Sentence Transformers causal CrossEncoder
    "modular": "modular",  # modules.json: Transformer -> Pooling -> Dense...
    "seq_cls": "seq_cls",  # config.json: *ForSequenceClassification
    "qwen3": "qwen3",  # config.json: Qwen3ForCausalLM (the official Qwen3-Reranker layout)
    "mxbai": "mxbai",  # Qwen2ForCausalLM named mxbai-rerank-*-v2 (Hub id, folder, Hub cache folder)
    "bge_gemma": "bge_gemma",  # GemmaForCausalLM named bge-reranker-v2-gemma
    "jina_v3": "jina_v3",  # config.json: JinaForRanking (jina-reranker-v3, listwise)
}
FAMILIES: tuple[str, ...] = tuple(_MODULES)


@dataclass(frozen=True)
class Family:
    name: str
    detect: Callable[["ModelFiles"], bool]  # True when the model's files say it is of this family
    load_encoder: Callable[..., Any]  # (model_id, model_dir, *, max_length) -> Encoder (tokenizer only)
    scorer: type  # Scorer subclass: (model_id, model_dir, *, dtype, device, max_length, token_budget, execution)
    supports: str  # what it serves, for the "unsupported model" message
    listwise: bool = False  # scores a request's documents together (models/encoded.py groups); cannot chunk


@dataclass
class ModelFiles:
    """What detection rules read: modules.json (None when absent), the backbone's config.json (read on first
    use) and the names the model goes by (Hub id, folder name, the Hub cache's `models--org--name`)."""
    path: Path
    model_id: str
    modules: list | None
    config_dir: Path
    names: frozenset[str] = field(default_factory=frozenset)

    @cached_property
    def config(self) -> dict:
        return read_json(self.model_id, self.config_dir / "config.json")

    @property
    def architectures(self) -> list[str]:
        return [str(a) for a in self.config.get("architectures") or []]

    @property
    def module_types(self) -> list[str]:
        """modules.json's class names (`...cross_encoder.modules.logit_score.LogitScore` -> `LogitScore`)."""
        return [str(m.get("type", "")).rsplit(".", 1)[-1] for m in self.modules or []]


def model_names(path: Path, model_id: str) -> frozenset[str]:
    """Lower-case names a model goes by: the last part of its Hub id / path, its folder, and the repository
    name of a Hub cache snapshot (`.../models--org--name/snapshots/<rev>`)."""
    names = {Path(str(model_id).rstrip("/")).name, path.resolve().name, path.name}
    for part in (*Path(str(model_id)).parts, *path.resolve().parts):
        if part.startswith("models--"):
            names.add(part.split("--")[-1])
    return frozenset(n.lower() for n in names if n)


def get(name: str) -> Family:
    """The registered family `name` (its module imported on first use)."""
    module = importlib.import_module(f"{__package__}.{_MODULES[name]}")
    family = module.FAMILY
    assert family.name == name, \
        f"models/families/{_MODULES[name]}.py declares {family.name!r}, registered as {name!r}"
    return family


def all_families() -> list[Family]:
    return [get(name) for name in FAMILIES]


def model_files(path, model_id: str | None = None) -> ModelFiles:
    """What detection reads of the model directory `path` (no weights)."""
    path = Path(path)
    model_id = model_id or str(path)
    if not path.is_dir():
        raise ModelLoadError(model_id, "not a directory", file=str(path))
    modules = read_json(model_id, path / "modules.json", required=False)
    config_dir = path
    if modules is not None:
        if not isinstance(modules, list) or not modules or not all(isinstance(m, dict) for m in modules):
            raise ModelLoadError(model_id, "modules.json is not a non-empty list of modules", file="modules.json")
        modules = sorted(modules, key=lambda m: int(m.get("idx", 0)))
        # The first module is the Transformer: its folder holds the backbone's config.json.
        config_dir = path / modules[0].get("path", "")
    return ModelFiles(path=path, model_id=model_id, modules=modules, config_dir=config_dir,
                      names=model_names(path, model_id))


def detect_family(path, model_id: str | None = None) -> str:
    """One of FAMILIES, or a ModelLoadError saying why none fits."""
    files = model_files(path, model_id)
    families = all_families()
    for family in families:
        if family.detect(files):
            return family.name
    config = files.config
    raise ModelLoadError(
        files.model_id, f"unsupported architecture {files.architectures or None} (model_type "
                        f"{config.get('model_type')!r}); supported: {'; '.join(f.supports for f in families)}. "
                        "A supported family the files do not name can be set with `family`",
        file="config.json")
