"""The HTTP layer of docs/API.md: FastAPI routes over a `RerankService`, JSON errors for everything.

Built per ingress replica by `create_http_app(service, map_error=...)`; it has no Ray imports (the ingress
passes deployments/errors.py's mapping of Ray's exceptions), so the whole HTTP contract is unit-testable in
process with a fake service backend.
"""
from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from typing import Any, Awaitable, Callable

from fastapi import FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import TypeAdapter
from fastapi.security import HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app.schemas import (ApiError, CohereRerankRequest, CohereRerankResponse, ErrorBody, PredictRequest,
                               PredictResponse, RerankRequest, RerankResponse, TokenizeRequest, TokenizeResponse,
                               map_exception)
from serve_app.service import VERSION, RerankService

logger = logging.getLogger("ray.serve")

BODY_ROUTES = frozenset({"/rerank", "/predict", "/v1/rerank", "/v2/rerank", "/tokenize"})
# Reachable without the API key: the health probe, and the docs page (it cannot send a header itself;
# its "Authorize" button adds the key to the calls it makes).
PUBLIC_ROUTES = frozenset({"/health", "/docs", "/docs/oauth2-redirect", "/openapi.json"})

_ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 404, 413, 415, 422, 429, 503)}
# The `route` label of the request metrics: the app's own routes, every other path counted as "other" (a label
# value per requested path would let clients create series without end).
METERED_ROUTES = BODY_ROUTES | {"/health", "/info", "/v1/models", "/metrics"}
_MODEL_KEY = "rerank.model"  # the scope["state"] entry where a route notes the model a request is for
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus text exposition

# (route, model, status, error_type, seconds) of every answered request; error_type "" for a success.
RequestObserver = Callable[[str, str, int, str, float], None]


def _body(shape: Any) -> tuple[dict, Callable[[Any], bytes]]:
    """A route's success response from its one description (serve_app/schemas.py): the `responses` entry that
    /docs shows, and the serialiser of the service's result through the same type."""
    return {200: {"model": shape}, **_ERRORS}, TypeAdapter(shape).dump_json


def error_response(err: ApiError) -> JSONResponse:
    # A message may quote what the client sent (a field name in a validation error): text that is not valid
    # Unicode (a lone surrogate) is written escaped, so rendering the error can never fail.
    message = err.message.encode("utf-8", "backslashreplace").decode("utf-8")
    return JSONResponse({"error": message, "error_type": err.error_type}, status_code=err.status,
                        headers=err.headers or None)


def _route_path(scope: dict) -> str:
    """The path the app routes on (Ray Serve may mount the app under a route prefix)."""
    path, root = scope.get("path", "/"), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path or "/"


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


class RequestGuard:
    """ASGI middleware in front of the routes: API key, content type, body size (docs/API.md, Errors).

    The body is read here, counting bytes as they arrive, so a body without (or lying in) its
    Content-Length is cut off at the limit instead of being buffered whole.
    """

    def __init__(self, app: Any, *, max_body_bytes: int, api_key: str | None):
        self.app, self.max_body_bytes, self.api_key = app, max_body_bytes, api_key

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = _route_path(scope)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key is not None and path not in PUBLIC_ROUTES and not self._authorized(headers):
            await self._reject(scope, receive, send, ApiError(
                401, "Unauthorized", "missing or wrong API key: send `Authorization: Bearer <key>`",
                {"WWW-Authenticate": "Bearer"}))
            return
        if scope.get("method") == "POST" and path in BODY_ROUTES:
            body_or_error = await self._read_body(headers, receive)
            if isinstance(body_or_error, ApiError):
                await self._reject(scope, receive, send, body_or_error)
                return
            receive = _replay(body_or_error, receive)
        await self.app(scope, receive, send)

    def _authorized(self, headers: dict[str, str]) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    async def _read_body(self, headers: dict[str, str], receive: Callable) -> bytes | ApiError:
        if not _is_json(headers.get("content-type", "")):
            return ApiError(415, "Validation", f"content type {headers.get('content-type', '(none)')!r} is not "
                                               "JSON: send `Content-Type: application/json`")
        too_large = ApiError(413, "PayloadTooLarge", f"the body is larger than the limit of "
                                                     f"{self.max_body_bytes} bytes: send fewer or shorter texts")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return too_large
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return too_large
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if not body.strip():
            return ApiError(400, "Validation", "the body is empty: send a JSON object")
        return body

    @staticmethod
    async def _reject(scope: dict, receive: Callable, send: Callable, err: ApiError) -> None:
        logger.info("rejected %s %s: %s", scope.get("method"), scope.get("path"), err)
        await error_response(err)(scope, receive, send)


class RequestMetrics:
    """ASGI middleware outside every other: reports each answered request to `observe` (route, model, status,
    error_type, seconds), whoever answered it (the guard, a framework error, a route). The model is what the route
    noted in the scope's state ("" where no route ran or the request names no model); error_type is read from the
    JSON error body (docs/API.md, Errors)."""

    def __init__(self, app: Any, *, observe: RequestObserver):
        self.app, self.observe = app, observe

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        path = _route_path(scope)
        state = scope.setdefault("state", {})
        answer = {"status": 500, "body": b""}

        async def noting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
            elif message["type"] == "http.response.body" and answer["status"] >= 400:
                answer["body"] += message.get("body", b"")[:4096]
            await send(message)

        try:
            await self.app(scope, receive, noting_send)
        finally:
            try:
                self.observe(path if path in METERED_ROUTES else "other", state.get(_MODEL_KEY, ""),
                             answer["status"], _error_type(answer["status"], answer["body"]),
                             time.perf_counter() - start)
            except Exception:  # noqa: BLE001 - metrics must never fail a request
                logger.warning("request metrics not recorded", exc_info=True)


def _error_type(status: int, body: bytes) -> str:
    if status < 400:
        return ""
    try:
        return str(json.loads(body)["error_type"])
    except Exception:  # noqa: BLE001 - an error body that is not ours (cannot happen through create_http_app)
        return "Internal" if status >= 500 else "Error"


def _replay(body: bytes, receive: Callable) -> Callable:
    """A `receive` that hands the already-read body to the app once, then defers to the real one."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _default_request_id() -> str:
    return uuid.uuid4().hex


def create_http_app(service: RerankService, *, request_id: Callable[[], str] = _default_request_id,
                    map_error: Callable[[BaseException], ApiError] = map_exception,
                    observe: RequestObserver | None = None,
                    metrics: Callable[[], Awaitable[str]] | None = None) -> FastAPI:
    """The FastAPI app of docs/API.md over `service`; `request_id` names a request (Ray Serve's id in replicas),
    `map_error` turns any exception into its JSON error (the ingress adds Ray's exceptions), `observe` is told of
    every answered request (RequestMetrics) and `metrics` gives GET /metrics its Prometheus text (the ingress
    gathers the cluster's, deployments/metrics.py)."""
    app = FastAPI(
        title="rerank-serve", version=VERSION,
        description="Rerankers of several families behind one endpoint: TEI `/rerank` and `/predict`, "
                    "Cohere-compatible `/v1/rerank` and `/v2/rerank`. Errors are `{error, error_type}`.")
    app.add_middleware(RequestGuard, max_body_bytes=service.settings.max_body_bytes,
                       api_key=service.settings.api_key.get_secret_value() if service.settings.api_key else None)
    if observe is not None:
        app.add_middleware(RequestMetrics, observe=observe)  # added last: outermost, it sees the guard's answers
    served = set(service.model_names)

    def for_model(request: Request, name: str | None) -> None:
        """Note the model a request is for, for RequestMetrics; a name nothing serves is "unknown" (a label value
        per made-up name would let clients create series without end)."""
        name = service.settings.default_model if name is None else name
        request.scope.setdefault("state", {})[_MODEL_KEY] = name if name in served else "unknown"
    # Only for /docs: declares the bearer scheme so the page's "Authorize" button works (RequestGuard checks).
    bearer = [Security(HTTPBearer(auto_error=False))] if service.settings.api_key else []

    @app.exception_handler(RequestValidationError)
    @app.exception_handler(StarletteHTTPException)
    async def _framework_error(_: Request, exc: Exception) -> JSONResponse:
        err = map_error(exc)
        if err.status == 405:  # keep Starlette's Allow header
            err.headers = {**err.headers, **(getattr(exc, "headers", None) or {})}
        return error_response(err)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return error_response(map_error(exc))

    rerank_docs, rerank_json = _body(RerankResponse)
    predict_docs, predict_json = _body(PredictResponse)
    cohere_docs, cohere_json = _body(CohereRerankResponse)
    tokenize_docs, tokenize_json = _body(TokenizeResponse)

    async def respond(work: Awaitable[Any], dump_json: Callable[[Any], bytes] | None = None) -> Response:
        """The work's result as JSON (through `dump_json` where the route has a described body), or its error."""
        try:
            result = await work
            if dump_json is None:
                return JSONResponse(result)
            return Response(dump_json(result), media_type="application/json")
        except Exception as exc:  # every failure becomes the JSON error of docs/API.md, Errors
            err = map_error(exc)
            if err.status >= 500:
                logger.error("request failed with %d %s: %r", err.status, err.error_type, exc,
                             exc_info=err.status == 500)
            else:
                logger.info("request rejected: %s", err)
            return error_response(err)

    @app.post("/rerank", dependencies=bearer, responses=rerank_docs,
              summary="Rerank texts against a query (text-embeddings-inference)")
    async def rerank(body: RerankRequest, request: Request) -> Response:
        for_model(request, body.model)
        return await respond(service.rerank(body), rerank_json)

    @app.post("/predict", dependencies=bearer, responses=predict_docs,
              summary="Score one text, a pair, or a batch of them (text-embeddings-inference)")
    async def predict(body: PredictRequest, request: Request) -> Response:
        for_model(request, body.model)
        return await respond(service.predict(body), predict_json)

    @app.post("/v1/rerank", dependencies=bearer, responses=cohere_docs,
              summary="Rerank documents (Cohere v1 / Jina / vLLM compatible)")
    async def rerank_v1(body: CohereRerankRequest, request: Request) -> Response:
        for_model(request, body.model)
        return await respond(service.cohere_rerank(body, request_id()), cohere_json)

    @app.post("/v2/rerank", dependencies=bearer, responses=cohere_docs,
              summary="Rerank documents (Cohere v2 compatible)")
    async def rerank_v2(body: CohereRerankRequest, request: Request) -> Response:
        for_model(request, body.model)
        return await respond(service.cohere_rerank(body, request_id()), cohere_json)

    @app.post("/tokenize", dependencies=bearer, responses=tokenize_docs,
              summary="The token ids and tokens a model scores, after templating and truncation")
    async def tokenize(body: TokenizeRequest, request: Request) -> Response:
        for_model(request, body.model)
        return await respond(service.tokenize(body), tokenize_json)

    @app.get("/info", dependencies=bearer, summary="Version, default model, and every model's settings")
    async def info() -> Response:
        return await respond(service.info())

    @app.get("/v1/models", dependencies=bearer, summary="Served models (OpenAI list shape)")
    async def list_models() -> JSONResponse:
        return JSONResponse(service.list_models())

    @app.get("/health", responses={503: {"model": ErrorBody}},
             summary="200 when every model can serve, 503 otherwise (never needs a key)")
    async def health() -> JSONResponse:
        try:
            ok, why = await service.health()
        except Exception as exc:
            ok, why = False, f"health check failed: {exc!r}"
        if ok:
            return JSONResponse({"status": "ok"})
        return error_response(ApiError(503, "Unhealthy", why))

    @app.get("/metrics", dependencies=bearer, responses={200: {"content": {"text/plain": {}}}, **_ERRORS},
             response_class=PlainTextResponse,
             summary="Prometheus text: every model's metrics across all its replicas (needs the key when one is set)")
    async def prometheus_metrics() -> Response:
        if metrics is None:
            return error_response(ApiError(503, "Unhealthy", "metrics are not collected by this server"))
        try:
            return Response(await metrics(), media_type=METRICS_TYPE)
        except Exception as exc:  # an unreadable cluster is a JSON error like any other
            return error_response(map_error(exc))

    return app
