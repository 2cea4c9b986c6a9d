"""Tokenization edge cases: truncation off, Left direction, empty strings, max_tokens_per_doc, typed input errors."""
from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

from models import (InputError, InputTooLongError, InstructionNotSupportedError, PairRequiredError, load_encoder)
from tests.tiny_models import DOCS, QUERIES

LONG = "machine learning models rank documents by relevance " * 20


@pytest.fixture(scope="module")
def encoders(tiny):
    return {name: load_encoder(str(path)) for name, path in tiny.items()}


@pytest.mark.parametrize("variant", ["bert", "modular", "qwen3_tied"])
def test_truncate_off_rejects_the_first_too_long_item_with_its_index(encoders, variant):
    items = [("short query", "short doc"), ("q", "tiny"), ("q", LONG * 3), ("q", LONG * 3)]
    with pytest.raises(InputTooLongError) as err:
        encoders[variant].encode(items, truncate=False)
    assert err.value.index == 2
    assert str(encoders[variant].max_length) in str(err.value)


@pytest.mark.parametrize("variant", ["bert", "xlmr", "qwen3_tied"])
def test_truncate_off_keeps_inputs_that_fit(encoders, variant):
    items = [("what is the capital of france", "paris"), ("", "")]
    on, off = encoders[variant].encode(items), encoders[variant].encode(items, truncate=False)
    assert np.array_equal(on.input_ids, off.input_ids) and np.array_equal(on.offsets, off.offsets)


def test_left_direction_cuts_the_start_of_the_text(encoders, tiny):
    enc = encoders["bert"]
    tok = AutoTokenizer.from_pretrained(str(tiny["bert"]))
    doc_ids = tok(LONG, add_special_tokens=False)["input_ids"]
    right = enc.encode([("q", LONG)], direction="Right").sequence(0).tolist()
    left = enc.encode([("q", LONG)], direction="LEFT").sequence(0).tolist()
    assert len(left) == len(right) == enc.max_length
    keep = enc.max_length - len(tok("q", add_special_tokens=False)["input_ids"]) - 3
    assert right[-keep - 1:-1] == doc_ids[:keep]
    assert left[-keep - 1:-1] == doc_ids[-keep:]


def test_bad_direction_is_an_input_error(encoders):
    with pytest.raises(InputError):
        encoders["bert"].encode([("q", "d")], direction="middle")


@pytest.mark.parametrize("variant", ["modular", "bert", "xlmr", "modernbert_cls", "qwen3_tied"])
def test_empty_strings_are_encoded_as_tokenized(encoders, tiny, variant):
    enc = encoders[variant]
    batch = enc.encode([("", ""), ("q", ""), ("", "d")])
    assert len(batch) == 3 and batch.lengths.min() >= 1
    if variant != "qwen3_tied":  # the pair template of the tokenizer, even around empty texts
        tok = AutoTokenizer.from_pretrained(str(tiny[variant]))
        ref = tok(["", "q", ""], ["", "", "d"])["input_ids"]
        assert [batch.sequence(i).tolist() for i in range(3)] == ref


def test_max_tokens_per_doc_cuts_documents_before_pairing(encoders, tiny):
    enc = encoders["bert"]
    tok = AutoTokenizer.from_pretrained(str(tiny["bert"]))
    cls, sep = tok.cls_token_id, tok.sep_token_id
    q_ids = tok(QUERIES[0], add_special_tokens=False)["input_ids"]
    for doc in DOCS:
        d_ids = tok(doc, add_special_tokens=False)["input_ids"]
        batch = enc.encode([(QUERIES[0], doc)], max_tokens_per_doc=5)
        assert batch.sequence(0).tolist() == [cls, *q_ids, sep, *d_ids[:5], sep]
        assert batch.token_types(0).tolist() == [0] * (len(q_ids) + 2) + [1] * (len(d_ids[:5]) + 1)
        left = enc.encode([(QUERIES[0], doc)], max_tokens_per_doc=5, direction="left")
        assert left.sequence(0).tolist() == [cls, *q_ids, sep, *(d_ids[-5:] if d_ids else []), sep]


def test_max_tokens_per_doc_then_pair_truncation(encoders):
    enc = encoders["bert"]
    long_query = "berlin " * 200
    batch = enc.encode([(long_query, LONG)], max_tokens_per_doc=10)
    assert batch.lengths[0] == enc.max_length


def test_qwen3_max_tokens_per_doc_keeps_the_first_tokens_of_the_document(encoders, tiny):
    enc = encoders["qwen3_tied"]
    tok = AutoTokenizer.from_pretrained(str(tiny["qwen3_tied"]))
    doc = DOCS[3]  # non-ASCII
    first = tok.decode(tok(doc, add_special_tokens=False)["input_ids"][:4])
    cut = enc.encode([("q", doc)], max_tokens_per_doc=4)
    assert cut.sequence(0).tolist() == enc.encode([("q", first)]).sequence(0).tolist()
    assert len(tok("yes no", add_special_tokens=False)["input_ids"]) <= 4  # short documents stay whole
    assert enc.encode([("q", "yes no")], max_tokens_per_doc=4).sequence(0).tolist() == \
        enc.encode([("q", "yes no")]).sequence(0).tolist()


@pytest.mark.parametrize("variant", ["bert", "qwen3_tied"])
@pytest.mark.parametrize("bad", [0, -3])
def test_max_tokens_per_doc_must_be_positive(encoders, variant, bad):
    with pytest.raises(InputError, match="max_tokens_per_doc"):
        encoders[variant].encode([("q", "d")], max_tokens_per_doc=bad)


def test_qwen3_needs_pairs(encoders):
    with pytest.raises(PairRequiredError) as err:
        encoders["qwen3_tied"].encode([("q", "d"), ("single text", None)])
    assert err.value.index == 1
    assert encoders["qwen3_tied"].accepts_single is False


@pytest.mark.parametrize("variant", ["modular", "bert", "xlmr", "modernbert_cls"])
def test_instruction_on_a_model_without_one_is_rejected(encoders, variant):
    assert encoders[variant].accepts_instruction is False and encoders[variant].default_instruction is None
    with pytest.raises(InstructionNotSupportedError):
        encoders[variant].encode([("q", "d")], instruction="rank well")


def test_the_instruction_message_names_exactly_the_families_that_take_one(encoders):
    """INSTRUCTION_FAMILIES (the 422's list) against every family's own encoder flags."""
    import importlib

    from models.encoding import INSTRUCTION_FAMILIES, Encoder, PairEncoder
    from models.families import FAMILIES

    takes = set()
    for name in FAMILIES:
        module = importlib.import_module(f"models.families.{name}")
        own = [c for c in vars(module).values()
               if isinstance(c, type) and issubclass(c, Encoder) and c.__module__ == module.__name__] or [PairEncoder]
        if any(c.accepts_instruction for c in own):
            takes.add(name)
    assert takes == set(INSTRUCTION_FAMILIES)
    with pytest.raises(InstructionNotSupportedError) as err:
        encoders["bert"].encode([("q", "d")], instruction="rank well")
    assert all(label in str(err.value) for label in INSTRUCTION_FAMILIES.values())


def test_qwen3_prefix_and_suffix_that_do_not_fit_are_rejected(tiny, encoders):
    full = encoders["qwen3_tied"]
    fixed = len(full.prefix_ids) + len(full.suffix_ids)
    tight = load_encoder(str(tiny["qwen3_tied"]), max_length=fixed)
    with pytest.raises(InputTooLongError):
        tight.encode([("q", "d")])
    one_more = load_encoder(str(tiny["qwen3_tied"]), max_length=fixed + 1)
    batch = one_more.encode([("q", LONG)])
    seq = batch.sequence(0).tolist()
    assert len(seq) == fixed + 1
    assert seq[:len(full.prefix_ids)] == full.prefix_ids and seq[-len(full.suffix_ids):] == full.suffix_ids


def test_qwen3_instruction_and_default(encoders):
    enc = encoders["qwen3_tied"]
    assert enc.accepts_instruction and enc.default_instruction.startswith("Given a web search query")
    default = enc.encode([("q", "d")]).sequence(0).tolist()
    explicit = enc.encode([("q", "d")], instruction=enc.default_instruction).sequence(0).tolist()
    other = enc.encode([("q", "d")], instruction="Find documents in French").sequence(0).tolist()
    assert default == explicit != other


def test_non_string_inputs_are_input_errors(encoders):
    with pytest.raises(InputError) as err:
        encoders["bert"].encode([("q", "d"), ("q", 3)])
    assert err.value.index == 1
    with pytest.raises(InputError):
        encoders["qwen3_tied"].encode([(None, "d")])


def test_encoder_attributes_and_tokens(encoders, tiny):
    bert = encoders["bert"]
    assert bert.family == "seq_cls" and bert.accepts_single and bert.id2label == {0: "LABEL_0"}
    assert encoders["modular"].family == "modular" and encoders["qwen3_tied"].family == "qwen3"
    batch = bert.encode([("paris", "berlin")])
    assert bert.convert_ids_to_tokens(batch.sequence(0)) == ["[CLS]", "paris", "[SEP]", "berlin", "[SEP]"]
    assert encoders["qwen3_untied"].id2label == {0: "LABEL_0"}


def test_id2label_is_kept(tmp_path):
    from tests.tiny_models import build_bert_seq_cls

    path = build_bert_seq_cls(tmp_path / "labelled", id2label={0: "relevant"})
    assert load_encoder(str(path)).id2label == {0: "relevant"}


def test_encoded_batch_is_compact(encoders):
    batch = encoders["bert"].encode([(q, d) for q in QUERIES for d in DOCS])
    assert batch.input_ids.dtype == np.int32 and batch.offsets.dtype == np.int64
    assert batch.token_type_ids.dtype == np.int8
    assert encoders["modular"].encode([("q", "d")]).token_type_ids is None


def _pairwise(enc, items, **kw):
    """The reference: every item encoded as its own pair (one query each, never shared)."""
    return [enc.encode([item], **kw) for item in items]


@pytest.mark.parametrize("variant", ["modular", "modular_legacy", "bert", "xlmr", "modernbert_cls"])
@pytest.mark.parametrize("direction", ["right", "left"])
@pytest.mark.parametrize("query", [QUERIES[0], QUERIES[3], "", LONG * 2])
def test_one_query_is_tokenized_once_with_the_same_result(encoders, tiny, variant, direction, query, monkeypatch):
    """A rerank request (one query, many documents) takes the query-once path: ids and token types equal the
    tokenizer's own pair encoding, with longest_first truncation either way (long documents, a long query).
    The path is forced for every query length here (min_tokens=0); `encode` takes it for long queries only."""
    from models import encoding
    from models.encoding import shared_query

    monkeypatch.setattr(encoding, "QUERY_ONCE_MIN_TOKENS", 0)
    calls = []
    real = encoding.PairEncoder._encode_one_query
    monkeypatch.setattr(encoding.PairEncoder, "_encode_one_query",
                        lambda self, *a, **k: calls.append(1) or real(self, *a, **k))

    enc = encoders[variant]
    docs = DOCS + [LONG, LONG * 3, "", "é"]
    items = [(query, d) for d in docs]
    assert shared_query(items) and not shared_query(items[:1]) and not shared_query(items + [("other", "d")])
    for truncate in ([True, False] if query != LONG * 2 else [True]):
        kw = dict(direction=direction, truncate=truncate)
        items_ok = items if truncate else \
            [x for x in items if len(enc.encode([x]).sequence(0)) < enc.max_length]  # what fits untruncated
        assert len(items_ok) >= 2
        batch = enc.encode(items_ok, **kw)
        ref = _pairwise(enc, items_ok, **kw)
        assert [batch.sequence(i).tolist() for i in range(len(items_ok))] == [r.sequence(0).tolist() for r in ref]
        assert calls, "the query-once path was not taken"
        types = [batch.token_types(i) for i in range(len(items_ok))]
        assert [None if t is None else t.tolist() for t in types] == \
            [None if r.token_types(0) is None else r.token_types(0).tolist() for r in ref]
    if variant in ("bert", "xlmr"):  # against transformers' tokenizer itself, not only our pair path
        tok = AutoTokenizer.from_pretrained(str(tiny[variant]))
        tok.truncation_side = direction
        want = tok([query] * len(docs), docs, truncation="longest_first", max_length=enc.max_length)["input_ids"]
        batch = enc.encode(items, direction=direction)
        assert [batch.sequence(i).tolist() for i in range(len(docs))] == want


def test_query_once_only_for_long_queries(encoders):
    from models.encoding import QUERY_ONCE_MIN_TOKENS
    enc = encoders["bert"]
    short = [("paris", d) for d in DOCS]
    assert enc._encode_one_query(short, enc._cut["right"]) is None  # a short query: pairs encoded as usual
    long_query = " ".join(["berlin"] * (QUERY_ONCE_MIN_TOKENS + 1))
    assert enc._encode_one_query([(long_query, d) for d in DOCS], enc._cut["right"]) is not None


# --- the tokenizer boundary: text the tokenizer cannot take is bad input (a 422), never a 500 ---------------------

def _word_level_without_unk():
    """A real Rust tokenizer that raises on a word outside its vocabulary (no [UNK] token to fall back on)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def test_the_tokenizer_boundary_turns_any_tokenizer_failure_into_an_input_error():
    from models.encoding import UserTextTokenizer, backend_copy

    tok = backend_copy(_word_level_without_unk(), None)
    assert isinstance(tok, UserTextTokenizer) and tok.encode("a b").ids == [0, 1]
    assert [e.ids for e in tok.encode_batch(["a", "b a"])] == [[0], [1, 0]]
    for call in (lambda: tok.encode("a zz"), lambda: tok.encode_batch(["a", "zz"])):
        with pytest.raises(InputError, match="tokenizer cannot take this text.*Missing \\[UNK\\]") as err:
            call()
        assert err.value.index is None and err.value.__cause__ is not None
    with pytest.raises(InputError, match="tokenizer cannot take"):  # not valid Unicode, caught at the tokenizer too
        tok.encode("a \ud800")
    assert tok.token_to_id("b") == 1  # everything else is the tokenizer's own


def test_the_tokenizer_boundary_takes_rust_panics_and_passes_interrupts():
    from models.encoding import UserTextTokenizer

    class PanicException(BaseException):  # pyo3's panic type derives from BaseException, under this name
        pass

    class Failing:
        def __init__(self, exc):
            self.exc = exc

        def encode(self, *a, **k):
            raise self.exc

        encode_batch = post_process = encode

    with pytest.raises(InputError, match="PanicException"):
        UserTextTokenizer(Failing(PanicException("index out of bounds"))).encode_batch(["x"])
    with pytest.raises(InputError):
        UserTextTokenizer(Failing(RuntimeError("boom"))).post_process(None)
    for exc in (KeyboardInterrupt(), SystemExit(1)):
        with pytest.raises(type(exc)):
            UserTextTokenizer(Failing(exc)).encode("x")
    own = InputError("already bad input", index=3)
    with pytest.raises(InputError) as err:
        UserTextTokenizer(Failing(own)).encode("x")
    assert err.value is own


@pytest.mark.parametrize("variant", ["bert", "qwen3_tied"])
def test_text_that_is_not_valid_unicode_is_refused_naming_its_item_and_part(encoders, variant):
    enc = encoders[variant]
    cases = [([("q", "d"), ("q", "x\ud800y")], 1, None, "the document"),
             ([("q", "d"), ("\udfff", "d")], 1, "query", "the query")]
    for items, index, field, what in cases:
        with pytest.raises(InputError) as err:
            enc.encode(items)
        assert (err.value.index, err.value.field) == (index, field)
        assert str(err.value).startswith(f"{what} is not valid Unicode") and "'\\ud" in str(err.value)
    if enc.accepts_instruction:
        with pytest.raises(InputError) as err:
            enc.encode([("q", "d")], instruction="\ud800")
        assert (err.value.index, err.value.field) == (None, "instruction")
    # Valid non-ASCII text (astral characters included) is untouched.
    assert len(enc.encode([("café 北京", "naïve 😀")])) == 1


@pytest.mark.parametrize("variant", ["bert", "qwen3_tied"])
def test_max_tokens_per_doc_beyond_any_document_cuts_nothing(encoders, variant):
    enc = encoders[variant]
    items = [(QUERIES[0], d) for d in DOCS]
    want = enc.encode(items)
    for huge in (2 ** 62, 2 ** 64, 10 ** 30):
        got = enc.encode(items, max_tokens_per_doc=huge)
        assert [got.sequence(i).tolist() for i in range(len(items))] == \
            [want.sequence(i).tolist() for i in range(len(items))]
