"""fp16/bf16 on CUDA against the fp32 references (skipped without a GPU): reports max |diff| and Pearson."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models import load_scorer
from tests.models.test_parity import PAIRS, cross_encoder_reference, qwen3_recipe

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("variant", ["modular", "modular_legacy", "modular_mean_tanh", "bert", "xlmr",
                                     "modernbert_cls", "modernbert_cls_pooling", "qwen3_tied", "qwen3_untied"])
def test_half_precision_tracks_the_fp32_reference(tiny, variant, dtype):
    scorer = load_scorer(str(tiny[variant]), dtype=dtype, device="cuda")
    assert scorer.dtype == dtype and scorer.device == "cuda"
    raw = scorer.score(scorer.encoder.encode(PAIRS))
    if variant.startswith("qwen3"):
        ref = qwen3_recipe(tiny[variant], PAIRS, max_length=scorer.max_length)[0]
    else:
        ref = cross_encoder_reference(tiny[variant], PAIRS)
    diff, pearson = np.abs(raw - ref).max(), np.corrcoef(raw, ref)[0, 1]
    print(f"{variant} {dtype}: max|diff| {diff:.2e} pearson {pearson:.6f}")
    assert pearson > (0.999 if dtype == "float16" else 0.995)
    assert diff < (0.02 if dtype == "float16" else 0.1) * max(1.0, np.abs(ref).max())
