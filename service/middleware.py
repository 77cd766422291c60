"""ASGI layers around every request, one job each: the request record (request id, access log,
metrics); the body-size limit. Predictions are recognised by what their route's dependency records
(`service.auth.names_the_model`), not by matching paths here."""
import asyncio
import logging
import os
import re
from collections.abc import Callable, Collection

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.dataplane import data_plane
from service.error_responses import error_response
from service.errors import BodyTooLarge, ShuttingDown
from service.metrics import COMPARISON, UNKNOWN_MODEL, Metrics
from service.record import SCOPE_KEY, RequestRecord

log = logging.getLogger("service.access")
REQUEST_ID_HEADER = b"x-request-id"
# A client's id is echoed and logged only if it cannot forge log lines or bloat them.
SAFE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:+/=@-]{1,128}")


class RequestRecorder:
    """Creates each request's record (service/record.py) and, once the answer is sent, writes its
    log line and its metrics from it: an `X-Request-ID` on every answer (the client's own if sane),
    requests in flight, and per prediction its model, status and stage timings."""

    def __init__(self, app: ASGIApp, metrics: Metrics, model_names: Callable[[], Collection[str]]) -> None:
        self.app = app
        self.metrics = metrics
        self.model_names = model_names

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        record = scope[SCOPE_KEY] = RequestRecord(request_id.decode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                message["headers"] = [*message.get("headers", []), (REQUEST_ID_HEADER, request_id)]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self.metrics.in_flight.dec()
            if record.model is not None:
                # Only served names become label values, so a client cannot grow the series.
                if record.model not in self.model_names() and record.model != COMPARISON:
                    record.model = UNKNOWN_MODEL
                self.metrics.observe_request(record.model, record.status,
                                             record.timings if record.status == 200 else None)
            _log(scope, record)


class BodyLimit:
    """Refuses a body over `limit` bytes (413), from Content-Length when the app starts reading it,
    and while it streams otherwise; a route that refuses a request first (401) reads nothing."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        received = 0
        announced = _content_length(scope)

        async def limited_receive() -> Message:
            nonlocal received
            if announced > self.limit:
                raise BodyTooLarge(self.limit)
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:  # a chunked upload without Content-Length, or a lying one
                raise BodyTooLarge(self.limit)
            return message

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
            asyncio.current_task().uncancel()
            await error_response(ShuttingDown())(scope, receive, send)


def _log(scope: Scope, record: RequestRecord) -> None:
    path = scope["path"]
    # %r: a path is decoded from the URL and may hold anything, newlines included.
    shown = path if path.isprintable() and " " not in path else repr(path)
    if record.model is None:
        log.info("%s %s request_id=%s status=%d total=%.1fms", scope["method"], shown,
                 record.request_id, record.status, record.elapsed_ms())
        return
    timings = record.timings or {"total": record.elapsed_ms()}
    stages = " ".join(f"{k}={v:.1f}ms" for k, v in timings.items())
    log.info("%s %s request_id=%s model=%s status=%d %s", scope["method"], shown, record.request_id,
             record.model, record.status, stages)


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


def _request_id(scope: Scope) -> bytes:
    given = _header(scope, REQUEST_ID_HEADER)
    if given is not None and SAFE_REQUEST_ID.fullmatch(given):
        return given
    return os.urandom(16).hex().encode()


def _content_length(scope: Scope) -> int:
    try:
        return int(_header(scope, b"content-length") or 0)
    except ValueError:
        return 0
