"""How the ingress cuts one request into pieces that its model's replicas score concurrently.

A request goes to its model as one handle call, or, when it holds at least two token budgets of tokens, as up
to `max_pieces` calls in flight at once. Ray's router sends each call to the less busy of two replicas, so
several replicas share a big request (its latency falls with the replica count) and their queues stay even.
On CPU this is what lets single-thread replicas, one per core, serve one request with every core.
"""
from __future__ import annotations

import numpy as np


def plan_pieces(lengths: np.ndarray, *, piece_tokens: int, max_pieces: int) -> list[np.ndarray]:
    """Index arrays of the pieces to send, covering every sequence exactly once.

    Sequences are sorted by length and cut into runs of about equal token counts, so each piece holds similar
    lengths (little padding in the replica) and the pieces take about equally long. There are
    `tokens // piece_tokens` pieces (at least 1, at most `max_pieces` and the number of sequences): a request
    under two budgets goes whole, since a replica runs a budget at a time anyway.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    total = int(lengths.sum())
    count = min(max_pieces, n, total // max(1, piece_tokens))
    if count <= 1:
        return [np.arange(n)]
    order = np.argsort(lengths, kind="stable")
    # A piece starts at the first sequence whose middle lies past its share of the tokens.
    middles = np.cumsum(lengths[order]) - lengths[order] / 2
    cuts = np.searchsorted(middles, total * np.arange(1, count) / count, side="left")
    return [piece for piece in np.split(order, cuts) if len(piece)]


def scatter(pieces: list[np.ndarray], parts: list[np.ndarray], n: int) -> np.ndarray:
    """The pieces' float32 scores put back in request order."""
    out = np.empty(n, dtype=np.float32)
    for index, part in zip(pieces, parts):
        part = np.asarray(part, dtype=np.float32)
        if part.shape != (len(index),):
            raise RuntimeError(f"a piece of {len(index)} inputs came back with {part.shape} scores")
        out[index] = part
    return out
