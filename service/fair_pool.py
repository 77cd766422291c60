"""A thread pool whose threads are shared fairly between models.

A plain pool serves jobs first come, first served: a model whose requests are each seconds of
decoding fills its queue and every other model's job waits behind all of them. Here a job takes a
thread only when one is free (nothing queues inside the pool), and a model holds at most its share
of the threads: all of them while it is the only one asking, an equal share (at least one) of them
while other models have asked within the last `RECENT_SECONDS`, so each of those finds a thread
free without waiting for the others' jobs to end. Jobs that find none wait in their model's own
queue, and each freed thread goes to the waiting model holding the fewest, the one served longest
ago first.

A thread stays taken until its job ends, even when the caller has gone (a decode cannot be
stopped half-way): the model whose request timed out pays for it, not the others. A waiting job
whose caller goes (its deadline passed, its client left) never starts.
"""
import asyncio
import contextlib
import math
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

RECENT_SECONDS = 1.0  # a model that asked within this long keeps its share of the threads


class FairPool:
    def __init__(self, workers: int, name: str, per_model: int | None = None) -> None:
        """`per_model`: the most threads one model may hold at once, even when nobody waits."""
        self.workers = workers
        self.per_model = per_model or workers
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix=name)
        self._busy = 0
        self._held: Counter[str] = Counter()  # touched only from the event loop: no lock needed
        self._waiting: OrderedDict[str, deque[asyncio.Future]] = OrderedDict()  # served longest ago first
        self._asked: dict[str, float] = {}  # each model's latest job, monotonic seconds

    async def run(self, model: str, function: Callable[..., Any], *args: Any) -> Any:
        """`function(*args)` on one of the threads, once `model` is given one."""
        await self._thread_for(model)
        job = self._executor.submit(function, *args)
        try:
            return await asyncio.wrap_future(job)
        finally:
            if job.done():
                self._release(model)
            else:  # its caller went, and the job runs on: the thread is free when it ends
                loop = asyncio.get_running_loop()
                job.add_done_callback(lambda _: _call_soon(loop, self._release, model))

    def _share(self) -> int:
        """Threads one model may hold: an equal share between the models asking lately."""
        now = time.monotonic()
        for model in [m for m, at in self._asked.items() if now - at > RECENT_SECONDS]:
            del self._asked[model]
        return min(self.per_model, max(1, math.ceil(self.workers / max(len(self._asked), 1))))

    def asking(self, model: str) -> None:
        """Count `model` among the models asking, for work it may do elsewhere this time (a lone
        image decoded on its inference worker): it keeps its share for its next jobs."""
        self._asked[model] = time.monotonic()

    async def _thread_for(self, model: str) -> None:
        self.asking(model)
        if self._busy < self.workers and self._held[model] < self._share() \
                and not self._waiting.get(model):
            self._take(model)
            return
        turn = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(model, deque()).append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():  # given a thread just as its caller left
                self._release(model)
            elif turn in self._waiting.get(model, ()):
                self._waiting[model].remove(turn)
                if not self._waiting[model]:
                    del self._waiting[model]
            raise

    def _take(self, model: str) -> None:
        self._busy += 1
        self._held[model] += 1

    def _release(self, model: str) -> None:
        self._busy -= 1
        self._held[model] -= 1
        while self._busy < self.workers and (chosen := self._next_model()) is not None:
            turn = self._waiting[chosen].popleft()
            if not self._waiting[chosen]:
                del self._waiting[chosen]
            else:
                self._waiting.move_to_end(chosen)
            if not turn.done():  # its caller may have gone meanwhile
                self._take(chosen)
                turn.set_result(None)

    def _next_model(self) -> str | None:
        """The waiting model holding the fewest threads; among equals, the one served longest ago."""
        share = self._share()
        candidates = [m for m, turns in self._waiting.items() if turns and self._held[m] < share]
        return min(candidates, key=lambda m: self._held[m], default=None)

    def shutdown(self) -> None:
        for turns in self._waiting.values():
            for turn in turns:
                turn.cancel()
        self._waiting.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any) -> None:
    with contextlib.suppress(RuntimeError):  # the loop has closed: a job outlived the server
        loop.call_soon_threadsafe(callback, *args)
