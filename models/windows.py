"""Long documents scored whole (docs/API.md): a pair that does not fit is scored as overlapping windows of its
document's tokens, each put into the model's template in the document's place; the pair's raw score is the max
over its windows.

The planner here is family-agnostic. A family only describes its template around the document through
`Encoder.document_slot` (a `DocumentSlot`: the tokens before and after the document for a query); see
`Encoder`'s docstring in models/encoding.py.
The windows of all pairs of a request are ordinary sequences of one EncodedBatch (scored, batched and fanned
out like any other); `WindowedBatch.reduce` takes the max per pair when the scores come back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .encoded import EncodedBatch
from .encoding import check_items, check_max_tokens_per_doc
from .errors import InputError, InputTooLongError

# Fewer document tokens than this per window: the pair is scored as with "truncate" (docs/API.md).
MIN_WINDOW = 32
_ALL = 1 << 62  # "keep every query token"


def window_query_tokens(max_length: int) -> int:
    """The query tokens a window's template keeps (docs/API.md: the query's first max_length // 2 tokens)."""
    return max_length // 2


def window_starts(num_doc_tokens: int, window: int, overlap: int, max_chunks: int) -> list[int]:
    """Starts s = 0, stride, 2·stride, ... up to and including the first window d[s:s+window] that reaches the
    end of the document, at most `max_chunks` of them (stride = window − overlap)."""
    stride = window - overlap
    if window < 1 or stride < 1:
        raise ValueError(f"window {window} with overlap {overlap} does not advance")
    starts = [0]
    while starts[-1] + window < num_doc_tokens and len(starts) < max_chunks:
        starts.append(starts[-1] + stride)
    return starts


@dataclass
class WindowedBatch:
    """Every sequence to score for a request's items: one per item, or one per window of a chunked pair.

    Sequences are in item order; `counts[i]` sequences belong to item i. `chunked` says which items were
    scored as windows (the others exactly as with truncation)."""

    batch: EncodedBatch
    counts: np.ndarray  # int64 [items], >= 1 each
    chunked: np.ndarray  # bool [items]

    @property
    def num_tokens(self) -> int:
        return self.batch.num_tokens

    def reduce(self, raw: np.ndarray) -> np.ndarray:
        """Each item's raw score: the max over its sequences (its windows), float32, item order."""
        raw = np.asarray(raw, dtype=np.float32)
        if raw.shape != (len(self.batch),):
            raise RuntimeError(f"{len(self.batch)} sequences came back with {raw.shape} scores")
        starts = np.zeros(len(self.counts), dtype=np.int64)
        np.cumsum(self.counts[:-1], out=starts[1:])
        return np.maximum.reduceat(raw, starts) if len(raw) else raw


def _doc_tokens(encoder, docs: list[str], max_tokens_per_doc: int | None) -> list[list[int]]:
    """The documents' own tokens (no special tokens), cut to max_tokens_per_doc."""
    out = encoder.plain_tokens(docs) if docs else []
    return [d[:max_tokens_per_doc] for d in out] if max_tokens_per_doc is not None else out


def _fits(encoder, item, *, instruction, max_tokens_per_doc) -> bool:
    """Whether the family's own untruncated encoding of the pair is within its max length."""
    try:
        encoder.encode([item], truncate=False, instruction=instruction, max_tokens_per_doc=max_tokens_per_doc)
    except InputTooLongError:
        return False
    return True


def _refuse_long_singles(encoder, items, plain: EncodedBatch, cut: list[bool] | None, *, instruction) -> None:
    """With `truncate: false`, a single text (no document) that does not fit is a 422 as in "truncate" mode:
    windows apply to the documents of pairs only (docs/API.md), so there is nothing to chunk it into."""
    for i, (_, doc) in enumerate(items):
        if doc is not None or not (cut[i] if cut is not None else plain.lengths[i] >= encoder.max_length):
            continue
        try:
            encoder.encode([items[i]], truncate=False, instruction=instruction)
        except InputTooLongError:
            raise InputTooLongError(
                f"input {i} is a single text longer than the model's maximum of {encoder.max_length} tokens; "
                "long_documents \"chunk\" windows the documents of pairs only: shorten it or send truncate=true",
                index=i) from None


def encode_windows(encoder, items: Sequence[tuple[str, str | None]], *, truncate: bool = True,
                   direction: str = "right", instruction: str | None = None, max_tokens_per_doc: int | None = None,
                   chunk_overlap: int = 64, max_chunks: int = 32) -> WindowedBatch:
    """`items` encoded with `long_documents: "chunk"` (docs/API.md).

    Items that fit (and single texts) are exactly the family's truncating `encode`; a pair that does not fit is
    its windows, unless fewer than MIN_WINDOW tokens are left for a window: then it is scored as with "truncate"
    (`truncate`/`direction` apply to it, as they would there). A single text that does not fit is cut, or with
    `truncate=False` refused, as in "truncate" mode.
    """
    if not getattr(encoder, "supports_windows", False):
        raise InputError(f"model {encoder.model_id!r} cannot score long documents as windows; "
                         "send long_documents=\"truncate\"")
    if chunk_overlap < 0 or max_chunks < 1:
        raise InputError(f"chunk_overlap must be >= 0 and max_chunks >= 1, got {chunk_overlap}, {max_chunks}")
    items = list(items)
    max_tokens_per_doc = check_max_tokens_per_doc(max_tokens_per_doc)
    check_items(encoder, items, instruction)
    # The truncating encoding: the answer for every item that fits, and the check that the batch encodes at all;
    # with the items it cut, where the family knows them.
    if hasattr(encoder, "encode_with_cuts"):
        plain, cut = encoder.encode_with_cuts(items, direction=direction, instruction=instruction,
                                              max_tokens_per_doc=max_tokens_per_doc)
    else:  # an encoder duck-typed without it (tests' fakes)
        plain, cut = encoder.encode(items, truncate=True, direction=direction, instruction=instruction,
                                    max_tokens_per_doc=max_tokens_per_doc), None
    max_length = encoder.max_length
    if not truncate:
        _refuse_long_singles(encoder, items, plain, cut, instruction=instruction)
    if cut is not None:  # the family says which items its truncation cut
        candidates = [i for i, (_, doc) in enumerate(items) if doc is not None and cut[i]]
    else:  # an encoding shorter than the max length was not cut; one at the max length may or may not have been
        candidates = [i for i, (_, doc) in enumerate(items) if doc is not None and plain.lengths[i] >= max_length]
    docs = dict(zip(candidates, _doc_tokens(encoder, [items[i][1] for i in candidates], max_tokens_per_doc)))
    if cut is not None:
        long = candidates
    elif getattr(encoder, "exact_slots", False):
        # before + doc + after IS the untruncated input: its length decides, no second encoding.
        full = {q: encoder.document_slot(q, _ALL, instruction).num_tokens
                for q in dict.fromkeys(items[i][0] for i in candidates)}
        long = [i for i in candidates if full[items[i][0]] + len(docs[i]) > max_length]
    else:
        long = [i for i in candidates
                if not _fits(encoder, items[i], instruction=instruction, max_tokens_per_doc=max_tokens_per_doc)]
    windows: dict[int, tuple[list[list[int]], list[list[int]] | None]] = {}
    if long:
        keep = window_query_tokens(max_length)
        slots = {q: encoder.document_slot(q, keep, instruction) for q in dict.fromkeys(items[i][0] for i in long)}
        for i in long:
            doc_ids, slot = docs[i], slots[items[i][0]]
            width = max_length - slot.num_tokens
            if width < MIN_WINDOW:
                if not truncate:
                    raise InputTooLongError(
                        f"input {i} does not fit the model's maximum of {max_length} tokens and leaves fewer than "
                        f"{MIN_WINDOW} tokens for a document window; shorten it or send truncate=true", index=i)
                continue  # scored as with "truncate"
            overlap = min(chunk_overlap, width // 2)
            ids, types = [], ([] if slot.before_types is not None else None)
            for s in window_starts(len(doc_ids), width, overlap, max_chunks):
                part = doc_ids[s:s + width]
                ids.append(slot.before + part + slot.after)
                if types is not None:
                    types.append(slot.before_types + [slot.doc_type] * len(part) + slot.after_types)
            windows[i] = (ids, types)
    if not windows:
        return WindowedBatch(plain, np.ones(len(items), dtype=np.int64), np.zeros(len(items), dtype=bool))
    all_ids, all_types, counts = [], [] if plain.token_type_ids is not None else None, []
    for i in range(len(items)):
        if i in windows:
            ids, types = windows[i]
            all_ids.extend(ids)
            if all_types is not None:
                all_types.extend(types if types is not None else [[0] * len(x) for x in ids])
        else:
            ids = [plain.sequence(i)]
            all_ids.extend(ids)
            if all_types is not None:
                all_types.append(plain.token_types(i))
        counts.append(len(ids))
    chunked = np.zeros(len(items), dtype=bool)
    chunked[list(windows)] = True
    return WindowedBatch(EncodedBatch.from_lists(all_ids, all_types), np.asarray(counts, dtype=np.int64), chunked)
