"""The Scorer interface and the padded execution every family shares.

score(): sort by length, cut into chunks whose padded size fits the token budget, pad each chunk on the right,
run the family's forward + head, scatter the raw scores back to input order. A family implements
`_forward_padded`; a packed (unpadded) path can later override `_score_chunk` behind the same `score`.
"""
from __future__ import annotations

import numpy as np
import torch

from .encoded import EncodedBatch

DEFAULT_TOKEN_BUDGET = {"cpu": 16384, "cuda": 65536}


def chunk_by_budget(sorted_lengths: np.ndarray, token_budget: int) -> list[slice]:
    """Slices of an ascending length array whose padded size (count × longest) stays within the budget.
    A sequence longer than the budget gets a chunk of its own."""
    chunks, start = [], 0
    for i, length in enumerate(sorted_lengths):
        if i > start and (i - start + 1) * int(length) > token_budget:
            chunks.append(slice(start, i))
            start = i
    if len(sorted_lengths):
        chunks.append(slice(start, len(sorted_lengths)))
    return chunks


def pad_right(batch: EncodedBatch, index: np.ndarray, pad_id: int, with_types: bool):
    """(input_ids, attention_mask, token_type_ids | None) of the selected sequences, right-padded, int64."""
    lengths = batch.lengths[index]
    width = int(lengths.max())
    ids = np.full((len(index), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(index), width), dtype=np.int64)
    types = np.zeros((len(index), width), dtype=np.int64) if with_types else None
    for row, (i, n) in enumerate(zip(index, lengths)):
        start = batch.offsets[i]
        ids[row, :n] = batch.input_ids[start:start + n]
        mask[row, :n] = 1
        if types is not None and batch.token_type_ids is not None:
            types[row, :n] = batch.token_type_ids[start:start + n]
    return ids, mask, types


class Scorer:
    """A loaded model: takes an EncodedBatch from the matching Encoder, returns raw float32 scores in input order."""

    family: str
    model_id: str
    dtype: str
    device: str
    max_length: int
    token_budget: int
    num_parameters: int

    def __init__(self, *, family: str, model_id: str, encoder, dtype: str, device: str,
                 token_budget: int | None, pad_id: int, uses_token_types: bool = False):
        self.family, self.model_id, self.encoder = family, model_id, encoder
        self.dtype, self.device, self.max_length = dtype, device, encoder.max_length
        kind = "cuda" if device.startswith("cuda") else "cpu"
        self.token_budget = int(token_budget or DEFAULT_TOKEN_BUDGET[kind])
        self.pad_id, self.uses_token_types = pad_id, uses_token_types
        self.num_parameters = 0

    def score(self, batch: EncodedBatch) -> np.ndarray:
        n = len(batch)
        out = np.empty(n, dtype=np.float32)
        if n == 0:
            return out
        lengths = batch.lengths
        if lengths.min() < 1:
            raise ValueError("cannot score an empty sequence (no tokens)")
        order = np.argsort(lengths, kind="stable")
        with torch.inference_mode():
            for part in chunk_by_budget(lengths[order], self.token_budget):
                index = order[part]
                out[index] = self._score_chunk(batch, index)
        return out

    def _score_chunk(self, batch: EncodedBatch, index: np.ndarray) -> np.ndarray:
        ids, mask, types = pad_right(batch, index, self.pad_id, self.uses_token_types)
        to = lambda a: None if a is None else torch.from_numpy(a).to(self.device)  # noqa: E731
        scores = self._forward_padded(to(ids), to(mask), to(types))
        return scores.float().cpu().numpy()

    def _forward_padded(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        token_type_ids: torch.Tensor | None) -> torch.Tensor:
        """Raw scores, shape (batch,), of right-padded inputs."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.model_id!r}, family={self.family!r}, dtype={self.dtype}, "
                f"device={self.device}, max_length={self.max_length})")
