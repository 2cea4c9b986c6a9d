"""A big request goes to its model as concurrent length-sorted pieces (models/cutting.py) and comes back whole."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
from fastapi.testclient import TestClient

from models.cutting import plan_pieces, scatter
from serve_app.routes import create_http_app
from serve_app.service import RerankService
from serve_app.settings import AppSettings
from tests.serve_app.fakes import FakeBackend, FakeEncoder, doc_of


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("max_pieces", [2, 3, 8])
def test_pieces_cover_every_sequence_once_sorted_and_balanced(seed, max_pieces):
    lengths = np.random.default_rng(seed).integers(1, 300, size=200)
    pieces = plan_pieces(lengths, piece_tokens=2000, max_pieces=max_pieces)
    assert len(pieces) == min(max_pieces, int(lengths.sum()) // 2000)
    assert sorted(np.concatenate(pieces).tolist()) == list(range(200))
    for a, b in zip(pieces, pieces[1:]):  # length-sorted runs: a piece holds similar lengths
        assert lengths[a].max() <= lengths[b].min()
    tokens = [int(lengths[p].sum()) for p in pieces]
    share = lengths.sum() / len(pieces)
    assert all(abs(t - share) <= lengths.max() for t in tokens), (tokens, share)


def test_small_requests_go_whole():
    lengths = np.array([100, 200, 300])
    assert [p.tolist() for p in plan_pieces(lengths, piece_tokens=400, max_pieces=8)] == [[0, 1, 2]]  # < 2 budgets
    assert len(plan_pieces(lengths, piece_tokens=10, max_pieces=1)) == 1
    assert len(plan_pieces(lengths, piece_tokens=10, max_pieces=8)) == 3  # never more pieces than sequences
    assert [p.tolist() for p in plan_pieces(np.array([5]), piece_tokens=1, max_pieces=8)] == [[0]]


def test_one_huge_sequence_makes_no_empty_piece():
    lengths = np.array([1, 1, 1, 5000, 1])
    pieces = plan_pieces(lengths, piece_tokens=100, max_pieces=8)
    assert all(len(p) for p in pieces) and sorted(np.concatenate(pieces).tolist()) == [0, 1, 2, 3, 4]


def test_scatter_puts_scores_back_in_request_order():
    pieces = [np.array([2, 0]), np.array([1, 3])]
    out = scatter(pieces, [np.array([20.0, 0.0]), np.array([10.0, 30.0])], 4)
    assert out.dtype == np.float32 and out.tolist() == [0.0, 10.0, 20.0, 30.0]
    with pytest.raises(RuntimeError, match="2 inputs"):
        scatter(pieces, [np.array([1.0]), np.array([1.0, 2.0])], 4)


class SlowBackend(FakeBackend):
    """Scores by table after a short wait; counts how many calls were in flight at once."""

    def __init__(self, table, fail_on: str | None = None):
        super().__init__(table)
        self.fail_on, self.in_flight, self.peak, self.cancelled = fail_on, 0, 0, 0

    async def score(self, batch):
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            docs = [doc_of(batch.sequence(i)) for i in range(len(batch))]
            if self.fail_on in docs:
                raise RuntimeError("replica failed")
            await asyncio.sleep(0.05 if self.fail_on is None else 5)
            return await super().score(batch)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.in_flight -= 1


def _client(backend, **model):
    settings = AppSettings(models=[{"name": "m", "model_id": "fake/m", **model}], api_key=None, hf_token=None)
    service = RerankService(settings, {"m": FakeEncoder(max_length=64)}, {"m": backend})
    return TestClient(create_http_app(service), raise_server_exceptions=False)


DOCS = [f"doc{i} " + "w " * (i % 7) for i in range(60)]  # 3-9 tokens each with the query: ~360 tokens


def test_big_request_is_scored_in_concurrent_pieces_and_reassembled():
    table = {d.strip(): float(i) for i, d in enumerate(DOCS)}
    backend = SlowBackend(table)
    r = _client(backend, token_budget=40, max_fanout=4).post(
        "/rerank", json={"query": "q", "texts": DOCS, "raw_scores": True})
    assert r.status_code == 200, r.text
    assert {item["index"]: item["score"] for item in r.json()} == {i: float(i) for i in range(len(DOCS))}
    assert len(backend.calls) == 4 and backend.peak == 4  # all four pieces in flight together
    assert sorted(len(c) for c in backend.calls) != [len(DOCS)]


def test_max_fanout_one_sends_each_request_whole():
    backend = SlowBackend({})
    r = _client(backend, token_budget=40, max_fanout=1).post("/rerank", json={"query": "q", "texts": DOCS})
    assert r.status_code == 200 and len(backend.calls) == 1 and len(backend.calls[0]) == len(DOCS)


def test_a_failing_piece_fails_the_request_and_cancels_the_others():
    backend = SlowBackend({}, fail_on=DOCS[0].strip())
    r = _client(backend, token_budget=40, max_fanout=4).post("/rerank", json={"query": "q", "texts": DOCS})
    assert r.status_code == 500 and r.json()["error_type"] == "Internal", r.text
    assert backend.cancelled == 3 and backend.in_flight == 0  # nothing left running for a failed request


def test_a_request_never_has_more_pieces_than_a_replica_takes_at_once():
    """With max_ongoing_requests 2, a lone request must not queue its own pieces (a queue limit would 429 it)."""
    backend = SlowBackend({})
    r = _client(backend, token_budget=40, max_fanout=8, max_ongoing_requests=2).post(
        "/rerank", json={"query": "q", "texts": DOCS})
    assert r.status_code == 200 and len(backend.calls) == 2


class ReplicaCountingBackend(SlowBackend):
    """A backend that knows how many replicas its model runs (deployments/ingress.py HandleBackend)."""

    def __init__(self, table, count):
        super().__init__(table)
        self.count = count

    async def replicas(self):
        if isinstance(self.count, Exception):
            raise self.count
        return self.count


@pytest.mark.parametrize("count, calls", [(1, 1), (0, 1), (2, 4), (3, 6), (None, 8), (RuntimeError("down"), 8)])
def test_pieces_follow_the_running_replicas(count, calls):
    """One replica gets the request whole (its pieces would be merged back, each costing a handle call);
    several get two pieces each, within max_fanout; an unknown count leaves max_fanout alone."""
    table = {d.strip(): float(i) for i, d in enumerate(DOCS)}
    backend = ReplicaCountingBackend(table, count)
    r = _client(backend, token_budget=40, max_fanout=8).post(
        "/rerank", json={"query": "q", "texts": DOCS, "raw_scores": True})
    assert r.status_code == 200, r.text
    assert {item["index"]: item["score"] for item in r.json()} == {i: float(i) for i in range(len(DOCS))}
    assert len(backend.calls) == calls


def test_a_request_that_cannot_be_cut_never_asks_for_the_replica_count():
    """The count costs a controller round trip (cached, but a lock every request would wait on): only a request
    of two token budgets or more, which could be cut, asks for it."""
    class Counting(ReplicaCountingBackend):
        asked = 0

        async def replicas(self):
            Counting.asked += 1
            return await super().replicas()

    backend = Counting({}, 2)
    client = _client(backend, token_budget=40, max_fanout=8)
    assert client.post("/rerank", json={"query": "q", "texts": DOCS[:1]}).status_code == 200
    assert Counting.asked == 0 and len(backend.calls) == 1
    assert client.post("/rerank", json={"query": "q", "texts": DOCS}).status_code == 200
    assert Counting.asked == 1
