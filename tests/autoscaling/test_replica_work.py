"""The model replica reports the work it holds: requests waiting in its batch queue count, not only the
batch being scored. Runs ModelReplica's real request path and Ray's real `@serve.batch` queue, without a
Ray cluster, around a scorer that blocks until the test lets it go."""
from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
import types

import numpy as np
import pytest
from ray import serve

from autoscaling.policy import TOKEN_BUDGET, WORK_PAIRS, WORK_REQUESTS, WORK_TOKENS
from autoscaling.work import WorkTracker
from deployments.model import ModelReplica, batch_tokens
from models.encoded import EncodedBatch
from serve_app.settings import ModelSettings


@pytest.fixture(autouse=True)
def _outside_a_replica(monkeypatch):
    # The batch queue's only use of the replica context: a warning about max_ongoing_requests.
    from ray.serve.batching import _BatchQueue

    monkeypatch.setattr(_BatchQueue, "_warn_if_max_batch_size_exceeds_max_ongoing_requests", lambda self: None)


class GatedScorer:
    """Raw score = first id of each sequence, once `gate` is set; records the size of each forward."""

    def __init__(self):
        self.gate, self.forwards = threading.Event(), []

    def score(self, batch: EncodedBatch) -> np.ndarray:
        self.forwards.append(batch.num_tokens)
        assert self.gate.wait(10), "the test never released the scorer"
        return np.array([batch.sequence(i)[0] for i in range(len(batch))], dtype=np.float32)

    def computed_tokens(self, batch: EncodedBatch) -> int:  # a model sharing no prefix (models.Scorer)
        return batch.num_tokens


class _NoMetric:
    def observe(self, *_):
        pass

    def inc(self, *_):
        pass


def replica(scorer, budget: int) -> ModelReplica:
    """A ModelReplica as its constructor leaves it, with `scorer` instead of a loaded model."""
    r = ModelReplica.__new__(ModelReplica)
    r.settings = ModelSettings(name="m", model_id="org/m")
    r.scorer, r.token_budget, r._fatal = scorer, budget, None
    r._executor = ThreadPoolExecutor(1)
    r.metrics = type("M", (), {k: _NoMetric() for k in ("pairs", "tokens", "fill", "queue_wait", "latency",
                                                         "batch_sequences")})()
    r.work = WorkTracker(token_budget=budget)
    # Ray keeps ONE batch queue per decorated function, bound to the event loop that first used it: each
    # test gets its own queue (the same batch body and token counting as the class's) for its own loop.
    batched = serve.batch(max_batch_size=budget, batch_wait_timeout_s=0.0, batch_size_fn=batch_tokens)(
        ModelReplica._score_batched.__wrapped__)
    r._score_batched = types.MethodType(batched, r)
    return r


def batch_of(lengths, start_id) -> EncodedBatch:
    return EncodedBatch.from_lists([[start_id + i] * n for i, n in enumerate(lengths)])


async def _held_while_one_request_waits_behind_another():
    scorer = GatedScorer()
    r = replica(scorer, budget=10)
    first = asyncio.ensure_future(r.score(batch_of([4, 4], start_id=10)))  # 8 tokens: a batch of its own
    second = asyncio.ensure_future(r.score(batch_of([6], start_id=20)))  # 6 more would pass the budget
    for _ in range(200):  # until the first batch is in the (blocked) forward pass
        await asyncio.sleep(0.01)
        if scorer.forwards:
            break
    assert scorer.forwards == [8]  # only the first request is being scored...
    held = r.work.held
    assert (held[WORK_TOKENS], held[WORK_PAIRS], held[WORK_REQUESTS]) == (14, 3, 2)  # ...both are held
    stats = r.record_autoscaling_stats()
    assert set(stats) == {WORK_TOKENS, WORK_PAIRS, WORK_REQUESTS, TOKEN_BUDGET} and stats[TOKEN_BUDGET] == 10
    assert all(isinstance(v, float) for v in stats.values())  # what Ray's hook accepts: str -> int | float

    scorer.gate.set()
    assert (await first).tolist() == [10, 11] and (await second).tolist() == [20]
    assert scorer.forwards == [8, 6]
    assert r.work.held == {WORK_TOKENS: 0, WORK_PAIRS: 0, WORK_REQUESTS: 0}


def test_queued_and_running_requests_are_both_held():
    asyncio.run(_held_while_one_request_waits_behind_another())


async def _released_when_the_request_fails():
    class Failing(GatedScorer):
        def score(self, batch):
            raise RuntimeError("boom")

    r = replica(Failing(), budget=10)
    try:
        await r.score(batch_of([3], start_id=1))
    except RuntimeError:
        pass
    else:
        raise AssertionError("the scorer's error was swallowed")
    assert r.work.held == {WORK_TOKENS: 0, WORK_PAIRS: 0, WORK_REQUESTS: 0}


def test_a_failed_request_no_longer_counts():
    asyncio.run(_released_when_the_request_fails())
