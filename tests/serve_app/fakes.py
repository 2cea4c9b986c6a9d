"""Small stand-ins for models' Encoder and a model deployment, with scores the tests declare themselves."""
from __future__ import annotations

import numpy as np

from models.encoded import EncodedBatch
from models.encoding import check_items
from models.errors import InputError, InputTooLongError

CLS, SEP = 1, 2
_WORDS: list[str] = ["<pad>", "[CLS]", "[SEP]"]


def word_id(word: str) -> int:
    if word not in _WORDS:
        _WORDS.append(word)
    return _WORDS.index(word)


class FakeEncoder:
    """[CLS] query words [SEP] doc words: one token per whitespace-separated word."""

    def __init__(self, *, family="seq_cls", max_length=32, accepts_single=True, accepts_instruction=False,
                 id2label=None, default_instruction=None, with_types=False, supports_windows=True):
        self.family, self.model_id, self.max_length = family, f"fake/{family}", max_length
        self.id2label = id2label if id2label is not None else {0: "LABEL_0"}
        self.accepts_single, self.accepts_instruction = accepts_single, accepts_instruction
        self.default_instruction, self.with_types = default_instruction, with_types
        self.supports_windows = supports_windows  # models/windows.py's hooks below
        self.calls: list[dict] = []

    def encode(self, items, *, truncate=True, direction="right", instruction=None, max_tokens_per_doc=None):
        self.calls.append(dict(items=list(items), truncate=truncate, direction=direction,
                               instruction=instruction, max_tokens_per_doc=max_tokens_per_doc))
        check_items(self, items, instruction)  # the real rules (accepts_instruction, accepts_single)
        seqs, types = [], []
        for i, (query, doc) in enumerate(items):
            if doc == "BAD INPUT":
                raise InputError("this item cannot be encoded", index=i)
            doc_words = (doc or "").split()
            if max_tokens_per_doc is not None:
                doc_words = doc_words[:max_tokens_per_doc]
            ids = [CLS] + [word_id(w) for w in query.split()] + [SEP] + [word_id(w) for w in doc_words]
            if len(ids) > self.max_length:
                if not truncate:
                    raise InputTooLongError(f"input {i} is too long", index=i)
                ids = ids[:self.max_length] if direction == "right" else ids[:2] + ids[len(ids) - self.max_length + 2:]
            seqs.append(ids)
            types.append([0] * len(ids))
        return EncodedBatch.from_lists(seqs, types if self.with_types else None)

    def convert_ids_to_tokens(self, ids):
        return [_WORDS[i] for i in ids]

    def plain_tokens(self, texts):
        return [[word_id(w) for w in t.split()] for t in texts]

    def document_slot(self, query, query_tokens, instruction=None):
        from models.encoding import DocumentSlot

        before = [CLS] + self.plain_tokens([query])[0][:query_tokens] + [SEP]
        return DocumentSlot(before, [], [0] * len(before) if self.with_types else None,
                            [] if self.with_types else None)


def doc_of(seq) -> str:
    """The document words of an encoded sequence (after the first [SEP])."""
    seq = [int(t) for t in seq]
    return " ".join(_WORDS[t] for t in seq[seq.index(SEP) + 1:])


class FakeBackend:
    """Raw score of a pair = `table[document text]` (0.0 when absent); records every call."""

    def __init__(self, table=None, *, error=None, ready=(True, "ok"), describe=None, word_scores=None):
        self.table, self.error, self._ready = dict(table or {}), error, ready
        # Else, with word_scores: the raw score of a document is the sum of its words' scores.
        self.word_scores = word_scores
        self._describe = describe or {"family": "seq_cls", "dtype": "float32", "device": "cpu", "execution": "padded",
                                      "token_budget": 4096, "num_parameters": 123}
        self.calls: list[EncodedBatch] = []

    async def score(self, batch: EncodedBatch) -> np.ndarray:
        self.calls.append(batch)
        if self.error is not None:
            raise self.error
        return np.array([self._score(doc_of(batch.sequence(i))) for i in range(len(batch))], dtype=np.float32)

    def _score(self, doc: str) -> float:
        if self.word_scores is not None:
            return float(sum(self.word_scores.get(w, 0.0) for w in doc.split()))
        return self.table.get(doc, 0.0)

    async def describe(self):
        return self._describe

    async def ready(self):
        return self._ready
