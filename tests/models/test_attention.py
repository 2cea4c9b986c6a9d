"""Packed attention reproduces per-sequence transformers forwards (fp32 CPU, max |diff| <= 1e-5).

References are the stock transformers models run with "sdpa": each sequence alone, and a right-padded batch
with a padding mask. Lengths straddle the sliding windows so the window matters on some sequences and not
on others, and include a one-token sequence.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import (BertConfig, BertModel, ModernBertConfig, ModernBertModel, Qwen3Config, Qwen3Model,
                          XLMRobertaConfig, XLMRobertaModel)

from models import attention, packing
from models.encoded import EncodedBatch

TOL = 1e-5
LENGTHS = [1, 3, 5, 6, 9, 17, 40, 2, 33, 12]
VOCAB = 120


@pytest.fixture(scope="module", autouse=True)
def _registered():
    attention.register()


def _sequences(lengths=LENGTHS, seed=0, low=3):
    rng = np.random.default_rng(seed)
    return [rng.integers(low, VOCAB, n).tolist() for n in lengths]


def _modernbert(**kw) -> ModernBertModel:
    torch.manual_seed(0)
    cfg = ModernBertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                           num_attention_heads=2, max_position_embeddings=128, global_attn_every_n_layers=3,
                           local_attention=8, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
                           sep_token_id=2, initializer_range=0.2, **kw)
    cfg.rope_parameters = {"full_attention": {"rope_type": "default", "rope_theta": 160000.0},
                           "sliding_attention": {"rope_type": "default", "rope_theta": 160000.0}}
    return ModernBertModel(cfg).eval()


def _qwen3(sliding_window: int | None = None) -> Qwen3Model:
    torch.manual_seed(1)
    kw = {}
    if sliding_window:  # layers >= max_window_layers slide
        kw = dict(use_sliding_window=True, sliding_window=sliding_window, max_window_layers=1)
    cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2, **kw)
    return Qwen3Model(cfg).eval()


def _bert() -> BertModel:
    torch.manual_seed(2)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=2, max_position_embeddings=64, type_vocab_size=2, pad_token_id=0,
                     initializer_range=0.2)
    return BertModel(cfg, add_pooling_layer=False).eval()


def _xlmr() -> XLMRobertaModel:
    torch.manual_seed(3)
    cfg = XLMRobertaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=2, max_position_embeddings=66, type_vocab_size=1, pad_token_id=1,
                           bos_token_id=0, eos_token_id=2, initializer_range=0.2)
    return XLMRobertaModel(cfg, add_pooling_layer=False).eval()


def _hidden(model, impl: str, **inputs) -> torch.Tensor:
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(**inputs).last_hidden_state


def _one_by_one(model, seqs, types=None) -> list[torch.Tensor]:
    out = []
    for i, s in enumerate(seqs):
        inputs = {"input_ids": torch.tensor([s])}
        if types is not None:
            inputs["token_type_ids"] = torch.tensor([types[i]])
        out.append(_hidden(model, "sdpa", **inputs)[0])
    return out


def _padded(model, seqs, pad_id: int) -> list[torch.Tensor]:
    """Right-padded batch with a padding mask: the way a padded scorer runs."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    hidden = _hidden(model, "sdpa", input_ids=ids, attention_mask=mask)
    return [hidden[i, :len(s)] for i, s in enumerate(seqs)]


def _packed(model, batch: EncodedBatch, **pack_kw) -> list[torch.Tensor]:
    packed = packing.pack(batch, **pack_kw)
    hidden = _hidden(model, attention.PACKED, **packed.model_kwargs())
    assert hidden.shape[:2] == (1, batch.num_tokens)
    return packing.unpack(hidden, packed.lengths)


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert [x.shape for x in a] == [y.shape for y in b]
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def test_modernbert_packed_matches_each_sequence_alone_and_padded_batch():
    model = _modernbert()
    # the window must matter: the sliding layers see sequences both shorter and longer than +-4
    assert model.config.sliding_window == 4 and "sliding_attention" in model.config.layer_types
    seqs = _sequences()
    packed = _packed(model, EncodedBatch.from_lists(seqs))
    assert _max_diff(packed, _one_by_one(model, seqs)) <= TOL
    assert _max_diff(packed, _padded(model, seqs, pad_id=0)) <= TOL


def test_modernbert_window_is_applied_inside_packed_sequences():
    """Guard against a kernel that ignores the window: widening it must change the long sequences only."""
    narrow, wide = _modernbert(), _modernbert()
    wide.config.sliding_window = 64
    for layer in wide.layers:
        if layer.attn.sliding_window is not None:
            layer.attn.sliding_window = 65
    seqs = _sequences([5, 40])
    a, b = _packed(narrow, EncodedBatch.from_lists(seqs)), _packed(wide, EncodedBatch.from_lists(seqs))
    assert (a[0] - b[0]).abs().max() <= TOL  # 5 tokens: inside both windows
    assert (a[1] - b[1]).abs().max() > 1e-3  # 40 tokens: the window cuts


@pytest.mark.parametrize("sliding_window", [None, 6])
def test_qwen3_causal_gqa_packed_matches_each_sequence_alone_and_padded_batch(sliding_window):
    model = _qwen3(sliding_window)
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    if sliding_window:
        assert model.config.layer_types == ["full_attention", "sliding_attention"]
    seqs = _sequences(seed=1)
    packed = _packed(model, EncodedBatch.from_lists(seqs))
    assert _max_diff(packed, _one_by_one(model, seqs)) <= TOL
    assert _max_diff(packed, _padded(model, seqs, pad_id=0)) <= TOL


def test_bert_packed_with_token_types_matches_each_sequence_alone():
    model = _bert()
    seqs = _sequences(seed=2)
    types = [[0] * (len(s) // 2) + [1] * (len(s) - len(s) // 2) for s in seqs]
    batch = EncodedBatch.from_lists(seqs, types)
    assert _max_diff(_packed(model, batch), _one_by_one(model, seqs, types)) <= TOL


def test_xlmr_packed_needs_positions_from_pad_id_plus_one():
    model = _xlmr()
    seqs = _sequences(seed=3, low=3)  # no pad id (1) inside the sequences
    batch = EncodedBatch.from_lists(seqs)
    reference = _one_by_one(model, seqs)
    offset = model.config.pad_token_id + 1
    assert _max_diff(_packed(model, batch, position_offset=offset), reference) <= TOL
    assert _max_diff(_packed(model, batch), reference) > 1e-3  # positions from 0 are wrong for XLM-R


@pytest.mark.parametrize("build", [_modernbert, _qwen3])
def test_unpadded_rows_run_under_packed_and_a_padding_mask_is_refused(build):
    """No mask function is registered for "packed" (transformers would sync the device once per forward looking
    for packed sequences): rows without cu_seq_lens are whole sequences, and a padding mask, which transformers
    would then drop, is refused on a model switched with `attention.use`."""
    model = build()
    rows = torch.tensor(_sequences([30, 30], seed=5))
    unpadded = _hidden(model, attention.PACKED, input_ids=rows)  # window and causality still applied
    assert (unpadded - _hidden(model, "sdpa", input_ids=rows)).abs().max() <= TOL
    attention.use(model, packed=True)
    mask = torch.ones_like(rows)
    mask[1, 20:] = 0
    with torch.no_grad(), pytest.raises(ValueError, match="padding attention_mask under packed"):
        model(input_ids=rows, attention_mask=mask)
    attention.use(model, packed=False)  # padded batches run under sdpa
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        model(input_ids=rows, attention_mask=mask)


def test_no_dense_mask_is_built_for_packed_inputs(monkeypatch):
    """The point of packing: attention never sees a [T, T] mask or a [T, T] score matrix, only per-sequence ones."""
    seen = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append((q.shape[-2], None if attn_mask is None else tuple(attn_mask.shape)))
        return real_sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    lengths = [7, 20]
    for model in (_modernbert(), _qwen3(6)):
        seen.clear()
        _packed(model, EncodedBatch.from_lists(_sequences(lengths)))
        assert seen and all(rows in lengths for rows, _ in seen)
        assert all(mask is None or max(mask) <= max(lengths) for _, mask in seen)


def test_backend_selection():
    assert attention.varlen_backend(torch.device("cpu"), torch.float32) == "segments"
    assert attention.varlen_backend(torch.device("cpu"), torch.bfloat16) == "segments"
    # fp32 on CUDA: flash kernels take half precision only, so the exact per-segment path serves it
    assert attention.varlen_backend(torch.device("cuda"), torch.float32) == "segments"
    with attention.force_backend("torch_varlen"):
        assert attention.varlen_backend(torch.device("cpu"), torch.float32) == "torch_varlen"
    assert attention.varlen_backend(torch.device("cpu"), torch.float32) == "segments"
    with pytest.raises(ValueError):
        with attention.force_backend("nope"):
            pass


def test_mismatched_inputs_are_rejected():
    model = _modernbert()
    packed = packing.pack(EncodedBatch.from_lists(_sequences([3, 4])))
    attention.use(model, packed=True)
    with torch.no_grad(), pytest.raises(ValueError, match="padding attention_mask under packed"):
        model(**packed.model_kwargs(), attention_mask=torch.ones(1, packed.num_tokens, dtype=torch.long))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["flash_attn", "torch_varlen"])
@pytest.mark.parametrize("causal,window", [(False, None), (False, 65), (True, None)])
def test_cuda_varlen_kernels_match_the_segment_reference(backend, causal, window):
    if backend == "flash_attn":
        pytest.importorskip("flash_attn")
    lengths = torch.tensor([1, 70, 200, 129, 5])
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(int(cu[-1]), 8, 64, generator=g).cuda().half()
    k = torch.randn(int(cu[-1]), 4, 64, generator=g).cuda().half()
    v = torch.randn(int(cu[-1]), 4, 64, generator=g).cuda().half()
    cu = cu.cuda()
    with attention.force_backend("segments"):
        ref = attention.varlen_attention(q.float(), k.float(), v.float(), cu, 200, causal=causal,
                                         sliding_window=window)
    with attention.force_backend(backend):
        out = attention.varlen_attention(q, k, v, cu, 200, causal=causal, sliding_window=window)
    assert (out.float() - ref).abs().max() < 2e-3
