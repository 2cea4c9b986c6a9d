"""Bad input through the HTTP app with the REAL encoder of one model of every family (in process: no Ray, no
weights; the backend only records what would reach a model replica).

docs/API.md, Errors: bad input never yields a 500 and never reaches a model; text the tokenizer cannot take is a 422
naming the field, on every family, route and long-documents mode. The Ray suites add the rest of that line (a
bad request never takes a replica down nor fails the requests batched with it: tests/deployments/test_e2e.py).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

from models.encoded import EncodedBatch
from serve_app.routes import create_http_app
from serve_app.service import RerankService
from serve_app.settings import AppSettings
from tests.tiny_models import DOCS, QUERIES

SURROGATE = "\ud800"  # a valid JSON escape ("\\ud800") that is not valid Unicode
J = {"content-type": "application/json"}
FAMILIES = ["seq_cls", "modular", "qwen3", "st_causal", "mxbai", "bge_gemma", "jina_v3"]
MODES = ["truncate", "chunk"]


def modes_of(encoder) -> list[str]:
    """The long-document modes a family takes; "chunk" is refused before any text is read where it cannot chunk
    (jina_v3, listwise: tests/serve_app/test_listwise_routes.py)."""
    return MODES if encoder.supports_windows else ["truncate"]


class RecordingBackend:
    """Scores every sequence 0.0 and records the batches: what reached the model."""

    def __init__(self):
        self.calls: list[EncodedBatch] = []

    async def score(self, batch: EncodedBatch) -> np.ndarray:
        self.calls.append(batch)
        return np.zeros(batch.num_scores, dtype=np.float32)  # a listwise block has one score per document

    async def describe(self):
        return {}

    async def ready(self):
        return True, "ok"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{family: model directory}, one tiny model of each family in its real layout."""
    from tests.llm_rerankers import build_bge_gemma, build_jina_v3, build_mxbai, build_st_causal
    from tests.tiny_models import build_bert_seq_cls, build_modular, build_qwen3_reranker

    root = tmp_path_factory.mktemp("bad-input")
    return {"seq_cls": build_bert_seq_cls(root / "bert"), "modular": build_modular(root / "modular"),
            "qwen3": build_qwen3_reranker(root / "qwen3"), "st_causal": build_st_causal(root / "st"),
            "mxbai": build_mxbai(root / "mxbai-rerank-base-v2"),
            "bge_gemma": build_bge_gemma(root / "bge-reranker-v2-gemma"), "jina_v3": build_jina_v3(root / "jina")}


@pytest.fixture(scope="module")
def app(models):
    """(client, service) over every family's real encoder; model names are the family names."""
    from models import load_encoder

    settings = AppSettings(models=[{"name": f, "model_id": str(p)} for f, p in models.items()], api_key=None,
                           hf_token=None)
    encoders = {f: load_encoder(str(p)) for f, p in models.items()}
    assert {f: e.family for f, e in encoders.items()} == {f: f for f in models}
    service = RerankService(settings, encoders, {f: RecordingBackend() for f in models})
    return TestClient(create_http_app(service), raise_server_exceptions=False), service


def post_raw(client, route: str, body: dict):
    """The body as a client's JSON encoder writes it: a lone surrogate goes on the wire as the escape \\ud800."""
    return client.post(route, content=json.dumps(body).encode("ascii"), headers=J)


def error_of(response, status: int, error_type: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "error_type"} and body["error_type"] == error_type, body
    return body["error"]


def surrogate_cases(family: str, accepts_instruction: bool, modes: list[str]):
    """(route, body, field the error must name, whether the refusal is the text's) for every text field."""
    q, d = QUERIES[0], DOCS[0]
    bad = f"abc {SURROGATE} def"
    cases = [
        ("/rerank", {"query": bad, "texts": [d, d]}, "`query`"),
        ("/rerank", {"query": q, "texts": [d, bad]}, "`texts[1]`"),
        ("/rerank", {"query": q, "texts": [d], "instruction": bad}, "`instruction`"),
    ]
    for route in ("/v1/rerank", "/v2/rerank"):
        cases += [
            (route, {"query": bad, "documents": [d]}, "`query`"),
            (route, {"query": q, "documents": [d, bad]}, "`documents[1]`"),
            (route, {"query": q, "documents": [{"text": d}, {"text": bad}]}, "`documents[1]`"),
            (route, {"query": q, "documents": [d], "instruction": bad}, "`instruction`"),
        ]
    for route in ("/predict", "/tokenize"):
        cases += [
            (route, {"inputs": bad}, "`inputs[0]`"),  # a single text
            (route, {"inputs": [bad, d]}, "`inputs[0]`"),  # one pair, its query
            (route, {"inputs": [q, bad]}, "`inputs[0]`"),  # one pair, its document
            (route, {"inputs": [[q, d], [q, bad]]}, "`inputs[1]`"),  # a batch
            (route, {"inputs": [q, d], "instruction": bad}, "`instruction`"),
        ]
    for route, body, field in cases:
        # A model without instructions refuses the field itself (naming it); every other case is the text's.
        own = "instruction" not in body or accepts_instruction
        for mode in [None] if route == "/tokenize" else modes:
            yield route, body if mode is None else {**body, "long_documents": mode}, field, own


@pytest.mark.parametrize("family", FAMILIES)
def test_a_lone_surrogate_in_any_field_is_a_422_naming_it(app, family):
    client, service = app
    backend = service.backends[family]
    backend.calls.clear()
    seen = 0
    encoder = service.encoders[family]
    for route, body, field, own in surrogate_cases(family, encoder.accepts_instruction, modes_of(encoder)):
        r = post_raw(client, route, {**body, "model": family})
        message = error_of(r, 422, "Validation")
        assert message.startswith(field + ": "), (route, body, message)
        if own:
            assert "surrogate" in message and "'\\ud800'" in message, (route, message)
        seen += 1
    assert seen == len(modes_of(encoder)) * (3 + 4 + 4 + 5) + 5
    assert backend.calls == []  # nothing reached the model
    # The same service answers good requests as before.
    assert client.post("/rerank", json={"model": family, "query": "q", "texts": ["a"]}).status_code == 200


def test_a_field_name_that_is_not_valid_unicode_is_a_422_too(app):
    client, _ = app
    error_of(post_raw(client, "/rerank", {"query": "q", "texts": ["a"], SURROGATE: 1}), 422, "Validation")


def test_an_error_message_quoting_invalid_unicode_is_written_escaped():
    """Whatever an error message quotes, rendering it never fails (JSON bodies are UTF-8)."""
    from serve_app.routes import error_response
    from serve_app.schemas import ApiError

    r = error_response(ApiError(404, "UnknownModel", f"model 'x{SURROGATE}' is not served"))
    assert r.status_code == 404 and json.loads(r.body) == {"error": "model 'x\\ud800' is not served",
                                                           "error_type": "UnknownModel"}


class Exploding:
    """A Rust tokenizer stand-in that raises on any text holding TRIGGER (as a tokenizer bug or an unforeseen
    input would), and is the real one otherwise."""

    TRIGGER = "kaboom"

    def __init__(self, real):
        self.real = real

    def _check(self, value):
        texts = [value] if isinstance(value, str) else [x for v in value for x in (v if isinstance(v, tuple) else
                                                                                     (v,)) if isinstance(x, str)]
        if any(self.TRIGGER in t for t in texts):
            raise RuntimeError("tokenizer failure")

    def encode(self, sequence, *args, **kwargs):
        self._check(sequence if isinstance(sequence, str) else [sequence])
        return self.real.encode(sequence, *args, **kwargs)

    def encode_batch(self, inputs, *args, **kwargs):
        self._check(inputs)
        return self.real.encode_batch(inputs, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.real, name)


def tokenizer_copies(encoder):
    """Every UserTextTokenizer an encoder holds (its `_full`, `_cut[...]`, a plain copy made for windows)."""
    from models.encoding import UserTextTokenizer

    encoder.plain_tokenizer()  # made on first use by some families
    found = []
    for value in vars(encoder).values():
        for v in (value.values() if isinstance(value, dict) else [value]):
            if isinstance(v, UserTextTokenizer):
                found.append(v)
    return found


@pytest.mark.parametrize("family", FAMILIES)
def test_any_tokenizer_failure_on_user_text_is_a_422(app, family):
    """The one boundary: every tokenizer copy an encoder uses raises on the trigger text; every route and mode
    answers 422, never 500, and nothing reaches the model."""
    client, service = app
    encoder = service.encoders[family]
    copies = tokenizer_copies(encoder)
    assert copies
    backend = service.backends[family]
    backend.calls.clear()
    bad = f"a {Exploding.TRIGGER} b"
    try:
        for t in copies:
            object.__setattr__(t, "_tok", Exploding(t._tok))
        bodies = [("/rerank", {"query": QUERIES[0], "texts": [DOCS[0], bad]}),
                  ("/rerank", {"query": bad, "texts": [DOCS[0]]}),
                  ("/v2/rerank", {"query": QUERIES[0], "documents": [bad], "max_tokens_per_doc": 5}),
                  ("/predict", {"inputs": [[QUERIES[0], DOCS[1]], [QUERIES[0], bad]]}),
                  ("/tokenize", {"inputs": [QUERIES[0], bad]})]
        if encoder.accepts_instruction:
            bodies.append(("/rerank", {"query": QUERIES[0], "texts": [DOCS[0]], "instruction": bad}))
        for route, body in bodies:
            for mode in modes_of(encoder):
                r = client.post(route, json={**body, "model": family, "long_documents": mode})
                assert "tokenizer cannot take this text" in error_of(r, 422, "Validation"), (route, body, mode)
        assert backend.calls == []
    finally:
        for t in copies:
            object.__setattr__(t, "_tok", t._tok.real)
    assert client.post("/rerank", json={"model": family, "query": "q", "texts": [bad]}).status_code == 200


@pytest.mark.parametrize("family", FAMILIES)
def test_over_long_single_text_with_truncate_false_is_a_422_in_both_modes(app, family):
    client, service = app
    encoder, backend = service.encoders[family], service.backends[family]
    backend.calls.clear()
    long = " ".join([DOCS[1]] * 40)
    for mode in modes_of(encoder):
        for inputs, where in ((long, "`inputs[0]`"), ([[QUERIES[0], DOCS[0]], [long]], "`inputs[1]`")):
            body = {"model": family, "inputs": inputs, "truncate": False, "long_documents": mode}
            message = error_of(client.post("/predict", json=body), 422, "Validation")
            assert message.startswith(where), message
            assert ("maximum" in message) if encoder.accepts_single else ("pairs only" in message)
    assert backend.calls == []
    if encoder.accepts_single:  # truncated, as in "truncate" mode, when truncation is on
        for mode in modes_of(encoder):
            assert client.post("/predict", json={"model": family, "inputs": long, "long_documents": mode}
                               ).status_code == 200
        assert [b.lengths.tolist() for b in backend.calls] == [[encoder.max_length]] * 2


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("huge", [2 ** 63, 2 ** 64, 10 ** 30])
def test_integers_far_out_of_range_are_clamped_on_every_family(app, family, huge):
    """max_tokens_per_doc larger than any document cuts nothing and top_n larger than the list returns all: the
    same answer on every family and mode (README: "Choices where docs/API.md is open")."""
    client, service = app
    backend = service.backends[family]
    docs = [DOCS[0], DOCS[1] * 3, DOCS[3]]
    for mode in modes_of(service.encoders[family]):
        backend.calls.clear()
        body = {"model": family, "query": QUERIES[0], "documents": docs, "long_documents": mode}
        plain = client.post("/v2/rerank", json=body)
        huge_r = client.post("/v2/rerank", json={**body, "max_tokens_per_doc": huge, "top_n": huge})
        assert plain.status_code == huge_r.status_code == 200, huge_r.text
        assert huge_r.json()["usage"] == plain.json()["usage"] and len(huge_r.json()["results"]) == 3
        sent = [[b.sequence(i).tolist() for i in range(len(b))] for b in backend.calls]
        assert len(sent) == 2 and sent[0] == sent[1]  # the very same tokens reached the model
    r = client.post("/rerank", json={"model": family, "query": "q", "texts": ["a", "b"], "top_n": huge})
    assert r.status_code == 200 and len(r.json()) == 2
    for bad in (0, -1, -huge):
        assert "max_tokens_per_doc" in error_of(client.post("/v2/rerank", json={
            "model": family, "query": "q", "documents": ["a"], "max_tokens_per_doc": bad}), 422, "Validation")
