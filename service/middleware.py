"""ASGI layers around every request, one job each: the request record (request id, access log,
metrics); the body-size limit. Predictions are recognised by what their route's dependency records
(`service.auth.names_the_model`), not by matching paths here."""
import asyncio
import logging
from collections.abc import Callable, Collection

import orjson
from opentelemetry import context
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.budget import BODY_COPIES, MemoryBudget
from service.dataplane import data_plane
from service.error_responses import error_response, status_and_code
from service.errors import BodyTooLarge, ClientClosedRequest, ShuttingDown
from service.metrics import Metrics
from service.record import SCOPE_KEY, RequestRecord, record_of, request_id
from service.tracing import Tracing, traceresponse

log = logging.getLogger("service.access")
REQUEST_ID_HEADER = b"x-request-id"
TRACERESPONSE_HEADER = b"traceresponse"
# Probes and scrapes come every few seconds and say nothing about a prediction: no spans for them.
UNTRACED_PATHS = ("/health", "/metrics")
ERROR_BODY_READ = 4096  # bytes of an error answer read for its `code`, when the request is traced


class RequestRecorder:
    """Creates each request's record (service/record.py) and, once the answer is sent, writes its
    log line and its metrics from it: an `X-Request-ID` on every answer (the client's own if sane),
    requests in flight, and per prediction its model, status and stage timings. While tracing is
    on, it continues the caller's trace (service/tracing.py): a server span, current while the app
    runs, a `traceresponse` header naming it, its trace id in the log line and the exemplars."""

    def __init__(self, app: ASGIApp, metrics: Metrics, model_names: Callable[[], Collection[str]],
                 tracing: Tracing | None = None) -> None:
        self.app = app
        self.metrics = metrics
        self.model_names = model_names
        self.tracing = tracing or Tracing.off()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = scope[SCOPE_KEY] = RequestRecord(request_id(_header(scope, REQUEST_ID_HEADER)))
        echoed = record.request_id.encode()
        if self.tracing.enabled and not scope["path"].startswith(UNTRACED_PATHS):
            record.span = self.tracing.start_server_span(scope["method"], scope["headers"], record.started)
        error_body = bytearray()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                message["headers"] = [*message.get("headers", []), (REQUEST_ID_HEADER, echoed)]
                if record.span is not None:
                    message["headers"].append((TRACERESPONSE_HEADER, traceresponse(record.span)))
            elif record.span is not None and record.status >= 400 and len(error_body) < ERROR_BODY_READ:
                error_body.extend(message.get("body", b""))
            await send(message)

        self.metrics.in_flight.inc()
        attached = context.attach(record.span.current()) if record.span else None
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if attached is not None:
                context.detach(attached)
            self.metrics.in_flight.dec()
            if record.answer_lost:
                record.status = status_and_code(ClientClosedRequest())[0]
            record.count(self.metrics, self.model_names())
            if record.span is not None:
                self._end_span(scope, record, bytes(error_body))
            _log(scope, record)

    def _end_span(self, scope: Scope, record: RequestRecord, error_body: bytes) -> None:
        """The server span's name and HTTP attributes; the record ends it (service/record.py)."""
        route = getattr(scope.get("route"), "path", None)
        assert record.span is not None
        record.span.name = f"{scope['method']} {route or scope['path']}"
        attributes = {"http.request.method": scope["method"], "http.response.status_code": record.status,
                      **({"http.route": route} if route else {})}
        record.end_span(self.tracing, attributes, _error_code(error_body) if record.status >= 400 else None)


class BodyLimit:
    """Refuses a body over `limit` bytes (413), from Content-Length when the app starts reading it,
    and while it streams otherwise; a route that refuses a request first (401) reads nothing.

    Each request holds an account of the memory budget until its answer is sent (`request.state.
    memory`). The body is reserved in it before it is read: Content-Length's worth at the first
    read, then whatever streams past that; past the budget the read raises MemoryExhausted (503)."""

    def __init__(self, app: ASGIApp, limit: int, budget: MemoryBudget) -> None:
        self.app = app
        self.limit = limit
        self.budget = budget

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        received = 0
        announced = _content_length(scope)
        covered: int | None = None  # body bytes reserved for; None until the app first reads

        async def limited_receive() -> Message:
            nonlocal received, covered
            if announced > self.limit:
                raise BodyTooLarge(self.limit)
            if covered is None:
                account.reserve(announced * BODY_COPIES)
                covered = announced
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:  # a chunked upload without Content-Length, or a lying one
                raise BodyTooLarge(self.limit)
            if received > covered:
                account.reserve((received - covered) * BODY_COPIES)
                covered = received
            return message

        with self.budget.account() as account:
            record_of(scope).memory = account
            await self.app(scope, limited_receive, send)


class ShutdownAnswer:
    """When graceful shutdown runs out of time, uvicorn cancels the requests still at work, and
    answers each with a bare 500 and a logged traceback. Here each gets a JSON 503 instead: the
    client learns to retry elsewhere, and the log is not filled with tracebacks of no fault.
    Innermost, so that the request log and the metrics see the 503."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        except asyncio.CancelledError:
            if started or not data_plane(scope["app"]).draining:  # not a shutdown, or too late to answer
                raise
            task = asyncio.current_task()
            if task is not None:  # always: uvicorn runs each request in a task
                task.uncancel()
            await error_response(ShuttingDown())(scope, receive, send)


def _log(scope: Scope, record: RequestRecord) -> None:
    path = scope["path"]
    # %r: a path is decoded from the URL and may hold anything, newlines included.
    shown = path if path.isprintable() and " " not in path else repr(path)
    model = f" model={record.model}" if record.model is not None else ""
    log.info("%s %s request_id=%s%s%s status=%d %s", scope["method"], shown, record.request_id,
             record.logged_trace(), model, record.status, record.logged_stages())


def _error_code(body: bytes) -> str | None:
    try:
        code = orjson.loads(body).get("code")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return code if isinstance(code, str) else None


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


def _content_length(scope: Scope) -> int:
    try:
        return int(_header(scope, b"content-length") or 0)
    except ValueError:
        return 0
