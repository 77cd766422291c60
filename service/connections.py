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
- past MAX_CONNECTIONS a new connection gets 503 and is closed at once;
- trailers and chunk framing count against MAX_HEADER_BYTES like headers do (431), and are not
  handed to the app;
- a connection has one request processed at a time: what a client pipelines behind it stays
  unparsed bytes, and reading stops, until its answer is written;
- an answer the client does not read is dropped, with the connection, once the write buffer has
  stayed full for WRITE_TIMEOUT_SECONDS;
- a malformed request gets a JSON 400 (`bad_http_request`), as an upgrade request with a body does
  (the parser would skip that body and read it as the next request); the service upgrades to no
  other protocol, so an upgrade request is served as plain HTTP and is the connection's last;
- a client that half-closes after its request still gets its answer;
- an answer that cannot reach its client (the connection was lost before it, or writing it failed)
  is counted as 499 in the request's record, not as what the app answered.

Each refusal closes the connection: what was left of the request can not be trusted.

The admin listener (ADMIN_PORT) serves probes and scrapes through the same protocol, with its own
small cap, so that clients holding every slot of the main port cannot starve them.
"""
import asyncio
import dataclasses
import functools
import logging
import resource
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httptools
import orjson
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from service.error_responses import error_body
from service.errors import BadHttpRequest, HeadersTimedOut, HeadersTooLarge, ServiceError, TooManyConnections
from service.record import SCOPE_KEY, RequestRecord
from service.settings import Settings

log = logging.getLogger("service.connections")

# Descriptors kept for everything but client connections: the listener, the event loop, log and
# model files, pipes.
RESERVED_DESCRIPTORS = 128
# Each open connection costs memory in uvicorn and the kernel, so the default stops here even
# where the descriptor limit is far higher.
DEFAULT_MAX_CONNECTIONS = 10_000
BACKLOG = 2048  # uvicorn's default accept queue
# Probes and scrapes open a few connections at a time; the admin listener allows this many.
ADMIN_MAX_CONNECTIONS = 32
# Bytes handed to the parser at a time where the end of the request is not known: a request
# pipelined behind the one that ends in them is parsed at most this far before it waits.
PARSE_STEP = 512


@dataclass(frozen=True)
class ConnectionLimits:
    """Decided once at start, from the settings and this process's limit on open files."""
    max_connections: int
    idle_timeout: float
    headers_timeout: float
    body_timeout: float
    max_header_bytes: int
    retry_after: int
    write_timeout: float
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
        write_timeout=settings.write_timeout_seconds, backlog=min(BACKLOG, spare - cap),
        descriptors=descriptors)


def admin_limits(limits: ConnectionLimits) -> ConnectionLimits:
    """The admin listener's: the main port's timeouts, with its own small cap."""
    return dataclasses.replace(limits, max_connections=ADMIN_MAX_CONNECTIONS)


def bounded_http_protocol(limits: ConnectionLimits) -> Callable[..., asyncio.Protocol]:
    """What `uvicorn.Config(http=...)` takes: a factory of protocols bound by `limits`."""
    return functools.partial(BoundedHttpProtocol, limits=limits)


class PipelineFlow(FlowControl):
    """uvicorn's flow control, but reading stays paused while a pipeline is held back: uvicorn
    resumes reading whenever the app awaits a message, which would read on past the pipeline."""

    def __init__(self, transport: asyncio.Transport, holding: Callable[[], bool]) -> None:
        super().__init__(transport)
        self.holding = holding

    def resume_reading(self) -> None:
        if not self.holding():
            super().resume_reading()


class Refused(Exception):
    """Raised in a parser callback after a refusal, so the parser stops where it is."""


class BoundedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the bounds listed in this module's docstring."""

    def __init__(self, *args: Any, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.deadline: asyncio.TimerHandle | None = None
        self.write_deadline: asyncio.TimerHandle | None = None
        self.reading_headers = True
        self.request_begun = False  # a request's first bytes are parsed, its headers not yet
        self.header_bytes = 0  # of the request line and headers parsed so far
        self.unaccounted = 0  # bytes parsed since the last body byte or header block: framing, trailers
        self.body_left: int | None = None  # of a Content-Length body being read
        self.body_due = 0.0  # loop time by which the body of the request being read must be in
        self.kept = b""  # received and not parsed yet: what is pipelined behind the request in flight
        self.last_request = False  # an upgrade request: nothing after it is parsed
        self.eof = False  # the client half-closed: answer what it sent, then close
        self.closing = False  # shutting down: answer the request under way, then close

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        over_cap = len(self.connections) >= self.limits.max_connections
        super().connection_made(transport)
        self.flow = PipelineFlow(transport, holding=lambda: bool(self.kept))
        if over_cap:
            # Refused before reading: a silent client must not keep the descriptor until a timeout.
            self.refuse(TooManyConnections(self.limits.max_connections, self.limits.retry_after))
            return
        # uvicorn's keep-alive timer otherwise starts only after a first response.
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                            self.timeout_keep_alive_handler)

    # Reading: bytes are kept, and parsed only while no answered-for request is waiting.

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        if self.last_request:
            return
        if self.reading_headers and self.deadline is None and not self.in_flight():
            self.set_deadline(self.limits.headers_timeout, self.headers_timed_out)
        self.kept += data
        self.parse_kept()

    def parse_kept(self) -> None:
        kept = memoryview(self.kept)
        parsed = 0
        while parsed < len(kept) and not self.in_flight() and not self.transport.is_closing():
            piece = kept[parsed:parsed + self.parse_step()]
            parsed += len(piece)
            self.feed(piece)
        self.kept = self.kept[parsed:] if not self.last_request else b""
        if self.kept:
            self.flow.pause_reading()
        elif not self.eof:
            self.flow.resume_reading()

    def parse_step(self) -> int:
        """Up to the end of a body whose length is known, so that its request ends a piece."""
        return self.body_left if not self.reading_headers and self.body_left else PARSE_STEP

    def feed(self, piece: memoryview) -> None:
        self.unaccounted += len(piece)
        try:
            self.parser.feed_data(piece)
        except httptools.HttpParserUpgrade:
            self.last_request = True  # served as plain HTTP; the rest is another protocol's
        except httptools.HttpParserError as error:
            if not self.transport.is_closing():  # else refused already, in a callback
                self.refuse(BadHttpRequest(str(error) or type(error).__name__))
            return
        # Partial lines are buffered by the parser before any callback sees them: count arrivals.
        if self.unaccounted > self.limits.max_header_bytes and not self.transport.is_closing():
            self.refuse(HeadersTooLarge(self.limits.max_header_bytes))

    def in_flight(self) -> bool:
        """A request is read to its end and its answer not yet written (or more are queued)."""
        waiting = self.cycle is not None and not self.cycle.more_body and not self.cycle.response_complete
        return waiting or bool(self.pipeline)

    # Parser callbacks.

    def on_message_begin(self) -> None:
        self.request_begun = True
        if self.deadline is None:
            self.set_deadline(self.limits.headers_timeout, self.headers_timed_out)
        super().on_message_begin()
        self.header_bytes = 0

    def on_url(self, url: bytes) -> None:
        self.header_bytes += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.reading_headers:
            return  # a trailer: counted in `unaccounted`, and the app reads none
        self.header_bytes += len(name) + len(value) + 4  # ": " and CRLF
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self.reading_headers = self.request_begun = False
        self.unaccounted = 0
        self.cancel_deadline()
        if self.header_bytes > self.limits.max_header_bytes:  # a header block in one read
            self.refuse(HeadersTooLarge(self.limits.max_header_bytes))
            raise Refused
        if self.parser.should_upgrade() and self.declares_body():
            self.refuse(BadHttpRequest("a request asking for a protocol upgrade may not carry a body"))
            raise Refused
        self.body_due = self.loop.time() + self.limits.body_timeout
        self.body_left = self.content_length()
        super().on_headers_complete()
        if self.closing or self.parser.should_upgrade() or (self.eof and not self.kept):
            self.cycle.keep_alive = False

    def on_body(self, body: bytes) -> None:
        self.unaccounted = 0
        if self.body_left:
            self.body_left -= len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.cancel_deadline()
        self.reading_headers = True
        self.unaccounted = 0
        self.body_left = None

    def declares_body(self) -> bool:
        return any(name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0")
                   for name, value in self.headers)

    def content_length(self) -> int | None:
        if any(name == b"transfer-encoding" for name, _ in self.headers):
            return None
        lengths = [value for name, value in self.headers if name == b"content-length"]
        return int(lengths[0]) if lengths else None  # the parser refused a malformed one

    # Answers.

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing():
            if self.cycle.keep_alive:  # not closed after its answer: writing the answer failed
                self.answer_lost()
            return
        if not self.reading_headers and self.cycle.response_complete:
            # Answered before its body is in (a refusal, a route that reads none): the rest is
            # read and dropped, but no longer than the body's own deadline.
            self.set_deadline(max(0.0, self.body_due - self.loop.time()), self.body_timed_out)
        # The next pipelined request in its own turn of the loop, after other connections'.
        self.loop.call_soon(self.answered)

    def answered(self) -> None:
        if self.transport.is_closing():
            return
        self.parse_kept()
        if self.eof and not self.kept and not self.in_flight() and self.reading_headers:
            self.transport.close()

    # uvicorn annotates its eof_received `-> None`; asyncio.Protocol's is `bool | None`, and True
    # is how a protocol keeps a half-closed transport open.
    def eof_received(self) -> bool | None:  # type: ignore[override]
        """A client may half-close once its request is sent: it is still answered."""
        self.eof = True
        if self.in_flight() or self.kept:
            if self.cycle is not None and not self.kept:
                self.cycle.keep_alive = False
            return True  # keep the transport open to write the answer
        return None  # nothing to answer: the transport closes

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.write_deadline is None:
            self.write_deadline = self.loop.call_later(self.limits.write_timeout, self.write_timed_out)

    def resume_writing(self) -> None:
        super().resume_writing()
        self.cancel_write_deadline()

    def write_timed_out(self) -> None:
        """The client has not read its answer for WRITE_TIMEOUT_SECONDS: drop it, and the connection."""
        self.write_deadline = None
        refusals.record("write_timeout", self.client)
        self.transport.abort()

    def shutdown(self) -> None:
        """Graceful shutdown: uvicorn closes a connection whose next request is not parsed yet, and
        so drops unanswered a request already on its way. Here such a connection is served and then
        closed; the idle and headers deadlines still bound how long it can keep the server up."""
        arriving = self.cycle is None or (self.cycle.response_complete
                                          and (self.request_begun or bool(self.kept)))
        if arriving:
            self.closing = True
            return
        super().shutdown()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.cycle is not None and not self.cycle.response_complete:
            self.answer_lost()  # uvicorn drops what the app still sends
        self.cancel_deadline()
        self.cancel_write_deadline()
        self.kept = b""  # a pipelined request whose client has gone is never parsed
        super().connection_lost(exc)

    def answer_lost(self) -> None:
        """The client left before its answer reached it: the request counts as 499."""
        record = self.cycle.scope.get(SCOPE_KEY)
        if isinstance(record, RequestRecord):  # the app has made the request's record
            record.answer_lost = True

    def set_deadline(self, seconds: float, expired: Callable[[], None]) -> None:
        self.cancel_deadline()
        self.deadline = self.loop.call_later(seconds, expired)

    def cancel_deadline(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def cancel_write_deadline(self) -> None:
        if self.write_deadline is not None:
            self.write_deadline.cancel()
            self.write_deadline = None

    def headers_timed_out(self) -> None:
        self.deadline = None
        if not self.transport.is_closing():
            self.refuse(HeadersTimedOut(self.limits.headers_timeout))

    def body_timed_out(self) -> None:
        self.deadline = None
        if not self.transport.is_closing():
            refusals.record("body_timeout", self.client)  # answered already: only the close
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request it cannot parse, as JSON like every other error."""
        self.refuse(BadHttpRequest(msg))

    def refuse(self, error: ServiceError) -> None:
        """Answer the error, unless an answer is being written already, and close."""
        status, body = error_body(error)
        if self.cycle is None or self.cycle.response_complete or not self.cycle.response_started:
            self.transport.write(self.error_response(status, body, error.headers))
        refusals.record(f"{status} {body['code']}", self.client)
        self.kept = b""
        self.transport.close()

    def error_response(self, status: int, body: dict, headers: Mapping[str, str]) -> bytes:
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
        self.last = now
        self.unreported = 0


refusals = RefusalLog()
