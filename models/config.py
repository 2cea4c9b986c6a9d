"""A model's files read before any weights: its JSON files, its transformers config (ModernBERT's saved rope thetas
honoured), its labels, and the max input length rule (docs/API.md, Max input length: the position limit the config
allows, the tokenizer's real limit, the deployment's setting)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import ModelLoadError

# A tokenizer `model_max_length` at or above this is transformers' "no limit" placeholder (1e30).
_NO_LIMIT = 1_000_000

# Models whose learned positions start at pad_token_id + 1 (create_position_ids_from_input_ids), so only
# max_position_embeddings - pad_token_id - 1 positions are usable.
_PAD_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text",
                         "longformer", "mpnet", "ibert", "roberta-prelayernorm", "xmod", "luke"}


def read_json(model_id: str, path: Path, required: bool = True) -> dict | list | None:
    """A JSON file of the model, or None when optional and absent; a ModelLoadError naming it otherwise."""
    if not path.is_file():
        if required:
            raise ModelLoadError(model_id, "file is missing", file=str(path))
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(model_id, f"unreadable JSON: {e}", file=str(path)) from e


def load_config(model_id: str, model_dir: Path):
    """The transformers config of `model_dir`, with saved ModernBERT rope thetas honoured."""
    from transformers import AutoConfig, PretrainedConfig

    raw = read_json(model_id, model_dir / "config.json")
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise ModelLoadError(model_id, "config.json has no model_type", file=str(model_dir / "config.json"))
    if raw["model_type"] == "modernbert":
        from .modernbert import fix_saved_rope  # torch-heavy module: only for ModernBERT configs

        raw = fix_saved_rope(raw)
    try:
        config_cls = type(AutoConfig.for_model(raw["model_type"]))
        config = config_cls.from_dict(raw)
    except (KeyError, ValueError, TypeError) as e:
        raise ModelLoadError(model_id, f"unsupported or invalid config ({raw['model_type']}): {e}",
                             file=str(model_dir / "config.json")) from e
    assert isinstance(config, PretrainedConfig)
    return config


def position_limit(config) -> int | None:
    """How many tokens the model's position embeddings can take (None when unbounded / unknown)."""
    mpe = getattr(config, "max_position_embeddings", None)
    if not isinstance(mpe, int) or mpe <= 0:
        return None
    if config.model_type in _PAD_OFFSET_POSITIONS:
        return mpe - (config.pad_token_id or 0) - 1
    return mpe


def real_tokenizer_limit(model_max_length: Any) -> int | None:
    """A tokenizer's `model_max_length` when it is a real limit; None for transformers' "no limit" placeholder."""
    if isinstance(model_max_length, int) and 0 < model_max_length < _NO_LIMIT:
        return model_max_length
    return None


def resolve_max_length(model_id: str, *, configured: int | None, file_configured: int | None,
                       tokenizer_max: int | None, pos_limit: int | None, default: int | None = None) -> int:
    """The max input length rule (docs/API.md).

    `configured` (the deployment's max_length) wins, and may not exceed the position limit. A limit saved with
    the model (sentence_bert_config max_seq_length) is next, capped at the position limit. Else the smaller of
    the tokenizer's real `model_max_length`, the position limit and a family default.
    """
    if configured is not None:
        if configured < 1:
            raise ModelLoadError(model_id, f"max_length must be at least 1, got {configured}")
        if pos_limit is not None and configured > pos_limit:
            raise ModelLoadError(model_id, f"max_length {configured} exceeds the model's position limit {pos_limit}")
        return configured
    if file_configured is not None:
        return min(file_configured, pos_limit) if pos_limit is not None else file_configured
    candidates = [x for x in (real_tokenizer_limit(tokenizer_max), pos_limit, default) if x]
    if not candidates:
        raise ModelLoadError(model_id, "no max input length known: set max_length in the deployment config")
    return min(candidates)


def id2label_of(config: Any) -> dict[int, str]:
    labels = getattr(config, "id2label", None) or {}
    return {int(k): str(v) for k, v in labels.items()} or {0: "LABEL_0"}
