"""One record per request: what the middleware, the route's dependencies and the lifecycle know
about it, in one typed object under one ASGI scope key, instead of loose keys in `scope["state"]`.

`RequestRecorder` (service/middleware.py) creates it first; the inference dependency names the
model, the lifecycle fills the timings; the recorder writes the access log line and the metrics
from it once the answer is sent.
"""
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import HTTPConnection
from starlette.types import Scope

SCOPE_KEY = "cnn_serve.record"


@dataclass
class RequestRecord:
    request_id: str
    started: float = field(default_factory=time.perf_counter)
    model: str | None = None  # the model a prediction named in its path; None: not a prediction
    status: int = 500  # until an answer starts
    timings: dict[str, float] | None = None  # ms per stage, from the lifecycle
    memory: Any = None  # the request's account of the memory budget, while it holds one

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000


def record_of(where: HTTPConnection | Scope) -> RequestRecord:
    scope = where.scope if isinstance(where, HTTPConnection) else where
    record: RequestRecord = scope[SCOPE_KEY]
    return record
