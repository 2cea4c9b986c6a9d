"""Shared-prefix scoring (docs/API.md, Shared prefix, models/prefix.py): a request's prompt before the documents computed once.

Every causal family, scored with the marks of `mark_shared_prefixes`, against its own reference (the official
Qwen3 recipe, sentence-transformers' CrossEncoder, mxbai-rerank, FlagEmbedding) and against the same batch scored
pairwise (no marks), to 1e-5 in float32; the batches must really share (marks set, fewer tokens computed) for a
test to pass. Then the cases that must not share a prefix, the chunk planning, the packed path through the
variable-length kernel stand-ins of test_varlen_kernels, the device loop, sliding windows and the "off" setting.
"""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from models import attention, load_scorer
from models.cutting import plan_shared_chunks
from models.encoded import EncodedBatch
from models.prefix import (MODEL_TYPES, SharedPrefixInputs, agreement, best_length, mark_shared_prefixes,
                           shared_inputs, shared_last_hidden, unsupported_reason)
from models.windows import encode_windows
from tests.llm_rerankers import build_bge_gemma, build_mxbai, build_st_causal
from tests.tiny_models import DOCS, QUERIES, build_qwen3_reranker, cached_scorers

pytestmark = pytest.mark.filterwarnings("ignore:`max_length` is ignored when `padding`")

TOL = 1e-5
QWEN_MAX_LENGTH = 140  # DOCS[5] is cut at this length (test_parity uses it too)
INSTRUCTION = "Decide whether the passage names the capital city asked about"
# Documents that meet the template where it ends: nothing, leading whitespace, a newline, punctuation first.
EDGE_DOCS = ["", " leading space", "\nnew line first", ": colon first", "paris"]
FAMILIES = ["qwen3_tied", "qwen3_untied", "flat", "structured", "gemma2", "mxbai", "bge"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared-prefix")
    out = {"qwen3_tied": build_qwen3_reranker(root / "qwen3_tied", tied=True),
           "qwen3_untied": build_qwen3_reranker(root / "qwen3_untied", tied=False, seed=6),
           "mxbai": build_mxbai(root / "mxbai-rerank-large-v2", tied=False),
           "bge": build_bge_gemma(root / "bge-reranker-v2-gemma")}
    for variant in ("flat", "structured", "gemma2"):
        out[variant] = build_st_causal(root / variant, variant=variant)
    return out


@pytest.fixture(scope="module")
def scorer_of(dirs):
    qwen3, others = cached_scorers(dirs, max_length=QWEN_MAX_LENGTH), cached_scorers(dirs)
    return lambda name, **kw: (qwen3 if name.startswith("qwen3") else others)(name, **kw)


def reference(name: str, path, pairs, *, instruction=None, side="right", max_length=None) -> np.ndarray:
    """Each family's own reference implementation (the ones its parity tests use)."""
    if name.startswith("qwen3"):
        from tests.models.test_parity import qwen3_recipe
        return qwen3_recipe(path, pairs, instruction=instruction, max_length=max_length, side=side)[0]
    if name in ("flat", "structured", "gemma2"):
        from tests.models.families.test_st_causal import reference as st_reference
        return st_reference(path, pairs, side=side, prompt=instruction)[0]
    if name == "mxbai":
        from tests.models.families.test_mxbai import reference as mx_reference
        return mx_reference(path, pairs, side=side, instruction=instruction)[0]
    from tests.models.families.test_bge_gemma import reference as bge_reference
    return bge_reference(path, pairs, side=side, prompt=instruction)[0]


def marked(encoder, items, **kw) -> tuple[EncodedBatch, EncodedBatch]:
    """(the pairwise batch, the same batch with its shared-prefix marks)."""
    batch = encoder.encode(items, **kw)
    return batch, mark_shared_prefixes(encoder, batch, [q for q, _ in items], kw.get("instruction"))


def assert_same_tokens(a: EncodedBatch, b: EncodedBatch) -> None:
    """Marks change nothing else: ids, boundaries and token counts are pairwise scoring's."""
    assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.offsets, b.offsets)
    assert a.num_tokens == b.num_tokens


def assert_unmarked_for_a_reason(shared: EncodedBatch) -> None:
    """A sequence left unmarked does not start with any prefix its batch shares (it would be marked otherwise)."""
    group, prefix, first = shared.prefix_groups
    for i in np.flatnonzero(shared.prefix_lengths == 0):
        for length, member in zip(prefix, first):
            head = shared.sequence(member)[:length]
            assert shared.lengths[i] <= length or not np.array_equal(shared.sequence(i)[:length], head), i


def spy_shared(monkeypatch, scorer) -> list[int]:
    """The sizes of the chunks `scorer` runs through its shared-prefix forward."""
    calls, forward = [], scorer._forward_shared
    monkeypatch.setattr(scorer, "_forward_shared", lambda inputs: calls.append(len(inputs)) or forward(inputs))
    return calls


# --- the representation ---------------------------------------------------------------------------------------------

def marked_batch() -> EncodedBatch:
    """Sequences 0-2 share [7, 8, 9] and 3 shares [7, 8] with no one; 4 is unmarked; 5 shares [7, 8, 9] too."""
    rows = [[7, 8, 9, 1], [7, 8, 9, 2, 2], [7, 8, 9, 3], [7, 8, 4], [5, 5], [7, 8, 9, 6, 6, 6]]
    return EncodedBatch.from_lists(rows).with_prefix_lengths(np.array([3, 3, 3, 2, 0, 3]))


def test_groups_are_the_marked_tokens_themselves():
    batch = marked_batch()
    group, prefix, first = batch.prefix_groups
    assert group.tolist() == [0, 0, 0, -1, -1, 0] and prefix.tolist() == [3] and first.tolist() == [0]
    assert batch.num_tokens == 24 and batch.computed_tokens == 24 - 3 * 3  # the prefix once instead of 4 times
    assert batch.own_lengths.tolist() == [1, 2, 1, 3, 2, 3]
    # Same mark length, different tokens: two groups, never one.
    other = EncodedBatch.from_lists([[1, 2, 3], [1, 2, 4], [9, 2, 3], [9, 2, 5]]).with_prefix_lengths(
        np.array([2, 2, 2, 2]))
    assert other.prefix_groups[0].tolist() == [0, 0, 1, 1]


def test_marks_travel_through_select_concat_and_pickle():
    batch = marked_batch()
    piece = batch.select([5, 3, 0])
    assert piece.prefix_lengths.tolist() == [3, 2, 3] and piece.prefix_groups[0].tolist() == [0, -1, 0]
    assert [piece.sequence(i).tolist() for i in range(3)] == [[7, 8, 9, 6, 6, 6], [7, 8, 4], [7, 8, 9, 1]]
    # Requests merged by a replica: the same prefix from two requests is one group; an unmarked batch shares none.
    merged = EncodedBatch.concat([batch.select([0, 1]), EncodedBatch.from_lists([[7, 8, 9, 9]]), batch.select([2])])
    assert merged.prefix_lengths.tolist() == [3, 3, 0, 3] and merged.prefix_groups[0].tolist() == [0, 0, -1, 0]
    assert EncodedBatch.concat([EncodedBatch.from_lists([[1]])] * 2).prefix_lengths is None
    back = pickle.loads(pickle.dumps(batch))
    assert back.prefix_lengths.tolist() == batch.prefix_lengths.tolist() and back.computed_tokens == 15


@pytest.mark.parametrize("marks", [[4, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [-1, 0, 0, 0, 0, 0]])
def test_a_mark_must_leave_the_sequence_a_token_of_its_own(marks):
    with pytest.raises(ValueError, match="prefix lengths"):
        marked_batch().with_prefix_lengths(np.array(marks))


def test_the_prefix_length_that_saves_the_most_tokens_wins():
    assert best_length(np.array([5, 5, 5, 2, 0])) == 5  # 5 × 2 saved, against 2 × 3
    assert best_length(np.array([9, 4, 4, 4, 4])) == 4  # an outlier longer than the rest shares only 4
    assert best_length(np.array([6, 6, 6, 3, 3])) == 6  # 6 × 2 = 3 × 4: of equal savings the longer
    assert best_length(np.array([6, 6, 3, 3])) == 3  # 3 × 3 beats 6 × 1
    assert best_length(np.array([7])) == 0 and best_length(np.array([0, 0])) == 0  # nothing to share
    batch = EncodedBatch.from_lists([[1, 2, 3, 4], [1, 2, 9], [1, 2, 3], [8]])
    # Agreement with the candidate [1, 2, 3, 4, 5], at most each sequence's length - 1.
    assert agreement(batch, np.arange(4), np.array([1, 2, 3, 4, 5], dtype=np.int32)).tolist() == [3, 2, 2, 0]


def test_chunks_count_their_own_parts_and_each_prefix_once():
    lengths = np.array([10, 12, 11, 14, 6, 9, 15])
    group = np.array([0, 0, 0, 1, -1, 1, 0])
    prefix = np.array([8, 6])  # own parts: 2, 4, 3, 8, 6, 3, 7
    for packed in (False, True):
        chunks = plan_shared_chunks(lengths, group, prefix, 16, packed=packed)
        assert sorted(np.concatenate(chunks).tolist()) == list(range(7))
        for index in chunks:
            g = group[index]
            own = lengths[index] - np.where(g >= 0, prefix[np.maximum(g, 0)], 0)
            cost = (own.sum() if packed else len(index) * own.max()) + prefix[np.unique(g[g >= 0])].sum()
            assert cost <= 16 or len(index) == 1
    assert [c.tolist() for c in plan_shared_chunks(lengths, group, prefix, 16, packed=True)] == \
        [[0, 2], [5], [1], [4], [6], [3]]  # by own length; the second group's prefix would overflow the first
    # A budget the whole group fits: one chunk, its prefix once (own 2 + 3 + 4, prefix 8).
    assert [c.tolist() for c in plan_shared_chunks(lengths[:3], group[:3], prefix, 17, packed=True)] == [[0, 2, 1]]


# --- exactness on every family ---------------------------------------------------------------------------------------

CASES = {"default": {}, "instruction": {"instruction": INSTRUCTION}, "left": {"direction": "left"}}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", FAMILIES)
def test_shared_scores_equal_the_reference_and_pairwise_scoring(dirs, scorer_of, monkeypatch, name, case):
    scorer = scorer_of(name)
    assert scorer.supports_shared_prefix, scorer.shared_prefix_unsupported
    kw = CASES[case]
    pairs = [(QUERIES[0], d) for d in DOCS + EDGE_DOCS]
    batch, shared = marked(scorer.encoder, pairs, **kw)
    assert_same_tokens(batch, shared)
    side = kw.get("direction", "right")
    # A pair left whole does not start with the shared prefix: a Left cut took its start away (the chat template
    # families cut the rendering whole), or a tokenizer merge across the boundary (bge-gemma: "machine ...").
    assert_unmarked_for_a_reason(shared)
    if side == "right":
        assert (shared.prefix_lengths > 0).sum() >= len(pairs) - 1, shared.prefix_lengths
    assert shared.computed_tokens < batch.num_tokens
    calls = spy_shared(monkeypatch, scorer)
    raw = scorer.score(shared)
    assert calls  # chunks ran the shared-prefix forward
    pairwise = scorer.score(batch)
    assert np.abs(raw - pairwise).max() <= TOL
    ref = reference(name, dirs[name], pairs, instruction=kw.get("instruction"), side=side,
                    max_length=scorer.max_length)
    assert np.abs(raw - ref).max() <= TOL, np.abs(raw - ref).max()


@pytest.mark.parametrize("name", FAMILIES)
def test_max_tokens_per_doc_and_truncate_false(scorer_of, monkeypatch, name):
    scorer = scorer_of(name)
    pairs = [(QUERIES[1], d) for d in ("paris", DOCS[2], DOCS[4], "berlin")]  # that fit: truncate=false takes them
    for kw in ({"max_tokens_per_doc": 5}, {"truncate": False}):
        batch, shared = marked(scorer.encoder, pairs, **kw)
        assert_same_tokens(batch, shared)
        assert (shared.prefix_lengths > 0).all(), shared.prefix_lengths
        calls = spy_shared(monkeypatch, scorer)
        assert np.abs(scorer.score(shared) - scorer.score(batch)).max() <= TOL
        assert calls


@pytest.mark.parametrize("name", ["qwen3_tied", "structured", "mxbai", "bge"])
def test_each_query_shares_its_own_prefix_and_a_lone_pair_runs_whole(scorer_of, monkeypatch, name):
    """A /predict batch of several queries: grouped by distinct prefix; a query with one pair shares nothing."""
    scorer = scorer_of(name)
    pairs = ([(QUERIES[0], d) for d in DOCS[:3]] + [(QUERIES[1], d) for d in DOCS[2:5]] + [(QUERIES[2], DOCS[0])]
             + [(QUERIES[0], DOCS[3])])
    batch, shared = marked(scorer.encoder, pairs)
    group = shared.prefix_groups[0]
    assert len(set(group[[0, 1, 2, 7]])) == 1 and len(set(group[[3, 4, 5]])) == 1 and group[0] != group[3]
    assert shared.prefix_lengths[6] == 0 and group[6] == -1
    calls = spy_shared(monkeypatch, scorer)
    assert np.abs(scorer.score(shared) - scorer.score(batch)).max() <= TOL and calls


# --- what must not share ------------------------------------------------------------------------------------------

def test_a_tokenizer_merge_across_the_boundary_scores_that_pair_whole(dirs, scorer_of):
    """bge-reranker-v2-gemma tokenizes "B: {passage}" as one piece with a BPE that merges across spaces: for
    "machine ..." the tokens are B, :, ▁m, ... instead of "B:▁" then the passage's. That pair does not start with
    the prefix its request shares; it is scored whole, and its score is still FlagEmbedding's."""
    scorer = scorer_of("bge")
    tok = scorer.encoder.plain_tokenizer()
    merge, clean = DOCS[5], DOCS[0]  # "machine learning models ...", "paris is the capital ..."
    alone = tok.encode("B: ", add_special_tokens=False).ids
    assert tok.encode("B: " + merge, add_special_tokens=False).ids[:len(alone)] != alone  # the merge is real
    assert tok.encode("B: " + clean, add_special_tokens=False).ids[:len(alone)] == alone
    pairs = [(QUERIES[0], d) for d in [DOCS[0], DOCS[1], DOCS[2], DOCS[3], DOCS[0] * 2, DOCS[2] * 2, merge]]
    batch, shared = marked(scorer.encoder, pairs)
    assert (shared.prefix_lengths[:-1] > 0).all() and shared.prefix_lengths[-1] == 0
    shared_prefix = shared.sequence(0)[:shared.prefix_lengths[0]]
    assert not np.array_equal(shared.sequence(6)[:len(shared_prefix)], shared_prefix)
    raw = scorer.score(shared)
    assert np.abs(raw - reference("bge", dirs["bge"], pairs)).max() <= TOL


def test_a_left_truncation_into_the_prompt_scores_that_pair_whole(dirs, scorer_of):
    """Qwen3 with Left truncation: a document too long for the max length loses the START of the content, i.e.
    the instruction and query; that pair keeps only the system prompt in common with the others."""
    scorer = scorer_of("qwen3_tied")
    pairs = [(QUERIES[0], d) for d in (DOCS[0], DOCS[2], DOCS[3], DOCS[4], "paris")] + [(QUERIES[0], DOCS[5])]
    batch, shared = marked(scorer.encoder, pairs, direction="left")
    assert batch.lengths[-1] == QWEN_MAX_LENGTH  # it was cut
    assert (shared.prefix_lengths[:-1] > 0).all() and shared.prefix_lengths[-1] == 0
    prompt = scorer.encoder.document_slot(QUERIES[0], QWEN_MAX_LENGTH).before
    assert batch.sequence(5)[:len(prompt) - 1].tolist() != prompt[:len(prompt) - 1]  # its prompt is not there
    ref = reference("qwen3_tied", dirs["qwen3_tied"], pairs, side="left", max_length=QWEN_MAX_LENGTH)
    assert np.abs(scorer.score(shared) - ref).max() <= TOL


def test_a_template_it_cannot_split_marks_nothing(scorer_of):
    from models.errors import InputError

    encoder = scorer_of("structured").encoder

    class Unsplittable:
        max_length = encoder.max_length

        def document_slot(self, *a, **k):
            raise InputError("cannot locate the document")
    batch = encoder.encode([(QUERIES[0], d) for d in DOCS[:3]])
    assert mark_shared_prefixes(Unsplittable(), batch, [QUERIES[0]] * 3).prefix_lengths is None


# --- long documents: the windows of a document share the prompt too --------------------------------------------------

# Max lengths that leave a window >= 32 tokens (test_windows_llm.py's).
@pytest.mark.parametrize("name,max_length", [("qwen3_tied", 192), ("flat", 256), ("structured", 176),
                                             ("gemma2", 128), ("mxbai", 158), ("bge", 88)])
def test_windows_share_the_prompt(scorer_of, monkeypatch, name, max_length):
    scorer = scorer_of(name, max_length=max_length)
    long_doc = " ".join([DOCS[1]] * 4)
    items = [(QUERIES[0], long_doc), (QUERIES[0], DOCS[0]), (QUERIES[0], DOCS[2])]
    windowed = encode_windows(scorer.encoder, items, chunk_overlap=8, max_chunks=8)
    assert windowed.counts[0] >= 3  # the long document is several windows
    from models.prefix import encode_marked
    shared = encode_marked(scorer.encoder, lambda it, **kw: encode_windows(scorer.encoder, it, **kw), items,
                           chunk_overlap=8, max_chunks=8)
    assert_same_tokens(windowed.batch, shared.batch)
    assert (shared.batch.prefix_lengths > 0).all() and shared.batch.computed_tokens < windowed.num_tokens
    calls = spy_shared(monkeypatch, scorer)
    got, want = shared.reduce(scorer.score(shared.batch)), windowed.reduce(scorer.score(windowed.batch))
    assert np.abs(got - want).max() <= TOL and calls


def test_windows_of_a_long_query_share_their_own_prompt(scorer_of):
    """A query longer than max_length // 2: windows keep its first tokens only, so their prompt is not the one
    of the pairs that fit; it is the second candidate, and the windows still share it."""
    scorer = scorer_of("qwen3_tied", max_length=256)
    query = " ".join([QUERIES[1]] * 25)
    assert len(scorer.encoder.plain_tokens([query])[0]) > 128
    items = [(query, " ".join([DOCS[0]] * 30)), (query, DOCS[2])]
    from models.prefix import encode_marked
    shared = encode_marked(scorer.encoder, lambda it, **kw: encode_windows(scorer.encoder, it, **kw), items,
                           chunk_overlap=8, max_chunks=8)
    windows = int(shared.counts[0])
    assert windows >= 2 and (shared.batch.prefix_lengths[:windows] > 0).all()
    unmarked = shared.batch.with_prefix_lengths(None)
    assert np.abs(scorer.score(shared.batch) - scorer.score(unmarked)).max() <= TOL


# --- the packed path through every kernel API (stand-ins on CPU) ------------------------------------------------------

@pytest.mark.parametrize("which", ["torch-2.10", "torch-2.11", "torch-2.13", "flash-attn-2"])
@pytest.mark.parametrize("name", ["qwen3_tied", "mxbai", "bge"])
def test_packed_shared_prefixes_through_each_kernel_api(dirs, scorer_of, monkeypatch, name, which):
    """Own parts as queries over their prefix's and their own keys: separate query and key lengths per sequence,
    causal bottom-right, through the exact signatures of torch 2.10-2.13's varlen_attn and flash-attn 2."""
    from tests.models import test_varlen_kernels as kernels

    scorer = scorer_of(name, execution="packed")
    assert scorer.execution == "packed" and scorer.supports_shared_prefix
    pairs = [(QUERIES[0], d) for d in DOCS]
    batch, shared = marked(scorer.encoder, pairs)
    backend = kernels.install(monkeypatch, which)
    with attention.force_backend(backend):
        raw = scorer.score(shared)
    assert kernels.CALLS, f"the {which} stand-in was never called"
    ref = reference(name, dirs[name], pairs, max_length=scorer.max_length)
    assert np.abs(raw - ref).max() <= TOL, np.abs(raw - ref).max()
    with attention.force_backend("segments"):
        assert np.abs(raw - scorer.score(batch)).max() <= TOL


def test_packed_inputs_bound_each_sequences_queries_and_keys():
    batch = marked_batch()
    inputs = shared_inputs(batch, np.array([0, 1, 3, 4, 5]), packed=True, pad_id=0)
    # One group ([7, 8, 9]: rows 0, 1, 5); rows 3 and 4 run whole (3's prefix [7, 8] has no partner here).
    assert inputs.prefix_ids.tolist() == [[7, 8, 9]] and inputs.prefix_cu.tolist() == [0, 3]
    assert inputs.own_ids.tolist() == [[1, 2, 2, 7, 8, 4, 5, 5, 6, 6, 6]]
    assert inputs.own_positions.tolist() == [[3, 3, 4, 0, 1, 2, 0, 1, 3, 4, 5]]
    assert inputs.own_cu.tolist() == [0, 1, 3, 6, 8, 11] and inputs.key_cu.tolist() == [0, 4, 9, 12, 14, 20]
    keys = torch.cat([inputs.prefix_ids[0], inputs.own_ids[0]])[inputs.gather]
    assert keys.tolist() == [7, 8, 9, 1, 7, 8, 9, 2, 2, 7, 8, 4, 5, 5, 7, 8, 9, 6, 6, 6]  # each sequence whole
    assert shared_inputs(batch, np.array([3, 4, 0]), packed=True, pad_id=0) is None  # no two share here


def test_the_device_loop_copies_shared_inputs_and_runs_them(scorer_of, monkeypatch):
    """Scorer.score's CUDA loop (models/scoring.py), with the recording transfer of test_pipelined_scoring: the
    shared-prefix chunks are prepared (pinned), uploaded and run like any other."""
    from tests.models.test_pipelined_scoring import RecordingTransfer

    scorer = scorer_of("qwen3_tied", token_budget=256)
    pairs = [(QUERIES[0], d) for d in DOCS * 3]
    _, shared = marked(scorer.encoder, pairs)
    want = scorer.score(shared)
    chunks = scorer.plan(shared)
    assert len(chunks) >= 2
    log, prepared = [], []
    prepare = scorer._prepare
    monkeypatch.setattr(scorer, "_prepare", lambda b, index: prepared.append(prepare(b, index)) or prepared[-1])
    monkeypatch.setattr(scorer, "transfer", RecordingTransfer(log), raising=False)
    got = scorer.score(shared)
    assert np.array_equal(got, want)
    assert all(isinstance(p, SharedPrefixInputs) for p in prepared) and len(prepared) == len(chunks)
    assert [e[0] for e in log].count("to_host") == 1


# --- sliding windows, the setting, models that cannot share ---------------------------------------------------------

def _sliding_qwen3():
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, use_sliding_window=True,
                         sliding_window=5, max_window_layers=1, initializer_range=0.2)
    config._attn_implementation = "sdpa"
    model = Qwen3Model(config).eval()
    assert "sliding_attention" in model.config.layer_types and "full_attention" in model.config.layer_types
    return model


@pytest.mark.parametrize("packed", [False, True])
def test_sliding_window_layers_see_the_same_keys_as_pairwise(packed):
    """A window shorter than the prefix: an own token must not see prefix keys beyond it."""
    from models.causal_lm import last_hidden_padded

    model = _sliding_qwen3()
    rows = [[3, 4, 5, 6, 7, 8, 9, 10] + tail for tail in ([11], [12, 13, 14], [15, 16, 17, 18, 19, 20], [21, 22])]
    batch = EncodedBatch.from_lists(rows).with_prefix_lengths(np.array([8, 8, 8, 8]))
    index = np.arange(4)
    ids = torch.zeros(4, 14, dtype=torch.long)
    mask = torch.zeros(4, 14, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
    with torch.inference_mode():
        want = last_hidden_padded(model, ids, mask)
        if packed:
            attention.register()
            model.set_attn_implementation(attention.PACKED)
        got = shared_last_hidden(model, shared_inputs(batch, index, packed=packed, pad_id=0))
    assert (got - want).abs().max() <= 1e-5


def test_off_ignores_the_marks(dirs, monkeypatch):
    scorer = load_scorer(str(dirs["qwen3_tied"]), dtype="float32", device="cpu", shared_prefix="off")
    pairs = [(QUERIES[0], d) for d in DOCS]
    batch, shared = marked(scorer.encoder, pairs)
    calls = spy_shared(monkeypatch, scorer)
    assert np.array_equal(scorer.score(shared), scorer.score(batch)) and not calls
    assert not scorer.shares_prefixes(shared) and scorer.computed_tokens(shared) == shared.num_tokens
    with pytest.raises(ValueError, match="shared_prefix"):
        load_scorer(str(dirs["qwen3_tied"]), dtype="float32", device="cpu", shared_prefix="on")


def test_what_cannot_share_says_why(scorer_of, tiny):
    assert MODEL_TYPES >= {"qwen3", "qwen2", "gemma", "gemma2"}
    bert = load_scorer(str(tiny["bert"]), dtype="float32", device="cpu")
    assert not bert.supports_shared_prefix and not bert.encoder.shares_prefix  # bidirectional: nothing to share
    scorer = scorer_of("qwen3_tied")
    model = scorer.model
    previous = model.config._attn_implementation
    try:
        model.config._attn_implementation = "flash_attention_2"
        assert "takes no prepared mask" in unsupported_reason(model)
    finally:
        model.config._attn_implementation = previous
    assert unsupported_reason(model) is None


def test_encoders_of_causal_families_mark_and_cross_encoders_do_not(scorer_of, tiny):
    from models import load_encoder

    assert all(scorer_of(name).encoder.shares_prefix for name in FAMILIES)
    for variant in ("modular", "bert", "xlmr"):
        assert not load_encoder(str(tiny[variant])).shares_prefix


def test_the_warm_up_runs_the_shared_prefix_forward_too(scorer_of, monkeypatch):
    """A kernel call only the shared path makes (separate query and key lengths) fails at load, not per request."""
    from models.errors import ModelLoadError

    scorer = scorer_of("qwen3_tied")
    calls = spy_shared(monkeypatch, scorer)
    raw = scorer.warmup()
    assert calls and np.array_equal(raw, scorer.score(scorer.encoder.encode(list(scorer.WARMUP_PAIRS))))

    def broken(inputs):
        raise RuntimeError("varlen kernel refused seqlen_q != seqlen_k")
    monkeypatch.setattr(scorer, "_forward_shared", broken)
    with pytest.raises(ModelLoadError, match="shared-prefix warm-up forward failed.*seqlen_q"):
        scorer.warmup()
