"""End to end over real HTTP and Ray Serve: jina-reranker-v3 (a tiny random checkpoint, `family: auto`) next to
a pairwise model. Concurrent rank requests of different sizes (some over the replica's token budget, some batched
together) each match tests/jina_reference.py to 1e-5, unsigmoided; /predict takes pairs as lists of one."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.jina_reference import JinaReference
from tests.llm_rerankers import build_jina_v3
from tests.tiny_models import DOCS, QUERIES

pytestmark = pytest.mark.slow

TOL = 1e-5
BUDGET = 700  # the longest list below spans several budgets (a forward of its own), short ones batch together


@pytest.fixture(scope="module")
def jina_app(serve_url, tiny, tmp_path_factory):
    from ray import serve

    from tests.serve_helpers import run_app

    path = build_jina_v3(tmp_path_factory.mktemp("jina-e2e") / "jina-reranker-v3", model_max_length=2200)
    run_app({"models": [{"name": "jina", "model_id": str(path), "num_cpus": 0.25, "token_budget": BUDGET,
                         "max_batch_wait_s": 0.05},
                        {"name": "bert", "model_id": str(tiny["bert"]), "num_cpus": 0.25}],
             "api_key": None}, name="listwise", route_prefix="/listwise")
    yield serve_url + "/listwise", JinaReference(path)
    serve.delete("listwise")


def test_concurrent_lists_match_the_reference(jina_app):
    url, ref = jina_app
    requests_ = [(QUERIES[k % 4], (DOCS * 3)[:n]) for k, n in enumerate([2, 18, 1, 7, 12, 3])]
    expected = [ref.rerank(q, docs) for q, docs in requests_]
    tokens = []
    for q, docs in requests_:
        ref.rerank(q, docs)
        tokens.append(sum(ref.prompt_tokens))

    def post(item):
        q, docs = item
        return requests.post(url + "/v1/rerank", json={"model": "jina", "query": q, "documents": docs}, timeout=180)

    with ThreadPoolExecutor(len(requests_)) as pool:
        responses = list(pool.map(post, requests_))
    assert max(tokens) > BUDGET  # one list over the budget
    for r, exp, n in zip(responses, expected, tokens):
        assert r.status_code == 200, r.text
        got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
        assert got == pytest.approx(dict(enumerate(exp.tolist())), abs=TOL)
        assert r.json()["usage"]["total_tokens"] == n


def test_rerank_and_predict(jina_app):
    url, ref = jina_app
    expected = ref.rerank(QUERIES[0], DOCS)
    r = requests.post(url + "/rerank", json={"model": "jina", "query": QUERIES[0], "texts": DOCS, "top_n": 2},
                      timeout=120)
    assert r.status_code == 200, r.text
    top = sorted(range(len(DOCS)), key=lambda i: (-expected[i], i))[:2]
    assert [x["index"] for x in r.json()] == top
    assert [x["score"] for x in r.json()] == pytest.approx([expected[i] for i in top], abs=TOL)
    pairs = [[QUERIES[i % 4], DOCS[i]] for i in range(len(DOCS))]
    r = requests.post(url + "/predict", json={"model": "jina", "inputs": pairs}, timeout=120)
    assert r.status_code == 200, r.text
    assert [x[0]["score"] for x in r.json()] == pytest.approx([ref.rerank(q, [d])[0] for q, d in pairs], abs=TOL)


def test_chunk_is_refused_and_the_pairwise_model_still_sigmoids(jina_app):
    url, _ = jina_app
    r = requests.post(url + "/rerank", json={"model": "jina", "query": "q", "texts": ["d"],
                                             "long_documents": "chunk"}, timeout=60)
    assert r.status_code == 422 and r.json()["error_type"] == "Validation"
    r = requests.post(url + "/rerank", json={"model": "bert", "query": "q", "texts": ["d"]}, timeout=60)
    assert r.status_code == 200 and 0 < r.json()[0]["score"] < 1
    info = {m["name"]: m for m in requests.get(url + "/info", timeout=30).json()["models"]}
    assert info["jina"]["family"] == "jina_v3" and info["jina"]["listwise"] and not info["bert"]["listwise"]
