"""Long documents as windows (docs/API.md) for the causal-LM families: Sentence Transformers
causal CrossEncoders (chat template), mxbai-rerank-v2 and bge-reranker-v2-gemma, against a reference written here.

The reference writes each family's input out from its reference's own texts (the chat templates the tiny models
carry, `mxbai_rerank.MxbaiRerankV2`'s pieces, FlagEmbedding's "A: " / "B: " / prompt), checks that written-out
input against the reference package's own rows, decides "fits" by whether the package cut the pair, builds the
windows from the 1.6 rules with transformers' tokenizer (q = the query's first max_length // 2 tokens, decoded
back; the template's text before the document and after it, each tokenized as one piece, around
d[s:s+W]) and scores each window with transformers' causal LM on those ids: logit(true) − logit(false) /
logit("1") − logit("0") / logit("Yes") at the last token. The expected raw score is the max.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from models import load_scorer
from models.windows import encode_windows
from tests.llm_rerankers import build_bge_gemma, build_mxbai, build_st_causal
from tests.models.test_windows import LONG_QUERY as _LONG_QUERY
from tests.models.test_windows import QUERY, SENTENCES, SHORT_DOC, reference_windows

pytestmark = pytest.mark.filterwarnings("ignore:`max_length` is ignored when `padding`")

TOL = 1e-5
LONG_DOC = " ".join([SENTENCES] * 3)  # several windows with either tokenizer (Gemma's takes the corpus in few)
LONG_QUERY = _LONG_QUERY * 2  # longer than every test max length with either tokenizer
CUSTOM = "Decide whether the passage names the capital city asked about"

# The tiny models' chat templates written out around the query and the document (tests/llm_rerankers.py).
FLAT_BEFORE = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
               "Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n"
               "<Instruct>: {prompt}\n<Query>: {query}\n<Document>: ")
FLAT_AFTER = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n"  # jinja drops the template's last newline
FLAT_DEFAULT = "Given a web search query, retrieve relevant passages that answer the query"
STRUCTURED_BEFORE = ("<|im_start|>system\n{prompt}<|im_end|>\n<|im_start|>query\n{query}<|im_end|>\n"
                     "<|im_start|>document\n")
STRUCTURED_AFTER = "<|im_end|>\n<|im_start|>assistant\nyes: "
STRUCTURED_DEFAULT = "Given a web search query, retrieve relevant passages"  # its saved default prompt
BGE_PROMPT = ("Given a query A and a passage B, determine whether the passage contains an answer to the query by "
              "providing a prediction of either 'Yes' or 'No'.")  # FlagEmbedding's default prompt

# (model, max_length): lengths at which a query cut to max_length // 2 still leaves >= 32 tokens for a window.
MODELS = [("flat", 256), ("structured", 176), ("gemma2", 128), ("mxbai", 256), ("bge", 88)]


@pytest.fixture(scope="module")
def llm_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("windows-llm")
    dirs = {v: build_st_causal(root / v, variant=v, seed=41 + i) for i, v in enumerate(("flat", "structured",
                                                                                          "gemma2"))}
    dirs["mxbai"] = build_mxbai(root / "mxbai-rerank-large-v2", seed=44, extra_positions=400, tied=False)
    dirs["bge"] = build_bge_gemma(root / "bge-reranker-v2-gemma", seed=45)
    return dirs


class Reference:
    """A family's input written out, its windows from the 1.6 rules, each scored by transformers' causal LM."""

    def __init__(self, name: str, path, max_length: int):
        self.name, self.path, self.max_length = name, path, max_length
        self.tok = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        first = lambda text: self.tokens(text)[0]  # noqa: E731
        if name in ("flat", "gemma2"):
            self.score_ids_of = [first("yes"), first("no")]
        elif name == "structured":
            self.score_ids_of = [self.tok.convert_tokens_to_ids("yes")]  # false_token_id null: logit(true) alone
        elif name == "mxbai":
            import mxbai_rerank  # not at module level: the GPU machine's bundle collects this file without it

            self.mx = mxbai_rerank.MxbaiRerankV2
            self.score_ids_of = [first("1"), first("0")]
            self.fixed = sum(len(self.tokens(t)) for t in (self.mx.chat_template["prefix"], self.mx.sep,
                                                           self.mx.task_prompt, self.mx.chat_template["suffix"]))
        else:
            self.score_ids_of = [first("Yes")]
            self.passage_length = max_length - 2 * (len(self.tokens("\n")) + len(self.tokens(BGE_PROMPT)))

    def tokens(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def score_ids(self, ids: list[int]) -> float:
        with torch.inference_mode():
            logits = self.model(torch.tensor([ids])).logits[0, -1].float()
        picked = logits[self.score_ids_of]
        return float(picked[0] - picked[1]) if len(picked) == 2 else float(picked[0])

    def around(self, query: str, instruction: str | None) -> tuple[list[int], list[int]]:
        """The template's tokens before and after the document for this (already kept) query."""
        if self.name in ("flat", "gemma2"):
            return (self.tokens(FLAT_BEFORE.format(prompt=instruction or FLAT_DEFAULT, query=query)),
                    self.tokens(FLAT_AFTER))
        if self.name == "structured":
            prompt = STRUCTURED_DEFAULT if instruction is None else instruction
            return self.tokens(STRUCTURED_BEFORE.format(prompt=prompt, query=query)), self.tokens(STRUCTURED_AFTER)
        if self.name == "mxbai":
            mx = self.mx
            q = mx.query_prompt.format(query=query)
            if instruction:
                q = mx.instruction_prompt.format(instruction=instruction) + mx.sep + q
            before = self.tokens(mx.chat_template["prefix"]) + self.tokens(q) + self.tokens(mx.sep) + \
                self.tokens(mx.doc_prompt.format(document=""))
            after = self.tokens(mx.sep) + self.tokens(mx.task_prompt) + self.tokens(mx.chat_template["suffix"])
            return before, after
        bos = [self.tok.bos_token_id]
        return (bos + self.tokens(f"A: {query}") + self.tokens("\n") + self.tokens("B: "),
                self.tokens("\n") + self.tokens(BGE_PROMPT if instruction is None else instruction))

    def whole(self, query: str, doc: str, instruction: str | None) -> list[int]:
        """The untruncated input as the family's reference builds it (checked against the package's rows)."""
        if self.name in ("flat", "gemma2", "structured"):
            before = (FLAT_BEFORE if self.name != "structured" else STRUCTURED_BEFORE)
            after = FLAT_AFTER if self.name != "structured" else STRUCTURED_AFTER
            default = FLAT_DEFAULT if self.name != "structured" else STRUCTURED_DEFAULT
            prompt = instruction or default if self.name != "structured" else (instruction or default)
            return self.tokens(before.format(prompt=prompt, query=query) + doc + after)
        if self.name == "mxbai":
            before, after = self.around(query, instruction)
            head = before[:len(before) - len(self.tokens(self.mx.doc_prompt.format(document="")))]
            return head + self.tokens(self.mx.doc_prompt.format(document=doc)) + after
        before, after = self.around(query, instruction)
        return before[:len(before) - len(self.tokens("B: "))] + self.tokens(f"B: {doc}") + after

    def package_rows(self, pairs, instruction):
        """The reference package's own (truncating) rows for the pairs."""
        if self.name == "mxbai":
            from tests.models.families.test_mxbai import reference
            return reference(self.path, pairs, instruction=instruction, max_length=self.max_length - self.fixed)[1]
        if self.name == "bge":
            from tests.models.families.test_bge_gemma import reference
            return reference(self.path, pairs, prompt=instruction, max_length=self.passage_length)[1]
        if not hasattr(self, "ce"):
            from sentence_transformers import CrossEncoder
            self.ce = CrossEncoder(str(self.path), device="cpu", max_length=self.max_length)
        features = self.ce.preprocess(pairs, prompt=self.ce._resolve_prompt(instruction, None))
        return [ids[mask.bool()].tolist() for ids, mask in zip(features["input_ids"], features["attention_mask"])]

    def sequences(self, query, doc, overlap, max_chunks, instruction=None) -> list[list[int]]:
        whole = self.whole(query, doc, instruction)
        if self.package_rows([(query, doc)], instruction)[0] == whole:
            return [whole]  # the reference did not cut it: it fits
        q = self.tokens(query)
        if len(q) > self.max_length // 2:
            query = self.tok.decode(q[:self.max_length // 2])
        before, after = self.around(query, instruction)
        width = self.max_length - len(before) - len(after)
        assert width >= 32, "the reference covers chunked pairs only"
        return [before + w + after for w in reference_windows(self.tokens(doc), width, overlap, max_chunks)]

    def raw(self, query, doc, overlap=64, max_chunks=32, instruction=None) -> tuple[float, list[list[int]]]:
        seqs = self.sequences(query, doc, overlap, max_chunks, instruction)
        return max(self.score_ids(ids) for ids in seqs), seqs


@pytest.fixture(scope="module")
def llm(llm_dirs):
    """(scorer, reference) per model at its test max length, loaded once."""
    cache = {}

    def get(name: str, max_length: int):
        if (name, max_length) not in cache:
            scorer = load_scorer(str(llm_dirs[name]), dtype="float32", device="cpu", max_length=max_length)
            assert scorer.encoder.max_length == max_length and scorer.encoder.supports_windows
            cache[name, max_length] = scorer, Reference(name, llm_dirs[name], max_length)
        return cache[name, max_length]

    return get


def check(llm, name, max_length, pairs, *, overlap=64, max_chunks=32, instruction=None, expect_counts=None):
    """The service's windows (token ids and max scores) equal the reference's, to TOL."""
    scorer, ref = llm(name, max_length)
    windowed = encode_windows(scorer.encoder, pairs, chunk_overlap=overlap, max_chunks=max_chunks,
                              instruction=instruction)
    got = windowed.reduce(scorer.score(windowed.batch))
    expected, sequences = zip(*(ref.raw(q, d, overlap, max_chunks, instruction) for q, d in pairs))
    assert windowed.counts.tolist() == [len(s) for s in sequences]
    if expect_counts is not None:
        assert windowed.counts.tolist() == expect_counts
    flat = [ids for seqs in sequences for ids in seqs]
    assert [windowed.batch.sequence(i).tolist() for i in range(len(windowed.batch))] == flat
    assert windowed.num_tokens == sum(map(len, flat))
    assert max(map(len, flat)) <= max_length
    assert np.abs(got - np.array(expected)).max() <= TOL, (got, expected)
    return windowed, got, sequences


@pytest.mark.parametrize("name,max_length", MODELS)
def test_written_out_template_is_the_references_input(llm, name, max_length):
    """The reference's written-out input equals the package's own rows for pairs it does not cut."""
    _, ref = llm(name, max_length)
    pairs = [(QUERY, SHORT_DOC), ("how many people live in berlin", "berlin has about 3.7 million people")]
    for instruction in (None, CUSTOM):
        assert ref.package_rows(pairs, instruction) == [ref.whole(q, d, instruction) for q, d in pairs]


@pytest.mark.parametrize("name,max_length", MODELS)
@pytest.mark.parametrize("overlap", [64, 8])
def test_several_windows_score_their_max(llm, name, max_length, overlap):
    pairs = [(QUERY, LONG_DOC), ("how many people live in berlin", LONG_DOC)]
    windowed, _, sequences = check(llm, name, max_length, pairs, overlap=overlap)
    assert windowed.chunked.all() and all(len(seqs) >= 2 for seqs in sequences)
    # Every full window fills the max length exactly: W counts every other token of the input.
    assert all(len(seqs[0]) == max_length for seqs in sequences)
    _, ref = llm(name, max_length)
    scores = [ref.score_ids(ids) for ids in sequences[0]]
    assert max(scores) - min(scores) > 1e-4, scores  # the max is what decides


@pytest.mark.parametrize("name,max_length", MODELS)
def test_exactly_one_window_when_the_query_is_cut(llm, name, max_length):
    """Over the max length only because of its query: q is cut to max_length // 2 and decoded back, one window.
    (mxbai and bge-gemma cut a long query to their own limit below max_length: still a pair that does not fit.)"""
    scorer, _ = llm(name, max_length)
    windowed, _, _ = check(llm, name, max_length, [(LONG_QUERY, SHORT_DOC)], expect_counts=[1])
    assert windowed.chunked.tolist() == [True]
    assert windowed.batch.sequence(0).tolist() != scorer.encoder.encode([(LONG_QUERY, SHORT_DOC)]).sequence(0).tolist()


@pytest.mark.parametrize("name,max_length", MODELS)
def test_max_chunks_caps_the_windows(llm, name, max_length):
    windowed, _, _ = check(llm, name, max_length, [(QUERY, " ".join([SENTENCES] * 6))], overlap=8, max_chunks=2,
                           expect_counts=[2])
    # the document is longer than two windows: the cap, not its end, stopped them
    scorer, _ = llm(name, max_length)
    assert encode_windows(scorer.encoder, [(QUERY, " ".join([SENTENCES] * 6))], chunk_overlap=8).counts[0] > 2


@pytest.mark.parametrize("name,max_length", MODELS)
def test_a_fitting_pair_scores_as_with_truncation(llm, name, max_length):
    scorer, _ = llm(name, max_length)
    pairs = [(QUERY, SHORT_DOC), (QUERY, "")]
    _, got, _ = check(llm, name, max_length, pairs, expect_counts=[1, 1])
    batch = scorer.encoder.encode(pairs)
    windowed = encode_windows(scorer.encoder, pairs)
    assert not windowed.chunked.any()
    assert np.array_equal(windowed.batch.input_ids, batch.input_ids)
    assert np.abs(scorer.score(batch) - got).max() == 0


@pytest.mark.parametrize("name,max_length", MODELS)
def test_custom_instruction_goes_into_every_window(llm, name, max_length):
    pairs = [(QUERY, LONG_DOC), (QUERY, SHORT_DOC)]
    windowed, _, sequences = check(llm, name, max_length, pairs, instruction=CUSTOM)
    assert windowed.chunked.tolist() == [True, False] and len(sequences[0]) >= 2
    _, ref = llm(name, max_length)
    assert windowed.batch.sequence(0).tolist()[:len(ref.around(QUERY, CUSTOM)[0])] == ref.around(QUERY, CUSTOM)[0]


def test_a_chat_template_that_rewrites_the_document_is_a_clear_input_error(llm_dirs):
    """Where the rendering does not hold the document verbatim there is no place to put a window's tokens: the
    request is refused as bad input (a 422), never scored wrongly or a 500."""
    from models import InputError, load_encoder

    encoder = load_encoder(str(llm_dirs["structured"]), max_length=176)
    encoder.template_kwargs = {**encoder.template_kwargs, "chat_template": (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content[0].text | upper }}<|im_end|>\n{% endfor %}"
        "<|im_start|>assistant\n")}
    assert encoder.encode([(QUERY, LONG_DOC)]).lengths.tolist() == [176]  # truncation still works
    with pytest.raises(InputError, match="cannot locate the document"):
        encode_windows(encoder, [(QUERY, LONG_DOC)])


@pytest.mark.parametrize("name,max_length", MODELS)
def test_the_fit_boundary(llm, name, max_length):
    """A pair of exactly max_length tokens (the reference's own untruncated input) fits and is scored as with
    truncation; the shortest longer one is chunked."""
    scorer, ref = llm(name, max_length)
    exact, k = [], 0  # character prefixes of the document: every length comes up
    while (n := len(ref.whole(QUERY, LONG_DOC[:k], None))) <= max_length:
        exact += [k] if n == max_length else []
        k += 1
    assert exact, "no document of exactly max_length tokens"
    pairs = [(QUERY, LONG_DOC[:exact[-1]]), (QUERY, LONG_DOC[:k])]
    windowed = encode_windows(scorer.encoder, pairs)
    assert windowed.chunked.tolist() == [False, True]
    assert windowed.batch.sequence(0).tolist() == scorer.encoder.encode(pairs[:1]).sequence(0).tolist()
    assert len(windowed.batch.sequence(0)) == max_length


def test_bge_gemma_windows_at_its_tokenizers_limit(tmp_path):
    """No max_length configured: bge-reranker-v2-gemma's max input length is its tokenizer's real limit (128), and
    long documents are windows of it, each scored as FlagEmbedding's reference input at L = 128 - overhead."""
    path = build_bge_gemma(tmp_path / "bge-reranker-v2-gemma", seed=46, model_max_length=128)
    scorer = load_scorer(str(path), dtype="float32", device="cpu")
    assert scorer.encoder.max_length == 128
    ref = Reference("bge", path, 128)
    assert scorer.encoder.passage_length == ref.passage_length
    pairs = [(QUERY, LONG_DOC), ("how many people live in berlin", LONG_DOC), (QUERY, SHORT_DOC)]
    windowed = encode_windows(scorer.encoder, pairs)
    got = windowed.reduce(scorer.score(windowed.batch))
    expected, sequences = zip(*(ref.raw(q, d) for q, d in pairs))
    assert windowed.counts.tolist() == [len(s) for s in sequences] and windowed.counts.tolist()[:2] != [1, 1]
    assert [windowed.batch.sequence(i).tolist() for i in range(len(windowed.batch))] == \
        [ids for seqs in sequences for ids in seqs]
    assert np.abs(got - np.array(expected)).max() <= TOL, (got, expected)
