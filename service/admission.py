"""Admission control: a bounded number of predictions per model, and a deadline for each request.

Past `max_in_flight` requests for one model, the next is refused at once (503 with Retry-After)
instead of joining an ever longer queue, so the requests that are admitted keep a bounded latency.
A request is admitted only once its body has arrived, so a slow upload holds no slot. A request
still running at its deadline is abandoned with a 504: whatever of it has not started (decoding,
a place in the batch queue) never runs. Both are counted in /metrics. Only predictions pass
through here: health, metrics and metadata are never shed.
"""
import asyncio
from collections import Counter as Tally
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge

from service.errors import Overloaded, RequestTimedOut


class Admission:
    def __init__(self, max_in_flight: int, retry_after_seconds: int, timeout_seconds: float,
                 registry: CollectorRegistry) -> None:
        self.max_in_flight = max_in_flight
        self.retry_after_seconds = retry_after_seconds
        self.timeout_seconds = timeout_seconds
        self._in_flight: Tally[str] = Tally()  # touched only from the event loop: no lock needed
        self.admitted = Gauge("cnn_serve_admitted_requests", "Predictions admitted and not yet "
                              "answered, per model", ["model"], registry=registry)
        self.shed = Counter("cnn_serve_requests_shed", "Predictions refused with 503 because the "
                            "model had MAX_IN_FLIGHT_PER_MODEL requests in flight", ["model"],
                            registry=registry)
        self.timed_out = Counter("cnn_serve_requests_timed_out", "Predictions abandoned with 504 "
                                 "after REQUEST_TIMEOUT_SECONDS", ["model"], registry=registry)

    def in_flight(self, model: str) -> int:
        return self._in_flight[model]

    @asynccontextmanager
    async def deadline(self, model: str) -> AsyncIterator[asyncio.Timeout]:
        """Cancel the body at the request's deadline, as RequestTimedOut; the body may move the
        deadline (`reschedule`) while a stage with its own, shorter one runs."""
        try:
            async with asyncio.timeout(self.timeout_seconds) as deadline:
                yield deadline
        except TimeoutError:
            if not deadline.expired():
                raise
            self.timed_out.labels(model=model).inc()
            raise RequestTimedOut(model, self.timeout_seconds) from None

    @asynccontextmanager
    async def admit(self, model: str) -> AsyncIterator[None]:
        """Hold one of the model's slots for the body; Overloaded when none is free."""
        if self._in_flight[model] >= self.max_in_flight:
            self.shed.labels(model=model).inc()
            raise Overloaded(model, self.max_in_flight, self.retry_after_seconds)
        self._in_flight[model] += 1
        self.admitted.labels(model=model).inc()
        try:
            yield
        finally:
            self._in_flight[model] -= 1
            self.admitted.labels(model=model).dec()
