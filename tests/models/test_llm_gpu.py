"""The causal-LM families in fp16/bf16 on CUDA, packed (the "auto" choice there), against their fp32 CPU scores,
which the CPU tests hold to the references at 1e-5 (skipped without a GPU): reports max |diff| and Pearson."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models import load_scorer
from tests.llm_rerankers import build_bge_gemma, build_mxbai, build_st_causal
from tests.tiny_models import DOCS, QUERIES

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PAIRS = [(q, d) for q in QUERIES for d in DOCS]


@pytest.fixture(scope="module")
def llm_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm-gpu")
    return {"st_flat": build_st_causal(root / "st_flat", variant="flat"),
            "st_structured": build_st_causal(root / "st_structured", variant="structured"),
            "mxbai": build_mxbai(root / "mxbai-rerank-base-v2"),
            "bge_gemma": build_bge_gemma(root / "bge-reranker-v2-gemma")}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", ["st_flat", "st_structured", "mxbai", "bge_gemma"])
def test_packed_half_precision_tracks_fp32(llm_dirs, name, dtype):
    cpu = load_scorer(str(llm_dirs[name]), dtype="float32", device="cpu")
    gpu = load_scorer(str(llm_dirs[name]), dtype=dtype, device="cuda")
    assert gpu.execution == "packed"
    batch = cpu.encoder.encode(PAIRS, direction="left")
    ref, raw = cpu.score(batch), gpu.score(batch)
    diff, pearson = np.abs(raw - ref).max(), np.corrcoef(raw, ref)[0, 1]
    print(f"{name} {dtype}: max|diff| {diff:.2e} pearson {pearson:.6f}")
    assert pearson > (0.999 if dtype == "float16" else 0.995)
    assert diff < (0.02 if dtype == "float16" else 0.1) * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("name", ["st_structured", "mxbai", "bge_gemma"])
def test_shared_prefixes_on_cuda_track_pairwise(llm_dirs, name, dtype):
    """Shared prefixes (models/prefix.py) on the device: fp32 runs padded (exact, 1e-5), fp16/bf16 packed through
    the installed varlen kernel with separate query and key lengths, against pairwise scoring of the same batch."""
    from models.prefix import mark_shared_prefixes

    gpu = load_scorer(str(llm_dirs[name]), dtype=dtype, device="cuda")
    assert gpu.supports_shared_prefix and gpu.execution == ("padded" if dtype == "float32" else "packed")
    pairs = [(QUERIES[0], d) for d in DOCS * 3] + [(QUERIES[1], d) for d in DOCS]
    batch = gpu.encoder.encode(pairs)
    marked = mark_shared_prefixes(gpu.encoder, batch, [q for q, _ in pairs])
    assert gpu.shares_prefixes(marked)
    shared, pairwise = gpu.score(marked), gpu.score(batch)
    diff, pearson = np.abs(shared - pairwise).max(), np.corrcoef(shared, pairwise)[0, 1]
    print(f"{name} {dtype} shared vs pairwise: max|diff| {diff:.2e} pearson {pearson:.6f}")
    if dtype == "float32":
        assert diff <= 1e-5
    else:
        assert pearson > 0.995 and diff < 0.1 * max(1.0, np.abs(pairwise).max())
