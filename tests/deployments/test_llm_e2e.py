"""End to end over real HTTP: the causal-LM families (a Sentence Transformers causal CrossEncoder, mxbai-rerank-v2,
bge-reranker-v2-gemma) served in one application next to a modular cross-encoder, each detected with
`family: auto`, scored to its own reference (run here), instructions reaching the models that take one and a 422
for the one that does not."""
from __future__ import annotations

import numpy as np
import pytest
import requests

from tests.llm_rerankers import build_bge_gemma, build_mxbai, build_st_causal
from tests.tiny_models import DOCS, QUERIES

pytestmark = pytest.mark.slow

TOL = 1e-5
FAMILY_OF = {"st": "st_causal", "mxbai": "mxbai", "gemma": "bge_gemma", "modular": "modular"}


@pytest.fixture(scope="module")
def llm_app(serve_url, tiny, tmp_path_factory):
    from ray import serve

    from tests.serve_helpers import run_app

    root = tmp_path_factory.mktemp("llm-e2e")
    dirs = {"st": build_st_causal(root / "st", variant="structured"),
            "mxbai": build_mxbai(root / "mxbai-rerank-base-v2"),
            "gemma": build_bge_gemma(root / "bge-reranker-v2-gemma"),
            "modular": tiny["modular"]}
    run_app({"models": [{"name": n, "model_id": str(p), "num_cpus": 0.25} for n, p in dirs.items()],
             "api_key": None}, name="llm", route_prefix="/llm")
    yield serve_url + "/llm", dirs
    serve.delete("llm")


def reference(name: str, path, pairs, instruction=None) -> np.ndarray:
    if name == "st":
        from tests.models.families.test_st_causal import reference as st_ref
        return st_ref(path, pairs, prompt=instruction)[0]
    if name == "mxbai":
        from tests.models.families.test_mxbai import reference as mx_ref
        return mx_ref(path, pairs, instruction=instruction, max_length=8192)[0]
    from tests.models.families.test_bge_gemma import reference as bge_ref
    return bge_ref(path, pairs, prompt=instruction)[0]


@pytest.mark.parametrize("name", ["st", "mxbai", "gemma"])
@pytest.mark.parametrize("instruction", [None, "find the capital city"])
def test_llm_families_match_their_references(llm_app, name, instruction):
    url, dirs = llm_app
    query = QUERIES[0]
    body = {"query": query, "texts": DOCS, "model": name, "raw_scores": True}
    if instruction is not None:
        body["instruction"] = instruction
    r = requests.post(url + "/rerank", json=body, timeout=120)
    assert r.status_code == 200, r.text
    got = {x["index"]: x["score"] for x in r.json()}
    raw = reference(name, dirs[name], [(query, d) for d in DOCS], instruction)
    assert got == pytest.approx(dict(enumerate(raw)), abs=TOL)


def test_info_names_every_family_and_instruction_support(llm_app):
    url, _ = llm_app
    models = {m["name"]: m for m in requests.get(url + "/info", timeout=30).json()["models"]}
    assert {n: m["family"] for n, m in models.items()} == FAMILY_OF
    assert {n: m["accepts_instruction"] for n, m in models.items()} == \
        {"st": True, "mxbai": True, "gemma": True, "modular": False}


def test_info_shows_shared_prefixes_active_for_the_causal_families(llm_app):
    """The replicas report whether they compute a request's prompt once (docs/API.md, Shared prefix): the causal families by
    default, never a cross-encoder (the scores above came through that path and equal their references)."""
    url, _ = llm_app
    models = {m["name"]: m for m in requests.get(url + "/info", timeout=30).json()["models"]}
    assert {n: (m["shared_prefix"], m["shared_prefix_active"]) for n, m in models.items()} == \
        {"st": ("auto", True), "mxbai": ("auto", True), "gemma": ("auto", True), "modular": ("auto", False)}


def test_instruction_for_a_model_without_one_is_a_422(llm_app):
    url, _ = llm_app
    r = requests.post(url + "/rerank", json={"query": "q", "texts": ["d"], "model": "modular",
                                             "instruction": "judge"}, timeout=60)
    assert r.status_code == 422, r.text
    assert r.json()["error_type"] == "Validation"


def test_single_text_to_a_causal_lm_is_a_422(llm_app):
    url, _ = llm_app
    r = requests.post(url + "/predict", json={"inputs": "just one text", "model": "gemma"}, timeout=60)
    assert r.status_code == 422, r.text


@pytest.mark.parametrize("name", ["st", "mxbai", "gemma"])
def test_long_documents_chunk_on_the_llm_families(llm_app, name):
    """A document of several windows and one that fits, through the ingress and the model deployment at the
    model's default max length; reference: tests/models/test_windows_llm.py's, built from docs/API.md, Long documents."""
    from models import load_encoder
    from tests.models.test_windows import SENTENCES
    from tests.models.test_windows_llm import Reference

    url, dirs = llm_app
    query = QUERIES[0]
    docs = [" ".join([SENTENCES] * (14 if name == "gemma" else 3)), DOCS[0]]  # past bge-gemma's 516 tokens too
    r = requests.post(url + "/v1/rerank", json={"model": name, "query": query, "documents": docs,
                                                "long_documents": "chunk"}, timeout=120)
    assert r.status_code == 200, r.text
    ref = Reference({"st": "structured", "mxbai": "mxbai", "gemma": "bge"}[name], dirs[name],
                    load_encoder(str(dirs[name])).max_length)
    expected = [ref.raw(query, d) for d in docs]
    assert len(expected[0][1]) >= 2 and len(expected[1][1]) == 1
    got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
    for i, (raw, _) in enumerate(expected):
        assert abs(got[i] - 1 / (1 + np.exp(-raw))) <= TOL
    assert r.json()["usage"]["total_tokens"] == sum(len(ids) for _, seqs in expected for ids in seqs)


@pytest.mark.parametrize("name", ["st", "mxbai", "gemma"])
def test_text_the_tokenizer_cannot_take_is_a_422_and_the_model_keeps_serving(llm_app, name):
    """A lone surrogate (the JSON escape \\ud800) in a document, the query or the instruction of a causal family,
    in both modes: 422 naming the field (these families answered 500 before), then a good request scores."""
    import json

    url, dirs = llm_app
    bodies = [({"query": "q", "documents": ["a", "b\ud800"]}, "`documents[1]`"),
              ({"query": "\udfff", "documents": ["a"]}, "`query`"),
              ({"query": "q", "documents": ["a"], "instruction": "\ud800"}, "`instruction`")]
    for body, field in bodies:
        for mode in ("truncate", "chunk"):
            r = requests.post(url + "/v2/rerank", timeout=60, headers={"content-type": "application/json"},
                              data=json.dumps({**body, "model": name, "long_documents": mode}).encode("ascii"))
            assert r.status_code == 422 and r.json()["error"].startswith(field), r.text
    pairs = [(QUERIES[0], DOCS[0])]
    r = requests.post(url + "/rerank", json={"model": name, "query": QUERIES[0], "texts": [DOCS[0]],
                                             "raw_scores": True}, timeout=60)
    assert r.status_code == 200 and r.json()[0]["score"] == pytest.approx(reference(name, dirs[name], pairs)[0],
                                                                          abs=TOL)
