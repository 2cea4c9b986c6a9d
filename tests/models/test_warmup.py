"""Scorer.warmup: one forward on a tiny batch, in the configured device, dtype and execution; a model that cannot
run fails there as a ModelLoadError naming the model and the cause."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models import attention
from models.errors import ModelLoadError
from tests.tiny_models import BUILDERS


@pytest.mark.parametrize("variant", list(BUILDERS))
@pytest.mark.parametrize("execution", ["padded", "packed"])
def test_warmup_scores_its_batch(scorers, variant, execution):
    scorer = scorers(variant, execution=execution)
    raw = scorer.warmup()
    assert raw.dtype == np.float32 and raw.shape == (2,) and np.isfinite(raw).all()
    batch = scorer.encoder.encode(list(scorer.WARMUP_PAIRS))
    # the long pair passes ettin's 128-token local window, or fills the model's length
    assert batch.lengths.max() >= min(scorer.max_length, 129)
    assert np.array_equal(raw, scorer.score(batch))


def test_a_kernel_that_cannot_run_fails_the_warmup_with_the_model_and_cause(scorers, monkeypatch):
    import torch.nn.attention.varlen as varlen

    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                    window_size=(-1, -1)):
        raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.")

    scorer = scorers("modular", execution="packed")
    monkeypatch.setattr(varlen, "varlen_attn", varlen_attn)
    with attention.force_backend("torch_varlen"), pytest.raises(ModelLoadError) as e:
        scorer.warmup()
    message = str(e.value)
    assert scorer.model_id in message and "Ampere" in message
    assert "packed execution, float32 on cpu" in message


def test_non_finite_warmup_scores_fail(scorers, monkeypatch):
    scorer = scorers("bert")
    monkeypatch.setattr(scorer, "_forward_padded", lambda ids, mask, types: torch.full((ids.shape[0],), float("nan")))
    with pytest.raises(ModelLoadError, match="finite"):
        scorer.warmup()
