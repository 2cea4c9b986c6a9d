"""The model deployment's own logic without Ray: token counting, budget splitting, the batch body."""
from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from deployments.model import ModelReplica, Work, batch_tokens, split_by_budget
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


@pytest.mark.parametrize("lengths, budget, pieces", [
    ([5, 5, 5], 100, [[5, 5, 5]]),
    ([5, 5, 5], 10, [[5, 5], [5]]),
    ([4, 7, 3, 3, 9], 10, [[4], [7, 3], [3], [9]]),
    ([30, 2, 2], 10, [[30], [2, 2]]),  # a sequence longer than the budget goes alone
    ([2, 30, 2], 10, [[2], [30], [2]]),
])
def test_split_by_budget_keeps_order_and_respects_the_budget(lengths, budget, pieces):
    batch = batch_of(lengths)
    got = split_by_budget(batch, budget)
    assert [p.lengths.tolist() for p in got] == pieces
    assert np.array_equal(EncodedBatch.concat(got).input_ids, batch.input_ids)


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


class _NoMetric:
    def observe(self, *_):
        pass

    def inc(self, *_):
        pass


def replica(scorer, budget=100) -> ModelReplica:
    """A ModelReplica without its constructor (which loads a real model inside Ray)."""
    r = ModelReplica.__new__(ModelReplica)
    r.settings = ModelSettings(name="m", model_id="org/m")
    r.scorer, r.token_budget, r._forward_lock, r._fatal = scorer, budget, threading.Lock(), None
    r.metrics = type("M", (), {k: _NoMetric() for k in ("pairs", "tokens", "fill", "queue_wait", "latency")})()
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
