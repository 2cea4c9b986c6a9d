"""jina-reranker-v3 in fp16/bf16 on CUDA, packed (the "auto" choice there), against its fp32 CPU scores, which
tests/models/families/test_jina_v3.py holds to the reference at 1e-5 (skipped without a GPU): several lists of several
blocks in one call; reports max |diff| and Pearson."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models import load_scorer
from models.encoded import EncodedBatch
from tests.llm_rerankers import build_jina_v3
from tests.tiny_models import DOCS, QUERIES

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_packed_half_precision_tracks_fp32(tmp_path, dtype):
    path = build_jina_v3(tmp_path / "jina-reranker-v3", model_max_length=2200)
    cpu = load_scorer(str(path), dtype="float32", device="cpu")
    gpu = load_scorer(str(path), dtype=dtype, device="cuda")
    assert gpu.execution == "packed" and gpu.token_budget >= gpu.max_block_tokens()
    batch = EncodedBatch.concat([cpu.encoder.encode([(q, d) for d in DOCS * 3], one_list=True) for q in QUERIES]
                                + [cpu.encoder.encode([(q, d) for q in QUERIES for d in DOCS])])
    assert len(batch) > len(QUERIES) * 2
    ref, raw = cpu.score(batch), gpu.score(batch)
    diff, pearson = np.abs(raw - ref).max(), np.corrcoef(raw, ref)[0, 1]
    print(f"jina_v3 {dtype}: max|diff| {diff:.2e} pearson {pearson:.6f}")
    assert pearson > (0.999 if dtype == "float16" else 0.995)
    assert diff < (0.02 if dtype == "float16" else 0.1)
