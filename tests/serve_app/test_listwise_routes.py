"""Every route over a listwise model (jina-reranker-v3, a tiny random checkpoint), in process: the real encoder in
the service, the real scorer behind a stand-in backend, scores compared with tests/jina_reference.py to 1e-5.

A rank request is ONE list (its documents travel together: one piece, never cut), /predict and /tokenize take
each pair as a list of one, scores are cosines returned as they are (no sigmoid, `raw_scores` changes nothing),
and usage counts every block's prompt tokens."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from models import ModelLoadError, load_scorer
from serve_app.routes import create_http_app
from serve_app.service import RerankService
from serve_app.settings import AppSettings, ModelSettings
from tests.jina_reference import JinaReference
from tests.llm_rerankers import build_jina_v3
from tests.tiny_models import DOCS, QUERIES

TOL = 1e-5
QUERY = QUERIES[0]
TEXTS = DOCS + ["the quick brown fox jumps over the lazy dog " * 3, "北京是中国的首都", "yes no maybe"] + DOCS[:3]
BUDGET = 400  # small: a rank request spans several budgets, so the fan-out is asked to cut it


class ScorerBackend:
    """ModelBackend over a scorer loaded in this process; claims `replicas` replicas so the fan-out may cut."""

    def __init__(self, scorer, replicas: int = 4):
        self.scorer, self._replicas, self.calls = scorer, replicas, []

    async def score(self, batch):
        self.calls.append(batch)
        return self.scorer.score(batch)

    async def describe(self):
        return {"family": self.scorer.family, "dtype": "float32", "device": "cpu",
                "token_budget": self.scorer.token_budget, "num_parameters": self.scorer.num_parameters}

    async def ready(self):
        return True, "ok"

    async def replicas(self):
        return self._replicas


@pytest.fixture(scope="module")
def jina_dir(tmp_path_factory):
    return build_jina_v3(tmp_path_factory.mktemp("jina-routes") / "jina-reranker-v3", model_max_length=2200)


@pytest.fixture(scope="module")
def ref(jina_dir):
    return JinaReference(jina_dir)


@pytest.fixture(scope="module")
def app(jina_dir):
    scorer = load_scorer(str(jina_dir), dtype="float32", device="cpu", token_budget=BUDGET)
    settings = AppSettings(models=[{"name": "jina", "model_id": str(jina_dir), "token_budget": BUDGET}],
                           api_key=None, hf_token=None)
    backend = ScorerBackend(scorer)
    service = RerankService(settings, {"jina": scorer.encoder}, {"jina": backend})
    return TestClient(create_http_app(service, request_id=lambda: "req-1")), backend


def ranked(scores) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


@pytest.mark.parametrize("raw_scores", [False, True])
def test_rerank_returns_the_cosines_unchanged_in_one_piece(app, ref, raw_scores):
    client, backend = app
    expected = ref.rerank(QUERY, TEXTS)
    backend.calls.clear()
    r = client.post("/rerank", json={"query": QUERY, "texts": TEXTS, "raw_scores": raw_scores, "return_text": True,
                                     "top_n": 5})
    assert r.status_code == 200, r.text
    got = r.json()
    assert [x["index"] for x in got] == ranked(expected)[:5]
    for x in got:
        assert x["score"] == pytest.approx(float(expected[x["index"]]), abs=TOL)  # no sigmoid either way
        assert x["text"] == TEXTS[x["index"]]
    # the list went as one call although it spans several token budgets of a model with several replicas
    assert len(backend.calls) == 1 and backend.calls[0].num_tokens > 2 * BUDGET and len(backend.calls[0]) >= 3


@pytest.mark.parametrize("route", ["/v1/rerank", "/v2/rerank"])
def test_cohere_routes(app, ref, route):
    client, _ = app
    expected = ref.rerank(QUERY, TEXTS, instruction="prefer passages about capitals")
    documents = [t if i % 2 else {"text": t} for i, t in enumerate(TEXTS)]
    r = client.post(route, json={"query": QUERY, "documents": documents, "top_n": 4, "return_documents": True,
                                 "instruction": "prefer passages about capitals"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [x["index"] for x in body["results"]] == ranked(expected)[:4]
    for x in body["results"]:
        assert x["relevance_score"] == pytest.approx(float(expected[x["index"]]), abs=TOL)
        assert x["document"] == {"text": TEXTS[x["index"]]}
    tokens = sum(ref.prompt_tokens)  # every block's prompt
    assert body["usage"] == {"total_tokens": tokens} and body["meta"]["tokens"] == {"input_tokens": tokens}


def test_max_tokens_per_doc(app, ref):
    client, _ = app
    expected = ref.rerank(QUERY, TEXTS, max_doc_length=16)
    r = client.post("/v2/rerank", json={"query": QUERY, "documents": TEXTS, "max_tokens_per_doc": 16})
    got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
    assert got == pytest.approx(dict(enumerate(expected.tolist())), abs=TOL)
    assert r.json()["usage"]["total_tokens"] == sum(ref.prompt_tokens)


def test_predict_scores_each_pair_as_a_list_of_one(app, ref):
    client, backend = app
    pairs = [[QUERIES[i % 4], DOCS[i % len(DOCS)]] for i in range(12)]
    expected = [ref.rerank(q, [d])[0] for q, d in pairs]
    backend.calls.clear()
    r = client.post("/predict", json={"inputs": pairs})
    assert r.status_code == 200, r.text
    assert [x[0]["score"] for x in r.json()] == pytest.approx(expected, abs=TOL)
    assert all(x[0]["label"] == "LABEL_0" for x in r.json())
    # many one-pair lists over several budgets: cut into pieces, each of whole lists
    assert len(backend.calls) > 1 and sum(len(b) for b in backend.calls) == len(pairs)
    one = client.post("/predict", json={"inputs": pairs[0], "raw_scores": True}).json()
    assert one == [{"score": pytest.approx(expected[0], abs=TOL), "label": "LABEL_0"}]


def test_predict_single_text_is_a_422(app):
    client, _ = app
    r = client.post("/predict", json={"inputs": "just one text"})
    assert r.status_code == 422 and r.json()["error_type"] == "Validation"


def test_tokenize_returns_each_pairs_one_document_prompt(app, ref):
    client, _ = app
    pairs = [[QUERY, DOCS[0]], [QUERIES[1], f"berlin <|embed_token|> {DOCS[1]}"]]
    r = client.post("/tokenize", json={"inputs": pairs, "instruction": "find it"})
    assert r.status_code == 200, r.text
    for (q, d), entry in zip(pairs, r.json()):
        ref.rerank(q, [d], instruction="find it")
        ids = ref.tokenizer(ref.prompts[0])["input_ids"]
        assert entry["ids"] == ids and entry["num_tokens"] == len(ids)
        assert entry["tokens"] == ref.tokenizer.convert_ids_to_tokens(ids)
        assert entry["tokens"].count("<|embed_token|>") == 1 and entry["tokens"].count("<|rerank_token|>") == 1


def test_chunk_is_a_422_per_request(app):
    client, _ = app
    for route, body in [("/rerank", {"query": QUERY, "texts": TEXTS}),
                        ("/v2/rerank", {"query": QUERY, "documents": TEXTS}),
                        ("/predict", {"inputs": [[QUERY, DOCS[0]]]})]:
        r = client.post(route, json={**body, "long_documents": "chunk"})
        assert r.status_code == 422, r.text
        assert "windows" in r.json()["error"] and "truncate" in r.json()["error"]


def test_chunk_as_a_model_setting_fails_the_build(jina_dir):
    from serve_app.builder import check_model_source

    model = ModelSettings(name="jina", model_id=str(jina_dir), long_documents="chunk")
    with pytest.raises(ModelLoadError, match="listwise"):
        check_model_source(model)
    check_model_source(ModelSettings(name="jina", model_id=str(jina_dir)))  # truncate: fine
    scorer_encoder = load_scorer(str(jina_dir), dtype="float32", device="cpu").encoder
    settings = AppSettings(models=[model], api_key=None, hf_token=None)
    with pytest.raises(ValueError, match="chunk"):  # a Hub model: the ingress refuses it when it starts
        RerankService(settings, {"jina": scorer_encoder}, {"jina": ScorerBackend(None)})


def test_info_says_listwise(app):
    client, _ = app
    info = client.get("/info").json()["models"][0]
    assert info["family"] == "jina_v3" and info["listwise"] is True and info["accepts_instruction"] is True
    assert info["max_input_length"] == 2200
