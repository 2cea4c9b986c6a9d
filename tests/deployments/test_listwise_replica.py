"""The model replica's batching and splitting with a listwise model (jina-reranker-v3, tiny, in process, no Ray):
a list never leaves one score call, lists of several requests share a forward and come back apart, and scores
come back per request in item order, equal to the reference."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from deployments.model import ModelReplica, Work
from models import load_scorer
from models.encoded import EncodedBatch
from tests.deployments.test_model_unit import replica, run_batch
from tests.jina_reference import JinaReference
from tests.llm_rerankers import build_jina_v3
from tests.tiny_models import DOCS, QUERIES

TOL = 1e-5
DOCS_LIST = DOCS + DOCS[:4]


@pytest.fixture(scope="module")
def jina(tmp_path_factory):
    path = build_jina_v3(tmp_path_factory.mktemp("jina-replica") / "jina-reranker-v3", model_max_length=2200)
    return load_scorer(str(path), dtype="float32", device="cpu"), JinaReference(path)


class Recording:
    """The real scorer, recording the batches it is given."""

    def __init__(self, scorer):
        self.scorer, self.calls = scorer, []
        self.encoder = scorer.encoder

    def score(self, batch: EncodedBatch) -> np.ndarray:
        self.calls.append(batch)
        return self.scorer.score(batch)

    def warmup(self):
        return self.scorer.warmup()

    def __getattr__(self, name):  # everything else the replica reads (computed_tokens, shared_prefix...)
        return getattr(self.scorer, name)


def test_lists_of_several_requests_share_one_forward_and_come_back_apart(jina):
    scorer, ref = jina
    enc = scorer.encoder
    rank_a = enc.encode([(QUERIES[0], d) for d in DOCS_LIST], one_list=True)
    rank_b = enc.encode([(QUERIES[1], d) for d in DOCS[:3]], one_list=True)
    pairs = enc.encode([(QUERIES[2], DOCS[0]), (QUERIES[3], DOCS[3])])
    assert len(rank_a) >= 2  # a list of several blocks
    r = replica(Recording(scorer), budget=100_000)
    out = run_batch(r, [Work(rank_a, 0.0), Work(rank_b, 0.0), Work(pairs, 0.0)])
    assert len(r.scorer.calls) == 1 and len(r.scorer.calls[0]) == len(rank_a) + len(rank_b) + 2
    np.testing.assert_allclose(out[0], ref.rerank(QUERIES[0], DOCS_LIST), atol=TOL, rtol=0)
    np.testing.assert_allclose(out[1], ref.rerank(QUERIES[1], DOCS[:3]), atol=TOL, rtol=0)
    np.testing.assert_allclose(out[2], [ref.rerank(QUERIES[2], [DOCS[0]])[0], ref.rerank(QUERIES[3], [DOCS[3]])[0]],
                               atol=TOL, rtol=0)


def _with_fake_batcher(r: ModelReplica):
    """Ray's batcher replaced by one forward per queued item, recording the items."""
    queued = []

    async def batched(work):
        queued.append(work.batch)
        return r.scorer.score(work.batch)
    r._score_batched = batched
    from autoscaling import WorkTracker
    r.work = WorkTracker(token_budget=r.token_budget)
    return queued


def test_a_list_over_the_budget_is_scored_whole_in_a_forward_of_its_own(jina):
    scorer, ref = jina
    batch = scorer.encoder.encode([(QUERIES[0], d) for d in DOCS_LIST], one_list=True)
    budget = int(batch.lengths.max())  # every block fits, the list does not
    r = replica(Recording(scorer), budget=budget)
    queued = _with_fake_batcher(r)
    out = asyncio.run(r.score(batch))
    assert queued == [] and len(r.scorer.calls) == 1 and len(r.scorer.calls[0]) == len(batch)
    np.testing.assert_allclose(out, ref.rerank(QUERIES[0], DOCS_LIST), atol=TOL, rtol=0)


def test_many_lists_over_the_budget_are_queued_as_whole_lists(jina):
    scorer, ref = jina
    pairs = [(QUERIES[i % 4], DOCS[i % len(DOCS)]) for i in range(10)]
    batch = scorer.encoder.encode(pairs)
    r = replica(Recording(scorer), budget=int(batch.num_tokens // 3))
    queued = _with_fake_batcher(r)
    out = asyncio.run(r.score(batch))
    assert len(queued) >= 3 and all(b.num_tokens <= r.token_budget for b in queued)
    # every list whole in one queued item: groups never span two items
    seen = [set(b.groups.tolist()) for b in queued]
    assert sum(len(s) for s in seen) == len(pairs)
    np.testing.assert_allclose(out, [ref.rerank(q, [d])[0] for q, d in pairs], atol=TOL, rtol=0)
