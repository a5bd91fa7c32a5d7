"""The HTTP service: a FastAPI app over one :class:`~moe_rec.serve.recommender.Recommender`.

Endpoints (OpenAPI at ``/openapi.json``, interactive docs at ``/docs`` and ``/redoc``, whose
JavaScript and CSS come from the ``fastapi-offline`` package and are served by this app, so the
docs work without internet):

* ``POST /v1/recommend`` — top-``k`` items of one service for a cross-service history;
* ``GET /v1/items/{service}/{item_id}`` — one catalogue row (404 when unknown);
* ``GET /healthz`` — status and what the bundle holds;
* ``GET /metrics`` — Prometheus text: requests by endpoint and status, latency, Recommender stats.

The model call blocks, so the recommend endpoint is a plain ``def``: FastAPI runs it in the
thread pool, and concurrent requests wait together inside the Recommender, which batches them.
Every error is JSON ``{"error", "message", "field"}``: bad input is a 4xx that names the field
at fault (a 422 also lists every problem in ``errors``); anything unexpected is a 500 with an
``error_id`` that is also in the server log beside the traceback, which never reaches the
client. A body is checked against :class:`~moe_rec.serve.request.RecommendRequest` here and
against the bundle by the Recommender, once each. Bodies over ``max_body_bytes`` get 413 before
they are parsed; a body not sent as
``application/json`` gets 415, an empty or malformed one 400.
"""

from __future__ import annotations

import errno
import logging
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from copy import deepcopy
from logging.config import dictConfig
from pathlib import Path
from typing import Annotated, Any

import anyio.to_thread
import torch
import uvicorn
from fastapi import Body, Depends, FastAPI
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.routing import BaseRoute, Match

import moe_rec
from moe_rec.serve.config import ServeConfig
from moe_rec.serve.metrics import ServeMetrics
from moe_rec.serve.recommender import Recommender
from moe_rec.serve.request import RecommendRequest, RequestError, field_name

log = logging.getLogger(__name__)

DRAIN_FACTOR = 8  # an oversized body up to this many times the limit is read (and dropped) so the
# client gets its 413 instead of a connection reset; a larger one is refused unread

RESERVED = (
    "item_id",
    "score",
    "rank",
    "narrative",
)  # response keys a catalogue field of the same name cannot replace
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


# --- response bodies (also the OpenAPI schema; the request body is serve.request.RecommendRequest)

# The OpenAPI examples use ids of the demo bundle (`moe-rec run --config configs/experiments/demo.yaml`:
# synthetic services grocery, marketplace and delivery with items g00000.., m00000.., d00000..),
# so "Try it out" in /docs works against it as written.
EXAMPLE_HISTORY = [{"service": "grocery", "item_id": "g00004"}, {"service": "delivery", "item_id": "d00014"}]
EXAMPLE_REQUEST = {"history": EXAMPLE_HISTORY, "service": "marketplace", "k": 5}
EXAMPLE_CRITIQUE = {
    **EXAMPLE_REQUEST,
    "critique": "Anything cheaper? Not a fan of that brand.",
    "explain": True,
}


def _demo(value: Any) -> dict[str, Any]:
    """An OpenAPI ``examples`` entry (shown and pre-filled by /docs) for the demo bundle."""
    return {"demo": {"summary": "the demo bundle", "value": value}}


class RecommendedItem(BaseModel):
    """One recommended item: its id, ranking score (higher first), 1-based rank and its catalogue fields."""

    model_config = ConfigDict(extra="allow")
    item_id: str
    score: float
    rank: int
    narrative: str | None = Field(None, description="why it fits and what it is (only with `explain`)")


class RecommendResponse(BaseModel):
    service: str
    items: list[RecommendedItem] = Field(description="best first; fewer than `k` only when `exhausted`")
    available: int = Field(
        description="items of the service this request may get: all of them, less the history's "
        "when `exclude_seen`"
    )
    exhausted: bool = Field(
        description="true when fewer than `k` items came back because only `available` exist (then all of them)"
    )
    latency_ms: float = Field(description="time spent in the Recommender (queue + batch + decode)")


class ErrorResponse(BaseModel):
    error: str = Field(
        description="invalid_json, unsupported_media_type, invalid_request, too_large, not_found, "
        "http_error or internal_error"
    )
    message: str = Field(description="what is wrong")
    field: str | None = Field(None, description='the input at fault, e.g. "history[3].item_id"')


class FieldError(BaseModel):
    field: str = Field(description='the input at fault, e.g. "history[3].item_id"')
    message: str


class InvalidRequestResponse(ErrorResponse):
    """Every 422: ``message`` joins the ``errors``, ``field`` is the first one's."""

    errors: list[FieldError] = Field(description="every problem of the request")


class InternalErrorResponse(ErrorResponse):
    error_id: str = Field(description="quote it to find the traceback in the server log")


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": model, "description": text}
    for code, model, text in (
        (400, ErrorResponse, "the body is empty or not valid JSON"),
        (413, ErrorResponse, "body over the size limit"),
        (415, ErrorResponse, "the body is not sent as JSON (Content-Type: application/json)"),
        (
            422,
            InvalidRequestResponse,
            "a field is missing, has the wrong type or an unknown value (e.g. unknown item)",
        ),
        (500, InternalErrorResponse, "internal error (no details; see error_id in the server log)"),
    )
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorResponse, "description": "unknown service or item"},
    422: ERRORS[422],  # FastAPI would document its own 422 shape, which this app never sends
}


def _error(status: int, error: str, message: str, field: str | None = None, **extra: Any) -> JSONResponse:
    body = {"error": error, "message": message, "field": field, **extra}
    return JSONResponse(body, status_code=status)


def _invalid(errors: list[dict[str, str]]) -> JSONResponse:
    """The one 422 shape: every ``{field, message}``, joined in ``message``, the first in ``field``."""
    message = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return _error(422, "invalid_request", message, errors[0]["field"], errors=errors)


class Refused(Exception):
    """A request turned away before its body is validated; answered as ``_error(*args)``."""

    def __init__(self, status: int, error: str, message: str, field: str) -> None:
        super().__init__(message)
        self.status, self.error, self.message, self.field = status, error, message, field


async def json_body(request: Request) -> None:
    """Refuses a body not declared as JSON (415) or empty (400), before FastAPI validates it: a
    form-encoded or text body would otherwise be reported as a wrong type, an empty one as a
    missing field."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not (media == "application/json" or (media.startswith("application/") and media.endswith("+json"))):
        got = f"got {media!r}" if media else "no Content-Type was sent"
        raise Refused(
            415,
            "unsupported_media_type",
            f"send the body as JSON with Content-Type: application/json ({got})",
            "body",
        )
    if not await request.body():  # a non-empty body that is not JSON fails FastAPI's parse: 400 too
        raise Refused(400, "invalid_json", "body is empty: send a JSON object", "body")


# --- ASGI layers around the app: metrics + catch-all, body size limit ------------------------


class _Observe:
    """Outermost layer: counts and times every request; turns an unhandled exception into a 500.

    The traceback goes to the server log under a fresh error id; the client sees only the id.
    A request's ``endpoint`` label is the template of the route its path matches (``/docs``,
    ``/openapi.json``, the docs' asset mount, ...), found before the app runs, so a request refused
    before routing (413) still counts under its endpoint; ``unmatched`` for unknown paths.
    """

    def __init__(self, app: ASGIApp, metrics: ServeMetrics, routes: list[BaseRoute]) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes

    def _endpoint(self, scope: Scope) -> str:
        """The route template ``scope``'s path matches (a wrong method still names its route)."""
        for route in self.routes:
            match, _ = route.matches(scope)
            if match is not Match.NONE:
                return getattr(route, "path", "unmatched")
        return "unmatched"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 499  # 499: the client went away before an answer
        endpoint = self._endpoint(scope)

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except Exception:
            error_id = uuid.uuid4().hex[:12]
            log.exception("error_id=%s on %s %s", error_id, scope["method"], scope["path"])
            if status == 499:  # nothing sent yet
                response = _error(500, "internal_error", "internal server error", error_id=error_id)
                await response(scope, receive, send_and_note)
        finally:
            self.metrics.observe(endpoint, scope["method"], status, time.perf_counter() - start)


class _BodyLimit:
    """Reads the whole body first and answers 413 when it is over ``max_bytes``."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = int(dict(scope["headers"]).get(b"content-length", b"0"))  # h11 checked the number
        drain = self.max_bytes * DRAIN_FACTOR
        body, received, more = bytearray(), 0, declared <= drain
        while more and received <= drain:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            received += len(chunk)
            if received <= self.max_bytes:
                body += chunk
            more = message.get("more_body", False)
        if max(declared, received) > self.max_bytes:
            text = f"request body is over the limit of {self.max_bytes:,} bytes"
            await _error(413, "too_large", text, "body")(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)


# --- the app ---------------------------------------------------------------------------------


def create_app(recommender: Recommender) -> FastAPI:
    """The FastAPI app serving ``recommender`` (its ``config.max_body_bytes``: larger request bodies
    are answered 413 unparsed); it closes the Recommender when the app shuts down."""
    config = recommender.config
    threads = max(64, 2 * config.max_batch_size)  # for blocking calls: batches fill only with enough
    metrics = ServeMetrics(recommender.stats)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        anyio.to_thread.current_default_thread_limiter().total_tokens = threads
        yield
        log.info("shutting down: closing the recommender")
        await anyio.to_thread.run_sync(recommender.close)

    app = FastAPIOffline(
        title="moe-rec",
        summary="Multi-service recommendations from a generative model over semantic IDs.",
        version=moe_rec.__version__,  # also when run from a source tree, not installed
        lifespan=lifespan,
    )

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            return _error(400, "invalid_json", f"body is not valid JSON: {first['ctx']['error']}", "body")
        return _invalid([{"field": field_name(tuple(e["loc"])), "message": e["msg"]} for e in exc.errors()])

    @app.exception_handler(Refused)
    async def refused(_: Request, exc: Refused) -> JSONResponse:
        return _error(exc.status, exc.error, exc.message, exc.field)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else "http_error"
        return _error(exc.status_code, code, str(exc.detail))

    @app.post(
        "/v1/recommend", response_model=RecommendResponse, responses=ERRORS, dependencies=[Depends(json_body)]
    )
    def recommend(
        request: Annotated[
            RecommendRequest,
            Body(
                openapi_examples=_demo(EXAMPLE_REQUEST)
                | {
                    "critique": {
                        "summary": "the demo bundle, with a critique, explained",
                        "value": EXAMPLE_CRITIQUE,
                    }
                }
            ),
        ],
    ) -> JSONResponse:
        """Top-``k`` items of ``service`` for the history: real items only, best first; fewer than
        ``k`` only when fewer exist (``exhausted``)."""
        start = time.perf_counter()
        try:
            answer = recommender.answer(request)
        except RequestError as e:
            return _invalid([{"field": e.field, "message": e.message}])
        items = [
            {"item_id": r.item_id, "score": r.score, "rank": rank}
            | ({"narrative": r.narrative} if r.narrative is not None else {})
            | {f: v for f, v in r.fields.items() if f not in RESERVED}
            for rank, r in enumerate(answer.items, start=1)
        ]
        latency_ms = (time.perf_counter() - start) * 1000
        body = {"service": request.service, "items": items, "available": answer.available,
                "exhausted": len(items) < request.k, "latency_ms": latency_ms}  # fmt: skip
        return JSONResponse(body)

    @app.get("/v1/items/{service}/{item_id:path}", response_model=dict[str, Any], responses=NOT_FOUND)
    def item(
        service: Annotated[str, PathParam(openapi_examples=_demo("grocery"))],
        item_id: Annotated[str, PathParam(openapi_examples=_demo("g00004"))],
    ) -> JSONResponse:
        """One catalogue row."""
        try:
            return JSONResponse(recommender.item(service, item_id))
        except RequestError as e:
            return _error(404, "not_found", str(e), e.field)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        """Liveness and what is served: services, limits and the bundle's info."""
        return {
            "status": "ok",
            "services": recommender.services,
            "max_k": config.max_k,
            "max_history": recommender.max_history,
            "bundle": recommender.info,
        }

    @app.get("/metrics", response_class=Response)
    def prometheus() -> Response:
        """Prometheus text exposition."""
        return Response(metrics.render(), media_type=metrics.content_type)

    app.add_middleware(_BodyLimit, max_bytes=config.max_body_bytes)
    app.add_middleware(_Observe, metrics=metrics, routes=app.router.routes)  # added last = outermost
    return app


# --- running it ------------------------------------------------------------------------------


def _log_config(level: str) -> dict[str, Any]:
    """uvicorn's logging setup, with our ``moe_rec`` loggers on the same handler."""
    config = deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["loggers"]["moe_rec"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return config


class _Server(uvicorn.Server):
    """uvicorn's server that also logs one line with the URL it actually listens on, and remembers
    the first signal that stopped it."""

    stopped_by: int | None = None

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.stopped_by is None:
            self.stopped_by = sig
        super().handle_exit(sig, frame)

    async def startup(self, sockets: list[Any] | None = None) -> None:
        await super().startup(sockets)
        for server in self.servers:
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                host = f"[{host}]" if ":" in host else host
                log.info(
                    "moe-rec serving at http://%s:%d (POST /v1/recommend; docs /docs; metrics /metrics)",
                    host,
                    port,
                )


def _listen(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` for uvicorn to serve on (as its own ``bind_socket``
    does), bound before the bundle loads, so a port in use fails at once and in one line.

    Raises:
        OSError: the address cannot be bound (in use, not this machine's, no permission).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        why = {
            errno.EADDRINUSE: "already in use; pick another port, or 0 for any free one",
            errno.EADDRNOTAVAIL: "the address is not one of this machine's",
            errno.EACCES: "permission denied (ports below 1024 need privileges)",
        }.get(e.errno, e.strerror or str(e))
        shown = f"[{host}]" if ":" in host else host
        raise OSError(f"cannot listen on {shown}:{port}: {why}") from None
    return sock


def run_server(bundle: str | Path, config: ServeConfig | None = None) -> None:
    """Load ``bundle`` and serve it in this process until SIGINT / SIGTERM, as ``config`` says.

    Shutdown is graceful: the socket stops accepting, in-flight requests finish, then the
    Recommender is closed. ``port=0`` picks a free port (the startup line says which). The port is
    bound before the bundle loads: one that cannot be bound (already in use, ...) raises OSError
    with a one-line message. ``torch_threads`` sets the model's intra-op CPU threads (default:
    torch's, one per core); on a small or shared machine 1 can be many times faster
    (docs/serving.md).
    """
    config = config or ServeConfig()
    sock = _listen(config.host, config.port)
    dictConfig(_log_config(config.log_level))
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)  # before the Recommender's worker thread starts
    log.info("loading bundle %s (device %s)", bundle, config.device or "auto")
    try:
        recommender = Recommender.from_bundle(bundle, config)
    except BaseException:
        sock.close()
        raise
    counts = recommender.info.get("items_per_service") or {}
    services = ", ".join(f"{s} ({counts.get(s, '?')} items)" for s in recommender.services)
    log.info("model on %s; services: %s", recommender.info.get("device", "?"), services)
    server = _Server(
        uvicorn.Config(
            create_app(recommender),
            host=config.host,
            port=config.port,
            log_config=None,  # configured above
            log_level=config.log_level,
            access_log=config.access_log,
            timeout_graceful_shutdown=30,
        )
    )
    server.run(sockets=[sock])  # uvicorn closes it on shutdown
    # uvicorn re-raises the stopping signal after its graceful shutdown, which does nothing where
    # SIGINT was ignored at start (a background job of a non-interactive shell): SIGINT always ends
    # as KeyboardInterrupt here, so the CLI exits 130 however it was started.
    if server.stopped_by == signal.SIGINT:
        raise KeyboardInterrupt
