"""The family registry: every registered family is one module declaring its rule, encoder and scorer, and
detection, loading and the settings all read the same list."""
from __future__ import annotations

import json
import shutil

import pytest

from models import FAMILIES, ModelLoadError, detect_family, families, load_encoder
from models.encoding import Encoder
from models.scoring import Scorer


@pytest.mark.parametrize("name", FAMILIES)
def test_every_registered_family_declares_itself(name):
    fam = families.get(name)
    assert fam.name == name and callable(fam.detect) and callable(fam.load_encoder)
    assert issubclass(fam.scorer, Scorer) and fam.supports


def test_settings_accept_exactly_the_registered_families():
    from pydantic import ValidationError

    from serve_app.settings import ModelSettings

    for name in ("auto", *FAMILIES):
        assert ModelSettings(model_id="x/a", family=name).family == name
    with pytest.raises(ValidationError, match="family"):
        ModelSettings(model_id="x/a", family="gpt")


def test_no_import_circle_between_families():
    """Shared pieces live in shared modules: no family module imports another family module."""
    import ast
    from pathlib import Path

    root = Path(families.__file__).parent
    modules = {families._MODULES[n] for n in FAMILIES}
    for mod in modules:
        tree = ast.parse((root / f"{mod}.py").read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1}
        assert not (imported & (modules - {mod})), f"models/{mod}.py imports {imported & modules}"


def test_unsupported_message_lists_every_family(tiny, tmp_path):
    path = tmp_path / "m"
    shutil.copytree(tiny["bert"], path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["BertForMaskedLM"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError) as e:
        detect_family(path)
    for name in FAMILIES:
        assert families.get(name).supports in str(e.value)


def test_family_names_reach_the_encoder(tiny):
    enc = load_encoder(str(tiny["qwen3_tied"]))
    assert isinstance(enc, Encoder) and enc.family == "qwen3" == detect_family(tiny["qwen3_tied"])


def test_model_names_read_hub_ids_folders_and_cache_paths(tmp_path):
    snap = tmp_path / "hub" / "models--Org--Some-Model" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    assert {"some-model", "abc"} <= families.model_names(snap, str(snap))
    assert "mxbai-rerank-base-v2" in families.model_names(snap, "mixedbread-ai/mxbai-rerank-base-v2")
