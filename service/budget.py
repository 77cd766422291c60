"""One memory budget for the whole process, and handing freed memory back to the OS.

Every request holds an account against the budget for as long as it runs, its answer's sending
included. What it will hold is reserved before it is spent: its body before a byte of it is read
(from Content-Length, or chunk by chunk as a chunked body streams; a multipart body's spool on
disk included), each image's working memory before it is decoded, its answer before inference (the
most its encoding can take, from the outputs asked for; the encoded size replaces that once known).
When a reservation does not fit, the request is refused with 503 and Retry-After, so the bodies
read at once, and the memory all requests hold together, never exceed the budget, whatever their
shape.
An account gives everything back when its request ends, however it ends.

glibc keeps freed heap memory resident (for later allocations of the same thread), and a refused
request's body may stay referenced by its exception's frames until a full garbage collection.
Both are handed back, off the event loop and at most once a second, after a request that held
much memory and once inference goes idle: a full collection, then `malloc_trim`. The number of
allocator arenas, each of which keeps its own freed memory, is bounded when the budget is made.
"""
import asyncio
import ctypes
import gc
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge

from service.errors import MemoryExhausted
from service.metrics import memory_limit_bytes, process_rss_bytes

# Four requests at their largest always fit at once: an image whose working memory is more than
# this share of the budget could never be served, and is refused as too complex.
REQUESTS_THAT_ALWAYS_FIT = 4
NO_LIMIT_SHARE_OF_PHYSICAL_MEMORY = 0.5
# A body is held twice at its peak: its chunks while the last arrives, and the one joined copy.
BODY_COPIES = 2
TRIM_AFTER_REQUEST_BYTES = 32 * 1024 * 1024  # several times a photo's decode: followed by a trim
TRIM_INTERVAL_SECONDS = 1.0
ALLOCATOR_ARENAS = 2  # glibc's default is 8 per core, each keeping its own freed memory
M_ARENA_MAX = -8  # glibc's mallopt parameter

_malloc_trim: Callable[[int], int] | None
_mallopt: Callable[[int, int], int] | None
try:
    _libc = ctypes.CDLL("libc.so.6")
    _malloc_trim = _libc.malloc_trim
    _mallopt = _libc.mallopt
except (OSError, AttributeError):  # not glibc
    _malloc_trim = None
    _mallopt = None


def default_budget_bytes() -> int:
    """The container's memory limit less what the process holds now, or a share of physical
    memory where there is no limit (see MEMORY_BUDGET_BYTES)."""
    limit = memory_limit_bytes()
    if math.isinf(limit):
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
                   * NO_LIMIT_SHARE_OF_PHYSICAL_MEMORY)
    return max(int(limit) - (process_rss_bytes() or 0), 0)


class AllocatorTrim:
    """Hands the heap memory glibc keeps after frees back to the OS, off the loop, at most once
    per interval: a call within the interval of the last trim is served at its end."""

    def __init__(self, interval_seconds: float = TRIM_INTERVAL_SECONDS) -> None:
        self.interval = interval_seconds
        self._last = -math.inf
        self._pending: asyncio.TimerHandle | None = None
        if _mallopt is not None:
            _mallopt(M_ARENA_MAX, ALLOCATOR_ARENAS)

    def soon(self) -> None:
        """Trim now, or once the interval since the last trim has passed. Called on the loop."""
        if _malloc_trim is None or self._pending is not None:
            return
        loop = asyncio.get_running_loop()
        self._pending = loop.call_later(max(self._last + self.interval - time.monotonic(), 0),
                                        self._trim, loop)

    def _trim(self, loop: asyncio.AbstractEventLoop) -> None:
        self._pending, self._last = None, time.monotonic()
        # On the loop's default pool, so that no request waits behind the trim.
        loop.run_in_executor(None, _collect_and_trim)

    @staticmethod
    def started_up() -> None:
        """Called once the models are loaded: what start-up made lives as long as the process, so
        it is kept out of every collection, and one after a big request costs only what requests
        made since (milliseconds rather than tens of them)."""
        gc.freeze()

    def cancel(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None


def _collect_and_trim() -> None:
    # A refused request's exception holds its frames, and so its body, in a reference cycle that
    # only a full collection frees; a trickle of traffic makes too few objects to start one.
    gc.collect()
    if _malloc_trim is not None:
        _malloc_trim(0)


class MemoryBudget:
    """Bytes that requests may hold at once; thread-safe, so decoding threads reserve too."""

    def __init__(self, total_bytes: int, retry_after_seconds: int, registry: CollectorRegistry,
                 trim: AllocatorTrim | None = None) -> None:
        self.retry_after_seconds = retry_after_seconds
        self.trim = trim or AllocatorTrim()
        self._reserved = 0
        self._lock = threading.Lock()
        self._size = Gauge("cnn_serve_memory_budget_bytes", "Memory all requests may hold at once "
                           "(MEMORY_BUDGET_BYTES)", registry=registry)
        Gauge("cnn_serve_memory_reserved_bytes", "Memory reserved by the requests in flight",
              registry=registry).set_function(lambda: self._reserved)  # read when scraped, not kept per reservation
        self.refused = Counter("cnn_serve_memory_refusals", "Requests refused with 503 because "
                               "the memory budget was spent", registry=registry)
        self.resize(total_bytes)

    def resize(self, total_bytes: int) -> None:
        """Set the budget's size: once at start, and again where it is measured once models load."""
        self.total = total_bytes
        self.per_request = total_bytes // REQUESTS_THAT_ALWAYS_FIT
        self._size.set(total_bytes)

    @property
    def reserved(self) -> int:
        return self._reserved

    @contextmanager
    def account(self) -> Iterator["RequestAccount"]:
        """One request's account, emptied when the request ends, on success, error or cancel."""
        account = RequestAccount(self)
        try:
            yield account
        finally:
            held = account.close()
            if held >= TRIM_AFTER_REQUEST_BYTES:
                self.trim.soon()

    def take(self, nbytes: int) -> None:
        """Reserve for an account; use `account().reserve`."""
        with self._lock:
            if self._reserved + nbytes > self.total:
                self.refused.inc()
                raise MemoryExhausted(self.total, self.retry_after_seconds)
            self._reserved += nbytes

    def give_back(self, nbytes: int) -> None:
        with self._lock:
            self._reserved -= nbytes


class RequestAccount:
    """What one request holds against the budget."""

    def __init__(self, budget: MemoryBudget) -> None:
        self._budget = budget
        self._held = 0
        self._answer = 0  # of `_held`: what is held for the answer
        self._open = True
        self._lock = threading.Lock()

    @property
    def per_request(self) -> int:
        """The most working memory one image may need: more could never be served."""
        return self._budget.per_request

    def reserve(self, nbytes: int) -> None:
        """Hold `nbytes` more until the request ends; MemoryExhausted (503) when they do not fit,
        or when the request has already ended (a decode that outlived its request)."""
        with self._lock:
            if not self._open:
                raise MemoryExhausted(self._budget.total, self._budget.retry_after_seconds)
            self._budget.take(nbytes)
            self._held += nbytes

    def hold_answer(self, nbytes: int) -> None:
        """Hold `nbytes` for the answer in place of what was held for it: the most its encoding can
        take, before inference; its encoded size, once known. MemoryExhausted (503) when more does
        not fit; less gives the difference back."""
        with self._lock:
            if not self._open:
                raise MemoryExhausted(self._budget.total, self._budget.retry_after_seconds)
            more = nbytes - self._answer
            if more > 0:
                self._budget.take(more)
            else:
                self._budget.give_back(-more)
            self._held += more
            self._answer = nbytes

    def close(self) -> int:
        """Give everything back; later reservations are refused. Returns the bytes held."""
        with self._lock:
            self._open, held, self._held = False, self._held, 0
        self._budget.give_back(held)
        return held
