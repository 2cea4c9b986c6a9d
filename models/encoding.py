"""Tokenization shared by the families: the Encoder interface and the text-pair encoder of the encoder families.

Encoding runs on the fast tokenizer's Rust backend with one `encode_batch` call for all items. Each truncation
setting has its own backend copy, configured once, so concurrent calls never reconfigure a shared tokenizer.
"""
from __future__ import annotations

from itertools import chain
from typing import Sequence

import numpy as np
from tokenizers import Encoding, Tokenizer

from .encoded import EncodedBatch
from .errors import InputError, InputTooLongError, InstructionNotSupportedError

Item = tuple[str, "str | None"]


def parse_direction(direction: str) -> str:
    d = str(direction).lower()
    if d not in ("right", "left"):
        raise InputError(f"truncation_direction must be 'Right' or 'Left', got {direction!r}")
    return d


def backend_copy(backend: Tokenizer, max_length: int | None, direction: str = "right") -> Tokenizer:
    """An independent copy of a Rust tokenizer, truncating pairs `longest_first` to `max_length` (None: never)."""
    tok = Tokenizer.from_str(backend.to_str())
    tok.no_padding()
    if max_length is None:
        tok.no_truncation()
    else:
        tok.enable_truncation(max_length, stride=0, strategy="longest_first", direction=direction)
    return tok


def flatten(ids: Sequence[list[int]], types: Sequence[list[int]] | None = None) -> EncodedBatch:
    """An EncodedBatch from per-sequence id lists, filled straight from one flat iterator (no nested loops)."""
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    flat = np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=total)
    flat_types = None if types is None else np.fromiter(chain.from_iterable(types), dtype=np.int8, count=total)
    return EncodedBatch(flat, offsets, flat_types)


# One core, 512 NQ-like documents (benchmarks/README.md): query-once vs pair encoding was 0.90x at a 12-token
# query, 1.08x at 32, 1.24x at 64, 1.47x at 128.
QUERY_ONCE_MIN_TOKENS = 24


def shared_query(inputs: Sequence) -> bool:
    """Whether every input is a (query, document) pair of one same query, and there are several."""
    if len(inputs) < 2 or not isinstance(inputs[0], tuple):
        return False
    query = inputs[0][0]
    return all(isinstance(x, tuple) and (x[0] is query or x[0] == query) for x in inputs)


def check_max_tokens_per_doc(value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or value < 1):
        raise InputError(f"max_tokens_per_doc must be a positive integer, got {value!r}")


def check_text(value, index: int, what: str) -> None:
    if not isinstance(value, str):
        raise InputError(f"item {index}: {what} must be a string, got {type(value).__name__}", index=index)


class Encoder:
    """Turns (query, document) items into an EncodedBatch the family's Scorer takes. Light: tokenizer only."""

    family: str
    model_id: str
    max_length: int
    id2label: dict[int, str]
    accepts_single: bool = True
    accepts_instruction: bool = False
    default_instruction: str | None = None

    def __init__(self, *, family: str, model_id: str, tokenizer, max_length: int, id2label: dict[int, str]):
        self.family, self.model_id, self.max_length, self.id2label = family, model_id, max_length, id2label
        self.tokenizer = tokenizer  # the transformers fast tokenizer

    def encode(self, items: Sequence[Item], *, truncate: bool = True, direction: str = "right",
               instruction: str | None = None, max_tokens_per_doc: int | None = None) -> EncodedBatch:
        raise NotImplementedError

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return self.tokenizer.convert_ids_to_tokens([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.model_id!r}, family={self.family!r}, max_length={self.max_length})"


class PairEncoder(Encoder):
    """Cross-encoder input: the tokenizer's own pair template ([CLS] q [SEP] d [SEP], <s> q </s></s> d </s>, ...),
    `longest_first` truncation to max_length, exactly as `tokenizer(queries, docs, truncation="longest_first")`."""

    def __init__(self, *, uses_token_types: bool, **kw):
        super().__init__(**kw)
        self.uses_token_types = uses_token_types
        backend = self.tokenizer.backend_tokenizer
        self._full = backend_copy(backend, None)
        self._cut = {d: backend_copy(backend, self.max_length, d) for d in ("right", "left")}

    def encode(self, items, *, truncate=True, direction="right", instruction=None, max_tokens_per_doc=None):
        direction = parse_direction(direction)
        check_max_tokens_per_doc(max_tokens_per_doc)
        if instruction is not None:
            raise InstructionNotSupportedError(
                f"model {self.model_id!r} takes no instruction; only instruction-aware models (Qwen3-Reranker) do")
        inputs = []
        for i, (query, doc) in enumerate(items):
            check_text(query, i, "the query")
            if doc is not None:
                check_text(doc, i, "the document")
            inputs.append(query if doc is None else (query, doc))
        tok = self._cut[direction] if truncate else self._full
        try:
            if max_tokens_per_doc is not None:
                encodings = self._encode_cut_docs(inputs, tok, max_tokens_per_doc, direction)
            else:
                encodings = self._encode_one_query(inputs, tok) if shared_query(inputs) else None
                if encodings is None:
                    encodings = tok.encode_batch(inputs, add_special_tokens=True)
        except Exception as e:  # e.g. a max_length below the template's special tokens
            raise InputError(f"cannot tokenize the input: {e}") from e
        for i, e in enumerate(encodings):
            if not e.ids:  # only a tokenizer without special tokens does this; a model cannot score nothing
                raise InputError(f"item {i} has no tokens at all", index=i)
            if not truncate and len(e.ids) > self.max_length:
                raise InputTooLongError(
                    f"input {i} has {len(e.ids)} tokens, more than the model's maximum of {self.max_length}; "
                    "shorten it or send truncate=true", index=i)
        return flatten([e.ids for e in encodings], [e.type_ids for e in encodings] if self.uses_token_types else None)

    def _encode_one_query(self, inputs: list[tuple[str, str]], tok: Tokenizer,
                          min_tokens: int | None = None) -> list[Encoding] | None:
        """A rerank request (one query, many documents): the query is tokenized once, not once per document;
        None (encode the pairs as usual) for a query under `min_tokens` (QUERY_ONCE_MIN_TOKENS), where the
        per-pair `post_process` call costs more than it saves. Exact: a pair's members are tokenized separately
        before `post_process` templates and truncates them (with `tok`'s truncation), which is what
        `tok.encode_batch(pairs)` does; `post_process` copies its inputs."""
        query = self._full.encode(inputs[0][0], add_special_tokens=False)
        if len(query.ids) < (QUERY_ONCE_MIN_TOKENS if min_tokens is None else min_tokens):
            return None
        docs = self._full.encode_batch([d for _, d in inputs], add_special_tokens=False)
        return [tok.post_process(query, d, add_special_tokens=True) for d in docs]

    def _encode_cut_docs(self, inputs, tok: Tokenizer, max_doc: int, direction: str) -> list[Encoding]:
        """Each document cut to `max_doc` tokens, then paired and truncated as usual. The tokenizer encodes
        pair members separately before templating, so cutting the document's own encoding is exact."""
        queries = [x[0] if isinstance(x, tuple) else x for x in inputs]
        docs = [x[1] for x in inputs if isinstance(x, tuple)]
        q_enc = self._full.encode_batch(queries, add_special_tokens=False)
        d_enc = iter(self._full.encode_batch(docs, add_special_tokens=False))
        out = []
        for x, q in zip(inputs, q_enc):
            if isinstance(x, tuple):
                d = next(d_enc)
                d.truncate(max_doc, stride=0, direction=direction)
                out.append(tok.post_process(q, d, add_special_tokens=True))
            else:
                out.append(tok.post_process(q, None, add_special_tokens=True))
        return out
