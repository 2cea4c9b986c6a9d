"""Packing an EncodedBatch into one row, and reading per-sequence rows back out of packed hidden states."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models import packing
from models.encoded import EncodedBatch

SEQS = [[5, 6, 7], [8], [9, 10, 11, 12, 13], [14, 15]]
TYPES = [[0, 0, 1], [0], [0, 0, 1, 1, 1], [0, 1]]


def test_pack_whole_batch():
    p = packing.pack(EncodedBatch.from_lists(SEQS))
    assert p.input_ids.dtype == torch.long and p.input_ids.tolist() == [sum(SEQS, [])]
    assert p.position_ids.tolist() == [[0, 1, 2, 0, 0, 1, 2, 3, 4, 0, 1]]
    assert p.cu_seq_lens.dtype == torch.int32 and p.cu_seq_lens.tolist() == [0, 3, 4, 9, 11]
    assert p.max_length == 5 and len(p) == 4 and p.num_tokens == 11
    assert p.token_type_ids is None
    assert p.lengths.tolist() == [3, 1, 5, 2]


def test_pack_selected_indices_with_token_types_and_position_offset():
    batch = EncodedBatch.from_lists(SEQS, TYPES)
    p = packing.pack(batch, [3, 0], position_offset=2)  # XLM-R style: pad id 1 -> positions from 2
    assert p.input_ids.tolist() == [[14, 15, 5, 6, 7]]
    assert p.position_ids.tolist() == [[2, 3, 2, 3, 4]]
    assert p.token_type_ids.dtype == torch.long and p.token_type_ids.tolist() == [[0, 1, 0, 0, 1]]
    assert p.cu_seq_lens.tolist() == [0, 2, 5] and p.max_length == 3
    kw = p.model_kwargs()
    assert set(kw) == {"input_ids", "position_ids", "token_type_ids", "cu_seq_lens_q", "cu_seq_lens_k",
                       "max_length_q", "max_length_k"}
    assert kw["cu_seq_lens_q"] is kw["cu_seq_lens_k"] and kw["max_length_q"] == 3


def test_pack_token_types_can_be_forced_or_dropped():
    assert packing.pack(EncodedBatch.from_lists(SEQS), with_token_types=True).token_type_ids.tolist() == [[0] * 11]
    assert packing.pack(EncodedBatch.from_lists(SEQS, TYPES), with_token_types=False).token_type_ids is None


def test_pack_rejects_empty_input():
    with pytest.raises(ValueError):
        packing.pack(EncodedBatch.from_lists([[1, 2], []]))
    with pytest.raises(ValueError):
        packing.pack(EncodedBatch.from_lists(SEQS), [])


def test_to_moves_every_tensor():
    p = packing.pack(EncodedBatch.from_lists(SEQS, TYPES)).to("cpu")
    assert all(t.device.type == "cpu" for t in (p.input_ids, p.position_ids, p.cu_seq_lens, p.token_type_ids))


def _padded_reference(hidden_rows: list[torch.Tensor]):
    """Right-padded [N, L, H] + mask, pooled the way sentence-transformers' Pooling does."""
    width = max(len(r) for r in hidden_rows)
    h = hidden_rows[0].shape[1]
    padded = torch.zeros(len(hidden_rows), width, h)
    mask = torch.zeros(len(hidden_rows), width)
    for i, r in enumerate(hidden_rows):
        padded[i, :len(r)], mask[i, :len(r)] = r, 1
    m = mask.unsqueeze(-1)
    mean = (padded * m).sum(1) / m.sum(1).clamp(min=1e-9)
    mx = padded.masked_fill(m == 0, -1e9).max(1).values
    return mean, mx


def test_pooling_reads_the_right_rows():
    lengths = [3, 1, 5, 2, 7]
    rows = [torch.randn(n, 6, generator=torch.Generator().manual_seed(i)) for i, n in enumerate(lengths)]
    hidden = torch.cat(rows).unsqueeze(0)  # [1, T, H] as a packed model returns it
    cu = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32)
    assert torch.equal(packing.first_token(hidden, cu), torch.stack([r[0] for r in rows]))
    assert torch.equal(packing.last_token(hidden, cu), torch.stack([r[-1] for r in rows]))
    assert torch.equal(packing.last_token(hidden[0], cu), torch.stack([r[-1] for r in rows]))  # [T, H] too
    mean, mx = _padded_reference(rows)
    assert torch.allclose(packing.segment_mean(hidden, cu), mean, atol=1e-6)
    assert torch.equal(packing.segment_max(hidden, cu), mx)
    assert packing.segment_ids(cu).tolist() == sum(([i] * n for i, n in enumerate(lengths)), [])
    assert all(torch.equal(a, b) for a, b in zip(packing.unpack(hidden, lengths), rows))


def test_pooling_rejects_a_batched_hidden_state():
    with pytest.raises(ValueError):
        packing.first_token(torch.zeros(2, 4, 3), torch.tensor([0, 4], dtype=torch.int32))
