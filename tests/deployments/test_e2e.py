"""End to end over real HTTP: a local Ray Serve instance serving tiny models of three families at once.

Expected scores come from the reference implementations run here (sentence-transformers CrossEncoder
with an Identity activation, the official Qwen3-Reranker recipe), never from the code under test.
"""
from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from tests.deployments import reference as ref
from tests.serve_helpers import replica_counts
from tests.tiny_models import DOCS, QUERIES

pytestmark = pytest.mark.slow

TOL = 1e-5
FAMILY_OF = {"modular": "modular", "bert": "seq_cls", "qwen": "qwen3"}


def raw_reference(tiny, model: str, pairs, instruction=None) -> np.ndarray:
    if model == "qwen":
        return ref.qwen_raw(tiny["qwen"], pairs, instruction)
    return ref.cross_encoder_raw(tiny[model], pairs)


def post(url, path, body, **kw):
    return requests.post(url + path, json=body, timeout=60, **kw)


def error_of(r, status: int, error_type: str) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error", "error_type"} and body["error_type"] == error_type, body
    return body["error"]


# ------------------------------------------------------------------------------------------ scores and routes

@pytest.mark.parametrize("model", ["modular", "bert", "qwen"])
def test_rerank_matches_the_reference(main_url, tiny, model):
    query = QUERIES[0]
    raw = raw_reference(tiny, model, [(query, d) for d in DOCS])
    r = post(main_url, "/rerank", {"query": query, "texts": DOCS, "model": model, "return_text": True})
    assert r.status_code == 200, r.text
    got = r.json()
    assert sorted(x["index"] for x in got) == list(range(len(DOCS)))
    for x in got:
        assert x["score"] == pytest.approx(ref.sigmoid(raw[x["index"]]), abs=TOL)
        assert x["text"] == DOCS[x["index"]]
    scores = [x["score"] for x in got]
    assert scores == sorted(scores, reverse=True)

    r = post(main_url, "/rerank", {"query": query, "texts": DOCS, "model": model, "raw_scores": True, "top_n": 2})
    got = r.json()
    assert len(got) == 2 and all("text" not in x for x in got)
    assert [x["index"] for x in got] == list(np.argsort(-raw, kind="stable")[:2])
    for x in got:
        assert x["score"] == pytest.approx(raw[x["index"]], abs=TOL)


def test_default_model_is_the_first(main_url, tiny):
    raw = ref.cross_encoder_raw(tiny["modular"], [(QUERIES[1], d) for d in DOCS[:3]])
    got = post(main_url, "/rerank", {"query": QUERIES[1], "texts": DOCS[:3], "raw_scores": True}).json()
    assert {x["index"]: x["score"] for x in got} == pytest.approx(dict(enumerate(raw)), abs=TOL)


def test_qwen_instruction_changes_the_prompt(main_url, tiny):
    pairs = [(QUERIES[0], d) for d in DOCS[:3]]
    instruction = "Judge the relevance of a passage"
    raw = ref.qwen_raw(tiny["qwen"], pairs, instruction)
    got = post(main_url, "/rerank", {"query": QUERIES[0], "texts": DOCS[:3], "model": "qwen",
                                     "instruction": instruction, "raw_scores": True}).json()
    assert {x["index"]: x["score"] for x in got} == pytest.approx(dict(enumerate(raw)), abs=TOL)
    default = ref.qwen_raw(tiny["qwen"], pairs)
    assert not np.allclose(raw, default, atol=1e-4)  # the instruction really reached the model


def test_a_request_larger_than_the_token_budget_comes_back_whole(main_url, tiny):
    # ~300 pairs of up to 64 tokens against a 256-token budget (modular) and a 40-token budget (bert):
    # split into many batches, single over-budget sequences scored on their own, all back in order.
    texts = [DOCS[i % len(DOCS)] + f" {i}" for i in range(300)]
    for model in ("modular", "bert"):
        raw = ref.cross_encoder_raw(tiny[model], [(QUERIES[2], t) for t in texts])
        got = post(main_url, "/rerank", {"query": QUERIES[2], "texts": texts, "model": model,
                                         "raw_scores": True}).json()
        assert len(got) == 300
        assert np.allclose([x["score"] for x in sorted(got, key=lambda x: x["index"])], raw, atol=TOL)


def test_predict_shapes_and_scores(main_url, tiny):
    q, d = QUERIES[0], DOCS[0]
    pair_raw = ref.cross_encoder_raw(tiny["bert"], [(q, d)])[0]
    single_raw = ref.seq_cls_single_raw(tiny["bert"], [q])[0]

    got = post(main_url, "/predict", {"inputs": [q, d], "model": "bert"}).json()
    assert got == [{"score": pytest.approx(ref.sigmoid(pair_raw), abs=TOL), "label": "LABEL_0"}]
    for single in (q, [q]):
        got = post(main_url, "/predict", {"inputs": single, "model": "bert", "raw_scores": True}).json()
        assert got == [{"score": pytest.approx(single_raw, abs=TOL), "label": "LABEL_0"}]
    got = post(main_url, "/predict", {"inputs": [[q, d], [q], [q, DOCS[1]]], "model": "bert",
                                      "raw_scores": True}).json()
    second_raw = ref.cross_encoder_raw(tiny["bert"], [(q, DOCS[1])])[0]
    assert got == [[{"score": pytest.approx(pair_raw, abs=TOL), "label": "LABEL_0"}],
                   [{"score": pytest.approx(single_raw, abs=TOL), "label": "LABEL_0"}],
                   [{"score": pytest.approx(second_raw, abs=TOL), "label": "LABEL_0"}]]

    qwen_raw = ref.qwen_raw(tiny["qwen"], [(q, d)])[0]
    got = post(main_url, "/predict", {"inputs": [[q, d]], "model": "qwen"}).json()
    assert got == [[{"score": pytest.approx(ref.sigmoid(qwen_raw), abs=TOL), "label": "LABEL_0"}]]


@pytest.mark.parametrize("route", ["/v1/rerank", "/v2/rerank"])
@pytest.mark.parametrize("model", ["modular", "bert", "qwen"])
def test_cohere_routes(main_url, tiny, route, model):
    query, docs = QUERIES[1], DOCS[:4]
    raw = raw_reference(tiny, model, [(query, d) for d in docs])
    if model == "qwen":
        tokens = sum(len(ref.qwen_ids(tiny["qwen"], query, d)) for d in docs)
    else:
        tokens = sum(len(ref.pair_ids(tiny[model], query, d)) for d in docs)
    documents = [docs[0], {"text": docs[1]}, docs[2], {"text": docs[3]}]
    r = post(main_url, route, {"model": model, "query": query, "documents": documents, "top_n": 3,
                               "return_documents": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == model and isinstance(body["id"], str) and body["id"]
    assert body["meta"] == {"billed_units": {"search_units": 1}, "tokens": {"input_tokens": tokens}}
    assert body["usage"] == {"total_tokens": tokens}
    order = list(np.argsort(-raw, kind="stable")[:3])
    assert [x["index"] for x in body["results"]] == order
    for x in body["results"]:
        assert x["relevance_score"] == pytest.approx(ref.sigmoid(raw[x["index"]]), abs=TOL)
        assert x["document"] == {"text": docs[x["index"]]}


def test_cohere_max_tokens_per_doc_cuts_documents(main_url, tiny):
    query, doc = QUERIES[0], DOCS[1]  # a long document
    full = post(main_url, "/v2/rerank", {"model": "bert", "query": query, "documents": [doc]}).json()
    cut = post(main_url, "/v2/rerank", {"model": "bert", "query": query, "documents": [doc],
                                        "max_tokens_per_doc": 5}).json()
    tok = ref._tokenizer(str(tiny["bert"]))
    expected = len(tok(query, tok.convert_tokens_to_string(tok.tokenize(doc)[:5]))["input_ids"])
    assert cut["usage"]["total_tokens"] == expected < full["usage"]["total_tokens"]


def test_tokenize_shows_what_the_model_sees(main_url, tiny):
    q, d = QUERIES[0], DOCS[1]
    got = post(main_url, "/tokenize", {"inputs": [q, d], "model": "bert"}).json()
    ids = ref.pair_ids(tiny["bert"], q, d)
    assert got[0]["ids"] == ids and got[0]["num_tokens"] == len(ids) == 64  # truncated to the model maximum
    assert got[0]["tokens"] == ref._tokenizer(str(tiny["bert"])).convert_ids_to_tokens(ids)
    assert got[0]["token_type_ids"][0] == 0 and got[0]["token_type_ids"][-1] == 1

    got = post(main_url, "/tokenize", {"inputs": [[q, DOCS[0]]], "model": "qwen"}).json()
    assert got[0]["ids"] == ref.qwen_ids(tiny["qwen"], q, DOCS[0])


def test_info_models_health_docs(main_url, tiny):
    info = requests.get(main_url + "/info", timeout=30).json()
    assert info["default_model"] == "modular" and info["version"]
    by_name = {m["name"]: m for m in info["models"]}
    assert list(by_name) == ["modular", "bert", "qwen"]
    for name, m in by_name.items():
        assert m["model_id"] == str(tiny[name]) and m["family"] == FAMILY_OF[name]
        assert m["dtype"] == "float32" and m["device"] == "cpu" and m["loaded"] is True
        assert m["execution"] == "padded"  # auto on CPU, decided by the replica at load
        assert m["revision"] is None and m["id2label"]["0"] == "LABEL_0"
    assert by_name["bert"]["max_input_length"] == 64 and by_name["qwen"]["max_input_length"] == 512
    assert by_name["bert"]["batching"]["token_budget"] == 40
    assert by_name["modular"]["batching"]["max_batch_wait_s"] == 0.02
    for m in by_name.values():  # num_cpus 0.25 set: one torch thread, sized from the setting, not the machine
        serving = m["serving"]
        assert serving["torch_threads"] == 1 and serving["torch_threads_from"] == "num_cpus", serving
        assert serving["cpus_seen"] >= 1
    assert info["ingress"]["num_replicas"] == 1  # every model on CPU: one tokenizing replica

    models = requests.get(main_url + "/v1/models", timeout=30).json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["modular", "bert", "qwen"]
    assert requests.get(main_url + "/health", timeout=30).json() == {"status": "ok"}
    assert requests.get(main_url + "/docs", timeout=30).status_code == 200
    assert "/v2/rerank" in requests.get(main_url + "/openapi.json", timeout=30).json()["paths"]


# ---------------------------------------------------------------------------------------------- error table

LONG = " ".join(["berlin has a population"] * 40)
J = {"content-type": "application/json"}
# Bodies as a JSON encoder writes a lone UTF-16 surrogate: the escape \ud800 (valid JSON, not valid Unicode).
SURROGATE_TEXT = json.dumps({"query": "q", "texts": ["a", "b \ud800"], "model": "bert"}).encode()
SURROGATE_QUERY = json.dumps({"query": "\ud800", "texts": ["a"], "model": "qwen", "long_documents": "chunk"}).encode()
SURROGATE_DOC = json.dumps({"query": "q", "documents": [{"text": "\udfff"}], "model": "modular"}).encode()
SURROGATE_PAIR = json.dumps({"inputs": ["q", "x\ud800"], "model": "qwen"}).encode()
SURROGATE_INSTRUCTION = json.dumps({"query": "q", "texts": ["a"], "model": "qwen", "instruction": "\ud800"}).encode()


@pytest.mark.parametrize("method, path, kwargs, status, error_type", [
    ("post", "/rerank", {"json": {"query": "q", "texts": []}}, 400, "Empty"),
    ("post", "/rerank", {"json": {"query": "", "texts": ["a"]}}, 400, "Empty"),
    ("post", "/v1/rerank", {"json": {"query": "q", "documents": []}}, 400, "Empty"),
    ("post", "/predict", {"json": {"inputs": []}}, 400, "Empty"),
    ("post", "/rerank", {"data": b"{nope", "headers": J}, 400, "Validation"),
    ("post", "/rerank", {"data": b'{"query": "q", "texts": ["\xff"]}', "headers": J}, 400, "Validation"),
    ("post", "/rerank", {"json": {"query": "q", "texts": ["a"], "model": "gpt-9"}}, 404, "UnknownModel"),
    ("post", "/nowhere", {"json": {}}, 404, "NotFound"),
    ("get", "/rerank", {}, 405, "MethodNotAllowed"),
    ("delete", "/v2/rerank", {}, 405, "MethodNotAllowed"),
    ("post", "/rerank", {"data": b'{"query": "q", "texts": ["a"]}', "headers": {"content-type": "text/plain"}},
     415, "Validation"),
    ("post", "/rerank", {"json": {"query": "q", "texts": "not a list"}}, 422, "Validation"),
    ("post", "/rerank", {"json": {"query": "q", "texts": ["a"], "surprise": 1}}, 422, "Validation"),
    ("post", "/rerank", {"json": {"query": "q", "texts": ["a"], "top_n": 0}}, 422, "Validation"),
    ("post", "/rerank", {"json": {"query": "q", "texts": ["a"] * 1001}}, 422, "Validation"),
    ("post", "/rerank", {"json": {"query": "q", "texts": [LONG], "truncate": False}}, 422, "Validation"),
    ("post", "/rerank", {"json": {"query": "q", "texts": ["a"], "instruction": "x", "model": "bert"}},
     422, "Validation"),
    ("post", "/predict", {"json": {"inputs": "single text", "model": "qwen"}}, 422, "Validation"),
    ("post", "/predict", {"json": {"inputs": ["a", "b", "c"]}}, 422, "Validation"),
    # Text the tokenizer cannot take (a lone surrogate, a valid JSON escape), on every family and mode.
    *[("post", route, {"data": body, "headers": J}, 422, "Validation")
      for route, body in (("/rerank", SURROGATE_TEXT), ("/rerank", SURROGATE_QUERY), ("/v2/rerank", SURROGATE_DOC),
                          ("/predict", SURROGATE_PAIR), ("/tokenize", SURROGATE_PAIR))],
    ("post", "/rerank", {"data": SURROGATE_INSTRUCTION, "headers": J}, 422, "Validation"),
    # An over-long single text with truncate=false: windows are for pairs, so chunk mode refuses it too.
    ("post", "/predict", {"json": {"inputs": LONG, "truncate": False, "model": "bert", "long_documents": "chunk"}},
     422, "Validation"),
])
def test_error_table(main_url, method, path, kwargs, status, error_type):
    r = getattr(requests, method)(main_url + path, timeout=60, **kwargs)
    error_of(r, status, error_type)


def test_payload_too_large(main_url):
    big = json.dumps({"query": "q", "texts": ["x" * 1000] * 4200}).encode()  # > 4 MB
    error_of(requests.post(main_url + "/rerank", data=big, headers=J, timeout=60), 413, "PayloadTooLarge")

    def chunked():  # no Content-Length: the size is counted as the body arrives
        step = 1 << 16
        for i in range(0, len(big), step):
            yield big[i:i + step]
    error_of(requests.post(main_url + "/rerank", data=chunked(), headers=J, timeout=60), 413, "PayloadTooLarge")


def test_truncate_false_accepts_inputs_that_fit(main_url, tiny):
    r = post(main_url, "/rerank", {"query": "q", "texts": [DOCS[0]], "truncate": False, "model": "bert"})
    assert r.status_code == 200


# --------------------------------------------------------------------------------------- concurrency, isolation

def test_concurrent_burst_each_response_carries_its_own_scores(main_url, tiny):
    """Requests to two models at once, sharing batches: every response holds exactly its own pairs' scores."""
    rng = random.Random(7)
    pool = [d + f" {i}" for i, d in enumerate(DOCS * 4)]
    reference = {m: dict(zip(pool, ref.cross_encoder_raw(tiny[m], [(QUERIES[0], t) for t in pool])))
                 for m in ("modular", "bert")}
    jobs = []
    for i in range(48):
        model = ("modular", "bert")[i % 2]
        texts = rng.sample(pool, rng.randint(1, 12))
        jobs.append((model, texts))
    # Bad requests in the same burst: rejected alone, the good ones around them unaffected, no replica down.
    bad = [{"query": QUERIES[0], "texts": [LONG], "truncate": False, "model": "bert"},
           {"query": QUERIES[0], "texts": ["a"], "instruction": "x", "model": "modular"},
           {"query": QUERIES[0], "texts": ["a", 5], "model": "bert"},
           {"query": QUERIES[0], "texts": ["a", "b \ud800"], "model": "bert"},
           {"query": "\ud800", "texts": ["a"], "model": "modular", "long_documents": "chunk"},
           {"query": QUERIES[0], "texts": ["a"], "model": "qwen", "instruction": "\udbff"}]
    bad_predict = [{"inputs": LONG, "truncate": False, "model": "bert", "long_documents": "chunk"},
                   {"inputs": [["q", "a"], ["q", "\ud800"]], "model": "modular", "long_documents": "chunk"}]
    # Integers far out of range are clamped: a good request (same scores as without them).
    clamped = {"query": QUERIES[0], "documents": pool[:5], "model": "bert", "top_n": 2 ** 64,
               "max_tokens_per_doc": 2 ** 64}

    def run_good(job):
        model, texts = job
        return job, post(main_url, "/rerank", {"query": QUERIES[0], "texts": texts, "model": model,
                                               "raw_scores": True})

    def send_raw(path, body):  # json.dumps escapes a lone surrogate as \ud800, as clients' encoders do
        return requests.post(main_url + path, data=json.dumps(body).encode("ascii"), headers=J, timeout=60)

    before = {m: replica_counts("main", f"model-{m}") for m in ("modular", "bert", "qwen")}
    with ThreadPoolExecutor(16) as ex:
        bad_futures = [ex.submit(send_raw, "/rerank", b) for b in bad]
        bad_futures += [ex.submit(send_raw, "/predict", b) for b in bad_predict]
        clamped_future = ex.submit(post, main_url, "/v2/rerank", clamped)
        results = list(ex.map(run_good, jobs))
    for (model, texts), r in results:
        assert r.status_code == 200, r.text
        got = {x["index"]: x["score"] for x in r.json()}
        assert got == pytest.approx({i: reference[model][t] for i, t in enumerate(texts)}, abs=TOL)
    for f in bad_futures:
        error_of(f.result(), 422, "Validation")
    r = clamped_future.result()
    assert r.status_code == 200 and len(r.json()["results"]) == 5
    assert {x["index"]: x["relevance_score"] for x in r.json()["results"]} == pytest.approx(
        {i: 1 / (1 + np.exp(-reference["bert"][t])) for i, t in enumerate(pool[:5])}, abs=TOL)
    # No replica was taken down: the same replicas run, and every model is healthy.
    assert {m: replica_counts("main", f"model-{m}") for m in before} == before
    assert requests.get(main_url + "/health", timeout=30).json() == {"status": "ok"}


def test_long_documents_chunk_through_the_deployments(main_url, tiny):
    """The windows go through the ingress and the model deployment (token budget 40: several pieces) and come
    back as the max per pair; reference: tests/models/test_windows.py's, built from docs/API.md, Long documents."""
    from tests.models.test_windows import PairReference

    query, docs = QUERIES[0], [DOCS[5], DOCS[0]]  # a document of several windows, one that fits
    r = post(main_url, "/v1/rerank", {"model": "bert", "query": query, "documents": docs,
                                      "long_documents": "chunk"}).json()
    reference = PairReference(tiny["bert"], "bert", 64)
    expected = [reference.raw(query, d) for d in docs]
    assert len(expected[0][1]) >= 3 and len(expected[1][1]) == 1
    got = {x["index"]: x["relevance_score"] for x in r["results"]}
    for i, (raw, _) in enumerate(expected):
        assert abs(got[i] - 1 / (1 + np.exp(-raw))) <= TOL
    assert r["usage"]["total_tokens"] == sum(len(ids) for _, seqs in expected for ids, _ in seqs)
