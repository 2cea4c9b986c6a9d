"""Packed execution behind Scorer.score(): same raw scores as padded execution and as the references (fp32 CPU,
1e-5), across several token-budget chunks and with truncated pairs; "auto" stays padded on CPU; packed forwards
never build a [T, T] attention mask.

References are the ones of test_parity.py: sentence-transformers CrossEncoder.predict and the official
Qwen3-Reranker recipe, run here. On CPU packed attention runs the "segments" kernel (forced, to be explicit).
"""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from models import attention, load_scorer
from models.cutting import chunk_by_tokens
from models.errors import ModelLoadError
from models.scoring import DEFAULT_TOKEN_BUDGET, resolve_execution
from tests.models.test_parity import PAIRS, cross_encoder_reference, qwen3_recipe
from tests.tiny_models import BUILDERS, build_modular

pytestmark = pytest.mark.filterwarnings("ignore:`max_length` is ignored when `padding`")

TOL = 1e-5
SMALL_BUDGET = 200  # real tokens per packed chunk: several chunks for PAIRS, some pairs alone
QWEN_MAX_LENGTH = 140  # truncates the long documents inside the Qwen3 template


@pytest.fixture(autouse=True)
def _segments_backend():
    with attention.force_backend("segments"):
        yield


@pytest.fixture(scope="module")
def extra_modular(tmp_path_factory):
    """Modular variants beyond tests.tiny_models.BUILDERS: the other packed poolings and a padded-only one."""
    root = tmp_path_factory.mktemp("tiny-pooling")
    return {pooling: build_modular(root / pooling, pooling=pooling, seed=7)
            for pooling in ("max", "lasttoken", "mean_sqrt_len_tokens")}


def _model(scorer):
    """The transformers model whose attention the scorer runs."""
    return scorer.backbone if scorer.family == "modular" else scorer.model


def _kw(variant: str) -> dict:
    return {"max_length": QWEN_MAX_LENGTH} if variant.startswith("qwen3") else {}


def _reference(path, variant: str, max_length: int) -> np.ndarray:
    if variant.startswith("qwen3"):
        return qwen3_recipe(path, PAIRS, max_length=max_length)[0]
    return cross_encoder_reference(path, PAIRS)


def _check_packed_matches(path, variant, padded, packed_whole, packed_small):
    assert padded.execution == "padded"
    assert packed_whole.execution == packed_small.execution == "packed"
    batch = padded.encoder.encode(PAIRS)
    assert batch.lengths.max() == padded.max_length  # some pairs were truncated
    assert len(chunk_by_tokens(np.sort(batch.lengths), SMALL_BUDGET)) > 3
    ref = _reference(path, variant, padded.max_length)
    raw_padded = padded.score(batch)
    for packed in (packed_whole, packed_small):
        raw = packed.score(batch)
        assert raw.dtype == np.float32 and raw.shape == (len(PAIRS),)
        assert np.abs(raw - raw_padded).max() <= TOL, np.abs(raw - raw_padded).max()
        assert np.abs(raw - ref).max() <= TOL, np.abs(raw - ref).max()
    assert np.std(ref) > 1e-3  # the random model does tell pairs apart


@pytest.mark.parametrize("variant", list(BUILDERS))
def test_packed_equals_padded_and_reference(tiny, scorers, variant):
    kw = _kw(variant)
    _check_packed_matches(tiny[variant], variant, scorers(variant, **kw),
                          scorers(variant, execution="packed", **kw),
                          scorers(variant, execution="packed", token_budget=SMALL_BUDGET, **kw))


@pytest.mark.parametrize("pooling", ["max", "lasttoken"])
def test_packed_segment_poolings_equal_padded_and_reference(extra_modular, pooling):
    path = str(extra_modular[pooling])
    load = lambda **kw: load_scorer(path, dtype="float32", device="cpu", **kw)  # noqa: E731
    _check_packed_matches(path, pooling, load(), load(execution="packed"),
                          load(execution="packed", token_budget=SMALL_BUDGET))


def test_pooling_without_a_packed_form_falls_back_to_padded(extra_modular, caplog):
    path = str(extra_modular["mean_sqrt_len_tokens"])
    with caplog.at_level(logging.WARNING, logger="models.scoring"):
        scorer = load_scorer(path, dtype="float32", device="cpu", execution="packed")
    assert not scorer.supports_packed and scorer.execution == "padded"
    assert "not supported" in caplog.text
    assert scorer.backbone.config._attn_implementation == "sdpa"
    raw = scorer.score(scorer.encoder.encode(PAIRS))
    assert np.abs(raw - cross_encoder_reference(path, PAIRS)).max() <= TOL


@pytest.mark.parametrize("variant", list(BUILDERS))
def test_auto_on_cpu_runs_padded_with_sdpa(scorers, variant):
    scorer = scorers(variant, **_kw(variant))
    assert scorer.supports_packed  # every tiny variant could run packed; auto still chooses padded on CPU
    assert scorer.execution == "padded" and scorer.token_budget == DEFAULT_TOKEN_BUDGET["cpu"] == 4096
    # Only packed mode switches the attention implementation, but for the causal LMs, whose shared prefixes run
    # packed on CPU (models/prefix.py): their padded batches go through it to SDPA unchanged.
    causal = variant.startswith("qwen3")
    assert _model(scorer).config._attn_implementation == (attention.PACKED if causal else "sdpa")
    assert _model(scorers(variant, execution="packed", **_kw(variant))).config._attn_implementation == attention.PACKED


def test_execution_resolution():
    kw = dict(model_id="m")
    ampere = dict(kw, capability=(8, 0))
    assert resolve_execution("auto", supported=True, device="cuda", dtype="bfloat16", **ampere) == "packed"
    assert resolve_execution("auto", supported=True, device="cuda:1", dtype="float16", **ampere) == "packed"
    assert resolve_execution("auto", supported=True, device="cuda", dtype="float16", model_id="m",
                             capability=(9, 0)) == "packed"
    # fp32 on CUDA: no varlen kernel takes it, so packed would loop per pair
    assert resolve_execution("auto", supported=True, device="cuda", dtype="float32", **ampere) == "padded"
    assert resolve_execution("auto", supported=False, device="cuda", dtype="bfloat16", **ampere) == "padded"
    assert resolve_execution("auto", supported=True, device="cpu", dtype="float32", **kw) == "padded"
    assert resolve_execution("packed", supported=True, device="cpu", dtype="float32", **kw) == "packed"
    assert resolve_execution("packed", supported=False, device="cpu", dtype="float32", **kw) == "padded"
    assert resolve_execution("padded", supported=True, device="cuda", dtype="bfloat16", **kw) == "padded"
    with pytest.raises(ModelLoadError, match="unknown execution"):
        resolve_execution("fast", supported=True, device="cpu", dtype="float32", **kw)


def test_unknown_execution_is_a_load_error(tiny):
    with pytest.raises(ModelLoadError, match="unknown execution"):
        load_scorer(str(tiny["bert"]), device="cpu", execution="unpadded")


def test_packed_chunks_count_real_tokens():
    lengths = np.sort(np.random.default_rng(0).integers(1, 100, 300))
    chunks = chunk_by_tokens(lengths, 1000)
    assert sum(c.stop - c.start for c in chunks) == len(lengths)
    assert all(c.stop == d.start for c, d in zip(chunks, chunks[1:]))
    for c, d in zip(chunks, chunks[1:]):
        assert lengths[c].sum() <= 1000 < lengths[c].sum() + lengths[d.start]  # full: the next one did not fit
    assert [(c.start, c.stop) for c in chunk_by_tokens(np.array([5, 2000, 3000]), 1000)] == [(0, 1), (1, 2), (2, 3)]
    assert chunk_by_tokens(np.array([], dtype=np.int64), 10) == []


@pytest.mark.parametrize("variant", ["modular", "modernbert_cls", "bert", "xlmr", "qwen3_tied"])
def test_packed_forward_never_builds_a_full_mask(scorers, monkeypatch, variant):
    """Attention sees per-pair blocks only: no [T, T] mask or score matrix for the T tokens of a chunk."""
    scorer = scorers(variant, execution="packed", **_kw(variant))
    batch = scorer.encoder.encode(PAIRS)
    longest, total = int(batch.lengths.max()), int(batch.num_tokens)
    assert total > 4 * longest  # one chunk of many pairs (default budget 4096)
    seen = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append((q.shape[-2], k.shape[-2], None if attn_mask is None else tuple(attn_mask.shape)))
        return real_sdpa(q, k, v, attn_mask=attn_mask, **kw)

    def no_dense_mask(*args, **kwargs):
        raise AssertionError("a padding mask was built for a packed forward")

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    monkeypatch.setattr("transformers.masking_utils.sdpa_mask", no_dense_mask)
    scorer.score(batch)
    assert seen
    assert all(q <= longest and k <= longest for q, k, _ in seen)
    assert all(mask is None or max(mask[-2:]) <= longest for _, _, mask in seen)
    # every token went through attention, pair by pair: T query rows per layer; a CLS-row last layer
    # (models/modernbert.py) has one query row per pair
    from models.modernbert import ClsRowLastLayer
    layers = _model(scorer).config.num_hidden_layers
    cls_row = isinstance(getattr(_model(scorer), "layers", [None])[-1], ClsRowLastLayer)
    expected = (layers - 1) * total + len(batch) if cls_row else layers * total
    assert sum(q for q, _, _ in seen) == expected


# --- CUDA only: skipped (not passing) without a GPU ------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["flash_attn", "torch_varlen"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("variant", list(BUILDERS))
def test_cuda_half_precision_packed_tracks_padded_and_reference(tiny, variant, dtype, backend):
    if backend == "flash_attn":
        pytest.importorskip("flash_attn")
    kw = _kw(variant)
    packed = load_scorer(str(tiny[variant]), dtype=dtype, device="cuda", **kw)
    assert packed.execution == "packed"  # auto on CUDA in half precision
    padded = load_scorer(str(tiny[variant]), dtype=dtype, device="cuda", execution="padded", **kw)
    batch = packed.encoder.encode(PAIRS)
    with attention.force_backend(backend):
        raw = packed.score(batch)
    ref = _reference(tiny[variant], variant, packed.max_length)
    raw_padded = padded.score(batch)
    pearson = np.corrcoef(raw, ref)[0, 1]
    print(f"{variant} {dtype} {backend}: max|diff| {np.abs(raw - ref).max():.2e} pearson {pearson:.6f}")
    assert pearson > (0.999 if dtype == "float16" else 0.995)
    assert np.corrcoef(raw, raw_padded)[0, 1] > (0.999 if dtype == "float16" else 0.995)
    assert np.abs(raw - ref).max() < (0.02 if dtype == "float16" else 0.1) * max(1.0, np.abs(ref).max())


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("variant", ["modular", "qwen3_tied"])
def test_cuda_fp32_packed_equals_reference(tiny, variant):
    kw = _kw(variant)
    scorer = load_scorer(str(tiny[variant]), dtype="float32", device="cuda", execution="packed", **kw)
    assert scorer.execution == "packed"
    raw = scorer.score(scorer.encoder.encode(PAIRS))
    assert np.abs(raw - _reference(tiny[variant], variant, scorer.max_length)).max() <= 1e-4
