"""Which family a model directory belongs to, read from its files (no weights loaded): each registered family's
own rule, tried in the registry's order (models/families/__init__.py)."""
from __future__ import annotations

from pathlib import Path

from .common import read_json
from .errors import ModelLoadError
from .families import FAMILIES, ModelFiles, all_families, model_names

__all__ = ["FAMILIES", "detect_family", "model_files"]


def model_files(path, model_id: str | None = None) -> ModelFiles:
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
