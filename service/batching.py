"""Dynamic batching for one model: run at once when a slot is free, else batch what queued meanwhile.

A request that finds one of the model's worker slots free runs at once, alone. Requests that arrive
while every slot is busy queue; when a slot frees, the queued arrays (of the same shape, up to
`max_batch_size` images) run as one batch and each caller gets its own rows back. A lone request
therefore never waits for a batch; `max_queue_delay_s` only lets already-queued requests wait a
little longer for company. A request whose caller has gone (its deadline passed) is dropped from
the queue instead of being run.

A job may also be a function that makes its array: it then runs alone, on the inference worker
that runs the model, so a lone request is decoded, preprocessed and inferred in one hand-off.

Lives on the event loop, so its state needs no lock; only the job itself leaves the loop.
"""
import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np
from opentelemetry import trace

from service.errors import InferenceFailed, ServiceError

Job = np.ndarray | Callable[[], np.ndarray]
# Runs one batch on the calling worker thread: (batch, alone) -> outputs.
RunBatch = Callable[[np.ndarray, bool], np.ndarray]


@dataclass(frozen=True)
class Inference:
    outputs: np.ndarray  # (batch, classes)
    queue_ms: float      # from submission until a worker picked the job up
    inference_ms: float  # session.run alone
    batch_size: int      # images in the session.run, this request's and others'
    threads: int         # onnxruntime threads the inference ran on
    # For its trace spans (perf_counter seconds): when it was submitted, when session.run began
    started: float = 0.0
    submitted: float = 0.0
    # The trace contexts of every request in a session.run that served several, given to the
    # first one only, so that one span per batch links them all.
    shared_by: tuple[trace.SpanContext, ...] = ()


@dataclass
class _Request:
    job: Job
    answer: asyncio.Future
    submitted: float = field(default_factory=time.perf_counter)
    # The caller's span (its server span while traced; an invalid one costs a contextvar read)
    trace_context: trace.SpanContext = field(default_factory=lambda: trace.get_current_span().get_span_context())

    @property
    def array(self) -> np.ndarray | None:
        """The input as submitted; None for a job that makes its own."""
        return self.job if isinstance(self.job, np.ndarray) else None

    @property
    def rows(self) -> int | None:
        return self.array.shape[0] if self.array is not None else None

    def made(self) -> np.ndarray:
        """The input, made now (on the inference worker) by a job that makes its own."""
        return self.job if isinstance(self.job, np.ndarray) else self.job()


@dataclass(frozen=True)
class _Ran:
    picked: float    # a worker took the batch
    started: float   # session.run began (after a job's own preparation)
    finished: float
    batches: list[np.ndarray]  # each request's input, in order
    outputs: np.ndarray


class _Abandoned(Exception):
    """Every caller of a batch went away (deadline, disconnect) while it was being prepared."""


class Activity:
    """Inferences running now across every model, so a batcher knows whether it runs alone.

    `on_idle` is called (on the loop) whenever the count drops to zero, `on_busy` when it leaves it.
    """

    def __init__(self, on_busy: Callable[[], None], on_idle: Callable[[], None]) -> None:
        self.running = 0
        self._on_busy = on_busy
        self._on_idle = on_idle

    def started(self) -> None:
        self.running += 1
        self._on_busy()

    def finished(self) -> None:
        self.running -= 1
        if self.running == 0:
            self._on_idle()


class Batcher:
    def __init__(self, name: str, run: RunBatch, executor: Executor, activity: Activity, slots: int,
                 max_batch_size: int, max_queue_delay_s: float, lone_threads: int,
                 has_one_thread_session: bool, on_batch: Callable[[str, int], None]) -> None:
        self.name = name
        self._run_batch = run
        self._executor = executor
        self._activity = activity
        self.slots = slots
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_queue_delay_s
        self._lone_threads = lone_threads
        self._has_one_thread_session = has_one_thread_session
        self._on_batch = on_batch
        self.running = 0
        self.queue: list[_Request] = []
        self._timer: asyncio.TimerHandle | None = None

    @property
    def idle(self) -> bool:
        """A job submitted now would start at once."""
        return self.running < self.slots and not self.queue

    async def submit(self, job: Job) -> Inference:
        request = _Request(job, asyncio.get_running_loop().create_future())
        idle = self.idle
        self.queue.append(request)
        self._dispatch(idle)
        return await request.answer

    def _dispatch(self, idle: bool = False) -> None:
        self._drop_abandoned()
        while self.running < self.slots and self.queue:
            if not idle and not self._worth_running_now():
                return
            idle = False
            self._start(self._take())

    def _drop_abandoned(self) -> None:
        self.queue = [r for r in self.queue if not r.answer.done()]

    def _worth_running_now(self) -> bool:
        """A queued batch runs when it is full or its oldest request has waited max_queue_delay."""
        waited = time.perf_counter() - self.queue[0].submitted
        queued_rows = sum(r.rows or self.max_batch_size for r in self.queue)
        if self.max_delay_s <= waited or queued_rows >= self.max_batch_size:
            return True
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.max_delay_s - waited, self._on_timer)
        return False

    def _on_timer(self) -> None:
        self._timer = None
        self._dispatch()

    def _take(self) -> list[_Request]:
        """The oldest request and the queued arrays of its shape that fit beside it."""
        first = self.queue[0]
        first_array = first.array
        if first_array is None:  # a job that makes its own array runs alone
            self.queue = self.queue[1:]
            return [first]
        taken = [first]
        rows = first_array.shape[0]
        kept = []
        for request in self.queue[1:]:
            array = request.array
            if array is not None and rows + array.shape[0] <= self.max_batch_size \
                    and array.shape[1:] == first_array.shape[1:] \
                    and array.dtype == first_array.dtype:
                taken.append(request)
                rows += array.shape[0]
            else:
                kept.append(request)
        self.queue = kept
        return taken

    def _start(self, requests: list[_Request]) -> None:
        alone = self._activity.running == 0 or not self._has_one_thread_session
        threads = self._lone_threads if alone else 1
        self.running += 1
        self._activity.started()
        running = asyncio.get_running_loop().run_in_executor(self._executor, self._run, requests, alone)
        running.add_done_callback(lambda done: self._finish(requests, done, threads))

    def _run(self, requests: list[_Request], alone: bool) -> _Ran:
        """On an inference worker: make the batch, run it."""
        picked = time.perf_counter()
        batches = [r.made() for r in requests]
        # Read across threads: at worst a caller that left a moment ago still gets its run.
        if all(r.answer.done() for r in requests):
            raise _Abandoned()
        batch = batches[0] if len(batches) == 1 else np.concatenate(batches)
        started = time.perf_counter()
        outputs = self._run_batch(batch, alone)
        return _Ran(picked, started, time.perf_counter(), batches, outputs)

    def _finish(self, requests: list[_Request], done: asyncio.Future, threads: int) -> None:
        self.running -= 1
        self._activity.finished()
        try:
            ran: _Ran = done.result()
        except ServiceError as error:  # a job's own preparation refused its image
            self._fail(requests, error)
        except (Exception, asyncio.CancelledError) as exc:  # onnxruntime's errors, or shut down
            self._fail(requests, InferenceFailed(self.name, f"{type(exc).__name__}: {exc}"))
        else:
            self._answer(requests, ran, threads)
        self._dispatch()

    def _answer(self, requests: list[_Request], ran: _Ran, threads: int) -> None:
        size = ran.outputs.shape[0]
        self._on_batch(self.name, size)
        row = 0
        # A run of one request links nothing: its inference span already says batch size 1.
        shared_by = tuple(r.trace_context for r in requests) if len(requests) > 1 else ()
        for request, batch in zip(requests, ran.batches, strict=True):  # one batch per request, by _run
            rows = batch.shape[0]
            if not request.answer.done():  # the caller may have gone away
                request.answer.set_result(Inference(
                    ran.outputs[row:row + rows], (ran.picked - request.submitted) * 1000,
                    (ran.finished - ran.started) * 1000, size, threads, ran.started, request.submitted,
                    shared_by))
                shared_by = ()
            row += rows

    @staticmethod
    def _fail(requests: list[_Request], error: Exception) -> None:
        for request in requests:
            if not request.answer.done():
                request.answer.set_exception(error)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for request in self.queue:
            request.answer.cancel()
        self.queue = []
