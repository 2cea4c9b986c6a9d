"""Sentence Transformers Pooling in plain torch, on right-padded [N, S, H] and on packed [1, T, H] hidden states;
shared by the modular cross-encoders and the packed heads of `*ForSequenceClassification`."""
from __future__ import annotations

import torch

# sentence-transformers' legacy boolean flags, in the order it concatenates the pooled vectors.
LEGACY_POOLING_FLAGS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                         "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                         "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}
POOLING_MODES = tuple(LEGACY_POOLING_FLAGS.values())
# Modes with a packed (segment) form; mean_sqrt_len_tokens / weightedmean models run padded.
PACKED_POOLING_MODES = ("cls", "lasttoken", "mean", "max")

def pool(token_embeddings: torch.Tensor, attention_mask: torch.Tensor, modes: tuple[str, ...]) -> torch.Tensor:
    """sentence-transformers Pooling on RIGHT-padded input: padding never counts; modes are concatenated."""
    mask = attention_mask.unsqueeze(-1).to(token_embeddings.dtype)
    acc = torch.float32 if token_embeddings.dtype in (torch.float16, torch.bfloat16) else token_embeddings.dtype
    lengths = attention_mask.sum(dim=1)
    rows = torch.arange(token_embeddings.shape[0], device=token_embeddings.device)
    out = []
    for mode in modes:
        if mode == "cls":
            out.append(token_embeddings[:, 0])
        elif mode == "max":
            out.append(token_embeddings.masked_fill(mask == 0, float("-inf")).max(dim=1).values)
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            total = (token_embeddings * mask).sum(dim=1, dtype=acc)
            count = torch.clamp(mask.sum(dim=1, dtype=acc), min=1e-9)
            out.append((total / (count if mode == "mean" else torch.sqrt(count))).to(token_embeddings.dtype))
        elif mode == "weightedmean":
            weights = torch.arange(1, token_embeddings.shape[1] + 1, device=mask.device, dtype=acc).view(1, -1, 1)
            weighted = mask.to(acc) * weights
            total = (token_embeddings * weighted).sum(dim=1)
            out.append((total / torch.clamp(weighted.sum(dim=1), min=1e-9)).to(token_embeddings.dtype))
        elif mode == "lasttoken":
            out.append(token_embeddings[rows, lengths - 1])
    return torch.cat(out, dim=-1)

def pool_packed(hidden: torch.Tensor, cu_seq_lens: torch.Tensor, modes: tuple[str, ...]) -> torch.Tensor:
    """`pool` on packed hidden states [1, T, H]: cls / lasttoken read one row per pair, mean / max reduce each
    segment in one op."""
    from .packing import first_token, last_token, segment_max, segment_mean

    out = []
    for mode in modes:
        if mode == "cls":
            out.append(first_token(hidden, cu_seq_lens))
        elif mode == "lasttoken":
            out.append(last_token(hidden, cu_seq_lens))
        elif mode == "mean":  # accumulate half precision in fp32, as `pool` does
            acc = hidden.float() if hidden.dtype in (torch.float16, torch.bfloat16) else hidden
            out.append(segment_mean(acc, cu_seq_lens).to(hidden.dtype))
        elif mode == "max":
            out.append(segment_max(hidden, cu_seq_lens))
        else:
            raise ValueError(f"pooling mode {mode!r} has no packed form")
    return torch.cat(out, dim=-1)
