"""How a batch is cut and put back together: one module for every layer that cuts.

Two cuts, both over length-sorted sequences (similar lengths side by side: little padding, even cuts):
- fan-out pieces (`plan_pieces`): the ingress cuts a big request into about equal token counts, one handle
  call each, so several replicas score it concurrently (serve_app/service.py).
- forward chunks (`plan_chunks`): at most a token budget each. A model replica queues a request larger than
  its budget as these chunks (Ray's batcher refuses an item over the budget), and `Scorer.score` runs one
  forward per chunk. Padded chunks count count × longest, packed chunks real tokens. Sequences that share a
  prefix (models/prefix.py) are planned by `plan_shared_chunks`: their own parts, plus each prefix once per chunk.
Every cut is put back in input order by the one `scatter`.

Listwise batches (models/encoded.py `groups`) are cut between groups only, never inside one: `plan_pieces` and
`plan_groups` (the replica's split of a request) plan over whole groups; the forward chunks of `plan_chunks` may
cut between a group's blocks, since the scorer merges a group only once all its blocks are through.
"""
from __future__ import annotations

import numpy as np


def by_length(lengths: np.ndarray) -> np.ndarray:
    """Indices of `lengths` shortest first (stable: equal lengths keep their order)."""
    return np.argsort(lengths, kind="stable")


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


def chunk_by_tokens(lengths: np.ndarray, token_budget: int) -> list[slice]:
    """Slices whose REAL token count (sum of lengths: packed chunks carry no padding) stays within the budget.
    A sequence longer than the budget gets a chunk of its own."""
    chunks, start, total = [], 0, 0
    for i, length in enumerate(lengths):
        if i > start and total + int(length) > token_budget:
            chunks.append(slice(start, i))
            start, total = i, 0
        total += int(length)
    if len(lengths):
        chunks.append(slice(start, len(lengths)))
    return chunks


def plan_chunks(lengths: np.ndarray, token_budget: int, *, packed: bool) -> list[np.ndarray]:
    """Index arrays of the forward chunks of sequences of these lengths (see the module docstring)."""
    order = by_length(lengths)
    chunker = chunk_by_tokens if packed else chunk_by_budget
    return [order[part] for part in chunker(lengths[order], token_budget)]


def plan_shared_chunks(lengths: np.ndarray, group: np.ndarray, prefix: np.ndarray, token_budget: int, *,
                       packed: bool) -> list[np.ndarray]:
    """Index arrays of the forward chunks of sequences in prefix groups (`group[i]`: sequence i's group, -1 for
    none; `prefix[g]`: group g's prefix length). A grouped sequence costs its own part (length − prefix), sorted
    by it; a chunk costs its own parts (padded: count × longest, packed: their sum) plus, once, the prefix of each
    group it holds. A sequence over the budget gets a chunk of its own."""
    lengths = np.asarray(lengths, dtype=np.int64)
    own = lengths - np.where(group >= 0, prefix[np.maximum(group, 0)], 0)
    order = by_length(own)
    chunks, start, total, groups, fixed = [], 0, 0, set(), 0
    for k, i in enumerate(order.tolist()):
        g, size = int(group[i]), int(own[i])
        extra = int(prefix[g]) if g >= 0 and g not in groups else 0
        cost = (total + size if packed else (k - start + 1) * size) + fixed + extra
        if k > start and cost > token_budget:
            chunks.append(order[start:k])
            start, total, groups, fixed = k, 0, set(), 0
            extra = int(prefix[g]) if g >= 0 else 0
        total += size
        if extra:
            groups.add(g)
            fixed += extra
    if len(order):
        chunks.append(order[start:])
    return chunks


def plan_pieces(lengths: np.ndarray, *, piece_tokens: int, max_pieces: int,
                groups: np.ndarray | None = None) -> list[np.ndarray]:
    """Index arrays of the fan-out pieces of one request, covering every sequence exactly once.

    Runs of about equal token counts, so the pieces take about equally long. There are
    `tokens // piece_tokens` pieces (at least 1, at most `max_pieces` and the number of sequences): a request
    under two budgets goes whole, since a replica runs a budget at a time anyway. With `groups` (listwise), the
    same over whole groups: a group's sequences always share a piece.
    """
    if groups is not None:
        units = group_members(groups)
        unit_pieces = plan_pieces(_unit_lengths(lengths, units), piece_tokens=piece_tokens, max_pieces=max_pieces)
        return [_expand(units, piece) for piece in unit_pieces]
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    total = int(lengths.sum())
    count = min(max_pieces, n, total // max(1, piece_tokens))
    if count <= 1:
        return [np.arange(n)]
    order = by_length(lengths)
    # A piece starts at the first sequence whose middle lies past its share of the tokens.
    middles = np.cumsum(lengths[order]) - lengths[order] / 2
    cuts = np.searchsorted(middles, total * np.arange(1, count) / count, side="left")
    return [piece for piece in np.split(order, cuts) if len(piece)]


def plan_groups(lengths: np.ndarray, groups: np.ndarray, token_budget: int) -> list[np.ndarray]:
    """Index arrays of whole groups, length-sorted, each part within `token_budget` real tokens (a group larger
    than the budget alone): how a model replica queues a listwise request too big for one batch."""
    units = group_members(groups)
    unit_lengths = _unit_lengths(lengths, units)
    order = by_length(unit_lengths)
    return [_expand(units, order[part]) for part in chunk_by_tokens(unit_lengths[order], token_budget)]


def group_members(groups: np.ndarray) -> list[np.ndarray]:
    """The sequence indices of each group, groups in order of first appearance, members in sequence order."""
    groups = np.asarray(groups)
    _, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    members = np.split(order, np.cumsum(np.bincount(inverse))[:-1])
    return [members[g] for g in np.argsort(first, kind="stable")]


def _unit_lengths(lengths: np.ndarray, units: list[np.ndarray]) -> np.ndarray:
    lengths = np.asarray(lengths, dtype=np.int64)
    return np.array([int(lengths[u].sum()) for u in units], dtype=np.int64)


def _expand(units: list[np.ndarray], picked: np.ndarray) -> np.ndarray:
    return np.concatenate([units[u] for u in picked]) if len(picked) else np.zeros(0, np.int64)


def scatter(indices: list[np.ndarray], parts: list, n: int) -> np.ndarray:
    """The parts' float32 scores put back in input order: part k holds the scores of `indices[k]`."""
    out = np.empty(n, dtype=np.float32)
    for index, part in zip(indices, parts):
        part = np.asarray(part, dtype=np.float32)
        if part.shape != (len(index),):
            raise RuntimeError(f"a part of {len(index)} inputs came back with {part.shape} scores")
        out[index] = part
    return out
