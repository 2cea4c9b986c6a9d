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


def test_packed_runs_the_cls_rows_only_and_other_attention_the_whole_layer(scorers):
    """Packed input over a global last layer: one query row per pair, the wrapped layer is never called. Any
    other attention implementation (here eager) hands every row to the wrapped layer."""
    scorer = scorers("modular", execution="packed")
    layer = scorer.backbone.layers[-1]
    assert layer.layer.attn.sliding_window is None  # ettin's last layer is global
    seen = []
    handle = layer.layer.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    try:
        batch = scorer.encoder.encode([("a query", "a document"), ("another query", "text")])
        scorer.score(batch)
        assert seen == []
        model = copy.deepcopy(scorer.backbone)
        model.set_attn_implementation("eager")
        ids = torch.tensor([batch.sequence(0).tolist()])
        with torch.inference_mode():
            model(input_ids=ids)
    finally:
        handle.remove()
    # the deep copy carries the hook too: eager ran the whole layer on every row
    assert len(seen) == 1 and seen[0][1] == len(batch.sequence(0))


@pytest.mark.parametrize("num_layers,last", [(4, "full_attention"), (3, "sliding_attention")])
def test_packed_cls_rows_equal_the_full_layer(num_layers, last):
    """Packed input: the CLS row of every sequence equals the unmodified model's (a sliding last layer runs
    whole); one-token sequences and sequences longer than the window included."""
    from models import attention, packing
    from models.encoded import EncodedBatch

    attention.register()
    full = _model(num_layers)
    assert full.config.layer_types[-1] == last
    fast = copy.deepcopy(full)
    cls_only_last_layer(fast)
    g = torch.Generator().manual_seed(1)
    lengths = [1, 17, 40, 3, 9, 26]
    packed = packing.pack(EncodedBatch.from_lists([torch.randint(1, 64, (n,), generator=g).tolist()
                                                   for n in lengths]))
    for m in (full, fast):
        m.set_attn_implementation(attention.PACKED)
    with torch.inference_mode():
        ref = full(**packed.model_kwargs()).last_hidden_state
        out = fast(**packed.model_kwargs()).last_hidden_state
    assert out.shape == ref.shape == (1, sum(lengths), 32)
    rows_ref, rows = packing.first_token(ref, packed.cu_seq_lens), packing.first_token(out, packed.cu_seq_lens)
    assert (rows - rows_ref).abs().max() <= TOL
    assert rows_ref.std() > 1e-2
    if last == "sliding_attention":
        assert (out - ref).abs().max() <= TOL  # the whole layer ran
