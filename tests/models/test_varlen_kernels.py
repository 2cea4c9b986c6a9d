"""The packed path through every variable-length kernel API it may meet, on CPU.

Stand-ins with the EXACT signatures of torch 2.10, 2.11 and 2.13's `torch.nn.attention.varlen.varlen_attn` and
of flash-attn 2's `flash_attn_varlen_func` are put where the code looks the kernels up (the module attribute /
`sys.modules["flash_attn"]`). They are real Python functions, so an unexpected keyword raises TypeError exactly
as the real one does (torch 2.11 on a GPU: `varlen_attn() got an unexpected keyword argument 'enable_gqa'`), and
they compute attention with the independent per-segment reference below (flash-attn's window convention).
`attention.force_backend` makes the CPU tensors eligible, so the packed scoring path really calls them.

Signatures (keywords after the seven positional arguments):
- torch 2.10: `is_causal=False, return_aux=None` (no scale, no window, no GQA; docs of the varlen API as first
  released, PR pytorch#164502);
- torch 2.11: `*, return_aux=None, scale=None, window_size=(-1, -1)` (a GPU machine's); causality
  is `window_size == (-1, 0)`;
- torch 2.13: 2.11's plus `enable_gqa=False, seqused_k=None, block_table=None, num_splits=None` (installed here:
  checked against `inspect.signature` below); fewer KV heads without enable_gqa is a ValueError;
- flash-attn 2.6+: `dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
  alibi_slopes=None, deterministic=False, return_attn_probs=False, block_table=None`; GQA native.
torch 2.10 / 2.11 document key/value as (T_k, H, D) with the query's H, so their stand-ins refuse fewer KV heads.
"""
from __future__ import annotations

import inspect
import sys
import types

import numpy as np
import pytest
import torch

from models import attention, load_scorer
from tests.models.test_parity import PAIRS, cross_encoder_reference, qwen3_recipe
from tests.tiny_models import BUILDERS

pytestmark = pytest.mark.filterwarnings("ignore:`max_length` is ignored when `padding`")

TOL = 1e-5
QWEN_MAX_LENGTH = 140
CALLS: list[dict] = []  # one entry per stand-in call: what it was given


# --- the independent reference -----------------------------------------------------------------------------------

def reference_attention(q, k, v, cu_q, cu_k, *, scale=None, window=(-1, -1)) -> torch.Tensor:
    """Per-sequence softmax(q k^T * scale) v with flash-attn's window rule, queries at a sequence's last positions:
    query i (at position i + Lk - Lq) sees key j when (left < 0 or pos - j <= left) and (right < 0 or
    j - pos <= right). KV head of query head h: h // (Hq / Hkv)."""
    left, right = window
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    scale = d ** -0.5 if scale is None else scale
    heads = torch.arange(hq) // (hq // hkv)
    out = torch.zeros_like(q)
    bq, bk = cu_q.tolist(), cu_k.tolist()
    for qs, qe, ks, ke in zip(bq[:-1], bq[1:], bk[:-1], bk[1:]):
        lq, lk = qe - qs, ke - ks
        qi, kj = q[qs:qe].transpose(0, 1), k[ks:ke][:, heads].transpose(0, 1)  # [H, L, D]
        vj = v[ks:ke][:, heads].transpose(0, 1)
        scores = (qi @ kj.transpose(1, 2)) * scale  # [H, Lq, Lk]
        pos = torch.arange(lq)[:, None] + (lk - lq)
        j = torch.arange(lk)[None, :]
        keep = torch.ones(lq, lk, dtype=torch.bool)
        if left >= 0:
            keep &= pos - j <= left
        if right >= 0:
            keep &= j - pos <= right
        scores = scores.masked_fill(~keep, float("-inf"))
        out[qs:qe] = (scores.softmax(-1) @ vj).transpose(0, 1)
    return out


def _check_inputs(q, k, v, cu_q, cu_k, max_q, max_k, *, gqa: bool):
    """What the real kernels require of their inputs."""
    assert q.dim() == k.dim() == v.dim() == 3, "varlen kernels take token-major [T, H, D]"
    assert cu_q.dtype == cu_k.dtype == torch.int32, "cu_seq lengths must be int32"
    assert cu_q.shape == cu_k.shape, "one boundary per sequence for queries and keys"
    assert int(cu_q[-1]) == q.shape[0] and int(cu_k[-1]) == k.shape[0] == v.shape[0]
    assert isinstance(max_q, int) and isinstance(max_k, int)
    assert max_q >= int((cu_q[1:] - cu_q[:-1]).max()) and max_k >= int((cu_k[1:] - cu_k[:-1]).max())
    if k.shape[1] != q.shape[1] and not gqa:
        raise ValueError(f"query has {q.shape[1]} heads but key/value have {k.shape[1]}")
    assert q.shape[1] % k.shape[1] == 0


# --- stand-ins with the exact signatures ----------------------------------------------------------------------

def varlen_attn_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    _check_inputs(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, gqa=False)
    CALLS.append({"kernel": "2.10", "causal": is_causal, "window": None, "kv_heads": key.shape[1]})
    return reference_attention(query, key, value, cu_seq_q, cu_seq_k, window=(-1, 0) if is_causal else (-1, -1))


def varlen_attn_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1)):
    _check_inputs(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, gqa=False)
    CALLS.append({"kernel": "2.11", "causal": window_size == (-1, 0), "window": window_size,
                  "kv_heads": key.shape[1]})
    return reference_attention(query, key, value, cu_seq_q, cu_seq_k, scale=scale, window=tuple(window_size))


def varlen_attn_2_13(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    _check_inputs(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, gqa=enable_gqa)
    CALLS.append({"kernel": "2.13", "causal": window_size == (-1, 0), "window": window_size,
                  "kv_heads": key.shape[1]})
    return reference_attention(query, key, value, cu_seq_q, cu_seq_k, scale=scale, window=tuple(window_size))


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, gqa=True)
    assert dropout_p == 0.0
    left, right = window_size
    if causal:
        right = 0
    CALLS.append({"kernel": "flash", "causal": causal, "window": tuple(window_size), "kv_heads": k.shape[1]})
    return reference_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, scale=softmax_scale, window=(left, right))


STAND_INS = {"torch-2.10": varlen_attn_2_10, "torch-2.11": varlen_attn_2_11, "torch-2.13": varlen_attn_2_13,
             "flash-attn-2": flash_attn_varlen_func}


def install(monkeypatch, which: str) -> str:
    """Put stand-in `which` where models/attention.py looks its kernel up; returns the backend name to force."""
    CALLS.clear()
    fn = STAND_INS[which]
    if which == "flash-attn-2":
        module = types.ModuleType("flash_attn")
        module.flash_attn_varlen_func = fn
        monkeypatch.setitem(sys.modules, "flash_attn", module)
        return "flash_attn"
    import torch.nn.attention.varlen as varlen
    monkeypatch.setattr(varlen, "varlen_attn", fn)
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)  # as if flash-attn were not installed
    if hasattr(attention, "_flash_attn_installed"):
        monkeypatch.setattr(attention, "_flash_attn_installed", lambda: False)
    return "torch_varlen"


def test_the_torch_2_13_stand_in_has_the_installed_signature():
    from torch.nn.attention.varlen import varlen_attn
    if not torch.__version__.startswith("2.13"):
        pytest.skip(f"torch {torch.__version__} installed, not 2.13")
    real = inspect.signature(varlen_attn)
    mine = inspect.signature(varlen_attn_2_13)
    assert [(p.name, p.kind, p.default) for p in real.parameters.values()] == \
           [(p.name, p.kind, p.default) for p in mine.parameters.values()]


# --- every tiny variant, packed, through every stand-in -------------------------------------------------------

_REFERENCES: dict[str, np.ndarray] = {}


def _kw(variant: str) -> dict:
    return {"max_length": QWEN_MAX_LENGTH} if variant.startswith("qwen3") else {}


def _reference(tiny, variant: str, max_length: int) -> np.ndarray:
    if variant not in _REFERENCES:
        path = tiny[variant]
        _REFERENCES[variant] = qwen3_recipe(path, PAIRS, max_length=max_length)[0] if variant.startswith("qwen3") \
            else cross_encoder_reference(path, PAIRS)
    return _REFERENCES[variant]


@pytest.mark.parametrize("which", list(STAND_INS))
@pytest.mark.parametrize("variant", list(BUILDERS))
def test_packed_scores_through_each_kernel_api_equal_the_reference(tiny, scorers, monkeypatch, variant, which):
    scorer = scorers(variant, execution="packed", **_kw(variant))
    assert scorer.execution == "packed"
    batch = scorer.encoder.encode(PAIRS)
    backend = install(monkeypatch, which)
    with attention.force_backend(backend):
        raw = scorer.score(batch)
    assert CALLS, f"the {which} stand-in was never called"
    ref = _reference(tiny, variant, scorer.max_length)
    assert np.abs(raw - ref).max() <= TOL, np.abs(raw - ref).max()
    if which == "torch-2.10":  # no window keyword: sliding layers must have gone to the per-segment path
        assert all(c["window"] is None for c in CALLS)
    if variant.startswith("qwen3"):
        assert all(c["causal"] for c in CALLS)  # every Qwen3 layer is causal
        if which in ("torch-2.10", "torch-2.11"):  # no GQA: KV heads were expanded to the query heads
            assert all(c["kv_heads"] == 4 for c in CALLS)
        else:
            assert all(c["kv_heads"] == 2 for c in CALLS)


def test_modernbert_sliding_layers_use_the_kernel_when_it_takes_a_window_and_fall_back_when_not(
        scorers, monkeypatch):
    scorer = scorers("modernbert_cls", execution="packed")
    batch = scorer.encoder.encode(PAIRS)
    layers = scorer.model.config.layer_types
    assert "sliding_attention" in layers and "full_attention" in layers
    seen = {}
    for which in ("torch-2.10", "torch-2.11"):
        backend = install(monkeypatch, which)
        with attention.force_backend(backend):
            scorer.score(batch)
        seen[which] = list(CALLS)
    # 2.11 takes the ±window; 2.10 gets the global layers only (the sliding ones ran per segment)
    windows = {c["window"] for c in seen["torch-2.11"]}
    assert any(w != (-1, -1) for w in windows)
    n_global = layers.count("full_attention")
    assert len(seen["torch-2.10"]) * len(layers) == len(seen["torch-2.11"]) * n_global


# --- varlen_attention directly: windows, causality, GQA, queries fewer than keys ---------------------------------

def _inputs(lengths_q, lengths_k, hq=4, hkv=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    cu = lambda ls: torch.tensor([0, *np.cumsum(ls)], dtype=torch.int32)  # noqa: E731
    cu_q, cu_k = cu(lengths_q), cu(lengths_k)
    q = torch.randn(int(cu_q[-1]), hq, d, generator=g)
    k = torch.randn(int(cu_k[-1]), hkv, d, generator=g)
    v = torch.randn(int(cu_k[-1]), hkv, d, generator=g)
    return q, k, v, cu_q, cu_k


@pytest.mark.parametrize("which", ["segments"] + list(STAND_INS))
@pytest.mark.parametrize("causal,window", [(False, None), (False, 4), (True, None), (True, 3)])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_varlen_attention_equals_the_reference(monkeypatch, which, causal, window, scale):
    lengths = [1, 3, 9, 5, 12]
    q, k, v, cu, _ = _inputs(lengths, lengths)
    backend = "segments" if which == "segments" else install(monkeypatch, which)
    with attention.force_backend(backend):
        out = attention.varlen_attention(q, k, v, cu, max(lengths), scale=scale, causal=causal,
                                         sliding_window=window)
    left = window - 1 if window else -1
    ref = reference_attention(q, k, v, cu, cu, scale=scale, window=(left, 0 if causal else left))
    assert (out - ref).abs().max() <= TOL
    if which in ("torch-2.10",):  # only what 2.10 can express reaches it: no window, no custom scale
        assert bool(CALLS) == (window is None and scale is None)
    elif which != "segments":
        assert CALLS


@pytest.mark.parametrize("which", ["segments"] + list(STAND_INS))
@pytest.mark.parametrize("causal", [False, True])
def test_fewer_queries_than_keys(monkeypatch, which, causal):
    """cu_seq_lens_q != cu_seq_lens_k: e.g. one query row per sequence over all its keys (the CLS row)."""
    lengths_k = [4, 1, 7, 10]
    lengths_q = [1, 1, 3, 2]
    q, k, v, cu_q, cu_k = _inputs(lengths_q, lengths_k, seed=3)
    backend = "segments" if which == "segments" else install(monkeypatch, which)
    with attention.force_backend(backend):
        out = attention.varlen_attention(q, k, v, cu_q, max(lengths_q), cu_k, max(lengths_k), causal=causal)
    ref = reference_attention(q, k, v, cu_q, cu_k, window=(-1, 0) if causal else (-1, -1))
    assert out.shape == q.shape
    assert (out - ref).abs().max() <= TOL


# --- the decision is made once, from the signature -------------------------------------------------------------

def test_each_signature_is_adapted_once_and_as_expected(monkeypatch):
    expect = {  # (scale keyword, causal keyword, window keyword, GQA)
        "torch-2.10": (None, "is_causal", None, "expand"),
        "torch-2.11": ("scale", None, "window_size", "expand"),
        "torch-2.13": ("scale", None, "window_size", "flag"),
        "flash-attn-2": ("softmax_scale", "causal", "window_size", "native"),
    }
    for which, (scale_kw, causal_kw, window_kw, gqa) in expect.items():
        backend = install(monkeypatch, which)
        k = attention.kernel(backend)
        assert (k.scale_kw, k.causal_kw, k.window_kw, k.gqa) == (scale_kw, causal_kw, window_kw, gqa), which
    attention.adapt.cache_clear()
    backend = install(monkeypatch, "torch-2.11")
    q, kk, v, cu, _ = _inputs([3, 5], [3, 5])
    with attention.force_backend(backend):
        for _ in range(3):
            attention.varlen_attention(q, kk, v, cu, 5, causal=True)
    info = attention.adapt.cache_info()
    assert info.misses == 1 and info.hits >= 2  # one signature inspection, then cached


def test_auto_selection_on_cuda_half_prefers_flash_then_torch_and_skips_unusable_signatures(monkeypatch):
    cuda, half = torch.device("cuda"), torch.float16
    install(monkeypatch, "torch-2.11")
    assert attention.varlen_backend(cuda, half) == "torch_varlen"
    assert attention.varlen_backend(cuda, torch.float32) == "segments"
    assert attention.varlen_backend(torch.device("cpu"), half) == "segments"
    install(monkeypatch, "flash-attn-2")
    assert attention.varlen_backend(cuda, half) == "flash_attn"

    def future_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, layout):  # a required keyword
        raise AssertionError("must not be called")

    import torch.nn.attention.varlen as varlen
    monkeypatch.delitem(sys.modules, "flash_attn")
    monkeypatch.setattr(varlen, "varlen_attn", future_varlen_attn)
    assert attention.kernel("torch_varlen") is None
    assert attention.varlen_backend(cuda, half) == "segments"
