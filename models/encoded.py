"""The compact encoded batch that travels from the ingress to a model replica.

Flat int32 token ids plus int64 offsets (and int8 token types where the model uses them): a few numpy
arrays pickle in microseconds, where nested Python lists of ints cost far more to ship between processes.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import Sequence

import numpy as np


@dataclass
class EncodedBatch:
    input_ids: np.ndarray  # int32, all sequences concatenated
    offsets: np.ndarray  # int64, len N+1; sequence i is input_ids[offsets[i]:offsets[i+1]]
    token_type_ids: np.ndarray | None = None  # int8, same length as input_ids, or None

    @classmethod
    def from_lists(cls, ids: Sequence[Sequence[int]], token_types: Sequence[Sequence[int]] | None = None):
        """A batch from per-sequence id lists, filled straight from one flat iterator (no nested loops)."""
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        total = int(offsets[-1])
        flat = np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=total)
        types = None if token_types is None else np.fromiter(chain.from_iterable(token_types), dtype=np.int8,
                                                             count=total)
        return cls(flat, offsets, types)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1] - self.offsets[0])

    def sequence(self, i: int) -> np.ndarray:
        return self.input_ids[self.offsets[i]:self.offsets[i + 1]]

    def token_types(self, i: int) -> np.ndarray | None:
        if self.token_type_ids is None:
            return None
        return self.token_type_ids[self.offsets[i]:self.offsets[i + 1]]

    def select(self, indices: Sequence[int] | np.ndarray) -> "EncodedBatch":
        """A new batch holding sequences `indices`, in that order."""
        idx = np.asarray(indices, dtype=np.int64)
        starts, ends = self.offsets[idx], self.offsets[idx + 1]
        lengths = ends - starts
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        gather = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends)]) if len(idx) else np.zeros(0, np.int64)
        types = self.token_type_ids[gather] if self.token_type_ids is not None else None
        return EncodedBatch(self.input_ids[gather], offsets, types)

    @staticmethod
    def concat(batches: Sequence["EncodedBatch"]) -> "EncodedBatch":
        """One batch of all sequences of `batches`, in order (for merging requests in a replica)."""
        if len(batches) == 1:
            return batches[0]
        ids = np.concatenate([b.input_ids[b.offsets[0]:b.offsets[-1]] for b in batches])
        lengths = np.concatenate([b.lengths for b in batches])
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        with_types = [b.token_type_ids is not None for b in batches]
        if any(with_types) and not all(with_types):
            raise ValueError("cannot concatenate batches with and without token types")
        types = (np.concatenate([b.token_type_ids[b.offsets[0]:b.offsets[-1]] for b in batches])
                 if all(with_types) else None)
        return EncodedBatch(ids, offsets, types)
