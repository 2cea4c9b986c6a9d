"""Tokenization shared by the families: the Encoder interface and the text-pair encoder of the encoder families.

Encoding runs on the fast tokenizer's Rust backend with one `encode_batch` call for all items. Each truncation
setting has its own backend copy, configured once, so concurrent calls never reconfigure a shared tokenizer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from tokenizers import Encoding, Tokenizer

from .encoded import EncodedBatch
from .errors import InputError, InputTooLongError, InstructionNotSupportedError, PairRequiredError

Item = tuple[str, "str | None"]


def parse_direction(direction: str) -> str:
    d = str(direction).lower()
    if d not in ("right", "left"):
        raise InputError(f"truncation_direction must be 'Right' or 'Left', got {direction!r}")
    return d


def backend_copy(backend: Tokenizer, max_length: int | None, direction: str = "right") -> "UserTextTokenizer":
    """An independent copy of a Rust tokenizer, truncating pairs `longest_first` to `max_length` (None: never),
    behind the boundary every encoder tokenizes user text through (`UserTextTokenizer`)."""
    tok = Tokenizer.from_str(backend.to_str())
    tok.no_padding()
    if max_length is None:
        tok.no_truncation()
    else:
        tok.enable_truncation(max_length, stride=0, strategy="longest_first", direction=direction)
    return UserTextTokenizer(tok)


def _tokenizer_failure(exc: BaseException) -> InputError | None:
    """The InputError for a tokenizer's failure on user text; None for what must pass through unchanged (an
    InputError already, KeyboardInterrupt, SystemExit, ...). A panic in the Rust code arrives as pyo3's
    PanicException, a BaseException: it is the input's fault as much as any other tokenizer error."""
    if isinstance(exc, InputError) or not (isinstance(exc, Exception) or type(exc).__name__ == "PanicException"):
        return None
    return InputError(f"the tokenizer cannot take this text ({type(exc).__name__}: {exc})")


def _guarded(call, args, kwargs):
    try:
        return call(*args, **kwargs)
    except BaseException as exc:
        error = _tokenizer_failure(exc)
        if error is None:
            raise
        raise error from exc


class UserTextTokenizer:
    """The one boundary where user text meets a Rust tokenizer: the encoders' tokenizer copies (`backend_copy`)
    are these, so ANY failure of the tokenizer on a text, in any family's encoding, is an InputError (a 422), never
    a 500. Texts that are not valid Unicode are refused with their index before (`check_text`); this catches what
    no check foresaw. Everything else is the wrapped `tokenizers.Tokenizer`'s own."""

    __slots__ = ("_tok",)

    def __init__(self, tok: Tokenizer):
        self._tok = tok

    def encode(self, *args, **kwargs) -> Encoding:
        return _guarded(self._tok.encode, args, kwargs)

    def encode_batch(self, *args, **kwargs) -> list[Encoding]:
        return _guarded(self._tok.encode_batch, args, kwargs)

    def post_process(self, *args, **kwargs) -> Encoding:
        return _guarded(self._tok.post_process, args, kwargs)

    def __getattr__(self, name: str):
        return getattr(self._tok, name)


# One core, 512 NQ-like documents (benchmarks/README.md): query-once vs pair encoding was 0.90x at a 12-token
# query, 1.08x at 32, 1.24x at 64, 1.47x at 128.
QUERY_ONCE_MIN_TOKENS = 24


def shared_query(inputs: Sequence) -> bool:
    """Whether every input is a (query, document) pair of one same query, and there are several."""
    if len(inputs) < 2 or not isinstance(inputs[0], tuple):
        return False
    query = inputs[0][0]
    return all(isinstance(x, tuple) and (x[0] is query or x[0] == query) for x in inputs)


# max_tokens_per_doc above this is this: more tokens than any document has, so it cuts nothing (and fits the
# tokenizer's 64-bit lengths, which a JSON integer such as 2**64 would not).
MAX_TOKENS_PER_DOC = 1 << 62


def check_max_tokens_per_doc(value: int | None) -> int | None:
    """`max_tokens_per_doc` as every family applies it: a positive integer (else an InputError), clamped to
    MAX_TOKENS_PER_DOC; None: no cut."""
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InputError(f"max_tokens_per_doc must be a positive integer, got {value!r}", field="max_tokens_per_doc")
    return min(value, MAX_TOKENS_PER_DOC)


def check_text(value, index: int | None, what: str, field: str | None = None) -> None:
    """A string the tokenizer can take: not a string, or a string that is not valid Unicode (a lone UTF-16
    surrogate such as the JSON escape "\\ud800" decodes to) is an InputError naming the item and `field`."""
    if not isinstance(value, str):
        where = f"item {index}: " if index is not None else ""
        raise InputError(f"{where}{what} must be a string, got {type(value).__name__}", index=index, field=field)
    if not value.isascii():  # O(1) for the common ASCII text; a surrogate is never ASCII
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:  # the message carries the character escaped, never the raw surrogate
            raise InputError(f"{what} is not valid Unicode: character {e.start} is {value[e.start]!r}, a lone "
                             "UTF-16 surrogate; send valid UTF-8 text", index=index, field=field) from None


def cut_texts(backend, texts: list[str], max_tokens: int, direction: str) -> list[str]:
    """Each text cut to its first (right) or last (left) `max_tokens` tokens, at token character offsets: for
    templates that re-tokenize the text inside a prompt, the cut must be made on the text."""
    out = []
    for text, enc in zip(texts, backend.encode_batch(texts, add_special_tokens=False)):
        if len(enc.ids) > max_tokens:
            text = text[:enc.offsets[max_tokens - 1][1]] if direction == "right" else text[enc.offsets[-max_tokens][0]:]
        out.append(text)
    return out


_NOTHING = object()  # a value no item holds

# The families whose encoders take an `instruction` (`accepts_instruction`), as users know them, for the message
# that refuses one (tests/models/test_encoding.py keeps this in step with the families' flags).
INSTRUCTION_FAMILIES = {
    "st_causal": "Sentence Transformers causal CrossEncoders",
    "qwen3": "Qwen3-Reranker",
    "mxbai": "mxbai-rerank-v2",
    "bge_gemma": "bge-reranker-v2-gemma",
    "jina_v3": "jina-reranker-v3",
}


def check_items(encoder, items: Sequence[Item], instruction: str | None) -> None:
    """The one check of a request against an encoder's rules, with one message per refusal: an `instruction`
    only where `encoder.accepts_instruction`, a single text (no document) only where `encoder.accepts_single`,
    and valid Unicode strings throughout (`check_text`). Every encoder runs it; the serving layer does not check
    these again."""
    if instruction is not None:
        if not encoder.accepts_instruction:
            raise InstructionNotSupportedError(
                f"model {encoder.model_id!r} takes no `instruction`; remove it (only instruction-aware models "
                f"take one: {', '.join(INSTRUCTION_FAMILIES.values())})", field="instruction")
        check_text(instruction, None, "the instruction", field="instruction")
    checked: object = _NOTHING
    for i, (query, doc) in enumerate(items):
        if query is not checked:  # a rerank request's items share one query object: checked once
            check_text(query, i, "the query", field="query")
            checked = query
        if doc is not None:
            check_text(doc, i, "the document")
        elif not encoder.accepts_single:
            raise PairRequiredError(f"model {encoder.model_id!r} scores (query, document) pairs only: send two "
                                    "texts, not a single one", index=i)


@dataclass(frozen=True)
class DocumentSlot:
    """A template around a document: `before + doc + after` is the model's input for this query (and
    instruction). `doc_type` is the token type of the document's tokens; types are None where the model uses none.
    """

    before: list[int]
    after: list[int]
    before_types: list[int] | None = None
    after_types: list[int] | None = None
    doc_type: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.before) + len(self.after)


class Encoder:
    """Turns (query, document) items into an EncodedBatch the family's Scorer takes. Light: tokenizer only.

    Long documents (docs/API.md): models/windows.py's `encode_windows(encoder, ...)` scores a pair that does not
    fit as windows of its document's tokens; the planner is generic and needs from a family only two things:
      - `encode(items, truncate=False, ...)` raising InputTooLongError for a pair over `max_length` (every
        family does: that is how `truncate: false` works), and
      - `document_slot(query, query_tokens, instruction) -> DocumentSlot`: the template's tokens BEFORE and AFTER
        the document for this query, with the query cut to its first `query_tokens` tokens (its own tokens, no
        special tokens), so that `before + window + after` is exactly the input a document of the window's tokens
        would get. Pair templates return the post-processor's tokens around the second sequence (PairEncoder);
        prompt/chat templates return the rendered prompt up to the document and from it on (Qwen3Encoder).
    A family that does not override `document_slot` cannot chunk (`supports_windows` is False). A family whose
    `before + (the document's own tokens) + after` is exactly its untruncated input (pair templates: tokenizers
    encodes pair members separately) sets `exact_slots`, and whether a pair fits is computed from those lengths;
    otherwise the planner asks `encode(truncate=False)` per over-long candidate. A family whose truncation cuts
    pieces to their own limits (so a cut row can be shorter than `max_length`: mxbai, bge-gemma) must say which
    items it cut through `encode_with_cuts`.
    """

    family: str
    model_id: str
    max_length: int
    id2label: dict[int, str]
    accepts_single: bool = True
    accepts_instruction: bool = False
    default_instruction: str | None = None
    exact_slots: bool = False
    # Listwise families (models/families/jina_v3.py): `encode(..., one_list=True)` reads a rank request's documents
    # as one list scored together, and the raw scores are final (cosines: the service applies no sigmoid).
    listwise: bool = False
    sigmoid_scores: bool = True
    # Causal templates: the tokens before the document (`document_slot(...).before`) are the prefix a request's
    # pairs may share (models/prefix.py, docs/API.md, Shared prefix).
    shares_prefix: bool = False

    def __init__(self, *, family: str, model_id: str, tokenizer, max_length: int, id2label: dict[int, str]):
        self.family, self.model_id, self.max_length, self.id2label = family, model_id, max_length, id2label
        self.tokenizer = tokenizer  # the transformers fast tokenizer

    def encode(self, items: Sequence[Item], *, truncate: bool = True, direction: str = "right",
               instruction: str | None = None, max_tokens_per_doc: int | None = None) -> EncodedBatch:
        raise NotImplementedError

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return self.tokenizer.convert_ids_to_tokens([int(i) for i in ids])

    # --- long documents (docs/API.md) -------------------------------------------------------------------------
    @property
    def supports_windows(self) -> bool:
        return type(self).document_slot is not Encoder.document_slot

    def document_slot(self, query: str, query_tokens: int, instruction: str | None = None) -> DocumentSlot:
        """The template around the document for `query` (cut to `query_tokens` tokens)."""
        raise NotImplementedError(f"{type(self).__name__} does not describe its template around the document")

    def encode_with_cuts(self, items: Sequence[Item], *, direction: str = "right", instruction: str | None = None,
                         max_tokens_per_doc: int | None = None) -> tuple[EncodedBatch, list[bool] | None]:
        """The truncating `encode`, and which items it cut where the family knows (None: the planner takes a row
        shorter than `max_length` as uncut and asks `encode(truncate=False)` about the others)."""
        return self.encode(items, truncate=True, direction=direction, instruction=instruction,
                           max_tokens_per_doc=max_tokens_per_doc), None

    def prompt_pairs(self, items: Sequence[Item], direction: str, instruction: str | None,
                     max_tokens_per_doc: int | None) -> tuple[str, list[str], list[str]]:
        """The common start of a prompt family's `encode` (the text is re-tokenized inside its template): the
        request checked, then (direction, queries, documents), each document cut to `max_tokens_per_doc` on its
        text (`self._full`: the encoder's never-truncating tokenizer)."""
        direction = parse_direction(direction)
        max_tokens_per_doc = check_max_tokens_per_doc(max_tokens_per_doc)
        check_items(self, items, instruction)
        queries = [query for query, _ in items]
        docs = [doc for _, doc in items]
        if max_tokens_per_doc is not None:
            docs = cut_texts(self._full, docs, max_tokens_per_doc, direction)
        return direction, queries, docs

    def kept_query(self, query: str, query_tokens: int) -> str:
        """The query, decoded back from its first `query_tokens` tokens when it has more (docs/API.md): for
        templates that tokenize the query inside a larger piece of text."""
        tok = self.plain_tokenizer()
        ids = tok.encode(query, add_special_tokens=False).ids
        return tok.decode(ids[:query_tokens], skip_special_tokens=False) if len(ids) > query_tokens else query

    def plain_tokenizer(self) -> Tokenizer:
        """A copy of the Rust tokenizer that never truncates: the encoder's own `_full` where it keeps one, else
        made on first use (only chunking needs it)."""
        tok = getattr(self, "_full", None) or getattr(self, "_plain", None)
        if tok is None:
            tok = self._plain = backend_copy(self.tokenizer.backend_tokenizer, None)
        return tok

    def plain_tokens(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's own tokens, no special tokens."""
        return [e.ids for e in self.plain_tokenizer().encode_batch(list(texts), add_special_tokens=False)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.model_id!r}, family={self.family!r}, max_length={self.max_length})"


class PairEncoder(Encoder):
    """Cross-encoder input: the tokenizer's own pair template ([CLS] q [SEP] d [SEP], <s> q </s></s> d </s>, ...),
    `longest_first` truncation to max_length, exactly as `tokenizer(queries, docs, truncation="longest_first")`."""

    exact_slots = True  # the pair's members are tokenized alone, then templated

    def __init__(self, *, uses_token_types: bool, **kw):
        super().__init__(**kw)
        self.uses_token_types = uses_token_types
        backend = self.tokenizer.backend_tokenizer
        self._full = backend_copy(backend, None)
        self._cut = {d: backend_copy(backend, self.max_length, d) for d in ("right", "left")}

    def encode(self, items, *, truncate=True, direction="right", instruction=None, max_tokens_per_doc=None):
        direction = parse_direction(direction)
        max_tokens_per_doc = check_max_tokens_per_doc(max_tokens_per_doc)
        check_items(self, items, instruction)
        inputs = [query if doc is None else (query, doc) for query, doc in items]
        tok = self._cut[direction] if truncate else self._full
        try:
            if max_tokens_per_doc is not None:
                encodings = self._encode_cut_docs(inputs, tok, max_tokens_per_doc, direction)
            else:
                encodings = self._encode_one_query(inputs, tok) if shared_query(inputs) else None
                if encodings is None:
                    encodings = tok.encode_batch(inputs, add_special_tokens=True)
        except InputError:
            raise
        except Exception as e:  # e.g. a max_length below the template's special tokens
            raise InputError(f"cannot tokenize the input: {e}") from e
        for i, e in enumerate(encodings):
            if not e.ids:  # only a tokenizer without special tokens does this; a model cannot score nothing
                raise InputError(f"item {i} has no tokens at all", index=i)
            if not truncate and len(e.ids) > self.max_length:
                raise InputTooLongError(
                    f"input {i} has {len(e.ids)} tokens, more than the model's maximum of {self.max_length}; "
                    "shorten it or send truncate=true", index=i)
        return EncodedBatch.from_lists([e.ids for e in encodings],
                                       [e.type_ids for e in encodings] if self.uses_token_types else None)

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

    def document_slot(self, query, query_tokens, instruction=None):
        """The post-processor's tokens around the second sequence, for the query's first `query_tokens` tokens.
        Template post-processors insert fixed tokens, so their output around a one-token probe document is their
        output around any document."""
        check_items(self, (), instruction)
        tok = self.plain_tokenizer()
        q = tok.encode(query, add_special_tokens=False)
        q.truncate(query_tokens, stride=0, direction="right")
        enc = tok.post_process(q, self._probe(), add_special_tokens=True)
        doc = [k for k, s in enumerate(enc.sequence_ids) if s == 1]
        if len(doc) != 1:
            raise InputError(f"model {self.model_id!r}: cannot locate the document in the tokenizer's pair template")
        at, ids, types = doc[0], enc.ids, enc.type_ids
        if not self.uses_token_types:
            return DocumentSlot(ids[:at], ids[at + 1:])
        return DocumentSlot(ids[:at], ids[at + 1:], types[:at], types[at + 1:], doc_type=types[at])

    def _probe(self) -> Encoding:
        """A one-token document (post_process works on copies, so one is shared)."""
        probe = getattr(self, "_probe_encoding", None)
        if probe is None:
            tok = self.plain_tokenizer()
            for text in ("a", "0", self.tokenizer.unk_token or "", "."):
                probe = tok.encode(text, add_special_tokens=False) if text else None
                if probe is not None and len(probe.ids) >= 1:
                    probe.truncate(1, stride=0, direction="right")
                    break
            else:
                raise InputError(f"model {self.model_id!r}: no one-token text to locate the document with")
            self._probe_encoding = probe
        return probe
