"""The process-wide memory budget: what a request holds is reserved before it is spent, a request
past the budget is refused with 503 before it costs anything, and everything goes back when the
request ends. In process for the budget's own logic, then against a real server for the attacks
it bounds: many stalled uploads, raw or multipart, and memory handed back after a spike."""
import asyncio
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from service.budget import MemoryBudget
from service.errors import MemoryExhausted
from service.fair_pool import FairPool
from tests.conftest import report
from tests.service_fixtures import ready_server, rss_bytes

MODEL = "mobilenetv3_small"
MB = 1024 * 1024


def budget_of(total: int) -> MemoryBudget:
    return MemoryBudget(total, retry_after_seconds=2, registry=CollectorRegistry())


# In process: the budget ---------------------------------------------------------------------------
def test_reservations_from_many_threads_never_exceed_the_budget_and_all_go_back():
    budget = budget_of(1000)
    granted, refused = [], []
    all_reserved = threading.Barrier(16)

    def request() -> None:
        with budget.account() as account:
            for _ in range(50):
                try:
                    account.reserve(7)
                    granted.append(7)
                except MemoryExhausted:
                    refused.append(7)
                assert budget.reserved <= budget.total
            all_reserved.wait()  # every account holds its share at once

    threads = [threading.Thread(target=request) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(granted) == 994 and refused  # 16 x 50 x 7 bytes asked of 1000
    assert budget.reserved == 0


def test_an_account_gives_everything_back_when_its_request_fails_or_is_cancelled():
    budget = budget_of(100)
    with pytest.raises(ValueError), budget.account() as account:
        account.reserve(60)
        raise ValueError("the request failed")
    assert budget.reserved == 0

    async def cancelled() -> None:
        with budget.account() as account:
            account.reserve(60)
            await asyncio.sleep(10)

    async def scenario() -> None:
        task = asyncio.ensure_future(cancelled())
        await asyncio.sleep(0.01)
        assert budget.reserved == 60
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert budget.reserved == 0


def test_past_the_budget_a_reservation_is_refused_with_retry_after_and_counted():
    registry = CollectorRegistry()
    budget = MemoryBudget(100, retry_after_seconds=2, registry=registry)
    with budget.account() as first, budget.account() as second:
        first.reserve(80)
        with pytest.raises(MemoryExhausted) as refusal:
            second.reserve(30)
        second.reserve(20)  # what is left still fits
    assert refusal.value.headers["Retry-After"] == "2"
    assert registry.get_sample_value("cnn_serve_memory_refusals_total") == 1
    assert budget.reserved == 0


def test_a_decode_that_outlives_its_request_cannot_reserve_any_more():
    budget = budget_of(100)
    with budget.account() as account:
        pass
    with pytest.raises(MemoryExhausted):
        account.reserve(1)
    assert budget.reserved == 0


def test_four_requests_at_their_largest_always_fit():
    budget = budget_of(1000)
    with budget.account() as a, budget.account() as b, budget.account() as c, budget.account() as d:
        for account in (a, b, c, d):
            account.reserve(account.per_request)


# In process: decode threads shared fairly between models ----------------------------------------
def test_a_model_waiting_for_a_decode_thread_is_served_before_the_busy_models_queue():
    pool = FairPool(2, "test")
    order: list[str] = []

    def job(name: str, seconds: float) -> None:
        time.sleep(seconds)
        order.append(name)

    async def scenario() -> None:
        busy = [asyncio.ensure_future(pool.run("a", job, f"a{i}", 0.2)) for i in range(6)]
        await asyncio.sleep(0.05)  # a0 and a1 hold both threads, a2..a5 wait
        other = asyncio.ensure_future(pool.run("b", job, "b", 0.0))
        await asyncio.gather(*busy, other)

    asyncio.run(scenario())
    pool.shutdown()
    assert order.index("b") <= 2  # right after the first of a's running jobs, not after all six


def test_a_queued_decode_whose_caller_has_gone_never_starts():
    pool = FairPool(1, "test")
    ran: list[str] = []

    async def scenario() -> None:
        running = asyncio.ensure_future(pool.run("a", lambda: time.sleep(0.2) or ran.append("first")))
        await asyncio.sleep(0.05)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await pool.run("a", lambda: ran.append("late"))
        await running
        await pool.run("b", lambda: ran.append("next"))

    asyncio.run(scenario())
    pool.shutdown()
    assert ran == ["first", "next"]
