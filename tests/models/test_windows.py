"""Long documents as windows (docs/API.md) against a reference written here.

The reference builds each pair's windows from the rules of 1.6 with transformers' tokenizer (its own token ids,
the template written out per family and checked against the tokenizer's pair call) and scores every window with
the reference implementation on those ids: sentence-transformers' CrossEncoder forward for the encoder families,
transformers' Qwen3ForCausalLM logit(yes) − logit(no) for Qwen3-Reranker. The expected raw score is the max.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sentence_transformers import CrossEncoder
from transformers import AutoModelForCausalLM, AutoTokenizer

from models.windows import encode_windows, window_starts
from tests.tiny_models import CORPUS

TOL = 1e-5
SENTENCES = " ".join(dict.fromkeys(CORPUS))  # each corpus sentence once: windows of different content
LONG_DOC = " ".join([SENTENCES] * 2)
SHORT_DOC = "paris is the capital and most populous city of france"
QUERY = "what is the capital of france"
LONG_QUERY = "how many people live in berlin and what is the capital of france " * 10

# (variant, max_length): lengths at which a long query still leaves >= 32 tokens for a window (but for xlmr).
PAIR_VARIANTS = [("modular", 128), ("bert", 128), ("xlmr", 64), ("modernbert_cls", 128)]
QWEN_VARIANTS = [("qwen3_tied", 256), ("qwen3_untied", 256)]
ALL = PAIR_VARIANTS + QWEN_VARIANTS

RECIPE_PREFIX = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and "
                 "the Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n"
                 "<|im_start|>user\n")
RECIPE_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
RECIPE_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


# --- the reference ----------------------------------------------------------------------------------------------

def reference_windows(d: list[int], width: int, overlap: int, max_chunks: int) -> list[list[int]]:
    """1.6 written out: d[s:s+W] for s = 0, stride, ... until a window reaches the end, at most max_chunks."""
    stride = width - min(overlap, width // 2)
    out, s = [], 0
    while True:
        out.append(d[s:s + width])
        if s + width >= len(d) or len(out) == max_chunks:
            return out
        s += stride


class PairReference:
    """A sentence-transformers CrossEncoder and the tokenizer's pair template, written out per family."""

    def __init__(self, path, variant: str, max_length: int):
        self.tok = AutoTokenizer.from_pretrained(str(path))
        self.ce = CrossEncoder(str(path), device="cpu")
        self.variant, self.max_length = variant, max_length
        self.types = variant == "bert"
        # The template must be what the tokenizer's own pair call produces.
        q, d = self.tokens(QUERY), self.tokens(SHORT_DOC)
        assert self.template(q, d)[0] == self.tok(QUERY, SHORT_DOC)["input_ids"]

    def tokens(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def template(self, q: list[int], d: list[int]) -> tuple[list[int], list[int]]:
        cls, sep = self.tok.cls_token_id, self.tok.sep_token_id
        if self.variant == "xlmr":  # <s> q </s></s> d </s>
            return [cls, *q, sep, sep, *d, sep], [0] * (len(q) + len(d) + 4)
        return [cls, *q, sep, *d, sep], [0] * (len(q) + 2) + [1] * (len(d) + 1)  # [CLS] q [SEP] d [SEP]

    @property
    def fixed(self) -> int:
        return 4 if self.variant == "xlmr" else 3

    def score_ids(self, ids: list[int], types: list[int]) -> float:
        features = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
                    "modality": "text"}
        if self.types:
            features["token_type_ids"] = torch.tensor([types])
        with torch.inference_mode():
            return float(self.ce(features)["scores"][0, 0])

    def sequences(self, query: str, doc: str, overlap: int, max_chunks: int) -> list[tuple[list[int], list[int]]]:
        q, d = self.tokens(query), self.tokens(doc)
        if len(q) + len(d) + self.fixed <= self.max_length:
            return [self.template(q, d)]  # fits: as with truncation (nothing cut)
        q = q[:self.max_length // 2]
        width = self.max_length - self.fixed - len(q)
        assert width >= 32, "the reference covers chunked pairs only"
        return [self.template(q, w) for w in reference_windows(d, width, overlap, max_chunks)]

    def raw(self, query, doc, overlap=64, max_chunks=32) -> tuple[float, list]:
        seqs = self.sequences(query, doc, overlap, max_chunks)
        return max(self.score_ids(ids, types) for ids, types in seqs), seqs


class QwenReference:
    """The official recipe's prompt around each window, scored by the full causal LM."""

    def __init__(self, path, max_length: int):
        self.tok = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        self.yes, self.no = self.tok.convert_tokens_to_ids("yes"), self.tok.convert_tokens_to_ids("no")
        self.prefix = self.tok.encode(RECIPE_PREFIX, add_special_tokens=False)
        self.suffix = self.tok.encode(RECIPE_SUFFIX, add_special_tokens=False)
        self.max_length = max_length

    def score_ids(self, ids: list[int]) -> float:
        with torch.inference_mode():
            logits = self.model(torch.tensor([ids])).logits[0, -1]
        return float(logits[self.yes] - logits[self.no])

    def sequences(self, query, doc, overlap, max_chunks, instruction=RECIPE_INSTRUCTION) -> list[list[int]]:
        enc = lambda text: self.tok.encode(text, add_special_tokens=False)  # noqa: E731
        whole = enc(f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}")
        if len(self.prefix) + len(whole) + len(self.suffix) <= self.max_length:
            return [self.prefix + whole + self.suffix]
        q = enc(query)
        if len(q) > self.max_length // 2:
            query = self.tok.decode(q[:self.max_length // 2])
        head = self.prefix + enc(f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: ")
        width = self.max_length - len(head) - len(self.suffix)
        assert width >= 32, "the reference covers chunked pairs only"
        return [head + w + self.suffix for w in reference_windows(enc(doc), width, overlap, max_chunks)]

    def raw(self, query, doc, overlap=64, max_chunks=32, **kw) -> tuple[float, list]:
        seqs = self.sequences(query, doc, overlap, max_chunks, **kw)
        return max(self.score_ids(ids) for ids in seqs), [(ids, None) for ids in seqs]


@pytest.fixture(scope="module")
def references(tiny):
    cache = {}

    def get(variant: str, max_length: int):
        if variant not in cache:
            cache[variant] = (QwenReference(tiny[variant], max_length) if variant.startswith("qwen3")
                              else PairReference(tiny[variant], variant, max_length))
        return cache[variant]

    return get


def check(scorers, references, variant, max_length, pairs, *, overlap=64, max_chunks=32, expect_counts=None):
    """The service's windows (tokens and max scores) equal the reference's, to TOL."""
    scorer = scorers(variant, max_length=max_length)
    ref = references(variant, max_length)
    windowed = encode_windows(scorer.encoder, pairs, chunk_overlap=overlap, max_chunks=max_chunks)
    got = windowed.reduce(scorer.score(windowed.batch))
    expected, sequences = zip(*(ref.raw(q, d, overlap, max_chunks) for q, d in pairs))
    assert windowed.counts.tolist() == [len(s) for s in sequences]
    if expect_counts is not None:
        assert windowed.counts.tolist() == expect_counts
    flat = [seq for seqs in sequences for seq in seqs]
    assert [windowed.batch.sequence(i).tolist() for i in range(len(windowed.batch))] == [ids for ids, _ in flat]
    if windowed.batch.token_type_ids is not None:
        assert [windowed.batch.token_types(i).tolist() for i in range(len(windowed.batch))] == [t for _, t in flat]
    assert windowed.num_tokens == sum(len(ids) for ids, _ in flat)  # every window's tokens count
    assert max(len(ids) for ids, _ in flat) <= max_length
    assert np.abs(got - np.array(expected)).max() <= TOL, (got, expected)
    return got, sequences


# --- the tests ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant,max_length", ALL)
@pytest.mark.parametrize("overlap", [64, 8])
def test_several_windows_score_their_max(scorers, references, variant, max_length, overlap):
    pairs = [(QUERY, LONG_DOC), ("how many people live in berlin", LONG_DOC)]
    _, sequences = check(scorers, references, variant, max_length, pairs, overlap=overlap)
    assert all(len(seqs) >= 2 for seqs in sequences)
    # The windows' scores differ, so taking their max is what decides the result.
    ref = references(variant, max_length)
    scores = [ref.score_ids(*w) if w[1] is not None else ref.score_ids(w[0]) for w in sequences[0]]
    assert max(scores) - min(scores) > 1e-4, scores


@pytest.mark.parametrize("variant,max_length", [v for v in ALL if v[0] != "xlmr"])
def test_exactly_one_window_when_the_query_is_cut(scorers, references, variant, max_length):
    """A pair over the max length only because of its query: q is cut to max_length // 2, one window."""
    check(scorers, references, variant, max_length, [(LONG_QUERY, SHORT_DOC)], expect_counts=[1])


@pytest.mark.parametrize("variant,max_length", ALL)
def test_max_chunks_caps_the_windows(scorers, references, variant, max_length):
    check(scorers, references, variant, max_length, [(QUERY, " ".join([SENTENCES] * 4))], overlap=8,
          max_chunks=2, expect_counts=[2])


@pytest.mark.parametrize("variant,max_length", ALL)
def test_a_fitting_pair_scores_as_with_truncation(scorers, references, variant, max_length):
    scorer = scorers(variant, max_length=max_length)
    pairs = [(QUERY, SHORT_DOC), (QUERY, "")]
    got, _ = check(scorers, references, variant, max_length, pairs, expect_counts=[1, 1])
    batch = scorer.encoder.encode(pairs)
    windowed = encode_windows(scorer.encoder, pairs)
    assert not windowed.chunked.any()
    assert np.array_equal(windowed.batch.input_ids, batch.input_ids)
    assert np.abs(scorer.score(batch) - got).max() == 0


@pytest.mark.parametrize("variant,max_length", [("xlmr", 64), ("bert", 64)])
def test_too_narrow_a_window_scores_as_truncate(scorers, variant, max_length):
    """max_length 64 and a long query: 64 − 32 − specials < 32 tokens for a window, so the pair is truncated —
    in the request's direction, as "truncate" would."""
    scorer = scorers(variant, max_length=max_length)
    pairs = [(LONG_QUERY, SHORT_DOC), (QUERY, LONG_DOC)]
    for side in ("right", "left"):
        windowed = encode_windows(scorer.encoder, pairs, direction=side)
        assert windowed.chunked.tolist() == [False, True]
        truncated = scorer.encoder.encode(pairs[:1], direction=side)
        assert windowed.batch.sequence(0).tolist() == truncated.sequence(0).tolist()
    from models.errors import InputTooLongError
    with pytest.raises(InputTooLongError):
        encode_windows(scorer.encoder, pairs, truncate=False)
    # truncate=false does not apply to a chunked document
    assert encode_windows(scorer.encoder, pairs[1:], truncate=False).chunked.tolist() == [True]


def test_max_tokens_per_doc_applies_before_the_windows(scorers, references):
    scorer = scorers("bert", max_length=128)
    ref = references("bert", 128)
    d = ref.tokens(LONG_DOC)
    windowed = encode_windows(scorer.encoder, [(QUERY, LONG_DOC)], max_tokens_per_doc=150, chunk_overlap=16)
    q = ref.tokens(QUERY)
    width = 128 - 3 - len(q)
    expected = [ref.template(q, w)[0] for w in reference_windows(d[:150], width, 16, 32)]
    assert [windowed.batch.sequence(i).tolist() for i in range(len(windowed.batch))] == expected


def test_qwen3_custom_instruction_goes_into_every_window(scorers, references):
    scorer = scorers("qwen3_tied", max_length=256)
    ref = references("qwen3_tied", 256)
    instruction = "Judge whether the document answers the query about a capital city"
    windowed = encode_windows(scorer.encoder, [(QUERY, LONG_DOC)], instruction=instruction)
    expected, seqs = ref.raw(QUERY, LONG_DOC, instruction=instruction)
    assert [windowed.batch.sequence(i).tolist() for i in range(len(windowed.batch))] == [s for s, _ in seqs]
    assert abs(windowed.reduce(scorer.score(windowed.batch))[0] - expected) <= TOL


def test_single_texts_are_scored_as_usual(scorers):
    scorer = scorers("bert", max_length=64)
    items = [("berlin " * 80, None), (QUERY, LONG_DOC)]
    windowed = encode_windows(scorer.encoder, items)
    assert windowed.chunked.tolist() == [False, True]
    assert windowed.batch.sequence(0).tolist() == scorer.encoder.encode(items[:1]).sequence(0).tolist()


def test_window_starts():
    assert window_starts(10, 4, 1, 32) == [0, 3, 6]  # 6 + 4 reaches the end: the last window
    assert window_starts(9, 4, 1, 32) == [0, 3, 6]
    assert window_starts(4, 4, 2, 32) == [0]
    assert window_starts(100, 10, 0, 3) == [0, 10, 20]


def test_windows_reduce_to_the_max_per_pair():
    from models.encoded import EncodedBatch
    from models.windows import WindowedBatch

    wb = WindowedBatch(EncodedBatch.from_lists([[1]] * 5), np.array([1, 3, 1]), np.array([False, True, False]))
    assert wb.reduce(np.array([0.5, -2.0, 3.0, 1.0, -7.0])).tolist() == [0.5, 3.0, -7.0]


@pytest.mark.parametrize("variant,max_length", [("bert", 128), ("xlmr", 64), ("qwen3_tied", 256)])
def test_the_fit_boundary(scorers, references, variant, max_length):
    """A pair of exactly max_length tokens fits (scored as with truncation); the shortest longer one is chunked.
    Lengths from the reference tokenizer's own untruncated call."""
    scorer = scorers(variant, max_length=max_length)
    ref = references(variant, max_length)

    def length(doc: str) -> int:
        if variant.startswith("qwen3"):
            text = f"<Instruct>: {RECIPE_INSTRUCTION}\n<Query>: {QUERY}\n<Document>: {doc}"
            return len(ref.prefix) + len(ref.tok.encode(text, add_special_tokens=False)) + len(ref.suffix)
        return len(ref.tok(QUERY, doc)["input_ids"])

    exact, k = [], 0  # character prefixes of the document: every length comes up
    while (n := length(LONG_DOC[:k])) <= max_length:
        exact += [k] if n == max_length else []
        k += 1
    over = k
    assert exact, "no document of exactly max_length tokens"
    pairs = [(QUERY, LONG_DOC[:exact[-1]]), (QUERY, LONG_DOC[:over])]
    windowed = encode_windows(scorer.encoder, pairs)
    assert windowed.chunked.tolist() == [False, True]
    assert windowed.batch.sequence(0).tolist() == scorer.encoder.encode(pairs[:1]).sequence(0).tolist()
    assert len(windowed.batch.sequence(0)) == max_length
