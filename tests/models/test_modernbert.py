"""ModernBERT's last layer at the CLS row only (models/modernbert.py) against the unmodified model."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import ModernBertConfig, ModernBertModel

from models.modernbert import ClsRowLastLayer, cls_only_last_layer

TOL = 1e-5


def _model(num_layers: int) -> ModernBertModel:
    torch.manual_seed(0)
    cfg = ModernBertConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=num_layers,
                           num_attention_heads=2, max_position_embeddings=128, pad_token_id=0,
                           global_attn_every_n_layers=3, local_attention=8, initializer_range=0.2,
                           attn_implementation="sdpa")
    return ModernBertModel(cfg).eval()


@pytest.mark.parametrize("num_layers,last", [(4, "full_attention"), (3, "sliding_attention")])
@pytest.mark.parametrize("lengths", [[40, 33, 9, 1], [24, 24, 24]])  # padded rows; no padding (no mask at all)
def test_cls_row_equals_row_zero_of_the_full_layer(num_layers, last, lengths):
    full = _model(num_layers)
    assert full.config.layer_types[-1] == last  # the sliding case keeps its ±4 window on the CLS row
    fast = copy.deepcopy(full)
    assert cls_only_last_layer(fast) and isinstance(fast.layers[-1], ClsRowLastLayer)
    width = max(lengths)
    ids = torch.randint(1, 64, (len(lengths), width))
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0)
    with torch.inference_mode():
        ref = full(input_ids=ids, attention_mask=mask).last_hidden_state
        out = fast(input_ids=ids, attention_mask=mask).last_hidden_state
    assert out.shape == (len(lengths), 1, 32)
    assert (out[:, 0] - ref[:, 0]).abs().max() <= TOL
    assert ref[:, 0].std() > 1e-2  # the rows differ: the comparison can fail


def test_installed_only_where_the_head_reads_the_cls_row(scorers):
    assert isinstance(scorers("modular").backbone.layers[-1], ClsRowLastLayer)  # ettin: cls pooling
    assert isinstance(scorers("modernbert_cls_pooling").model.model.layers[-1], ClsRowLastLayer)
    assert not isinstance(scorers("modular_mean_tanh").backbone.layers[-1], ClsRowLastLayer)
    assert not isinstance(scorers("modernbert_cls").model.model.layers[-1], ClsRowLastLayer)  # mean pooling
    assert not cls_only_last_layer(scorers("bert").model.bert)  # ModernBERT only


def test_packed_and_other_attention_run_the_whole_layer(scorers):
    """On packed input (or a non-SDPA attention) the wrapper hands every row to the wrapped layer."""
    layer = scorers("modular", execution="packed").backbone.layers[-1]
    seen = []
    handle = layer.layer.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    try:
        scorer = scorers("modular", execution="packed")
        batch = scorer.encoder.encode([("a query", "a document"), ("another query", "text")])
        scorer.score(batch)
    finally:
        handle.remove()
    assert seen and seen[0][1] == batch.num_tokens
