"""An ASGI layer around every request: request id, API key, body-size limit, in-flight gauge,
metrics and one log line."""
import hmac
import logging
import os
import re
import time
from collections.abc import Callable, Collection

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import BodyTooLarge, ServiceError, Unauthorized, error_response
from service.metrics import UNKNOWN_MODEL, Metrics

log = logging.getLogger("service.access")
# Predictions, counted and timed per model: /predict and the Open Inference Protocol's infer.
# DOTALL: a decoded path may hold a newline, and must not slip past the API key for it.
PREDICTION_PATH = re.compile(r"/predict/(?P<model>.+)"
                             r"|/v2/models/(?P<oip_model>[^/]+)(/versions/[^/]+)?/infer", re.DOTALL)
REQUEST_ID_HEADER = b"x-request-id"
# A client's id is echoed and logged only if it cannot forge log lines or bloat them.
SAFE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:+/=@-]{1,128}")


class RequestObserver:
    def __init__(self, app: ASGIApp, metrics: Metrics, max_body_bytes: int,
                 model_names: Callable[[], Collection[str]], api_key: str | None = None) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.model_names = model_names
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = _request_id(scope)
        status = 500
        limit = self.max_body_bytes
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:  # a chunked upload without Content-Length, or a lying one
                raise BodyTooLarge(limit)
            return message

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (REQUEST_ID_HEADER, request_id)]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            refusal = self._refusal(scope)  # before reading a byte of the body
            if refusal is not None:
                await error_response(refusal)(scope, receive, observed_send)
            else:
                await self.app(scope, limited_receive, observed_send)
        finally:
            self.metrics.in_flight.dec()
            self._observe(scope, status, (time.perf_counter() - started) * 1000, request_id)

    def _refusal(self, scope: Scope) -> ServiceError | None:
        if self.api_key is not None and PREDICTION_PATH.fullmatch(scope["path"]):
            given = _api_key(scope)
            if given is None:
                return Unauthorized("missing API key")
            if not hmac.compare_digest(given, self.api_key):
                return Unauthorized("wrong API key")
        if _content_length(scope) > self.max_body_bytes:
            return BodyTooLarge(self.max_body_bytes)
        return None

    def _observe(self, scope: Scope, status: int, elapsed_ms: float, request_id: bytes) -> None:
        path = scope["path"]
        timings = scope.get("state", {}).get("timings")
        prediction = PREDICTION_PATH.fullmatch(path)
        # %r: a path is decoded from the URL and may hold anything, newlines included.
        shown = path if path.isprintable() and " " not in path else repr(path)
        if prediction is None:
            log.info("%s %s request_id=%s status=%d total=%.1fms", scope["method"], shown,
                     request_id.decode(), status, elapsed_ms)
            return
        model = prediction["model"] or prediction["oip_model"]
        if model not in self.model_names():
            model = UNKNOWN_MODEL
        self.metrics.observe_request(model, status, timings if status == 200 else None)
        stages = " ".join(f"{k}={v:.1f}ms" for k, v in (timings or {"total": elapsed_ms}).items())
        log.info("%s %s request_id=%s model=%s status=%d %s", scope["method"], shown,
                 request_id.decode(), model, status, stages)


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


def _api_key(scope: Scope) -> bytes | None:
    authorization = _header(scope, b"authorization")
    if authorization is not None and authorization[:7].lower() == b"bearer ":
        return authorization[7:].strip()
    return _header(scope, b"x-api-key")


def _content_length(scope: Scope) -> int:
    try:
        return int(_header(scope, b"content-length") or 0)
    except ValueError:
        return 0
