"""score(): token-budget chunks, input order, dtypes, parameter counts."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from models import EncodedBatch, load_scorer
from models.cutting import chunk_by_budget
from tests.tiny_models import DOCS, QUERIES

PAIRS = [(q, d) for q in QUERIES for d in DOCS]


def test_chunks_respect_the_padded_token_budget():
    lengths = np.sort(np.random.default_rng(0).integers(1, 100, 300))
    chunks = chunk_by_budget(lengths, 1000)
    assert sum(c.stop - c.start for c in chunks) == len(lengths)
    assert all(c.stop == d.start for c, d in zip(chunks, chunks[1:]))
    for c in chunks:
        assert (c.stop - c.start) * lengths[c.stop - 1] <= 1000
    assert [(c.start, c.stop) for c in chunk_by_budget(np.array([5, 2000, 3000]), 1000)] == [(0, 1), (1, 2), (2, 3)]
    assert chunk_by_budget(np.array([], dtype=np.int64), 10) == []


@pytest.mark.parametrize("variant", ["modular", "bert", "qwen3_untied"])
def test_order_is_kept_across_token_budget_chunks(scorers, variant):
    whole = scorers(variant)
    small = scorers(variant, token_budget=150)  # many chunks, some a single sequence over budget
    rng = np.random.default_rng(1)
    pairs = [PAIRS[i] for i in rng.permutation(len(PAIRS))]
    batch = whole.encoder.encode(pairs)
    assert len(chunk_by_budget(np.sort(batch.lengths), 150)) > 3
    one_by_one = np.array([whole.score(batch.select([i]))[0] for i in range(len(batch))])
    assert np.abs(small.score(batch) - one_by_one).max() <= 1e-5
    assert np.abs(whole.score(batch) - one_by_one).max() <= 1e-5
    assert np.std(one_by_one) > 1e-3


def test_empty_batch(scorers):
    empty = EncodedBatch(np.zeros(0, np.int32), np.zeros(1, np.int64))
    assert scorers("bert").score(empty).shape == (0,)


def test_scorer_attributes(scorers, tiny):
    s = scorers("bert")
    assert (s.family, s.dtype, s.device, s.max_length, s.token_budget) == ("seq_cls", "float32", "cpu", 64, 4096)
    assert s.model_id == str(tiny["bert"])
    assert load_scorer(str(tiny["bert"])).dtype == "float32"  # auto on CPU


@pytest.mark.parametrize("dtype,name", [("bf16", "bfloat16"), ("float16", "float16")])
def test_half_precision_dtypes_load_and_track_fp32(scorers, tiny, dtype, name):
    half = load_scorer(str(tiny["modernbert_cls"]), dtype=dtype, device="cpu")
    assert half.dtype == name and next(half.model.parameters()).dtype == getattr(torch, name)
    batch = half.encoder.encode(PAIRS)
    raw, ref = half.score(batch), scorers("modernbert_cls").score(batch)
    assert raw.dtype == np.float32
    assert np.corrcoef(raw, ref)[0, 1] > 0.99


def test_parameter_counts_match_the_checkpoints(scorers, tiny):
    bert = AutoModelForSequenceClassification.from_pretrained(str(tiny["bert"]))
    assert scorers("bert").num_parameters == sum(p.numel() for p in bert.parameters())
    for variant in ("qwen3_tied", "qwen3_untied"):
        lm = AutoModelForCausalLM.from_pretrained(str(tiny[variant]))
        assert scorers(variant).num_parameters == sum(p.numel() for p in lm.parameters())
