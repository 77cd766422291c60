"""An ASGI layer around every request: body-size limit, in-flight gauge, metrics and one log line."""
import logging
import re
import time
from collections.abc import Callable, Collection

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import BodyTooLarge, error_response
from service.metrics import UNKNOWN_MODEL, Metrics

log = logging.getLogger("service.access")
# Predictions, counted and timed per model: /predict and the Open Inference Protocol's infer.
PREDICTION_PATH = re.compile(r"/predict/(?P<model>.+)"
                             r"|/v2/models/(?P<oip_model>[^/]+)(/versions/[^/]+)?/infer")


class RequestObserver:
    def __init__(self, app: ASGIApp, metrics: Metrics, max_body_bytes: int,
                 model_names: Callable[[], Collection[str]]) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.model_names = model_names

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
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
            await send(message)

        self.metrics.in_flight.inc()
        try:
            if _content_length(scope) > limit:  # reject before reading a byte of the body
                await error_response(BodyTooLarge(limit))(scope, receive, observed_send)
            else:
                await self.app(scope, limited_receive, observed_send)
        finally:
            self.metrics.in_flight.dec()
            self._observe(scope, status, (time.perf_counter() - started) * 1000)

    def _observe(self, scope: Scope, status: int, elapsed_ms: float) -> None:
        path = scope["path"]
        timings = scope.get("state", {}).get("timings")
        prediction = PREDICTION_PATH.fullmatch(path)
        if prediction is None:
            log.info("%s %s status=%d total=%.1fms", scope["method"], path, status, elapsed_ms)
            return
        model = prediction["model"] or prediction["oip_model"]
        if model not in self.model_names():
            model = UNKNOWN_MODEL
        self.metrics.observe_request(model, status, timings if status == 200 else None)
        stages = " ".join(f"{k}={v:.1f}ms" for k, v in (timings or {"total": elapsed_ms}).items())
        log.info("%s %s model=%s status=%d %s", scope["method"], path, model, status, stages)


def _content_length(scope: Scope) -> int:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0
