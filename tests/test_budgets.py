"""The process-wide memory budget: what a request holds is reserved before it is spent, a request
past the budget is refused with 503 before it costs anything, and everything goes back when the
request ends. In process for the budget's own logic, then against a real server for the attacks
it bounds: many stalled uploads, raw or multipart, and memory handed back after a spike."""
import asyncio
import contextlib
import os
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
from prometheus_client import CollectorRegistry

from service.budget import MemoryBudget
from service.errors import MemoryExhausted
from service.fair_pool import FairPool
from tests.conftest import report
from tests.onnx_models import CIFAR_MEAN, CIFAR_STD, SmallModel, write_small_repository
from tests.service_fixtures import metric, ready_server, rss_bytes

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


def test_an_answer_held_before_it_is_built_is_replaced_by_its_encoded_size():
    budget = budget_of(100)
    with budget.account() as account:
        account.reserve(10)  # the body
        account.hold_answer(60)  # the most the answer can take, before inference
        assert budget.reserved == 70
        account.hold_answer(25)  # encoded: the rest goes back
        assert budget.reserved == 35
        with pytest.raises(MemoryExhausted):
            account.hold_answer(95)  # 10 + 95 cannot fit
        assert budget.reserved == 35
    assert budget.reserved == 0


def test_four_requests_at_their_largest_always_fit():
    budget = budget_of(1000)
    with budget.account() as a, budget.account() as b, budget.account() as c, budget.account() as d:
        for account in (a, b, c, d):
            account.reserve(account.per_request)


# In process: decode threads shared fairly between models ----------------------------------------
def test_while_another_model_asks_a_busy_model_keeps_a_decode_thread_free_for_it():
    pool = FairPool(2, "test")
    order: list[str] = []

    def job(name: str, seconds: float) -> None:
        time.sleep(seconds)
        order.append(name)

    async def scenario() -> None:
        await pool.run("b", job, "b0", 0.0)
        busy = [asyncio.ensure_future(pool.run("a", job, f"a{i}", 0.2)) for i in range(6)]
        await asyncio.sleep(0.05)  # a0 holds a's share, one thread; a1..a5 wait
        await pool.run("b", job, "b1", 0.0)
        order.append("b answered")
        await asyncio.gather(*busy)

    asyncio.run(scenario())
    pool.shutdown()
    assert order[:3] == ["b0", "b1", "b answered"]  # before any of a's jobs ended


def test_a_model_alone_uses_every_decode_thread():
    pool = FairPool(2, "test")

    async def scenario() -> float:
        started = time.perf_counter()
        await asyncio.gather(*(pool.run("a", time.sleep, 0.2) for _ in range(4)))
        return time.perf_counter() - started

    elapsed = asyncio.run(scenario())
    pool.shutdown()
    assert elapsed < 0.6  # two at a time: 0.4 s, not 0.8


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


# Against a real server ---------------------------------------------------------------------------
BUDGET = 200 * MB
UPLOAD = 19 * MB
STALLED_UPLOADS = 60
STALLED_MULTIPART_UPLOADS = 40
STALL_SECONDS = 6.0
BUDGETED = {"MEMORY_BUDGET_BYTES": str(BUDGET), "BODY_TIMEOUT_SECONDS": str(STALL_SECONDS),
            "REQUEST_TIMEOUT_SECONDS": str(STALL_SECONDS), "RETRY_AFTER_SECONDS": "3"}


@pytest.fixture(scope="module")
def server(model_repository, tmp_path_factory):
    folder = tmp_path_factory.mktemp("budget")
    spool = folder / "tmp"
    spool.mkdir()
    with ready_server(model_repository, folder, MODEL, TMPDIR=str(spool), **BUDGETED) as server:
        server.spool = spool
        yield server


def stalled_upload(port: int, head: bytes, body: bytes, answers: list[bytes]) -> None:
    """Send the head and all of the body but its last byte, then wait for the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as connection:
        with contextlib.suppress(OSError):  # refused and closed before the body was all sent
            connection.sendall(head + body[:-1])
        try:
            answers.append(connection.recv(65536))
        except OSError:
            answers.append(b"")


def during_stalled_uploads(server, head: bytes, body: bytes, uploads: int, watch
                           ) -> tuple[list[bytes], list]:
    """`uploads` uploads at once, each missing its last byte; `watch()` sampled meanwhile."""
    answers: list[bytes] = []
    clients = [threading.Thread(target=stalled_upload, args=(server.port, head, body, answers))
               for _ in range(uploads)]
    for client in clients:
        client.start()
    samples = []
    while any(client.is_alive() for client in clients):
        samples.append(watch())
        time.sleep(0.1)
    return answers, samples


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def assert_excess_refused_with_retry_after(answers: list[bytes]) -> None:
    statuses = [status_of(a) for a in answers]
    refused = [a for a in answers if status_of(a) == 503]
    assert len(refused) >= len(answers) - BUDGET // (2 * UPLOAD), statuses
    assert all(b"retry-after: 3" in a.lower() and b"memory_exhausted" in a for a in refused)
    assert set(statuses) <= {503, 408}, statuses  # the admitted ones stall until their deadline


def test_sixty_stalled_19_mb_uploads_hold_at_most_the_budget(server, request):
    body = b"\xff\xd8" + bytes(UPLOAD - 2)
    head = (f"PUT /predict/{MODEL} HTTP/1.1\r\nHost: test\r\nContent-Length: {len(body)}\r\n"
            "\r\n").encode()
    before = rss_bytes(server.pid)
    answers, rss = during_stalled_uploads(server, head, body, STALLED_UPLOADS,
                                          lambda: rss_bytes(server.pid))
    growth = max(rss) - before
    report(request, "budget", f"{STALLED_UPLOADS} stalled {UPLOAD // MB} MB uploads: RSS +"
           f"{growth / MB:.0f} MB at most; {sum(status_of(a) == 503 for a in answers)} x 503")
    assert growth < 300 * MB  # the budget (200 MB) and what the refused connections cost
    assert_excess_refused_with_retry_after(answers)


def test_forty_stalled_multipart_uploads_hold_at_most_the_budget_in_memory_or_on_disk(server, request):
    boundary = "b0undary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode() + bytes(UPLOAD) + f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST /predict/{MODEL} HTTP/1.1\r\nHost: test\r\nContent-Length: {len(body)}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n").encode()
    before = rss_bytes(server.pid)
    answers, held = during_stalled_uploads(
        server, head, body, STALLED_MULTIPART_UPLOADS,
        lambda: (rss_bytes(server.pid) - before, spool_bytes(server.pid, server.spool)))
    report(request, "budget", f"{STALLED_MULTIPART_UPLOADS} stalled multipart uploads: RSS +"
           f"{max(r for r, _ in held) / MB:.0f} MB and {max(f for _, f in held) / MB:.0f} MB of "
           "temporary files at most")
    assert max(r + f for r, f in held) < 300 * MB  # in memory or spooled to disk: the budget bounds it
    assert_excess_refused_with_retry_after(answers)


def spool_bytes(pid: int, folder: Path) -> int:
    """Bytes of the temporary files the process holds open in `folder` (unlinked at creation)."""
    total = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd).startswith(str(folder)):
                total += fd.stat().st_size
        except OSError:  # closed meanwhile
            pass
    return total


BURST = BUDGET // (2 * UPLOAD)  # as many as the budget admits at once


def test_memory_held_by_a_burst_of_big_uploads_goes_back_under_a_trickle_of_traffic(server, photos,
                                                                                 request):
    photo = photos["chelsea"].read_bytes()
    garbage = b"\xff\xd8" + bytes(UPLOAD - 2)  # read whole, then refused as undecodable
    url = f"{server.url}/predict/{MODEL}"

    async def trickle(client: httpx.AsyncClient, seconds: float) -> list[int]:
        rss, stop = [], time.monotonic() + seconds
        while time.monotonic() < stop:
            assert (await client.put(url, content=photo)).status_code == 200
            rss.append(rss_bytes(server.pid))
            await asyncio.sleep(0.25)
        return rss

    async def scenario() -> tuple[int, int, int]:
        async with httpx.AsyncClient(timeout=60) as client:
            before = (await trickle(client, 2.0))[-1]
            burst = await asyncio.gather(*(client.put(url, content=garbage) for _ in range(BURST)))
            assert [r.status_code for r in burst] == [400] * BURST
            peak = rss_bytes(server.pid)
            after = await trickle(client, 4.0)
        return before, peak, after[-1]

    before, peak, after = asyncio.run(scenario())
    report(request, "budget", f"burst of {BURST} x {UPLOAD // MB} MB: RSS {before / MB:.0f} MB before, "
           f"{peak / MB:.0f} MB after it, {after / MB:.0f} MB after 4 s of 4 requests/s")
    assert after - before < 16 * MB  # of the 190 MB the burst held


# A real server: an answer is held in the budget before inference -------------------------------
MANY_CLASSES = SmallModel("many_classes", 100_000, 32, 32, CIFAR_MEAN, CIFAR_STD, "many")


@pytest.fixture(scope="module")
def served_repository(tmp_path_factory) -> Path:
    """A model of 100,000 classes on 32 x 32 inputs: small requests, answers of megabytes."""
    return write_small_repository(tmp_path_factory.mktemp("many_classes"), (MANY_CLASSES,))


def test_a_request_whose_answer_could_not_fit_is_refused_before_inference(served):
    server = served([MANY_CLASSES.name], MEMORY_BUDGET_BYTES=str(8 * MB))

    def infer(rows: int, output: dict) -> httpx.Response:
        tensor = np.zeros((rows, 3, MANY_CLASSES.crop, MANY_CLASSES.crop), "<f4")
        header = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(tensor.shape),
                                           "parameters": {"binary_data_size": tensor.nbytes}}],
                               "outputs": [{"name": "logits", **output}]})
        return httpx.post(f"{server.url}/v2/models/{MANY_CLASSES.name}/infer", content=header + tensor.tobytes(),
                          headers={"Inference-Header-Content-Length": str(len(header))}, timeout=60)

    def inferences() -> float:
        return metric(httpx.get(f"{server.url}/metrics").text, "cnn_serve_batch_size_count",
                      model=MANY_CLASSES.name)

    before = inferences()
    # 16 rows of 100,000 scores in JSON: about 30 MB to build, from a 200 KB request.
    huge = infer(16, {})
    assert huge.status_code == 503 and huge.json()["code"] == "memory_exhausted"
    assert inferences() == before  # refused before the model ran
    normal = infer(1, {"parameters": {"classification": 5}})
    assert normal.status_code == 200 and inferences() == before + 1
