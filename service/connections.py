"""The connection layer: the bounds a request must meet before it reaches the app.

uvicorn's HTTP protocols leave these open (uvicorn issue #157): a connection that never sends a
request is never closed (the keep-alive timeout starts only after a response), request headers
are buffered without limit, a body the app answered without reading is read to its end however
slowly it comes, and past `limit_concurrency` a connection still holds its descriptor until it
sends a request. Here uvicorn's httptools protocol gets these bounds, so file descriptors and
memory stay bounded whatever the clients do:

- a connection with no request under way is closed after IDLE_TIMEOUT_SECONDS without a byte;
- a request's headers must arrive within HEADERS_TIMEOUT_SECONDS of its first byte (else 408) and
  fit in MAX_HEADER_BYTES (else 431);
- its body must arrive within BODY_TIMEOUT_SECONDS of its headers: while the app reads it, the app
  enforces that (service/lifecycle.py, 408); once the app has answered, the connection is closed
  at that deadline;
- past MAX_CONNECTIONS a new connection gets 503 and is closed at once.

Each refusal closes the connection: what was left of the request can not be trusted.
"""
import asyncio
import functools
import logging
import resource
import time
from dataclasses import dataclass
from typing import Any, Callable

import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from service.errors import (HeadersTimedOut, HeadersTooLarge, ServiceError, TooManyConnections,
                            error_body)
from service.settings import Settings

log = logging.getLogger("service.connections")

# Descriptors kept for everything but client connections: the listener, the event loop, log and
# model files, pipes.
RESERVED_DESCRIPTORS = 128
# Each open connection costs memory in uvicorn and the kernel, so the default stops here even
# where the descriptor limit is far higher.
DEFAULT_MAX_CONNECTIONS = 10_000
BACKLOG = 2048  # uvicorn's default accept queue


@dataclass(frozen=True)
class ConnectionLimits:
    """Decided once at start, from the settings and this process's limit on open files."""
    max_connections: int
    idle_timeout: float
    headers_timeout: float
    body_timeout: float
    max_header_bytes: int
    retry_after: int
    # The accept queue: connections accepted past the cap (each takes a descriptor before it can
    # be refused) must fit in the descriptors the cap leaves.
    backlog: int
    descriptors: int


def raise_descriptor_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit; return the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard and hard != resource.RLIM_INFINITY:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # some platforms refuse; the soft limit stays usable
            pass
    return soft


def connection_limits(settings: Settings) -> ConnectionLimits:
    """The limits for this process, decided once at start; raises the descriptor limit, and fails
    loudly when MAX_CONNECTIONS could exhaust it."""
    descriptors = raise_descriptor_limit()
    spare = descriptors - RESERVED_DESCRIPTORS
    cap = settings.max_connections or min(DEFAULT_MAX_CONNECTIONS, spare // 2)
    if cap < 1 or cap >= spare:
        raise ValueError(f"MAX_CONNECTIONS={cap} needs more than the {descriptors} open files this "
                         f"process may have ({RESERVED_DESCRIPTORS} are kept for other uses): lower "
                         "it or raise `ulimit -n`")
    return ConnectionLimits(
        max_connections=cap, idle_timeout=settings.idle_timeout_seconds,
        headers_timeout=settings.headers_timeout_seconds, body_timeout=settings.body_timeout_seconds,
        max_header_bytes=settings.max_header_bytes, retry_after=settings.retry_after_seconds,
        backlog=min(BACKLOG, spare - cap), descriptors=descriptors)


def bounded_http_protocol(limits: ConnectionLimits) -> Callable[..., asyncio.Protocol]:
    """What `uvicorn.Config(http=...)` takes: a factory of protocols bound by `limits`."""
    return functools.partial(BoundedHttpProtocol, limits=limits)


class BoundedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the bounds listed in this module's docstring."""

    def __init__(self, *args: Any, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.deadline: asyncio.TimerHandle | None = None
        self.reading_headers = True
        self.header_bytes = 0
        self.body_due = 0.0  # loop time by which the body of the request being read must be in
        self.closing = False  # shutting down: answer the request under way, then close

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        over_cap = len(self.connections) >= self.limits.max_connections
        super().connection_made(transport)
        if over_cap:
            # Refused before reading: a silent client must not keep the descriptor until a timeout.
            self.refuse(TooManyConnections(self.limits.max_connections, self.limits.retry_after))
            return
        # uvicorn's keep-alive timer otherwise starts only after a first response.
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                            self.timeout_keep_alive_handler)

    def data_received(self, data: bytes) -> None:
        if self.reading_headers:
            # Counted as they arrive, since httptools buffers an unfinished header line whole.
            self.header_bytes += len(data)
            if self.deadline is None:
                self.set_deadline(self.limits.headers_timeout, self.headers_timed_out)
        super().data_received(data)
        if (self.reading_headers and self.header_bytes > self.limits.max_header_bytes
                and not self.transport.is_closing()):
            self.refuse(HeadersTooLarge(self.limits.max_header_bytes))

    def on_headers_complete(self) -> None:
        self.reading_headers = False
        self.header_bytes = 0
        self.cancel_deadline()
        self.body_due = self.loop.time() + self.limits.body_timeout
        super().on_headers_complete()
        if self.closing:
            self.cycle.keep_alive = False

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.reading_headers and self.cycle.response_complete and not self.transport.is_closing():
            # Answered before its body is in (a refusal, a route that reads none): the rest is
            # read and dropped, but no longer than the body's own deadline.
            self.set_deadline(max(0.0, self.body_due - self.loop.time()), self.body_timed_out)

    def shutdown(self) -> None:
        """Graceful shutdown: uvicorn closes a connection whose next request is not parsed yet, and
        so drops unanswered a request already on its way. Here such a connection is served and then
        closed; the idle and headers deadlines still bound how long it can keep the server up."""
        arriving = self.cycle is None or (self.cycle.response_complete and self.header_bytes > 0)
        if arriving:
            self.closing = True
            return
        super().shutdown()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.cancel_deadline()
        self.reading_headers = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.cancel_deadline()
        super().connection_lost(exc)

    def set_deadline(self, seconds: float, expired: Callable[[], None]) -> None:
        self.cancel_deadline()
        self.deadline = self.loop.call_later(seconds, expired)

    def cancel_deadline(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def headers_timed_out(self) -> None:
        self.deadline = None
        if not self.transport.is_closing():
            self.refuse(HeadersTimedOut(self.limits.headers_timeout))

    def body_timed_out(self) -> None:
        self.deadline = None
        if not self.transport.is_closing():
            refusals.record("body_timeout", self.client)  # answered already: only the close
            self.transport.close()

    def refuse(self, error: ServiceError) -> None:
        """Answer the error, unless an earlier request's answer is still under way, and close."""
        status, body = error_body(error)
        if self.cycle is None or self.cycle.response_complete:
            self.transport.write(self.error_response(status, body, error.headers))
        refusals.record(f"{status} {body['code']}", self.client)
        self.transport.close()

    def error_response(self, status: int, body: dict, headers: dict[str, str]) -> bytes:
        content = orjson.dumps(body)
        lines = [*self.server_state.default_headers,
                 *((name.lower().encode(), value.encode()) for name, value in headers.items()),
                 (b"content-type", b"application/json"),
                 (b"content-length", str(len(content)).encode()), (b"connection", b"close")]
        return b"".join([STATUS_LINE[status], *(name + b": " + value + b"\r\n" for name, value in lines),
                         b"\r\n", content])


class RefusalLog:
    """One warning a second at most: a flood of bad clients must not become a flood of log lines."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.last = -interval
        self.unreported = 0

    def record(self, reason: str, client: tuple[str, int] | None) -> None:
        now = time.monotonic()
        if now - self.last < self.interval:
            self.unreported += 1
            return
        more = f" (and {self.unreported} more since the last report)" if self.unreported else ""
        log.warning("closed a connection from %s: %s%s", client[0] if client else "?", reason, more)
        self.last, self.unreported = now, 0


refusals = RefusalLog()
