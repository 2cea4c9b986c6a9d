"""What each route does, without Ray or HTTP: validate, tokenize, one score call per request, shape.

`RerankService` holds one tokenizer-only `Encoder` per model (models/) and one `ModelBackend` per model:
in production a Ray Serve handle to that model's deployment (deployments/ingress.py), in unit tests a
fake. Everything that can fail on user input fails here, before anything reaches a model replica.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from functools import partial
from typing import Any, Awaitable, Mapping, Protocol, Sequence

import numpy as np

from models.cutting import plan_pieces, scatter
from models.encoded import EncodedBatch
from models.errors import InputError
from models.prefix import encode_marked
from models.windows import encode_windows
from serve_app.schemas import (ApiError, CohereRerankRequest, CohereRerankResponse, CohereResult, PredictRequest,
                               PredictResponse, PredictScore, RerankRequest, RerankResponse, RerankResult,
                               TokenizedInput, TokenizeRequest, TokenizeResponse, predict_items)
from serve_app.settings import AppSettings, ModelSettings

logger = logging.getLogger("ray.serve")

try:
    from importlib.metadata import version as _pkg_version
    VERSION = _pkg_version("rerank-serve")
except Exception:  # not installed (running from a checkout)
    VERSION = "0.1.0"

DESCRIBE_TIMEOUT_S = 5.0
# A replica's threads follow its busy neighbours (serve_app/cpu_share.py): /info asks a model again after this.
DESCRIBE_TTL_S = 1.0
# What /info says of the per-replica facts of a model whose replicas are gone (scaled to zero).
_NO_REPLICA = {"torch_threads": None, "torch_threads_why": "no running replica", "cpu_node": None}


class ModelBackend(Protocol):
    """Where a model's scores come from (a deployment handle in production)."""

    async def score(self, batch: EncodedBatch) -> np.ndarray:
        """Raw float32 scores of every sequence of `batch`, in order."""

    async def describe(self) -> dict[str, Any]:
        """Facts only the loaded model knows: family, dtype, device, max_length, token_budget, ..."""

    async def ready(self) -> tuple[bool, str]:
        """(can serve now, why not)."""

    # Optional: `async def replicas(self) -> int | None`, the model's running replicas (None: unknown). With
    # it, a request is cut into pieces only when there are several replicas to share them (see `score`).


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function in float64 (no overflow warnings for |x| > 709)."""
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def rank_order(scores: np.ndarray, top_n: int | None) -> np.ndarray:
    """Indices by score descending, ties by ascending index, cut to `top_n`."""
    idx = np.arange(len(scores))
    order = np.lexsort((idx, -np.asarray(scores, dtype=np.float64)))
    return order[:top_n] if top_n is not None else order


def _json_float(x: float) -> float | None:
    # JSON has no NaN/Infinity; a non-finite score (e.g. an fp16 overflow) is reported as null.
    return float(x) if math.isfinite(x) else None


async def _replicas(backend: Any) -> int | None:
    """The backend's running replica count, None when it cannot tell (then `max_fanout` alone decides)."""
    count = getattr(backend, "replicas", None)
    if count is None:
        return None
    try:
        return await count()
    except Exception as e:  # noqa: BLE001 - sizing the fan-out must never fail a request
        logger.warning("replica count unavailable: %r", e)
        return None


def error_place(error: InputError, field: str, query_field: str | None = None) -> str:
    """Where in the request an encoder's InputError is, as its message's prefix: "`texts[3]`: ", "`query`: ",
    "`instruction`: "; "" when it is about no one place. `field` is the request's list of items; `query_field` its
    query where that is a field of its own (else a query is part of its item: `inputs[3]`)."""
    if error.field == "query" and query_field is not None:
        return f"`{query_field}`: "
    if error.field is not None and error.field != "query":
        return f"`{error.field}`: "
    return f"`{field}[{error.index}]`: " if error.index is not None else ""


async def _all_or_cancel(calls: Sequence[Awaitable[np.ndarray]]) -> list[np.ndarray]:
    """The results of `calls`, run concurrently; the first failure cancels the others and is raised."""
    tasks = [asyncio.ensure_future(c) for c in calls]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # reap them: no "exception never retrieved"
        raise


class RerankService:
    def __init__(self, settings: AppSettings, encoders: Mapping[str, Any], backends: Mapping[str, ModelBackend]):
        names = [m.name for m in settings.models]
        if set(encoders) != set(names) or set(backends) != set(names):
            raise ValueError(f"need an encoder and a backend for every model {names}")
        self.settings = settings
        self.encoders = dict(encoders)
        self.backends = dict(backends)
        self._described: dict[str, tuple[float, dict[str, Any]]] = {}
        from models.device_share import share_token_budget  # torch-heavy: imported once the app is built

        # Fan-out piece size: the replica's batching budget, resolved as the replica resolves it.
        self._piece_tokens = {m.name: share_token_budget(m.token_budget, m.resolved_device, m.num_gpus)
                              for m in settings.models}
        for m in settings.models:  # a setting the model cannot honour fails the deploy, not every request
            if m.long_documents == "chunk" and not getattr(self.encoders[m.name], "supports_windows", False):
                raise ValueError(f"model {m.name!r}: long_documents 'chunk' is not supported by its family "
                                 f"{self.encoders[m.name].family!r}; use 'truncate'")

    # ---------------------------------------------------------------------------------------- helpers
    @property
    def model_names(self) -> list[str]:
        return [m.name for m in self.settings.models]

    def resolve(self, name: str | None) -> ModelSettings:
        name = name if name is not None else self.settings.default_model
        if name not in self.encoders:
            raise ApiError(404, "UnknownModel", f"model {name!r} is not served; served models: "
                                                f"{', '.join(self.model_names)}")
        return self.settings.model(name)

    def _check_count(self, field: str, n: int) -> None:
        if n == 0:
            raise ApiError(400, "Empty", f"`{field}` is empty: send at least one")
        if n > self.settings.max_candidates:
            raise ApiError(422, "Validation", f"`{field}` has {n} entries, more than the limit of "
                                              f"{self.settings.max_candidates} per request: split the request")

    async def encode(self, model: ModelSettings, items: Sequence[tuple[str, str | None]], field: str,
                     query_field: str | None = None, **kwargs: Any) -> EncodedBatch:
        """Template + tokenize in a worker thread (keeps the event loop free for other requests)."""
        return await self._in_thread(self.encoders[model.name].encode, items, field, query_field, **kwargs)

    @staticmethod
    async def _in_thread(fn: Any, items: Sequence[tuple[str, str | None]], field: str, query_field: str | None,
                         **kwargs: Any) -> Any:
        try:  # models' encoders are safe to call from several threads at once
            return await asyncio.to_thread(fn, items, **kwargs)
        except InputError as e:
            raise ApiError(422, "Validation", f"{error_place(e, field, query_field)}{e}") from e

    async def encode_and_score(self, model: ModelSettings, items: Sequence[tuple[str, str | None]], field: str, *,
                               query_field: str | None = None, long_documents: str | None = None,
                               **kwargs: Any) -> tuple[np.ndarray, int]:
        """(raw score per item, tokens scored). With long_documents "chunk" (docs/API.md) a pair
        that does not fit is several sequences of the one batch (its windows), scored and fanned out like any
        others; its score is the max over them, and every window's tokens count. With shared_prefix "auto"
        (docs/API.md, Shared prefix) the batch carries the prefix marks of the family's causal template; the
        tokens counted are those of pairwise scoring. `field` names the request's list of items, and
        `query_field` its query where that is one field of its own (the rerank routes), in errors."""
        encoder = self.encoders[model.name]
        chunk = (long_documents or model.long_documents) == "chunk"
        encode = partial(encode_windows, encoder, chunk_overlap=model.chunk_overlap,
                         max_chunks=model.max_chunks) if chunk else encoder.encode
        if self._marks_prefixes(model):
            encode = partial(encode_marked, encoder, encode)  # in the same worker thread as the tokenizer
        encoded = await self._in_thread(encode, items, field, query_field, **kwargs)
        if chunk:
            return encoded.reduce(await self.score(model, encoded.batch)), encoded.num_tokens
        return await self.score(model, encoded), encoded.num_tokens

    # --- listwise families (models/families/jina_v3.py): the documents of a request are one list, scored together ---
    def _listwise(self, model: ModelSettings) -> bool:
        return bool(getattr(self.encoders[model.name], "listwise", False))

    def _marks_prefixes(self, model: ModelSettings) -> bool:
        """Whether the ingress marks shared prefixes for `model`: set to "auto" and the family's template has one."""
        return model.shared_prefix == "auto" and bool(getattr(self.encoders[model.name], "shares_prefix", False))

    def _activate(self, model: ModelSettings, raw: np.ndarray, raw_scores: bool = False) -> np.ndarray:
        """What a route returns for raw scores: sigmoid(raw), or raw itself when asked for or when the family's raw
        score is already final (a listwise cosine: never sigmoided, docs/API.md, Scores)."""
        if raw_scores or not getattr(self.encoders[model.name], "sigmoid_scores", True):
            return np.asarray(raw, dtype=np.float64)
        return sigmoid(raw)

    async def score(self, model: ModelSettings, batch: EncodedBatch) -> np.ndarray:
        """Raw scores of `batch` from the model's deployment: one call, or for a request of several token
        budgets, up to `max_fanout` concurrent calls on length-sorted pieces (models/cutting.py)."""
        start = time.perf_counter()
        backend = self.backends[model.name]
        # No more pieces than one replica takes at once: a lone request never queues (nor gets a 429)
        # because of its own pieces.
        max_pieces = min(model.max_fanout, model.max_ongoing_requests)
        piece_tokens = self._piece_tokens[model.name]
        # The replica count is asked only for a request that could be cut: most requests go whole anyway.
        tokens = batch.computed_tokens  # a shared prefix counts once (models/prefix.py)
        replicas = await _replicas(backend) if tokens >= 2 * piece_tokens and max_pieces > 1 else None
        if replicas is not None:
            # Pieces pay only where several replicas share them: one replica (which uses every CPU it sees)
            # would merge them back into the same forward batches, and each piece costs the ingress a handle
            # call (measured: 8 pieces a request took ~20% of the ingress CPU, benchmarks/README.md).
            # Two per replica keep replicas even when Ray's router sends two pieces to the same one.
            max_pieces = 1 if replicas <= 1 else min(max_pieces, 2 * replicas)
        # A listwise batch is cut between its lists only (its groups), never inside one; a shared prefix is
        # computed once per piece, so pieces are sized by the sequences' own parts.
        pieces = plan_pieces(batch.own_lengths, piece_tokens=piece_tokens, max_pieces=max_pieces, groups=batch.groups)
        if len(pieces) == 1:
            parts = [await backend.score(batch)]
        else:
            parts = await _all_or_cancel([backend.score(batch.select(index)) for index in pieces])
        try:
            raw = scatter([batch.score_index(index) for index in pieces], parts, batch.num_scores)
        except RuntimeError as e:
            raise RuntimeError(f"model {model.name!r}: {e}") from None
        logger.info("model=%s pairs=%d tokens=%d pieces=%d score_ms=%.1f", model.name, len(batch),
                    batch.num_tokens, len(pieces), (time.perf_counter() - start) * 1e3)
        return raw

    async def _rank(self, model: ModelSettings, query: str, texts: list[str], field: str, *,
                    truncate: bool | None = None, direction: str = "right", instruction: str | None = None,
                    max_tokens_per_doc: int | None = None, long_documents: str | None = None
                    ) -> tuple[np.ndarray, int]:
        # A listwise encoder reads the documents of a rank request as ONE list (a /predict pair is a list of one).
        one_list = {"one_list": True} if self._listwise(model) and long_documents != "chunk" else {}
        return await self.encode_and_score(model, [(query, t) for t in texts], field, query_field="query",
                                           long_documents=long_documents, truncate=truncate is not False,
                                           direction=direction, instruction=instruction,
                                           max_tokens_per_doc=max_tokens_per_doc, **one_list)

    # ----------------------------------------------------------------------------------------- routes
    async def rerank(self, req: RerankRequest) -> RerankResponse:
        """POST /rerank (TEI)."""
        if not req.query:
            raise ApiError(400, "Empty", "`query` is empty")
        self._check_count("texts", len(req.texts))
        model = self.resolve(req.model)
        raw, _ = await self._rank(model, req.query, req.texts, "texts", truncate=req.truncate,
                                  direction=req.truncation_direction, instruction=req.instruction,
                                  long_documents=req.long_documents)
        scores = self._activate(model, raw, req.raw_scores)
        out: RerankResponse = []
        for i in rank_order(scores, req.top_n):
            item: RerankResult = {"index": int(i), "score": _json_float(scores[i])}
            if req.return_text:
                item["text"] = req.texts[i]
            out.append(item)
        return out

    async def cohere_rerank(self, req: CohereRerankRequest, request_id: str) -> CohereRerankResponse:
        """POST /v1/rerank and /v2/rerank (Cohere)."""
        if not req.query:
            raise ApiError(400, "Empty", "`query` is empty")
        self._check_count("documents", len(req.documents))
        model = self.resolve(req.model)
        texts = req.texts()
        raw, num_tokens = await self._rank(model, req.query, texts, "documents", instruction=req.instruction,
                                           max_tokens_per_doc=req.max_tokens_per_doc,
                                           long_documents=req.long_documents)
        scores = self._activate(model, raw)
        results: list[CohereResult] = []
        for i in rank_order(scores, req.top_n):
            item: CohereResult = {"index": int(i), "relevance_score": _json_float(scores[i])}
            if req.return_documents:
                item["document"] = {"text": texts[i]}
            results.append(item)
        return {"id": request_id, "model": model.name, "results": results,
                "meta": {"billed_units": {"search_units": 1}, "tokens": {"input_tokens": num_tokens}},
                "usage": {"total_tokens": num_tokens}}

    async def predict(self, req: PredictRequest) -> PredictResponse:
        """POST /predict (TEI): a single input gives [{score, label}], a batch [[{score, label}], ...]."""
        items, is_batch = predict_items(req.inputs)
        self._check_count("inputs", len(items))
        model = self.resolve(req.model)
        encoder = self.encoders[model.name]
        raw, _ = await self.encode_and_score(model, items, "inputs", long_documents=req.long_documents,
                                             truncate=req.truncate is not False,
                                             direction=req.truncation_direction, instruction=req.instruction)
        scores = self._activate(model, raw, req.raw_scores)
        label = (encoder.id2label or {}).get(0, "LABEL_0")
        per_input: list[list[PredictScore]] = [[{"score": _json_float(s), "label": label}] for s in scores]
        return per_input if is_batch else per_input[0]

    async def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        """POST /tokenize: per input, the ids and tokens the model scores (after templating, truncation)."""
        items, _ = predict_items(req.inputs)
        self._check_count("inputs", len(items))
        model = self.resolve(req.model)
        batch = await self.encode(model, items, "inputs", truncate=req.truncate is not False,
                                  direction=req.truncation_direction, instruction=req.instruction)
        encoder = self.encoders[model.name]
        out: TokenizeResponse = []
        for i in range(len(batch)):
            ids = [int(t) for t in batch.sequence(i)]
            entry: TokenizedInput = {"ids": ids, "tokens": list(encoder.convert_ids_to_tokens(ids)),
                                     "num_tokens": len(ids)}
            types = batch.token_types(i)
            if types is not None:
                entry["token_type_ids"] = [int(t) for t in types]
            out.append(entry)
        return out

    async def _describe(self, name: str) -> dict[str, Any] | None:
        """The loaded model's facts from one of its replicas, at most DESCRIBE_TTL_S old; None while it cannot
        answer. A model with no running replica is not woken up for /info: its last facts stand, less the
        per-replica ones."""
        cached = self._described.get(name)
        if cached is not None and time.monotonic() - cached[0] < DESCRIBE_TTL_S:
            return cached[1]
        if cached is not None and not await self._may_describe(name):
            return {**cached[1], **_NO_REPLICA}
        try:
            fresh = dict(await asyncio.wait_for(self.backends[name].describe(), DESCRIBE_TIMEOUT_S))
        except Exception as e:  # a model that is down must not break /info
            logger.warning("describe(%s) failed: %s", name, e)
            return None if cached is None else {**cached[1], **_NO_REPLICA}
        self._described[name] = (time.monotonic(), fresh)
        return fresh

    async def _may_describe(self, name: str) -> bool:
        """Whether asking the model would reach a running replica (not start one); True when unknown."""
        replicas = getattr(self.backends[name], "replicas", None)
        if replicas is None:
            return True
        try:
            running = await replicas()
        except Exception:  # noqa: BLE001 - a slow controller: ask the model anyway
            return True
        return running is None or running > 0

    def _model_info(self, model: ModelSettings, loaded: dict[str, Any] | None) -> dict[str, Any]:
        encoder = self.encoders[model.name]
        loaded = loaded or {}
        return {
            "name": model.name,
            "model_id": model.model_id,
            "revision": model.revision,
            "family": encoder.family,
            "dtype": loaded.get("dtype", model.dtype),
            "device": loaded.get("device", model.resolved_device),
            # "packed" or "padded", decided by the replica at load (models/scoring.py resolve_execution).
            "execution": loaded.get("execution"),
            "max_input_length": encoder.max_length,
            "id2label": {str(k): v for k, v in (encoder.id2label or {0: "LABEL_0"}).items()},
            "accepts_single_text": encoder.accepts_single,
            "accepts_instruction": encoder.accepts_instruction,
            "default_instruction": encoder.default_instruction,
            "listwise": self._listwise(model),  # a request's documents are scored together
            "long_documents": model.long_documents,
            "chunk_overlap": model.chunk_overlap,
            "max_chunks": model.max_chunks,
            "shared_prefix": model.shared_prefix,
            # Whether prefixes are really computed once: the setting, the family's template and the loaded model.
            "shared_prefix_active": (self._marks_prefixes(model) and loaded.get("shared_prefix")) if loaded else None,
            "num_parameters": loaded.get("num_parameters"),
            "loaded": bool(loaded),
            "batching": {
                "token_budget": loaded.get("token_budget", model.token_budget),
                "max_batch_wait_s": model.max_batch_wait_s,
                "max_fanout": model.max_fanout,
                "max_ongoing_requests": model.max_ongoing_requests,
                "max_queued_requests": model.max_queued_requests,
            },
            "serving": {
                "num_replicas": None if model.autoscaling_config else model.num_replicas,
                "autoscaling_config": model.autoscaling_config.given() if model.autoscaling_config else None,
                "num_cpus": model.resolved_num_cpus,
                "num_gpus": model.num_gpus,
                # Sized by the replica at runtime: a share of its node's CPUs unless num_cpus is set
                # (serve_app/cpu_share.py); the replica that answered, and its node's CPU replicas of this model.
                "torch_threads": loaded.get("torch_threads"),
                "torch_threads_from": loaded.get("torch_threads_from"),
                "torch_threads_why": loaded.get("torch_threads_why"),
                "cpus_seen": loaded.get("cpus_seen"),
                **_node_view(model.name, loaded.get("cpu_node")),
                "gpu_memory": loaded.get("gpu_memory"),
            },
        }

    async def info(self) -> dict[str, Any]:
        """GET /info: service and per-model facts (plus TEI's top-level fields for the default model)."""
        loaded = await asyncio.gather(*(self._describe(m.name) for m in self.settings.models))
        models = [self._model_info(m, d) for m, d in zip(self.settings.models, loaded)]
        default = next(m for m in models if m["name"] == self.settings.default_model)
        return {
            "version": VERSION,
            "default_model": self.settings.default_model,
            "models": models,
            "max_client_batch_size": self.settings.max_candidates,
            "max_body_bytes": self.settings.max_body_bytes,
            "auth_required": self.settings.api_key is not None,
            "ingress": {"num_replicas": self.settings.ingress.num_replicas,
                        "autoscaling_config": (self.settings.ingress.autoscaling_config.given()
                                               if self.settings.ingress.autoscaling_config is not None else None),
                        "num_cpus": self.settings.ingress.num_cpus},
            # TEI /info field names, for the default model.
            "model_id": default["model_id"],
            "model_dtype": default["dtype"],
            "max_input_length": default["max_input_length"],
            "max_batch_tokens": default["batching"]["token_budget"],
        }

    def list_models(self) -> dict[str, Any]:
        """GET /v1/models (OpenAI list shape)."""
        return {"object": "list", "data": [
            {"id": m.name, "object": "model", "created": 0, "owned_by": "rerank-serve", "root": m.model_id,
             "max_model_len": self.encoders[m.name].max_length}
            for m in self.settings.models]}

    async def health(self) -> tuple[bool, str]:
        """GET /health: every model can serve."""
        states = await asyncio.gather(*(self.backends[n].ready() for n in self.model_names),
                                      return_exceptions=True)
        bad = []
        for name, state in zip(self.model_names, states):
            if isinstance(state, BaseException):
                bad.append(f"{name} ({type(state).__name__}: {state})")
            elif not state[0]:
                bad.append(f"{name} ({state[1]})")
        return (not bad, "models not ready: " + "; ".join(bad) if bad else "ok")


def _node_view(name: str, node: dict[str, Any] | None) -> dict[str, Any]:
    """/info's `replicas` (this model's CPU replicas on the answering replica's node: threads of their last
    forward, how they are sized, active or not) and `node` (that node's CPUs and who shares them)."""
    if not node:
        return {"replicas": None, "node": None}
    everyone = node.get("replicas", [])
    mine = [{k: v for k, v in r.items() if k != "model"} for r in everyone if r.get("model") == name]
    summary = {k: v for k, v in node.items() if k != "replicas"}
    summary["cpu_replicas"] = len(everyone)
    summary["models"] = sorted({str(r.get("model")) for r in everyone})
    return {"replicas": mine, "node": summary}
