"""Shared prefixes (docs/API.md, Shared prefix) through every route, in process: the real service over real tiny causal-LM scorers,
each model served twice, with shared_prefix "auto" and "off". Every response must be the same (scores to 1e-5,
token counts exactly), and the "auto" model must really have received marked batches (no Ray here: the backend
calls the scorer; tests/deployments covers the replica)."""
from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from models import load_encoder, load_scorer
from serve_app.routes import create_http_app
from serve_app.service import RerankService
from serve_app.settings import AppSettings
from tests.llm_rerankers import build_bge_gemma, build_st_causal
from tests.tiny_models import DOCS, QUERIES, build_qwen3_reranker

pytestmark = pytest.mark.filterwarnings("ignore:`max_length` is ignored when `padding`")

TOL = 1e-5
MAX_LENGTH = {"qwen": 140, "st": None, "bge": None}
TEXTS = DOCS + ["paris", " leading space", "\nnew line first"]


class ScorerBackend:
    """A model deployment in process: scores with a loaded scorer, two replicas (so big requests fan out)."""

    def __init__(self, scorer):
        self.scorer, self.batches = scorer, []

    async def score(self, batch):
        self.batches.append(batch)
        return self.scorer.score(batch)

    async def describe(self):
        s = self.scorer
        return {"family": s.family, "dtype": "float32", "device": "cpu", "token_budget": s.token_budget,
                "shared_prefix": s.prefix_sharing}

    async def ready(self):
        return True, "ok"

    async def replicas(self):
        return 2


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared-routes")
    dirs = {"qwen": build_qwen3_reranker(root / "qwen", tied=True),
            "st": build_st_causal(root / "st", variant="structured"),
            "bge": build_bge_gemma(root / "bge-reranker-v2-gemma")}
    models, encoders, backends = [], {}, {}
    for family, path in dirs.items():
        for setting in ("auto", "off"):
            name = f"{family}-{setting}"
            # A small budget: the longer requests go out as several fan-out pieces and several forward chunks.
            models.append({"name": name, "model_id": str(path), "max_length": MAX_LENGTH[family],
                           "shared_prefix": setting, "token_budget": 384, "max_fanout": 4})
            encoders[name] = load_encoder(str(path), max_length=MAX_LENGTH[family])
            backends[name] = ScorerBackend(load_scorer(str(path), dtype="float32", device="cpu",
                                                       max_length=MAX_LENGTH[family], token_budget=384,
                                                       shared_prefix=setting))
    settings = AppSettings(models=models, api_key=None, hf_token=None)
    service = RerankService(settings, encoders, backends)
    client = TestClient(create_http_app(service, request_id=lambda: "req-1"), raise_server_exceptions=False)
    return client, backends, dirs


LONG = " ".join([DOCS[1]] * 4)
ROUTES = {
    "rerank": ("/rerank", {"query": QUERIES[0], "texts": TEXTS, "raw_scores": True}),
    "rerank-left": ("/rerank", {"query": QUERIES[0], "texts": TEXTS, "raw_scores": True,
                                "truncation_direction": "Left"}),
    "rerank-instruction": ("/rerank", {"query": QUERIES[1], "texts": TEXTS, "raw_scores": True,
                                       "instruction": "find the city", "return_text": True, "top_n": 5}),
    "rerank-no-truncate": ("/rerank", {"query": QUERIES[3], "texts": ["paris", DOCS[2], DOCS[4], "berlin"],
                                       "truncate": False, "raw_scores": True}),
    "predict": ("/predict", {"inputs": [[QUERIES[0], d] for d in DOCS[:4]] + [[QUERIES[1], d] for d in DOCS[2:]]
                             + [[QUERIES[2], DOCS[0]]], "raw_scores": True}),
    "v1": ("/v1/rerank", {"query": QUERIES[0], "documents": TEXTS, "max_tokens_per_doc": 6}),
    "v2": ("/v2/rerank", {"query": QUERIES[1], "documents": [{"text": t} for t in TEXTS],
                          "instruction": "find the city", "return_documents": True}),
    "v2-chunk": ("/v2/rerank", {"query": QUERIES[0], "documents": [LONG, DOCS[0], DOCS[2], LONG[::-1]],
                                "long_documents": "chunk"}),
    "predict-chunk": ("/predict", {"inputs": [[QUERIES[0], LONG], [QUERIES[0], DOCS[0]], [QUERIES[1], LONG]],
                                   "long_documents": "chunk", "raw_scores": True}),
}


def scores_of(route: str, body) -> dict:
    """index -> score of any route's response (a /predict batch: position -> score)."""
    if route == "/predict":
        return {i: row[0]["score"] for i, row in enumerate(body)}
    if route == "/rerank":
        return {x["index"]: x["score"] for x in body}
    return {x["index"]: x["relevance_score"] for x in body["results"]}


def without_scores(route: str, body):
    """The response with its scores taken out: everything else must be identical."""
    if route == "/predict":
        return [[{k: v for k, v in row[0].items() if k != "score"}] for row in body]
    if route == "/rerank":
        return sorted(({k: v for k, v in x.items() if k != "score"} for x in body), key=lambda x: x["index"])
    body = {k: v for k, v in body.items() if k != "model"}  # the model's name differs, of course
    return {**body, "results": sorted(({k: v for k, v in x.items() if k != "relevance_score"} for x in body["results"]),
                                      key=lambda x: x["index"])}


@pytest.mark.parametrize("case", list(ROUTES))
@pytest.mark.parametrize("family", ["qwen", "st", "bge"])
def test_every_route_answers_as_pairwise_scoring_does(served, family, case):
    client, backends, _ = served
    route, body = ROUTES[case]
    got = {}
    for setting in ("auto", "off"):
        backends[f"{family}-{setting}"].batches.clear()
        r = client.post(route, json={**body, "model": f"{family}-{setting}"})
        assert r.status_code == 200, r.text
        got[setting] = r.json()
    shared, pairwise = (scores_of(route, got[s]) for s in ("auto", "off"))
    assert shared.keys() == pairwise.keys()
    assert max(abs(shared[i] - pairwise[i]) for i in shared) <= TOL
    if route != "/rerank" or "top_n" not in body:  # a top_n cut may fall between near-equal scores
        # Same token counts (usage, meta), same texts, same ids: only the scores may differ, in the 6th decimal.
        assert without_scores(route, got["auto"]) == without_scores(route, got["off"])
    sent = backends[f"{family}-auto"].batches
    assert any(b.prefix_lengths is not None and b.computed_tokens < b.num_tokens for b in sent)
    assert all(b.prefix_lengths is None for b in backends[f"{family}-off"].batches)


def test_the_shared_scores_are_the_references(served):
    from tests.models.test_parity import qwen3_recipe

    client, backends, dirs = served
    r = client.post("/rerank", json={"model": "qwen-auto", "query": QUERIES[0], "texts": TEXTS, "raw_scores": True})
    raw = qwen3_recipe(dirs["qwen"], [(QUERIES[0], t) for t in TEXTS], max_length=MAX_LENGTH["qwen"])[0]
    assert max(abs(x["score"] - raw[x["index"]]) for x in r.json()) <= TOL


def test_a_big_request_fans_out_in_pieces_that_keep_their_marks(served):
    client, backends, _ = served
    backend = backends["qwen-auto"]
    backend.batches.clear()
    texts = TEXTS * 4
    r = client.post("/rerank", json={"model": "qwen-auto", "query": QUERIES[0], "texts": texts, "raw_scores": True})
    assert r.status_code == 200 and len(r.json()) == len(texts)
    assert len(backend.batches) > 1  # pieces
    assert all(b.prefix_lengths is not None and len(b.prefix_groups[1]) == 1 for b in backend.batches)


def test_info_shows_the_setting_and_whether_it_is_active(served):
    client, _, _ = served
    models = {m["name"]: m for m in client.get("/info").json()["models"]}
    for family in ("qwen", "st", "bge"):
        assert models[f"{family}-auto"]["shared_prefix"] == "auto"
        assert models[f"{family}-auto"]["shared_prefix_active"] is True
        assert models[f"{family}-off"]["shared_prefix"] == "off"
        assert models[f"{family}-off"]["shared_prefix_active"] is False
