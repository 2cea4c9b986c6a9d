"""models/: detection, tokenization and scoring of every reranker family. Pure PyTorch/transformers, no Ray.

    encoder = load_encoder("cross-encoder/ettin-reranker-17m-v1")        # ingress: tokenizer only
    scorer = load_scorer("cross-encoder/ettin-reranker-17m-v1")          # replica: weights, loaded once
    raw = scorer.score(encoder.encode([(query, doc), ...]))              # float32, input order; sigmoid = normalised

Causal families compute a request's shared prompt once (models/prefix.py) when the batch is marked:
    batch = models.prefix.mark_shared_prefixes(encoder, encoder.encode(pairs), [q for q, _ in pairs])
"""
from __future__ import annotations

from pathlib import Path

from . import families
from .encoded import EncodedBatch
from .encoding import Encoder
from .errors import (InputError, InputTooLongError, InstructionNotSupportedError, ModelLoadError,
                     PairRequiredError)
from .families import FAMILIES, detect_family
from .hub import resolve_model_dir
from .loading import resolve_device, resolve_dtype
from .scoring import Scorer

__all__ = ["EncodedBatch", "ModelLoadError", "InputError", "InputTooLongError", "PairRequiredError",
           "InstructionNotSupportedError", "resolve_model_dir", "detect_family", "load_encoder", "load_scorer",
           "Encoder", "Scorer", "FAMILIES"]


def _resolve(model_id: str, revision: str | None, family: str, token: str | None,
             weights: bool = True) -> tuple[Path, families.Family]:
    model_dir = resolve_model_dir(model_id, revision=revision, token=token, weights=weights)
    if family in (None, "auto"):
        family = detect_family(model_dir, model_id)
    elif family not in FAMILIES:
        raise ModelLoadError(model_id, f"unknown family {family!r}; use auto or one of {FAMILIES}")
    return model_dir, families.get(family)


def load_encoder(model_id: str, *, revision: str | None = None, family: str = "auto", max_length: int | None = None,
                 token: str | None = None) -> Encoder:
    """The model's tokenizer-side half (no weights, none downloaded): for the HTTP ingress."""
    model_dir, family = _resolve(model_id, revision, family, token, weights=False)
    return family.load_encoder(model_id, model_dir, max_length=max_length)


def load_scorer(model_id: str, *, revision: str | None = None, family: str = "auto", dtype: str = "auto",
                device: str = "auto", max_length: int | None = None, token: str | None = None,
                token_budget: int | None = None, execution: str = "auto", shared_prefix: str = "auto") -> Scorer:
    """The loaded model (weights + head, once). `scorer.encoder` is its matching Encoder.

    execution: "auto" (packed on CUDA in fp16/bf16 where the model supports it, padded otherwise), "packed"
    (padded where unsupported, with a warning) or "padded"; `scorer.execution` says what was chosen.
    token_budget: tokens per forward chunk — padded size for padded chunks, real tokens for packed ones.
    shared_prefix: "auto" (prefixes marked by models.prefix.mark_shared_prefixes run once per chunk, where the
    model supports it: `scorer.supports_shared_prefix`) or "off"."""
    from .prefix import check_setting

    check_setting(shared_prefix)
    model_dir, family = _resolve(model_id, revision, family, token)  # detection reads files only: before any weights
    device = resolve_device(model_id, device)
    dtype = resolve_dtype(model_id, dtype, device)
    scorer = family.scorer(model_id, model_dir, dtype=dtype, device=device, max_length=max_length,
                           token_budget=token_budget, execution=execution)
    scorer.set_shared_prefix(shared_prefix)
    return scorer
