"""ASGI layers around every request, one job each: request id and access log; body-size limit;
metrics. Predictions are recognised by what their route tells (`service.auth.inference_request`),
not by matching paths here."""
import logging
import os
import re
import time
from collections.abc import Callable, Collection

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.budget import BODY_COPIES, MemoryBudget
from service.errors import BodyTooLarge
from service.metrics import UNKNOWN_MODEL, Metrics

log = logging.getLogger("service.access")
REQUEST_ID_HEADER = b"x-request-id"
# A client's id is echoed and logged only if it cannot forge log lines or bloat them.
SAFE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:+/=@-]{1,128}")


class RequestLog:
    """An `X-Request-ID` on every answer (the client's own if sane) and one log line per request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = _request_id(scope)
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (REQUEST_ID_HEADER, request_id)]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            _log(scope, status, (time.perf_counter() - started) * 1000, request_id.decode())


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
            scope.setdefault("state", {})["memory"] = account
            await self.app(scope, limited_receive, send)


class RequestMetrics:
    """Requests in flight; per prediction its model, status and stage timings."""

    def __init__(self, app: ASGIApp, metrics: Metrics, model_names: Callable[[], Collection[str]]) -> None:
        self.app = app
        self.metrics = metrics
        self.model_names = model_names

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, observed_send)
        finally:
            self.metrics.in_flight.dec()
            state = scope.get("state", {})
            if "prediction_for" in state:
                # Only served names become label values, so a client cannot grow the series.
                model = state["prediction_for"]
                state["model"] = model if model in self.model_names() else UNKNOWN_MODEL
                self.metrics.observe_request(state["model"], status,
                                             state.get("timings") if status == 200 else None)


def _log(scope: Scope, status: int, elapsed_ms: float, request_id: str) -> None:
    path = scope["path"]
    # %r: a path is decoded from the URL and may hold anything, newlines included.
    shown = path if path.isprintable() and " " not in path else repr(path)
    state = scope.get("state", {})
    if "model" not in state:
        log.info("%s %s request_id=%s status=%d total=%.1fms", scope["method"], shown, request_id,
                 status, elapsed_ms)
        return
    timings = state.get("timings") or {"total": elapsed_ms}
    stages = " ".join(f"{k}={v:.1f}ms" for k, v in timings.items())
    log.info("%s %s request_id=%s model=%s status=%d %s", scope["method"], shown, request_id,
             state["model"], status, stages)


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
