"""Variable-length ("packed") attention for transformers models.

`register()` adds an attention implementation named "packed" to transformers' AttentionInterface;
`model.set_attn_implementation("packed")` selects it. The model is then called with the packed inputs of
models/packing.py: one row of T real tokens, position ids restarting per sequence, and `cu_seq_lens_q/k` +
`max_length_q/k`, which transformers forwards untouched to every attention call. Each sequence attends only to
itself (plus the causal / sliding-window rule of the layer).

No mask function is registered for "packed", on purpose: transformers then builds no mask at all for it (its path
for attention functions that need none), where a registered one makes it first look for packed sequences in the
position ids with a host-side `.all()` on a device tensor, one device-to-host sync per forward chunk, which the
pipelined CUDA loop (models/scoring.py) exists to avoid. So a model under "packed" takes packed or unpadded input
only; padded batches run under "sdpa" (`use(model, packed)` switches it, and refuses a padding mask under
"packed").

Kernels, picked per call by `varlen_backend()`:
- "flash_attn": `flash_attn.flash_attn_varlen_func` — CUDA, fp16/bf16, flash-attn installed;
- "torch_varlen": `torch.nn.attention.varlen.varlen_attn` — CUDA, fp16/bf16, torch 2.10 to 2.13 (each
  version's signature is handled: see "the variable-length kernels" below);
- "segments": one `scaled_dot_product_attention` per sequence — any device and dtype (the CPU default:
  measured faster on CPU than compiled FlexAttention with a document mask, see benchmarks/cpu_packing.py),
  and any layer the chosen kernel cannot express (a sliding window on torch 2.10).

Without `cu_seq_lens`, each batch row is taken as one unpadded sequence. A prepared 4D mask passed in by hand runs
as stock SDPA. An argument a layer passes that this function cannot honour (a logit soft cap, attention sinks
`s_aux`, cross-attention states, dropout) raises instead of being dropped (`check_honoured`).

Window convention (transformers' flash convention, which ModernBERT and Qwen3 follow): a layer's
`sliding_window` s lets token i attend to j when |i - j| < s (bidirectional) or 0 <= i - j < s (causal);
ModernBERT passes s = local_attention / 2 + 1, i.e. +-64 for ettin.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import logging
import math
import sys
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

PACKED = "packed"

_forced_backend: str | None = None


def register(name: str = PACKED) -> str:
    """Register the packed attention with transformers under `name` (and no mask function: see above);
    idempotent."""
    from transformers import AttentionInterface

    AttentionInterface.register(name, packed_attention_forward)
    return name


def use(model: torch.nn.Module, packed: bool) -> None:
    """Run `model` (a transformers model) with packed attention, or with "sdpa" when `packed` is False. Under packed
    attention a call with a padding `attention_mask` is refused: with no mask function registered, transformers
    would drop the mask and a padded batch would attend to its padding."""
    target = register() if packed else "sdpa"
    if model.config._attn_implementation != target:
        model.set_attn_implementation(target)
    if packed and not getattr(model, "_packed_mask_guard", False):
        model.register_forward_pre_hook(_refuse_padding_mask, with_kwargs=True)
        model._packed_mask_guard = True


def _refuse_padding_mask(model, args, kwargs):
    if kwargs.get("attention_mask") is not None and model.config._attn_implementation == PACKED:
        raise ValueError("a padding attention_mask under packed attention: pass cu_seq_lens (packed input), or "
                         "switch the model to sdpa for padded batches")


# Keyword arguments transformers' layers pass to every attention function that do not change what it computes.
NEUTRAL_KWARGS = frozenset({"position_ids", "use_cache", "deterministic", "output_attentions", "cache_position"})


def check_honoured(module: torch.nn.Module, kwargs: dict) -> None:
    """Refuse an argument packed attention would otherwise drop: a logit soft cap (`softcap`, Gemma 2), attention
    sinks (`s_aux`, gpt-oss), cross-attention states, anything new. Dropping one would change the scores
    silently; an argument that asks for nothing (None, False, 0) is fine."""
    for name, value in kwargs.items():
        if name in NEUTRAL_KWARGS or value is None or (not isinstance(value, torch.Tensor) and not value):
            continue
        shown = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)
        raise NotImplementedError(f"packed attention cannot honour `{name}` ({shown}) of {type(module).__name__}; "
                                  "run this model padded")


# --- the variable-length kernels ---------------------------------------------------------------------------------
#
# Every version takes (q, k, v, cu_seq_q, cu_seq_k, max_q, max_k) positionally; the keywords differ:
#   torch 2.10        varlen_attn(..., is_causal=False, return_aux=None)            no scale, no window, no GQA
#   torch 2.11        varlen_attn(..., *, return_aux=None, scale=None, window_size=(-1, -1))          no GQA
#   torch 2.12, 2.13  varlen_attn(..., *, return_aux, scale, window_size, enable_gqa=False, seqused_k,
#                     block_table, num_splits)
#   flash-attn 2      flash_attn_varlen_func(..., dropout_p=0.0, softmax_scale=None, causal=False,
#                     window_size=(-1, -1), ...)                       fewer KV heads than query heads taken as is
# A kernel's call is worked out ONCE per function (signature inspection, cached), never by catching TypeError
# per call. A layer whose call a kernel cannot express (a sliding window or a non-default scale on torch 2.10)
# runs on the exact per-segment path instead; grouped KV heads are expanded for a kernel without GQA.
# torch's varlen_attn derives causality from window_size == (-1, 0) (2.11+), which is also flash's own rule
# for right == 0, so causal layers pass (left, 0) there.

KERNELS = ("flash_attn", "torch_varlen")


@dataclass(frozen=True)
class VarlenKernel:
    """How to call one installed variable-length kernel (`adapt` builds it from the function's signature)."""

    name: str
    fn: Callable
    scale_kw: str | None  # keyword of the softmax scale; None: the kernel only knows 1/sqrt(head_dim)
    causal_kw: str | None  # keyword of a causal flag; None: causality through window_kw (if any)
    window_kw: str | None  # keyword of a (left, right) window
    gqa: str  # "native": fewer KV heads taken as is; "flag": pass enable_gqa=True; "expand": repeat KV heads

    def can_run(self, *, causal: bool, left: int, right: int, scale: float | None, head_dim: int) -> bool:
        """Whether this kernel computes exactly this layer's attention."""
        if left >= 0 or (right >= 0 and not causal):  # a window beyond plain causality
            if self.window_kw is None:
                return False
        if causal and self.causal_kw is None and self.window_kw is None:
            return False
        if scale is not None and self.scale_kw is None and not math.isclose(scale, head_dim ** -0.5, rel_tol=1e-6):
            return False
        return True

    def __call__(self, q, k, v, cu_q, cu_k, max_q: int, max_k: int, *, causal: bool, left: int, right: int,
                 scale: float | None) -> torch.Tensor:
        kwargs = {}
        if scale is not None and self.scale_kw is not None:
            kwargs[self.scale_kw] = scale
        if causal and self.causal_kw is not None:
            kwargs[self.causal_kw] = True
        if (left, right) != (-1, -1) and self.window_kw is not None:
            kwargs[self.window_kw] = (left, right)  # a tuple: torch compares it with (-1, 0) for causality
        if k.shape[1] != q.shape[1]:
            if self.gqa == "flag":
                kwargs["enable_gqa"] = True
            elif self.gqa == "expand":  # query head h reads KV head h // group, as with enable_gqa
                group = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return self.fn(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)


_KEYWORDS = {  # kernel -> (scale, causal, window) keyword names, used where the signature has them
    "flash_attn": ("softmax_scale", "causal", "window_size"),
    "torch_varlen": ("scale", "is_causal", "window_size"),
}


@lru_cache(maxsize=16)
def adapt(name: str, fn: Callable) -> VarlenKernel | None:
    """The call of kernel `name` for function `fn`, from its signature; None when it cannot be called safely."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        log.warning("varlen kernel %s: no inspectable signature; using per-segment attention", name)
        return None
    kinds = inspect.Parameter
    positional = [p for p in params.values() if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)]
    takes_args = any(p.kind == kinds.VAR_POSITIONAL for p in params.values())
    extra_required = [p.name for p in list(params.values())[7:]
                      if p.default is p.empty and p.kind not in (kinds.VAR_POSITIONAL, kinds.VAR_KEYWORD)]
    if (len(positional) < 7 and not takes_args) or extra_required:
        log.warning("varlen kernel %s%s: unknown signature; using per-segment attention",
                    name, inspect.signature(fn))
        return None
    named = set(list(params)[7:])  # only keywords after the seven positional ones
    scale_kw, causal_kw, window_kw = (kw if kw in named else None for kw in _KEYWORDS[name])
    gqa = "native" if name == "flash_attn" else ("flag" if "enable_gqa" in named else "expand")
    return VarlenKernel(name, fn, scale_kw, causal_kw, window_kw, gqa)


@lru_cache(maxsize=None)
def _import(module: str):
    try:
        return importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - a broken build (e.g. flash-attn against another torch) is absent
        if importlib.util.find_spec(module.split(".")[0]) is not None:
            log.warning("cannot import %s (%s: %s); its varlen kernel is not used", module, type(exc).__name__, exc)
        return None


def _kernel_function(name: str) -> Callable | None:
    """The installed function of kernel `name`, looked up where its package keeps it (tests replace it there)."""
    if name == "flash_attn":
        module = sys.modules.get("flash_attn") or (_import("flash_attn") if _flash_attn_installed() else None)
        return getattr(module, "flash_attn_varlen_func", None)
    module = sys.modules.get("torch.nn.attention.varlen") or _import("torch.nn.attention.varlen")
    return getattr(module, "varlen_attn", None)


@lru_cache(maxsize=None)
def _flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def kernel(name: str) -> VarlenKernel | None:
    """The adapted kernel `name` ("flash_attn" | "torch_varlen") of this process, None when unavailable."""
    if name not in KERNELS:
        raise ValueError(f"unknown varlen kernel {name!r}; use one of {KERNELS}")
    fn = _kernel_function(name)
    return None if fn is None else adapt(name, fn)


def kernel_report() -> dict:
    """What each kernel resolved to here (for logs and benchmarks/gpu_check.py)."""
    out = {}
    for name in KERNELS:
        k = kernel(name)
        out[name] = None if k is None else {"scale": k.scale_kw is not None, "causal": bool(k.causal_kw or k.window_kw),
                                            "window": k.window_kw is not None, "gqa": k.gqa}
    return out


def varlen_backend(device: torch.device, dtype: torch.dtype) -> str:
    """The kernel packed attention prefers for tensors on `device` of `dtype` ("segments" when none serves them).

    A layer the preferred kernel cannot express still runs on "segments" (see `VarlenKernel.can_run`)."""
    if _forced_backend is not None:
        return _forced_backend
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        for name in KERNELS:
            if kernel(name) is not None:
                return name
    return "segments"


@contextlib.contextmanager
def force_backend(name: str | None):
    """Use kernel `name` for every packed attention call inside the block, whatever the device and dtype
    (tests and benchmarks; on CPU tensors only a stand-in kernel runs). Layers the kernel cannot express still
    fall back to "segments"."""
    global _forced_backend
    if name not in (None, "segments") + KERNELS:
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


def varlen_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_lens_q: torch.Tensor,
                     max_length_q: int, cu_seq_lens_k: torch.Tensor | None = None, max_length_k: int | None = None,
                     *, scale: float | None = None, causal: bool = False,
                     sliding_window: int | None = None) -> torch.Tensor:
    """Attention of packed sequences, each to itself only.

    query [Tq, Hq, D]; key, value [Tk, Hkv, D] (Hq a multiple of Hkv: grouped KV heads); cu_seq_lens_q / _k
    int32 [N+1] (queries of sequence i are rows cu_q[i]:cu_q[i+1], its keys rows cu_k[i]:cu_k[i+1]; _k defaults
    to _q: self-attention); returns [Tq, Hq, D]. When a sequence has fewer queries than keys, its queries are
    its LAST positions for the causal / window rule (flash-attn's bottom-right alignment) and attend to every
    key otherwise — e.g. one CLS query per sequence over a global layer.
    """
    if cu_seq_lens_k is None:
        cu_seq_lens_k, max_length_k = cu_seq_lens_q, max_length_q
    elif max_length_k is None:
        max_length_k = int((cu_seq_lens_k[1:] - cu_seq_lens_k[:-1]).max())
    left, right = _window(sliding_window, causal)
    backend = varlen_backend(query.device, query.dtype)
    if backend != "segments":
        chosen = kernel(backend)
        if chosen is None:  # only when forced: auto selection never names a missing kernel
            raise RuntimeError(f"varlen attention backend {backend!r} is not available here")
        if chosen.can_run(causal=causal, left=left, right=right, scale=scale, head_dim=query.shape[-1]):
            return chosen(query, key, value, cu_seq_lens_q, cu_seq_lens_k, int(max_length_q), int(max_length_k),
                          causal=causal, left=left, right=right, scale=scale)
    return _segments_attention(query, key, value, cu_seq_lens_q, cu_seq_lens_k, scale=scale, left=left,
                               right=right)


def _segments_attention(query, key, value, cu_q, cu_k, *, scale, left: int, right: int) -> torch.Tensor:
    """One SDPA call per sequence: exact per-sequence attention on any device, no [T, T] mask anywhere."""
    # [1, H, T, D] views: 4-D inputs reach SDPA's fused CPU kernel (3-D ones fall back to the slower math path)
    q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (query, key, value))
    out = torch.empty_like(q)
    gqa = k.shape[1] != q.shape[1]
    bounds_q = cu_q.tolist()
    bounds_k = bounds_q if cu_k is cu_q else cu_k.tolist()
    for qs, qe, ks, ke in zip(bounds_q[:-1], bounds_q[1:], bounds_k[:-1], bounds_k[1:]):
        mask, is_causal = _segment_mask(qe - qs, ke - ks, left, right, q.device)
        out[:, :, qs:qe] = F.scaled_dot_product_attention(
            q[:, :, qs:qe], k[:, :, ks:ke], v[:, :, ks:ke], attn_mask=mask, is_causal=is_causal,
            scale=scale, enable_gqa=gqa)
    return out[0].transpose(0, 1)


def _segment_mask(length_q: int, length_k: int, left: int, right: int,
                  device: torch.device) -> tuple[torch.Tensor | None, bool]:
    """(bool mask or None, is_causal) for one sequence of `length_q` queries (its last positions) and
    `length_k` keys under window (left, right)."""
    if length_q != length_k:
        if length_q > length_k:
            raise ValueError(f"a sequence has more queries ({length_q}) than keys ({length_k})")
        if left < 0 and right < 0:
            return None, False
        return _band(length_k, left, right, device)[length_k - length_q:], False  # the band's last rows
    length = length_q
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
    check_honoured(module, kwargs)
    if attention_mask is not None:  # a prepared mask: it already carries padding, causality and window
        if cu_seq_lens_q is not None:
            raise ValueError("pass either a padding attention_mask or cu_seq_lens, not both")
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    causal = is_causal if is_causal is not None else bool(getattr(module, "is_causal", False))
    batch, _, seq_q, _ = query.shape
    seq_k = key.shape[2]
    if cu_seq_lens_q is None:  # every row is one whole sequence
        cu_q = torch.arange(0, (batch + 1) * seq_q, seq_q, dtype=torch.int32, device=query.device)
        cu_k = cu_q if seq_k == seq_q else torch.arange(0, (batch + 1) * seq_k, seq_k, dtype=torch.int32,
                                                        device=query.device)
        max_q, max_k = seq_q, seq_k
    else:
        if batch != 1:
            raise ValueError(f"packed inputs have batch size 1, got {batch}")
        cu_q = cu_seq_lens_q.to(torch.int32)
        cu_k = cu_q if cu_seq_lens_k is None or cu_seq_lens_k is cu_seq_lens_q else cu_seq_lens_k.to(torch.int32)
        max_q = int(max_length_q) if max_length_q is not None else int((cu_q[1:] - cu_q[:-1]).max())
        max_k = max_q if cu_k is cu_q else (int(max_length_k) if max_length_k is not None
                                            else int((cu_k[1:] - cu_k[:-1]).max()))
    # [B, H, S, D] -> [B*S, H, D]: the token-major layout of variable-length kernels
    q = query.transpose(1, 2).reshape(batch * seq_q, query.shape[1], query.shape[3])
    k = key.transpose(1, 2).reshape(batch * seq_k, key.shape[1], key.shape[3])
    v = value.transpose(1, 2).reshape(batch * seq_k, value.shape[1], value.shape[3])
    out = varlen_attention(q, k, v, cu_q, max_q, cu_k, max_k, scale=scaling, causal=causal,
                           sliding_window=sliding_window)
    return out.reshape(batch, seq_q, out.shape[1], out.shape[2]), None
