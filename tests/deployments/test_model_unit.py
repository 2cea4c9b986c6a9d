"""The model deployment's own logic without Ray: token counting, budget splitting, the batch body."""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from deployments.model import ModelReplica, Work, batch_tokens, split_by_chunks
from models.encoded import EncodedBatch
from serve_app.settings import ModelSettings


def batch_of(lengths, start_id=0) -> EncodedBatch:
    """Sequence i holds `lengths[i]` copies of the id start_id + i (so tests can tell sequences apart)."""
    return EncodedBatch.from_lists([[start_id + i] * n for i, n in enumerate(lengths)])


def test_batch_tokens_counts_tokens_and_never_raises():
    works = [Work(batch_of([3, 4]), 0.0), Work(batch_of([10]), 0.0)]
    assert batch_tokens(works) == 17
    assert batch_tokens([Work(None, 0.0), "garbage", Work(batch_of([2]), 0.0)]) == 1 + 1 + 2
    assert batch_tokens([]) == 0


def planner(budget: int, execution: str = "padded"):
    """The real chunk planner of models.scoring.Scorer, without a model behind it."""
    from models.scoring import Scorer
    s = Scorer.__new__(Scorer)
    s.token_budget, s.execution = budget, execution
    return s


@pytest.mark.parametrize("execution", ["padded", "packed"])
@pytest.mark.parametrize("lengths, budget", [
    ([5, 5, 5], 10), ([4, 7, 3, 3, 9], 10), ([30, 2, 2], 10), ([2, 30, 2, 9, 1, 8, 2, 7], 12),
])
def test_split_by_chunks_groups_similar_lengths_within_the_budget(lengths, budget, execution):
    batch = batch_of(lengths)
    chunks = planner(budget, execution).chunks(batch.lengths)
    pieces = list(zip(chunks, split_by_chunks(batch, chunks), strict=True))
    seen = np.concatenate([index for index, _ in pieces])
    assert sorted(seen.tolist()) == list(range(len(lengths)))  # every sequence exactly once
    for index, piece in pieces:
        assert piece.lengths.tolist() == [lengths[i] for i in index]
        assert [int(piece.sequence(k)[0]) for k in range(len(piece))] == index.tolist()  # the right sequences
        size = len(piece) * max(piece.lengths) if execution == "padded" else piece.num_tokens
        assert size <= budget or len(piece) == 1  # fits Ray's batcher, or a lone over-long sequence
    # Length-sorted: pieces never interleave lengths, so a piece pads only to sequences like its own.
    maxima = [max(p.lengths) for _, p in pieces]
    minima = [min(p.lengths) for _, p in pieces]
    assert all(hi <= lo for hi, lo in zip(maxima[:-1], minima[1:]))


def test_a_big_request_comes_back_whole_and_in_order():
    class Scorer(FakeScorer):
        chunks = planner(10).chunks
    r = replica(Scorer(), budget=10)

    async def fake_batched(work):  # stands in for Ray's batcher: one forward per piece
        return r.scorer.score(work.batch)
    r._score_batched = fake_batched
    from autoscaling import WorkTracker
    r.work = WorkTracker(token_budget=10)
    lengths = [2, 9, 1, 8, 2, 30, 7, 3]
    out = asyncio.run(r.score(batch_of(lengths, start_id=100)))
    assert out.tolist() == [100 + i for i in range(len(lengths))]
    assert len(r.scorer.calls) > 1


class FakeScorer:
    """Raw score = the first id of each sequence; `poison` ids make the whole call fail."""

    def __init__(self, poison=()):
        self.poison, self.calls = set(poison), []

    def score(self, batch: EncodedBatch) -> np.ndarray:
        self.calls.append(len(batch))
        firsts = [int(batch.sequence(i)[0]) for i in range(len(batch))]
        if self.poison & set(firsts):
            raise RuntimeError("kernel failed on this input")
        return np.array(firsts, dtype=np.float32)

    def warmup(self) -> np.ndarray:  # as models.scoring.Scorer.warmup: a tiny batch of its own
        return self.score(batch_of([2, 3], start_id=1000))

    def computed_tokens(self, batch: EncodedBatch) -> int:  # as Scorer.computed_tokens for a model sharing nothing
        return batch.num_tokens

    def plan(self, batch: EncodedBatch) -> list[np.ndarray]:  # as Scorer.plan: its chunks
        return self.chunks(batch.lengths)


class _NoMetric:
    def __init__(self):
        self.seen = []

    def observe(self, value, *_):
        self.seen.append(value)

    def inc(self, *_):
        pass


def replica(scorer, budget=100) -> ModelReplica:
    """A ModelReplica without its constructor (which loads a real model inside Ray)."""
    r = ModelReplica.__new__(ModelReplica)
    r.settings = ModelSettings(name="m", model_id="org/m")
    r.scorer, r.token_budget, r._fatal = scorer, budget, None
    r._executor = ThreadPoolExecutor(1)
    r.metrics = type("M", (), {k: _NoMetric() for k in ("pairs", "tokens", "fill", "queue_wait", "latency",
                                                         "batch_sequences")})()
    return r


def run_batch(r: ModelReplica, works):
    return asyncio.run(ModelReplica._score_batched.__wrapped__(r, works))


def test_batch_body_runs_one_forward_and_splits_scores_back_per_request():
    r = replica(FakeScorer())
    works = [Work(batch_of([2, 3], start_id=10), 0.0), Work(batch_of([1], start_id=20), 0.0),
             Work(batch_of([4, 1, 1], start_id=30), 0.0)]
    out = run_batch(r, works)
    assert r.scorer.calls == [6]
    assert [o.tolist() for o in out] == [[10, 11], [20], [30, 31, 32]]
    assert r.metrics.batch_sequences.seen == [6]  # the batch size metric: sequences of the one forward


def test_a_failing_request_fails_alone():
    r = replica(FakeScorer(poison={20}))
    works = [Work(batch_of([2], start_id=10), 0.0), Work(batch_of([1], start_id=20), 0.0),
             Work(batch_of([3], start_id=30), 0.0)]
    out = run_batch(r, works)
    assert out[0].tolist() == [10] and out[2].tolist() == [30]
    assert isinstance(out[1], RuntimeError)


def test_device_errors_make_the_replica_unhealthy():
    class Broken(FakeScorer):
        def score(self, batch):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
    r = replica(Broken())
    r.check_health()
    out = run_batch(r, [Work(batch_of([1]), 0.0)])
    assert isinstance(out[0], RuntimeError)
    with pytest.raises(RuntimeError, match="fatal device error"):
        r.check_health()


def test_scorer_returning_wrong_count_is_an_error():
    class Short(FakeScorer):
        def score(self, batch):
            return super().score(batch)[:-1]
    out = run_batch(replica(Short()), [Work(batch_of([1, 1]), 0.0)])
    assert isinstance(out[0], RuntimeError)


# --- fail fast: the warm-up at load, the probe after an unexplained failure -------------------------------------

def unrunnable_copy(model_dir, dest):
    """A copy of a tiny BERT that loads (config and weights agree) but cannot run: its vocabulary was cut to 5
    rows, so the tokenizer's ids index past the embedding table in every forward."""
    import json
    import shutil
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    dest = Path(shutil.copytree(model_dir, dest))
    weights = load_file(dest / "model.safetensors")
    name = next(n for n in weights if n.endswith("word_embeddings.weight"))
    weights[name] = weights[name][:5].clone()
    save_file(weights, dest / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dest / "config.json").read_text())
    config["vocab_size"] = 5
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def test_the_constructor_warms_up_and_a_model_that_cannot_run_fails_with_its_name_and_cause(tmp_path):
    from models.errors import ModelLoadError
    from tests.tiny_models import build_bert_seq_cls

    good = build_bert_seq_cls(tmp_path / "bert")
    r = ModelReplica(ModelSettings(name="good", model_id=str(good), num_cpus=1))
    r.check_health()
    bad = unrunnable_copy(good, tmp_path / "bad-bert")
    with pytest.raises(ModelLoadError) as e:
        ModelReplica(ModelSettings(name="bad", model_id=str(bad), num_cpus=1))
    assert str(bad) in str(e.value) and "warm-up forward failed" in str(e.value)
    assert "IndexError" in str(e.value) and "float32 on cpu" in str(e.value)


def test_a_replica_that_cannot_score_anything_reports_unhealthy():
    """A GPU failure seen on a real device: every forward raised TypeError, and the replica stayed healthy for ever."""
    class Broken(FakeScorer):
        def score(self, batch):
            self.calls.append(len(batch))
            raise TypeError("varlen_attn() got an unexpected keyword argument 'enable_gqa'")
    r = replica(Broken())
    out = run_batch(r, [Work(batch_of([1, 2]), 0.0)])
    assert isinstance(out[0], TypeError)
    assert r.scorer.calls == [2, 2]  # the request, then the warm-up probe
    with pytest.raises(RuntimeError, match="cannot score the warm-up batch any more.*enable_gqa"):
        r.check_health()


def test_a_failure_of_one_request_keeps_the_replica_healthy():
    r = replica(FakeScorer(poison={20}))
    out = run_batch(r, [Work(batch_of([1], start_id=20), 0.0)])
    assert isinstance(out[0], RuntimeError)
    assert r.scorer.calls == [1, 2]  # the request, then the probe, which passed
    r.check_health()
    assert run_batch(r, [Work(batch_of([1], start_id=30), 0.0)])[0].tolist() == [30]


def test_bad_input_runs_no_probe():
    from models.errors import InputError

    class Picky(FakeScorer):
        def score(self, batch):
            self.calls.append(len(batch))
            raise InputError("text too long")
    r = replica(Picky())
    assert isinstance(run_batch(r, [Work(batch_of([1]), 0.0)])[0], InputError)
    assert r.scorer.calls == [1]
    r.check_health()


# --- GPU faults stay local: out of memory fails the batch that caused it, never the replica ---------------------

def test_out_of_memory_on_one_request_fails_it_alone_and_keeps_the_replica_healthy():
    """What the scorer raises when one sequence does not fit even alone (models/scoring.py): the requests batched
    with it are scored again without it, the warm-up probe passes, and the replica stays in service."""
    from models.errors import DeviceMemoryError

    class Tight(FakeScorer):
        def score(self, batch):
            self.calls.append(len(batch))
            if 20 in [int(batch.sequence(i)[0]) for i in range(len(batch))]:
                raise DeviceMemoryError("model 'm' ran out of device memory scoring one sequence of 9000 tokens")
            return np.array([int(batch.sequence(i)[0]) for i in range(len(batch))], dtype=np.float32)
    r = replica(Tight())
    out = run_batch(r, [Work(batch_of([2], start_id=10), 0.0), Work(batch_of([1], start_id=20), 0.0),
                        Work(batch_of([3], start_id=30), 0.0)])
    assert out[0].tolist() == [10] and out[2].tolist() == [30] and isinstance(out[1], DeviceMemoryError)
    r.check_health()  # not a fatal device error
    # the merged batch, the warm-up probe (passed), then each request alone (the failing one probed again)
    assert r.scorer.calls == [3, 2, 1, 1, 2, 1]


@pytest.mark.parametrize("error", [
    lambda: __import__("torch").OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    lambda: RuntimeError("CUDA error: out of memory"),
    lambda: RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
])
def test_out_of_memory_is_not_a_fatal_device_error(error):
    class OnceShort(FakeScorer):
        def score(self, batch):
            self.calls.append(len(batch))
            if len(self.calls) == 1:
                raise error()
            return super().score(batch)
    r = replica(OnceShort())
    assert isinstance(run_batch(r, [Work(batch_of([1]), 0.0)])[0], RuntimeError)
    r.check_health()
    assert run_batch(r, [Work(batch_of([1], start_id=7), 0.0)])[0].tolist() == [7]


def test_a_device_that_cannot_run_the_warm_up_any_more_makes_the_replica_unhealthy():
    import torch

    class Full(FakeScorer):
        def score(self, batch):
            self.calls.append(len(batch))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")
    r = replica(Full())
    assert isinstance(run_batch(r, [Work(batch_of([1]), 0.0)])[0], torch.OutOfMemoryError)
    with pytest.raises(RuntimeError, match="cannot score the warm-up batch any more"):
        r.check_health()


# --- shared prefixes (docs/API.md, Shared prefix): the budget counts the tokens computed, marks survive every cut ----------------

def test_batch_tokens_counts_what_the_forward_computes():
    works = [Work(batch_of([30, 30]), 0.0, tokens=35), Work(batch_of([10]), 0.0)]
    assert batch_tokens(works) == 35 + 10  # a shared prefix once; 0 (unknown) falls back to the token count


@pytest.fixture(scope="module")
def qwen_scorer(tiny):
    from models import load_scorer

    return load_scorer(str(tiny["qwen"]), dtype="float32", device="cpu", token_budget=300)


def marked_request(scorer, query, docs):
    from models.prefix import mark_shared_prefixes

    return mark_shared_prefixes(scorer.encoder, scorer.encoder.encode([(query, d) for d in docs]), [query] * len(docs))


def test_a_big_marked_request_is_queued_as_chunks_that_keep_their_marks(qwen_scorer):
    from tests.tiny_models import DOCS, QUERIES

    r = replica(qwen_scorer, budget=300)
    seen = []

    async def fake_batched(work):  # stands in for Ray's batcher: one forward per queued chunk
        seen.append(work)
        return r.scorer.score(work.batch)
    r._score_batched = fake_batched
    from autoscaling import WorkTracker
    r.work = WorkTracker(token_budget=300)
    batch = marked_request(qwen_scorer, QUERIES[0], DOCS * 2)
    assert batch.num_tokens > batch.computed_tokens > 300
    out = asyncio.run(r.score(batch))
    assert np.abs(out - qwen_scorer.score(batch.with_prefix_lengths(None))).max() <= 1e-5
    assert len(seen) > 1 and all(w.batch.prefix_lengths is not None for w in seen)
    # Each chunk was queued with the tokens its forward computes (its prefix once), within the budget.
    assert all(w.tokens == w.batch.computed_tokens <= 300 for w in seen)
    assert any(w.tokens < w.batch.num_tokens for w in seen)


def test_requests_merged_in_one_batch_share_their_common_prefix(qwen_scorer):
    from tests.tiny_models import DOCS, QUERIES

    r = replica(qwen_scorer, budget=4096)
    first, second = (marked_request(qwen_scorer, QUERIES[0], docs) for docs in (DOCS[:3], DOCS[3:]))
    other = marked_request(qwen_scorer, QUERIES[1], DOCS[:2])
    forwards = []
    score = qwen_scorer.score
    r.scorer = type("Spy", (), {"score": lambda self, b: forwards.append(b) or score(b),
                                "computed_tokens": qwen_scorer.computed_tokens})()
    out = run_batch(r, [Work(first, 0.0), Work(second, 0.0), Work(other, 0.0)])
    merged = forwards[0]
    assert len(forwards) == 1 and len(merged.prefix_groups[1]) == 2  # two distinct prompts, one group each
    assert merged.computed_tokens == first.num_tokens + second.num_tokens + other.num_tokens \
        - (len(DOCS) - 1) * first.prefix_lengths[0] - (2 - 1) * other.prefix_lengths[0]
    for got, batch in zip(out, (first, second, other)):
        assert np.abs(got - score(batch.with_prefix_lengths(None))).max() <= 1e-5
