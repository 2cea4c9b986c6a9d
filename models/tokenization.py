"""Tokenizer pieces every family shares: loading the fast tokenizer, the text-pair encoder of the encoder
families, and the padding id / token-type facts the scorers need."""
from __future__ import annotations

from pathlib import Path

from .config import id2label_of, position_limit, resolve_max_length
from .encoding import PairEncoder
from .errors import ModelLoadError


def load_tokenizer(model_id: str, tokenizer_dir: Path, config=None):
    """The fast tokenizer. `config` (ours, rope-fixed) spares AutoTokenizer from re-reading config.json."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), **({"config": config} if config is not None else {}))
    except Exception as e:
        raise ModelLoadError(model_id, f"cannot load the tokenizer: {type(e).__name__}: {e}",
                             file=str(tokenizer_dir)) from None  # the cause is in the message
    if not getattr(tok, "is_fast", False) or getattr(tok, "backend_tokenizer", None) is None:
        raise ModelLoadError(model_id, "the tokenizer has no fast (tokenizers) backend; a tokenizer.json is needed",
                             file=str(tokenizer_dir))
    return tok


def uses_token_types(tokenizer, config) -> bool:
    """Token types matter only where the tokenizer emits them and the model has more than one type (BERT);
    for everyone else the model's default all-zero types are what the reference sees."""
    return "token_type_ids" in tokenizer.model_input_names and (getattr(config, "type_vocab_size", 0) or 0) > 1


def pair_encoder(family: str, model_id: str, tokenizer, config, *, max_length: int | None,
                 file_max_length: int | None = None) -> PairEncoder:
    limit = resolve_max_length(model_id, configured=max_length, file_configured=file_max_length,
                               tokenizer_max=getattr(tokenizer, "model_max_length", None),
                               pos_limit=position_limit(config))
    return PairEncoder(family=family, model_id=model_id, tokenizer=tokenizer, max_length=limit,
                       id2label=id2label_of(config), uses_token_types=uses_token_types(tokenizer, config))


def pad_id_of(config, tokenizer) -> int:
    """The id padding positions get: the model's own pad id first (RoBERTa-style positions are counted from it)."""
    for pad in (getattr(config, "pad_token_id", None), tokenizer.pad_token_id):
        if pad is not None:
            return int(pad)
    return 0
