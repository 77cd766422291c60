"""A thread pool whose threads are shared fairly between models.

A plain pool serves jobs first come, first served: a model whose requests are each seconds of
decoding fills its queue and every other model's job waits behind all of them. Here a job takes a
thread only when one is free (nothing queues inside the pool), and a model holds at most its share
of the threads: all of them while it is the only one asking, an equal share (at least one) of them
while other models have asked within the last `RECENT_SECONDS`, so each of those finds a thread
free without waiting for the others' jobs to end. Jobs that find none wait in their model's own
queue, and each freed thread goes to the waiting model holding the fewest, the one served longest
ago first.

A thread that ends a job takes the next waiting one itself, under the pool's lock, without a round
trip through the event loop: on a busy loop that round trip left threads idle between jobs (the
cheapest model's throughput at 16 clients was a tenth lower with this pool than with a plain one).

A thread stays taken until its job ends, even when the caller has gone (a decode cannot be
stopped half-way): the model whose request timed out pays for it, not the others. A waiting job
whose caller goes (its deadline passed, its client left) never starts.
"""
import asyncio
import functools
import math
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

RECENT_SECONDS = 1.0  # a model that asked within this long keeps its share of the threads


@dataclass
class _Job:
    model: str
    call: Callable[[], Any]
    future: Future = field(default_factory=Future)

    def run(self) -> None:
        if not self.future.set_running_or_notify_cancel():  # its caller went while it waited
            return
        try:
            result = self.call()
        except BaseException as error:  # handed to the caller, as an executor does
            self.future.set_exception(error)
        else:
            self.future.set_result(result)


class FairPool:
    def __init__(self, workers: int, name: str, per_model: int | None = None) -> None:
        """`per_model`: the most threads one model may hold at once, even when nobody waits."""
        self.workers = workers
        self.per_model = per_model or workers
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix=name)
        self._lock = threading.Lock()  # the loop and the pool's threads both take and free threads
        self._busy = 0
        self._held: Counter[str] = Counter()
        self._waiting: OrderedDict[str, deque[_Job]] = OrderedDict()  # served longest ago first
        self._asked: dict[str, float] = {}  # each model's latest job, monotonic seconds

    async def run(self, model: str, function: Callable[..., Any], *args: Any) -> Any:
        """`function(*args)` on one of the threads, once `model` is given one. A caller that goes
        while its job waits cancels it; one that goes while it runs leaves it running."""
        job = _Job(model, functools.partial(function, *args))
        with self._lock:
            self._asked[model] = time.monotonic()
            start = self._busy < self.workers and self._held[model] < self._share() \
                and not self._waiting.get(model)
            if start:
                self._take(model)
            else:
                self._waiting.setdefault(model, deque()).append(job)
        if start:
            self._submit(job)
        return await asyncio.wrap_future(job.future)

    def asking(self, model: str) -> None:
        """Count `model` among the models asking, for work it may do elsewhere this time (a lone
        image decoded on its inference worker): it keeps its share for its next jobs."""
        with self._lock:
            self._asked[model] = time.monotonic()

    def _work(self, job: _Job | None) -> None:
        """On a pool thread: the job, then each next one this thread is given."""
        while job is not None:
            job.run()
            with self._lock:
                self._busy -= 1
                self._held[job.model] -= 1
                given = self._next_jobs()
            for other in given[1:]:  # threads the fair share had kept idle
                self._submit(other)
            job = given[0] if given else None

    def _submit(self, job: _Job) -> None:
        try:
            self._executor.submit(self._work, job)
        except RuntimeError:  # shut down: the job will never run
            job.future.cancel()

    def _share(self) -> int:
        """Threads one model may hold: an equal share between the models asking lately."""
        now = time.monotonic()
        for model in [m for m, at in self._asked.items() if now - at > RECENT_SECONDS]:
            del self._asked[model]
        return min(self.per_model, max(1, math.ceil(self.workers / max(len(self._asked), 1))))

    def _take(self, model: str) -> None:
        self._busy += 1
        self._held[model] += 1

    def _next_jobs(self) -> list[_Job]:
        """While threads are free, the next job of the waiting model holding the fewest threads;
        among equals, the one served longest ago. Under the lock."""
        given: list[_Job] = []
        share = self._share()
        while self._busy < self.workers:
            candidates = [m for m in self._waiting if self._held[m] < share]
            chosen = min(candidates, key=lambda m: self._held[m], default=None)
            if chosen is None:
                return given
            jobs = self._waiting[chosen]
            given.append(jobs.popleft())
            if not jobs:
                del self._waiting[chosen]
            else:
                self._waiting.move_to_end(chosen)
            self._take(chosen)
        return given

    def shutdown(self) -> None:
        with self._lock:
            for jobs in self._waiting.values():
                for job in jobs:
                    job.future.cancel()
            self._waiting.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)
