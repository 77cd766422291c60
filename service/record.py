"""One record per request: what the middleware, the route's dependencies and the lifecycle know
about it, in one typed object under one ASGI scope key, instead of loose keys in `scope["state"]`.

`RequestRecorder` (service/middleware.py) creates it first; the inference dependency names the
model, the lifecycle fills the timings; the recorder writes the access log line and the metrics
from it once the answer is sent.
"""
import random
import re
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import HTTPConnection
from starlette.types import Scope

from service.metrics import COMPARISON, UNKNOWN_MODEL, Metrics
from service.tracing import ServerSpan, Stage, Tracing

SCOPE_KEY = "cnn_serve.record"
# A client's request id is echoed and logged only if it cannot forge log lines or bloat them.
SAFE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:+/=@-]{1,128}")


def request_id(given: bytes | None) -> str:
    """The client's own request id (X-Request-ID, or gRPC's x-request-id) if sane, else a new one."""
    if given is not None and SAFE_REQUEST_ID.fullmatch(given):
        return given.decode()
    # Not os.urandom: a system call that lets go of the GIL, which the event loop then waits to get
    # back from the decode threads (7 % of effnet's requests/s at 16 clients). An id names a
    # request in the log; it guards nothing, so the seeded generator's 128 bits serve.
    return f"{random.getrandbits(128):032x}"


@dataclass
class RequestRecord:
    request_id: str
    started: float = field(default_factory=time.perf_counter)
    model: str | None = None  # the model a prediction named in its path; None: not a prediction
    status: int = 500  # until an answer starts
    # The connection was lost before the answer reached the client (service/connections.py):
    # counted as 499, whatever the app answered.
    answer_lost: bool = False
    timings: dict[str, float] | None = None  # ms per stage, from the lifecycle
    memory: Any = None  # the request's account of the memory budget, while it holds one
    # Tracing (service/tracing.py): the server span while the request is traced, and what the
    # lifecycle measured for its spans: each stage's start and duration, the request's facts.
    span: ServerSpan | None = None
    stages: dict[str, Stage] = field(default_factory=dict)
    attributes: dict[str, str | int] = field(default_factory=dict)  # model, version, protocol, image
    batch: Any = None  # the service.batching.Inference that answered it

    @property
    def trace_ids(self) -> tuple[str, str] | None:
        """The trace id and the server span id, hex, while the request is traced and sampled."""
        context = self.span.context if self.span is not None else None
        if context is None or not context.trace_flags.sampled:  # an unsampled trace leads nowhere
            return None
        return f"{context.trace_id:032x}", f"{context.span_id:016x}"

    def logged_trace(self) -> str:
        """The log line's trace and span ids while the request is traced, else nothing."""
        ids = self.trace_ids
        return f" trace_id={ids[0]} span_id={ids[1]}" if ids else ""

    def server_timings(self) -> dict[str, float]:
        """What Server-Timing says, sent once the answer is encoded: the stages of `timings_ms`,
        then `encode`, which the body cannot hold since it is what is being encoded."""
        encode = self.stages.get("encode")
        return {**(self.timings or {}), **({"encode": encode.duration_ms} if encode is not None else {})}

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000

    def logged_stages(self) -> str:
        """The stages for the access log line: the lifecycle's timings, else the total so far."""
        timings = self.timings or {"total": self.elapsed_ms()}
        return " ".join(f"{stage}={ms:.1f}ms" for stage, ms in timings.items())

    def count(self, metrics: Metrics, served: Collection[str], protocol: str = "http") -> None:
        """Count a finished prediction in its model's series, whatever protocol carried it. Only
        served names become label values, so a client cannot grow the series."""
        if self.model is None:
            return
        if self.model not in served and self.model != COMPARISON:
            self.model = UNKNOWN_MODEL
        metrics.observe_request(self.model, self.status, self.timings if self.status == 200 else None,
                                self.trace_ids, protocol)


    def end_span(self, tracing: Tracing, attributes: dict[str, Any], code: str | None) -> None:
        """End the server span, whatever protocol carried the request: the model's and the
        lifecycle's attributes with the protocol's `attributes` (last, so they win), the status (an
        error `code` or a 5xx), one span per stage and the span of its batched inference."""
        span = self.span
        assert span is not None
        attributes = {**({"model": self.model} if self.model else {}), **self.attributes, **attributes}
        if self.batch is not None:
            attributes["batch.size"] = self.batch.batch_size
        if code is not None:
            attributes["error.code"] = code
        span.attributes.update(attributes)
        span.set_error(code, self.status)
        tracing.end(span, self.stages)
        if self.batch is not None:
            tracing.batch_span(self.model or "", self.batch)


def record_of(where: HTTPConnection | Scope) -> RequestRecord:
    scope = where.scope if isinstance(where, HTTPConnection) else where
    record: RequestRecord = scope[SCOPE_KEY]
    return record
