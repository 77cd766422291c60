"""A deploy stops the service with SIGTERM while clients keep sending: readiness turns 503 at once,
requests are still served while a load balancer catches up, every accepted request gets its
answer, and then the process exits within the configured bound."""
import asyncio
import concurrent.futures
import signal
import socket
import time

import httpx
import numpy as np
import uvicorn
from fastapi import FastAPI
from PIL import Image

from service.__main__ import DrainingServer
from service.connections import bounded_http_protocol, connection_limits
from service.settings import Settings
from tests.image_bombs import with_last_scan_repeated
from tests.service_fixtures import copy_repository, encode, running_server

MODEL = "mobilenetv2"
CLIENTS = 8
DRAIN_SECONDS = 1.5
GRACEFUL_SHUTDOWN_SECONDS = 10


def gradient_png(side: int) -> bytes:
    ramp = np.add.outer(np.arange(side), np.arange(side)) % 256
    return encode(Image.fromarray(np.stack([ramp, ramp[::-1], ramp.T], -1).astype(np.uint8)), "PNG",
                  compress_level=1)


async def load_until_refused(url: str, image: bytes, terminate) -> tuple[list, list, float]:
    """CLIENTS loops, a new connection per request, until the listener refuses them; SIGTERM after 1 s.

    Returns each request's (sent, answered, outcome) in seconds since SIGTERM, the readiness
    answers seen after it, and when SIGTERM was sent (perf_counter)."""
    outcomes, readiness = [], []
    sigterm_at = time.perf_counter() + 3600
    no_keep_alive = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=no_keep_alive) as client:
        async def send() -> None:
            while True:
                sent = time.perf_counter()
                try:
                    response = await client.put(f"/predict/{MODEL}", content=image)
                    outcome = response.status_code
                except httpx.ConnectError:
                    outcome = "refused"
                except httpx.TransportError as exc:
                    outcome = type(exc).__name__
                outcomes.append((sent - sigterm_at, time.perf_counter() - sigterm_at, outcome))
                if outcome == "refused":
                    return

        async def stop_then_watch() -> None:
            nonlocal sigterm_at
            await asyncio.sleep(1.0)
            readiness.append(("before", (await client.get("/health/ready")).status_code))
            sigterm_at = time.perf_counter()
            terminate()
            try:
                while True:
                    await asyncio.sleep(0.1)
                    readiness.append((time.perf_counter() - sigterm_at,
                                      (await client.get("/health/ready")).status_code,
                                      (await client.get("/health/live")).status_code))
            except httpx.ConnectError:
                return

        await asyncio.gather(*(send() for _ in range(CLIENTS)), stop_then_watch())
    return outcomes, readiness, sigterm_at


def test_sigterm_under_load_loses_no_accepted_request(model_repository, tmp_path):
    copy_repository(model_repository, tmp_path / "repository", MODEL)
    image = gradient_png(1500)  # tens of ms to decode: there are always requests in flight
    with running_server(tmp_path / "repository", tmp_path / "service.log",
                        DRAIN_SECONDS=str(DRAIN_SECONDS), PREPROCESS_WORKERS="1",
                        GRACEFUL_SHUTDOWN_SECONDS=str(GRACEFUL_SHUTDOWN_SECONDS)) as server:
        server.wait_ready()
        process = server.process
        outcomes, readiness, sigterm_at = asyncio.run(
            load_until_refused(server.url, image, lambda: process.send_signal(signal.SIGTERM)))
        process.wait(timeout=DRAIN_SECONDS + GRACEFUL_SHUTDOWN_SECONDS + 10)
        exited_after = time.perf_counter() - sigterm_at

    kinds = {outcome for _, _, outcome in outcomes}
    answered = [(sent, done) for sent, done, outcome in outcomes if outcome == 200]
    closed_at = min(done for _, done, outcome in outcomes if outcome == "refused")
    during_drain = [s for s, _ in answered if 0 < s < closed_at]
    finished_after_close = [d for _, d in answered if d > closed_at]
    print(f"\n{len(answered)} requests answered 200, {len(during_drain)} of them sent after SIGTERM, "
          f"{len(finished_after_close)} finished after the listener closed at {closed_at:.2f} s; "
          f"process exited {exited_after:.2f} s after SIGTERM with code {process.returncode}")
    assert kinds == {200, "refused"}, kinds  # nothing accepted was dropped, nothing failed
    assert during_drain and finished_after_close
    assert closed_at >= DRAIN_SECONDS * 0.9
    assert readiness[0] == ("before", 200)
    assert [ready for _, ready, live in readiness[1:]] == [503] * (len(readiness) - 1)
    assert {live for _, _, live in readiness[1:]} == {200}
    assert process.returncode in (0, -signal.SIGTERM)
    assert exited_after < DRAIN_SECONDS + GRACEFUL_SHUTDOWN_SECONDS
    assert "Traceback" not in server.log.read_text()


def test_connections_waiting_in_the_backlog_at_shutdown_are_answered_not_reset():
    """A client whose connection the kernel completed, but the loop had not accepted yet when the
    listener closed, has sent its request: it gets its answer, not a reset."""
    app = FastAPI()

    @app.get("/ping")
    async def ping() -> dict:
        return {"ok": True}

    async def scenario() -> list[bytes]:
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off",
                                http=bounded_http_protocol(connection_limits(Settings())))
        server = DrainingServer(config, app, drain_seconds=0)
        serving = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        [listener] = server.servers[0].sockets
        # The loop stops accepting, as a busy loop has not yet: these wait in the kernel's backlog.
        asyncio.get_running_loop().remove_reader(listener.fileno())
        clients = [socket.create_connection(listener.getsockname()[:2]) for _ in range(3)]
        for client in clients:
            client.sendall(b"GET /ping HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        server.should_exit = True
        await serving
        answers = []
        for client in clients:
            client.settimeout(5)
            try:
                answers.append(client.recv(4096).split(b"\r\n")[0])
            except ConnectionResetError:
                answers.append(b"reset")
            client.close()
        return answers

    assert asyncio.run(scenario()) == [b"HTTP/1.1 200 OK"] * 3


def test_a_request_still_decoding_when_shutdown_runs_out_of_time_gets_a_json_503(model_repository,
                                                                                 tmp_path):
    copy_repository(model_repository, tmp_path / "repository", MODEL)
    # About 95 scans, each decoded over the whole image: seconds of decoding, under the scan limit.
    slow = with_last_scan_repeated(encode(Image.new("L", (6000, 6600), 128), "JPEG", progressive=True), 90)
    with running_server(tmp_path / "repository", tmp_path / "service.log",
                        GRACEFUL_SHUTDOWN_SECONDS="0.3") as server:
        server.wait_ready()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            answer = pool.submit(httpx.put, f"{server.url}/predict/{MODEL}", content=slow, timeout=60)
            time.sleep(0.5)  # well into its decoding
            server.process.send_signal(signal.SIGTERM)
            response = answer.result()
        server.process.wait(timeout=30)
    print(f"\nSIGTERM during a {len(slow) / 1000:.0f} KB JPEG's decode: {response.status_code} "
          f"{response.text[:80]}")
    assert response.status_code == 503 and response.json()["code"] == "shutting_down"
    assert "Traceback" not in server.log.read_text()
