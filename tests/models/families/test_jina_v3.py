"""jina-reranker-v3 (listwise): a tiny random checkpoint in the real layout, scored by the family's encoder and
scorer and by tests/jina_reference.py (written from the model's published code) — to 1e-5 in float32, padded and
packed, across blocks, cuts, markers in user text and instructions."""
from __future__ import annotations

import json

import numpy as np
import pytest

from models import InputError, InputTooLongError, ModelLoadError, PairRequiredError, detect_family, load_scorer
from models.encoded import EncodedBatch
from models.families.jina_v3 import BLOCK_SIZE, DOC_MARKER, QUERY_MARKER, plan_blocks, without_markers
from tests.jina_reference import JinaReference
from tests.llm_rerankers import build_jina_v3
from tests.tiny_models import DOCS

TOL = 1e-5
CAPACITY = 2200  # the tiny tokenizer's model_max_length: 152 tokens of documents per block for a 24-token query
QUERY = "what is the capital of france"
# Lengths 11 to ~400 tokens: several blocks of several documents under CAPACITY, an empty one, non-ASCII.
LIST = DOCS + ["the quick brown fox jumps over the lazy dog " * 3, "北京是中国的首都", "yes no maybe"] + DOCS[:3]


@pytest.fixture(scope="module")
def jina_dir(tmp_path_factory):
    return build_jina_v3(tmp_path_factory.mktemp("jina") / "jina-reranker-v3", model_max_length=CAPACITY)


@pytest.fixture(scope="module")
def scorers(jina_dir):
    cache = {}

    def get(execution="padded", **kw):
        key = (execution, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = load_scorer(str(jina_dir), dtype="float32", device="cpu", execution=execution, **kw)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def reference(jina_dir):
    cache = {}

    def get(**kw):
        key = tuple(sorted(kw.items()))
        if key not in cache:
            cache[key] = JinaReference(jina_dir, **kw)
        return cache[key]

    return get


def served(scorer, query, docs, **kw) -> tuple[np.ndarray, EncodedBatch]:
    batch = scorer.encoder.encode([(query, d) for d in docs], one_list=True, **kw)
    return scorer.score(batch), batch


def assert_same_prompts(batch: EncodedBatch, ref: JinaReference) -> None:
    """The block prompts scored are exactly the reference's, token for token."""
    assert len(batch) == len(ref.prompts)
    for i, prompt in enumerate(ref.prompts):
        assert batch.sequence(i).tolist() == ref.tokenizer(prompt)["input_ids"]
    assert batch.num_tokens == sum(ref.prompt_tokens)


def test_detected_by_architecture_and_loaded_without_the_repositorys_code(jina_dir, scorers):
    assert detect_family(jina_dir) == "jina_v3"
    assert (jina_dir / "modeling.py").read_text().startswith("raise")  # importing it would have failed the load
    scorer = scorers()
    assert scorer.family == "jina_v3" and scorer.max_length == CAPACITY
    assert scorer.encoder.listwise and not scorer.encoder.sigmoid_scores
    assert (scorer.encoder.doc_marker_id, scorer.encoder.query_marker_id) == tuple(
        scorer.encoder.tokenizer.convert_tokens_to_ids([DOC_MARKER, QUERY_MARKER]))
    assert scorer.w1.shape == (16, 32) and scorer.w2.shape == (12, 16)


@pytest.mark.parametrize("execution", ["padded", "packed"])
def test_several_blocks_match_the_reference(scorers, reference, execution):
    ref = reference()
    expected = ref.rerank(QUERY, LIST)
    got, batch = served(scorers(execution), QUERY, LIST)
    assert len(batch) >= 3 and batch.outputs.max() >= 2  # several blocks, of several documents
    assert batch.outputs.tolist() == [len(b) for b in plan_blocks(
        [len(ref.tokenizer(d)["input_ids"]) for d in LIST], len(ref.tokenizer(QUERY)["input_ids"]), CAPACITY, 2048)]
    assert_same_prompts(batch, ref)
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)
    assert got.min() >= -1 and got.max() <= 1


def test_a_block_closes_at_125_documents(scorers, reference):
    docs = [f"document {i} about paris" for i in range(BLOCK_SIZE + 6)]
    ref = reference(model_max_length=100_000)
    expected = ref.rerank(QUERY, docs)
    got, batch = served(scorers(max_length=100_000), QUERY, docs)
    assert batch.outputs.tolist() == [BLOCK_SIZE, 6]
    assert_same_prompts(batch, ref)
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


def test_a_document_cut_inside_a_multibyte_character(scorers, reference):
    """2048 tokens end three bytes into a four-byte character: the decoded text ends in U+FFFD, which tokenizes
    differently from the bytes it replaces."""
    long_doc = "paris" + "\U0001D11E" * 600  # 1 + 4 byte-tokens per character
    ref = reference()
    docs = [DOCS[0], long_doc, DOCS[2]]
    expected = ref.rerank(QUERY, docs)
    assert any("\ufffd" in p for p in ref.prompts)
    got, batch = served(scorers(), QUERY, docs)
    assert_same_prompts(batch, ref)
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("execution", ["padded", "packed"])
def test_a_query_over_512_tokens_is_cut_and_decoded(scorers, reference, execution):
    query = "what is the capital of france and " * 80
    ref = reference()
    assert len(ref.tokenizer(query)["input_ids"]) > 512
    expected = ref.rerank(query, DOCS)
    got, batch = served(scorers(execution), query, DOCS)
    assert batch.outputs.tolist() == [1] * len(DOCS)  # 2 x 512 query tokens leave no room: a block per document
    assert_same_prompts(batch, ref)
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


def test_markers_in_user_text_are_removed(scorers, reference):
    query = f"capital {QUERY_MARKER}of france{DOC_MARKER}"
    docs = [f"paris{DOC_MARKER} is the capital", f"{QUERY_MARKER}berlin", DOC_MARKER * 3, DOCS[1]]
    ref = reference()
    expected = ref.rerank(query, docs)
    got, batch = served(scorers(), query, docs)
    assert_same_prompts(batch, ref)
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


def test_text_that_one_pass_turns_into_a_marker_is_cleaned_too():
    """The reference's single pass would leave a marker here (and break its own prompt); the encoder repeats it."""
    nested = f"<|rerank_{DOC_MARKER}token|> and <|embed_{QUERY_MARKER}token|>"
    assert without_markers(nested) == " and "
    assert without_markers("plain text") == "plain text"


def test_nested_markers_leave_one_marker_per_document(scorers):
    nested = f"<|rerank_{DOC_MARKER}token|>"
    batch = scorers().encoder.encode([(nested, nested), (QUERY, nested)], one_list=False)
    assert batch.outputs.tolist() == [1, 1] and np.isfinite(scorers().score(batch)).all()


@pytest.mark.parametrize("instruction", ["rank passages naming a capital city", ""])
def test_an_instruction_goes_after_the_task_line(scorers, reference, instruction):
    ref = reference()
    expected = ref.rerank(QUERY, LIST, instruction=instruction)
    got, batch = served(scorers(), QUERY, LIST, instruction=instruction)
    assert_same_prompts(batch, ref)
    assert ("<instruct>" in ref.prompts[0]) == bool(instruction)
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


def test_max_tokens_per_doc_is_the_references_max_doc_length(scorers, reference):
    ref = reference()
    expected = ref.rerank(QUERY, LIST, max_doc_length=20)
    got, batch = served(scorers(), QUERY, LIST, max_tokens_per_doc=20)
    assert_same_prompts(batch, ref)
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


def test_left_truncation_keeps_the_end(scorers, reference):
    query = "what is the capital of france and " * 80
    ref = reference(truncation_side="left")
    expected = ref.rerank(query, DOCS[:3])
    got, batch = served(scorers(), query, DOCS[:3], direction="Left")
    assert_same_prompts(batch, ref)
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


def test_pairs_are_lists_of_one(scorers, reference):
    """/predict and /tokenize: every pair is its own one-document list, whatever its query."""
    pairs = [(QUERY, DOCS[0]), ("how many people live in berlin", DOCS[1]), (QUERY, DOCS[3])]
    ref = reference()
    expected = [ref.rerank(q, [d])[0] for q, d in pairs]
    batch = scorers().encoder.encode(pairs)
    assert batch.outputs.tolist() == [1, 1, 1] and batch.groups.tolist() == [0, 1, 2]
    np.testing.assert_allclose(scorers().score(batch), expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("execution", ["padded", "packed"])
def test_lists_of_several_requests_in_one_call_and_a_list_over_several_forwards(jina_dir, scorers, reference,
                                                                               execution):
    """Blocks of different lists share forwards (their merges stay apart), and one list's blocks may be spread over
    several forward chunks: the merge waits for all of them."""
    ref = reference()
    first, second = ref.rerank(QUERY, LIST), ref.rerank("berlin population", DOCS)
    scorer = scorers(execution)
    a = scorer.encoder.encode([(QUERY, d) for d in LIST], one_list=True)
    b = scorer.encoder.encode([("berlin population", d) for d in DOCS], one_list=True)
    both = EncodedBatch.concat([a, b])
    np.testing.assert_allclose(scorer.score(both), np.concatenate([first, second]), atol=TOL, rtol=0)
    small = load_scorer(str(jina_dir), dtype="float32", device="cpu", execution=execution, token_budget=600)
    assert len(small.chunks(both.lengths)) >= 3
    np.testing.assert_allclose(small.score(both), np.concatenate([first, second]), atol=TOL, rtol=0)
    shuffled = both.select(np.random.default_rng(0).permutation(len(both)))
    order = both.score_index(np.random.default_rng(0).permutation(len(both)))
    np.testing.assert_allclose(small.score(shuffled), np.concatenate([first, second])[order], atol=TOL, rtol=0)


def test_truncate_false_refuses_what_the_recipe_would_cut(scorers):
    enc = scorers().encoder
    long_doc = "paris" + "\U0001D11E" * 600
    with pytest.raises(InputTooLongError) as err:
        enc.encode([(QUERY, "short"), (QUERY, long_doc)], truncate=False, one_list=True)
    assert err.value.index == 1 and "2048" in str(err.value)
    with pytest.raises(InputTooLongError):
        enc.encode([("capital " * 600, "short")], truncate=False)
    assert len(enc.encode([(QUERY, long_doc)], truncate=False, max_tokens_per_doc=100)) == 1  # cut as asked
    np.testing.assert_array_equal(enc.encode([(QUERY, d) for d in DOCS], truncate=False, one_list=True).input_ids,
                                  enc.encode([(QUERY, d) for d in DOCS], one_list=True).input_ids)


def test_input_errors(scorers):
    enc = scorers().encoder
    with pytest.raises(PairRequiredError):
        enc.encode([("a single text", None)])
    with pytest.raises(InputError, match="one query"):
        enc.encode([("q1", "d"), ("q2", "d")], one_list=True)
    with pytest.raises(InputError, match="max_tokens_per_doc"):
        enc.encode([(QUERY, "d")], max_tokens_per_doc=0)
    with pytest.raises(InputError, match="string"):
        enc.encode([(QUERY, 3)])


def test_pair_batches_are_refused_by_the_scorer(scorers):
    with pytest.raises(ValueError, match="listwise"):
        scorers().score(EncodedBatch.from_lists([[1, 2, 3]]))


def test_warmup_scores_two_lists_of_one(scorers):
    raw = scorers().warmup()
    assert raw.shape == (2,) and np.all(np.abs(raw) <= 1)


def _copy(jina_dir, tmp_path, edit):
    import shutil

    path = tmp_path / "jina-reranker-v3"
    shutil.copytree(jina_dir, path)
    edit(path)
    return path


def _rewrite_projector(path, change):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("change, message", [
    (lambda t: t.pop("projector.2.weight"), "projector"),
    (lambda t: t.update({"projector.0.bias": t["projector.0.weight"][:, 0].clone()}), "no biases"),
    (lambda t: t.update({"projector.2.weight": t["projector.2.weight"][:, :5].clone()}), "chain"),
])
def test_a_checkpoint_without_the_real_projector_fails_to_load(jina_dir, tmp_path, change, message):
    path = _copy(jina_dir, tmp_path, lambda p: _rewrite_projector(p, change))
    with pytest.raises(ModelLoadError, match=message):
        load_scorer(str(path), dtype="float32", device="cpu")


def test_a_backbone_that_is_not_qwen3_fails_to_load(jina_dir, tmp_path):
    def edit(path):
        cfg = json.loads((path / "config.json").read_text())
        cfg["model_type"] = "qwen2"
        (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="Qwen3"):
        load_scorer(str(_copy(jina_dir, tmp_path, edit)), dtype="float32", device="cpu")


def test_packed_default_budget_takes_a_whole_block(jina_dir):
    """On a packed execution the default token budget admits the longest block (capacity + a full block's
    template); padded keeps the device default (a padded chunk pays for its longest row)."""
    packed = load_scorer(str(jina_dir), dtype="float32", device="cpu", execution="packed", max_length=10_000)
    padded = load_scorer(str(jina_dir), dtype="float32", device="cpu", execution="padded", max_length=10_000)
    assert packed.token_budget == packed.max_block_tokens() > 10_000 + 125 * 5
    assert padded.token_budget == 4096
    assert load_scorer(str(jina_dir), dtype="float32", device="cpu", execution="packed",
                       token_budget=1000).token_budget == 1000


def test_no_items_is_an_empty_batch(scorers):
    batch = scorers().encoder.encode([], one_list=True)
    assert len(batch) == 0 and batch.num_scores == 0 and scorers().score(batch).shape == (0,)


@pytest.mark.parametrize("execution", ["padded", "packed"])
def test_a_batch_whose_markers_do_not_match_its_documents_is_refused(scorers, execution):
    good = scorers().encoder.encode([(QUERY, DOCS[0]), (QUERY, DOCS[2])], one_list=True)
    bad = EncodedBatch(good.input_ids, good.offsets, groups=good.groups, outputs=good.outputs + 1)
    with pytest.raises(ValueError, match="markers"):
        scorers(execution).score(bad)
