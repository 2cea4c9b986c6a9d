"""Variable-length ("packed") attention for transformers models.

`register()` adds an attention implementation named "packed" to transformers' AttentionInterface (and a
matching mask function to AttentionMaskInterface); `model.set_attn_implementation("packed")` selects it.
The model is then called with the packed inputs of models/packing.py: one row of T real tokens, position ids
restarting per sequence, and `cu_seq_lens_q/k` + `max_length_q/k`, which transformers forwards untouched to
every attention call. Each sequence attends only to itself (plus the causal / sliding-window rule of the layer).

Kernels, picked per call by `varlen_backend()`:
- "flash_attn": `flash_attn.flash_attn_varlen_func` — CUDA, fp16/bf16, flash-attn installed;
- "torch_varlen": `torch.nn.attention.varlen.varlen_attn` — CUDA, fp16/bf16, torch >= 2.10;
- "segments": one `scaled_dot_product_attention` per sequence — any device and dtype (the CPU default:
  measured faster on CPU than compiled FlexAttention with a document mask, see benchmarks/cpu_packing.py).

Padded calls keep working under the same implementation name: with a 2D padding mask the registered mask
function builds the usual SDPA mask and attention runs as stock SDPA. Without a mask and without
`cu_seq_lens`, each batch row is taken as one unpadded sequence.

Window convention (transformers' flash convention, which ModernBERT and Qwen3 follow): a layer's
`sliding_window` s lets token i attend to j when |i - j| < s (bidirectional) or 0 <= i - j < s (causal);
ModernBERT passes s = local_attention / 2 + 1, i.e. +-64 for ettin.
"""
from __future__ import annotations

import contextlib
import importlib.util
from functools import lru_cache

import torch
import torch.nn.functional as F

PACKED = "packed"

_forced_backend: str | None = None


def register(name: str = PACKED) -> str:
    """Register the packed attention (and its mask function) with transformers under `name`; idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, packed_attention_forward)
    AttentionMaskInterface.register(name, _padding_only_mask)
    return name


def _padding_only_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs):
    """Mask factory for the "packed" implementation.

    No 2D padding mask (packed or unpadded input): return None, so no [T, T] mask is ever materialised — the
    attention function separates sequences through cu_seq_lens instead. transformers' packed-sequence detection
    (`find_packed_sequence_indices`, causal models) wraps the mask function but the result is dropped here.
    With a padding mask (a padded batch): the stock SDPA mask, so padded forwards stay correct.
    """
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


@lru_cache(maxsize=None)
def _has_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _has_torch_varlen() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def varlen_backend(device: torch.device, dtype: torch.dtype) -> str:
    """The kernel packed attention uses for tensors on `device` of `dtype`."""
    if _forced_backend is not None:
        return _forced_backend
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        if _has_flash_attn():
            return "flash_attn"
        if _has_torch_varlen():
            return "torch_varlen"
    return "segments"


@contextlib.contextmanager
def force_backend(name: str | None):
    """Use kernel `name` for every packed attention call inside the block (tests and benchmarks)."""
    global _forced_backend
    if name not in (None, "flash_attn", "torch_varlen", "segments"):
        raise ValueError(f"unknown varlen attention backend {name!r}")
    previous, _forced_backend = _forced_backend, name
    try:
        yield
    finally:
        _forced_backend = previous


def _window(sliding_window: int | None, causal: bool) -> tuple[int, int]:
    """(left, right) in flash-attn's inclusive convention; -1 means unbounded."""
    left = sliding_window - 1 if sliding_window else -1
    right = 0 if causal else left
    return left, right


def varlen_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_lens: torch.Tensor,
                     max_length: int, *, scale: float | None = None, causal: bool = False,
                     sliding_window: int | None = None) -> torch.Tensor:
    """Attention of packed sequences, each to itself only.

    query [T, Hq, D]; key, value [T, Hkv, D] (Hq a multiple of Hkv: grouped KV heads); cu_seq_lens int32 [N+1];
    returns [T, Hq, D].
    """
    backend = varlen_backend(query.device, query.dtype)
    left, right = _window(sliding_window, causal)
    if backend == "flash_attn":
        from flash_attn import flash_attn_varlen_func
        return flash_attn_varlen_func(query, key, value, cu_seq_lens, cu_seq_lens, max_length, max_length,
                                      softmax_scale=scale, causal=causal, window_size=(left, right))
    if backend == "torch_varlen":
        from torch.nn.attention.varlen import varlen_attn
        return varlen_attn(query, key, value, cu_seq_lens, cu_seq_lens, max_length, max_length, scale=scale,
                           window_size=(left, right), enable_gqa=key.shape[1] != query.shape[1])
    return _segments_attention(query, key, value, cu_seq_lens, scale=scale, left=left, right=right)


def _segments_attention(query, key, value, cu_seq_lens, *, scale, left: int, right: int) -> torch.Tensor:
    """One SDPA call per sequence: exact per-sequence attention on any device, no [T, T] mask anywhere."""
    # [1, H, T, D] views: 4-D inputs reach SDPA's fused CPU kernel (3-D ones fall back to the slower math path)
    q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (query, key, value))
    out = torch.empty_like(q)
    gqa = k.shape[1] != q.shape[1]
    bounds = cu_seq_lens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        mask, is_causal = _segment_mask(end - start, left, right, q.device)
        out[:, :, start:end] = F.scaled_dot_product_attention(
            q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], attn_mask=mask, is_causal=is_causal,
            scale=scale, enable_gqa=gqa)
    return out[0].transpose(0, 1)


def _segment_mask(length: int, left: int, right: int, device: torch.device) -> tuple[torch.Tensor | None, bool]:
    """(bool mask or None, is_causal) for one sequence of `length` under window (left, right)."""
    full_left = left < 0 or length <= left + 1
    if right == 0:  # causal
        return (None, True) if full_left else (_band(length, left, 0, device), False)
    full_right = right < 0 or length <= right + 1
    if full_left and full_right:
        return None, False
    return _band(length, left, right, device), False


def _band(length: int, left: int, right: int, device: torch.device) -> torch.Tensor:
    # A band matrix is Toeplitz: the top-left corner of one big band is the band of any shorter length.
    size = max(1024, 1 << (length - 1).bit_length())
    return _band_cached(size, left, right, str(device))[:length, :length]


@lru_cache(maxsize=32)
def _band_cached(size: int, left: int, right: int, device: str) -> torch.Tensor:
    i = torch.arange(size, device=device)
    offset = i[:, None] - i[None, :]  # query index minus key index
    keep = torch.ones(size, size, dtype=torch.bool, device=device)
    if left >= 0:
        keep &= offset <= left
    if right >= 0:
        keep &= -offset <= right
    return keep


def packed_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                             sliding_window: int | None = None, is_causal: bool | None = None,
                             cu_seq_lens_q: torch.Tensor | None = None, cu_seq_lens_k: torch.Tensor | None = None,
                             max_length_q: int | None = None, max_length_k: int | None = None, **kwargs):
    """transformers attention function: query [B, Hq, S, D], key/value [B, Hkv, S, D] -> ([B, S, Hq, D], None)."""
    if dropout:
        raise NotImplementedError("packed attention is for inference: call model.eval() first")
    if attention_mask is not None:  # a padded batch: the mask already carries padding, causality and window
        if cu_seq_lens_q is not None:
            raise ValueError("pass either a padding attention_mask or cu_seq_lens, not both")
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    causal = is_causal if is_causal is not None else bool(getattr(module, "is_causal", False))
    batch, _, seq, _ = query.shape
    if cu_seq_lens_q is None:  # every row is one whole sequence
        cu = torch.arange(0, (batch + 1) * seq, seq, dtype=torch.int32, device=query.device)
        max_length = seq
    else:
        if batch != 1:
            raise ValueError(f"packed inputs have batch size 1, got {batch}")
        if cu_seq_lens_k is not None and cu_seq_lens_k is not cu_seq_lens_q \
                and not torch.equal(cu_seq_lens_k, cu_seq_lens_q):
            raise ValueError("packed self-attention needs cu_seq_lens_k == cu_seq_lens_q")
        cu = cu_seq_lens_q.to(torch.int32)
        max_length = int(max_length_q) if max_length_q is not None else int((cu[1:] - cu[:-1]).max())
    # [B, H, S, D] -> [B*S, H, D]: the token-major layout of variable-length kernels
    q = query.transpose(1, 2).reshape(batch * seq, query.shape[1], query.shape[3])
    k = key.transpose(1, 2).reshape(batch * seq, key.shape[1], key.shape[3])
    v = value.transpose(1, 2).reshape(batch * seq, value.shape[1], value.shape[3])
    out = varlen_attention(q, k, v, cu, max_length, scale=scaling, causal=causal, sliding_window=sliding_window)
    return out.reshape(batch, seq, out.shape[1], out.shape[2]), None
