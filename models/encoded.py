"""The compact encoded batch that travels from the ingress to a model replica.

Flat int32 token ids plus int64 offsets (and int8 token types where the model uses them): a few numpy
arrays pickle in microseconds, where nested Python lists of ints cost far more to ship between processes.

Listwise families (models/families/jina_v3.py) add two per-sequence arrays: a sequence is then a block prompt of
several documents (`outputs`: how many scores it yields), and the blocks of one list are scored together
(`groups`: the list each belongs to). Every layer that cuts a batch keeps a group whole (models/cutting.py), and
scores travel in sequence order, `outputs[i]` of them for sequence i (`score_index`).

Shared prefixes (docs/API.md, models/prefix.py): every sequence keeps ALL its tokens (what pairwise scoring sees,
so lengths, token counts and /tokenize are unchanged); `prefix_lengths[i]` > 0 says that its first tokens may be
computed once for every sequence of the batch that starts with the same tokens. Sequences are grouped by those
tokens themselves, so a group can never hold two different prefixes, and `select` / `concat` (fan-out pieces,
forward chunks, requests merged by a replica) carry the marks with nothing to renumber.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from itertools import chain
from typing import Sequence

import numpy as np


@dataclass
class EncodedBatch:
    input_ids: np.ndarray  # int32, all sequences concatenated
    offsets: np.ndarray  # int64, len N+1; sequence i is input_ids[offsets[i]:offsets[i+1]]
    token_type_ids: np.ndarray | None = None  # int8, same length as input_ids, or None
    prefix_lengths: np.ndarray | None = None  # int32 [N]: leading tokens a sequence may share (0: none), or None
    # Listwise batches only (both set or both None): int64 [N] each.
    groups: np.ndarray | None = None  # the list a sequence belongs to: sequences of one group are scored together
    outputs: np.ndarray | None = None  # scores a sequence yields (its block's documents); None: one each

    @classmethod
    def from_lists(cls, ids: Sequence[Sequence[int]], token_types: Sequence[Sequence[int]] | None = None, *,
                   groups: Sequence[int] | None = None, outputs: Sequence[int] | None = None):
        """A batch from per-sequence id lists, filled straight from one flat iterator (no nested loops)."""
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        total = int(offsets[-1])
        flat = np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=total)
        types = None if token_types is None else np.fromiter(chain.from_iterable(token_types), dtype=np.int8,
                                                             count=total)
        if (groups is None) != (outputs is None):
            raise ValueError("a listwise batch needs both groups and outputs")
        listwise = {} if groups is None else {"groups": np.asarray(groups, dtype=np.int64),
                                              "outputs": np.asarray(outputs, dtype=np.int64)}
        return cls(flat, offsets, types, **listwise)

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
        prefixes = self.prefix_lengths[idx] if self.prefix_lengths is not None else None
        listwise = {} if self.groups is None else {"groups": self.groups[idx], "outputs": self.outputs[idx]}
        return EncodedBatch(self.input_ids[gather], offsets, types, prefixes, **listwise)

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
        prefixes = None  # a batch without marks shares nothing
        if any(b.prefix_lengths is not None for b in batches):
            prefixes = np.concatenate([b.prefix_lengths if b.prefix_lengths is not None
                                       else np.zeros(len(b), dtype=np.int32) for b in batches])
        return EncodedBatch(ids, offsets, types, prefixes, **_concat_groups(batches))

    # --- listwise batches: several scores per sequence, groups scored together ----------------------------------
    @property
    def num_scores(self) -> int:
        """Scores the batch yields: one per sequence, or each block's documents in a listwise batch."""
        return len(self) if self.outputs is None else int(self.outputs.sum())

    def score_index(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Positions in this batch's scores of the scores of sequences `indices`, in that order: where the scores
        of `self.select(indices)` go back to (for sequence-per-score batches, `indices` itself)."""
        idx = np.asarray(indices, dtype=np.int64)
        if self.outputs is None:
            return idx
        starts = np.concatenate([[0], np.cumsum(self.outputs)[:-1]])[idx]
        counts = self.outputs[idx]
        return np.repeat(starts - np.cumsum(counts) + counts, counts) + np.arange(int(counts.sum()))


    # --- shared prefixes (models/prefix.py) ------------------------------------------------------------------
    def with_prefix_lengths(self, prefix_lengths: np.ndarray | None) -> "EncodedBatch":
        """This batch with these prefix marks (checked: each within its sequence, leaving it a token of its own)."""
        if prefix_lengths is None:
            return replace(self, prefix_lengths=None)
        marks = np.asarray(prefix_lengths, dtype=np.int32)
        if marks.shape != (len(self),) or (marks < 0).any() or (marks >= np.maximum(self.lengths, 1)).any():
            raise ValueError("prefix lengths must be one per sequence, >= 0 and shorter than the sequence")
        return replace(self, prefix_lengths=marks)

    @cached_property
    def prefix_groups(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(group of each sequence or -1, prefix length of each group, one member of each group).

        Sequences whose marked prefixes are the same tokens form a group; a group has at least two members (a
        prefix no other sequence shares saves nothing: that sequence is scored whole)."""
        n = len(self)
        group = np.full(n, -1, dtype=np.int64)
        if self.prefix_lengths is None or n < 2:
            return group, np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        members: dict[bytes, list[int]] = {}
        starts = self.offsets[:-1]
        for i in np.flatnonzero(self.prefix_lengths > 0).tolist():
            start = int(starts[i])
            key = self.input_ids[start:start + int(self.prefix_lengths[i])].tobytes()  # the length is in the key
            members.setdefault(key, []).append(i)
        shared = [m for m in members.values() if len(m) > 1]
        for g, m in enumerate(shared):
            group[m] = g
        first = np.array([m[0] for m in shared], dtype=np.int64)
        return group, self.prefix_lengths[first].astype(np.int64), first

    @property
    def own_lengths(self) -> np.ndarray:
        """Each sequence's tokens after the prefix it shares (its whole length when it shares none)."""
        group, prefix, _ = self.prefix_groups
        if not len(prefix):
            return self.lengths
        return self.lengths - np.where(group >= 0, prefix[np.maximum(group, 0)], 0)

    @property
    def computed_tokens(self) -> int:
        """Tokens a forward of the whole batch computes: every shared prefix once, the rest of each sequence."""
        group, prefix, _ = self.prefix_groups
        if not len(prefix):
            return self.num_tokens
        counts = np.bincount(group[group >= 0], minlength=len(prefix))
        return self.num_tokens - int((prefix * (counts - 1)).sum())


def _concat_groups(batches: Sequence[EncodedBatch]) -> dict:
    """groups/outputs of concatenated listwise batches: each batch's groups renumbered past the previous ones', so
    lists of different requests stay apart."""
    listwise = [b.groups is not None for b in batches]
    if not any(listwise):
        return {}
    if not all(listwise):
        raise ValueError("cannot concatenate listwise batches with others")
    groups, start = [], 0
    for b in batches:
        if len(b.groups):
            groups.append(b.groups - b.groups.min() + start)
            start = int(groups[-1].max()) + 1
    return {"groups": np.concatenate(groups) if groups else np.zeros(0, np.int64),
            "outputs": np.concatenate([b.outputs for b in batches])}
