"""The load generator: simulated users, each on one kept-alive connection of its own, sending one
prebuilt request again and again, and the cell that summarises what a server did with it.

Over HTTP, raw asyncio streams rather than an HTTP client library: the client's own CPU per request
stays a small, measured fraction of the server's, so the numbers are the server's. (gRPC's
connection is in bench/grpc_load.py.)"""
from __future__ import annotations

import asyncio
import json
import mimetypes
import struct
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

GRACE_S = 10.0
TOP_K = 5  # classes asked for, whatever the protocol: /predict's top_k, the OIP's classification
# A BYTES tensor element on the Open Inference Protocol's wire: 4-byte little-endian length, bytes.
BYTES_LENGTH = struct.Struct("<I")


def post_request(host: str, port: int, path: str, headers: dict[str, str], body: bytes) -> bytes:
    """One complete HTTP/1.1 request, built once and sent as is by every client."""
    head = "".join([f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n",
                    *(f"{name}: {value}\r\n" for name, value in headers.items()),
                    f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"])
    return head.encode() + body


def multipart_request(host: str, port: int, path: str, image: bytes, filename: str) -> bytes:
    """The photo uploaded as a form's file, as a browser sends it to /predict."""
    boundary = uuid.uuid4().hex
    content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
    body = b"".join([
        f"--{boundary}\r\n".encode(),
        f'Content-Disposition: form-data; name="file"; filename="{filename}"\r\n'.encode(),
        f"Content-Type: {content_type}\r\n\r\n".encode(),
        image,
        f"\r\n--{boundary}--\r\n".encode(),
    ])
    return post_request(host, port, path, {"Content-Type": f"multipart/form-data; boundary={boundary}"}, body)


def infer_request(host: str, port: int, model: str, image: bytes, output: str | None) -> bytes:
    """The photo as a BYTES input named `image` of the Open Inference Protocol's REST infer, laid
    out as tritonclient.http sends it: the JSON header, then the tensor in the binary data
    extension. With the model's `output` named, only its top classes come back, as from /predict."""
    header: dict = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                "parameters": {"binary_data_size": BYTES_LENGTH.size + len(image)}}]}
    if output:
        header["outputs"] = [{"name": output, "parameters": {"classification": TOP_K, "binary_data": True}}]
    text = json.dumps(header, separators=(",", ":")).encode()
    return post_request(host, port, f"/v2/models/{model}/infer",
                        {"Inference-Header-Content-Length": str(len(text))},
                        text + BYTES_LENGTH.pack(len(image)) + image)


@dataclass(frozen=True)
class Response:
    status: int
    keep_alive: bool


async def read_response(reader: asyncio.StreamReader) -> Response:
    """Read one response to its end, body included, so the next one starts on a clean stream."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    chunked = False
    keep_alive = True
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        value = value.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value
        elif name == b"connection":
            keep_alive = value != b"close"
    if not chunked:
        await reader.readexactly(length)
        return Response(status, keep_alive)
    while size := int((await reader.readline()).split(b";")[0], 16):
        await reader.readexactly(size + 2)
    await reader.readuntil(b"\r\n")  # the empty trailer
    return Response(status, keep_alive)


@dataclass
class Phase:
    """Requests still to send in one phase of a cell, and what came back."""

    to_send: int
    deadline: float  # event-loop time after which no request is sent
    latencies_ms: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    sent: int = 0


@dataclass(frozen=True)
class Answer:
    """How one request ended, in its protocol's words (an HTTP status, a gRPC status code), and
    whether its connection can carry the next one."""

    outcome: str
    ok: bool
    keep_alive: bool = True


class Connection(Protocol):
    """One simulated user's connection, sending its one prebuilt request on each `exchange`."""

    async def exchange(self) -> Answer: ...

    async def close(self) -> None: ...


class HttpConnection:
    """One kept-alive HTTP/1.1 connection, opened at the first request and again after a close."""

    def __init__(self, host: str, port: int, request: bytes) -> None:
        self.host = host
        self.port = port
        self.request = request
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def exchange(self) -> Answer:
        if self.reader is None or self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(self.request)
        response = await read_response(self.reader)
        return Answer(str(response.status), response.status == 200, response.keep_alive)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = None
        self.writer = None


class Client:
    """One simulated user: sends the request, awaits the answer, repeats, on its own connection."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    async def run(self, phase: Phase) -> None:
        loop = asyncio.get_running_loop()
        while phase.sent < phase.to_send and loop.time() < phase.deadline:
            phase.sent += 1
            start = time.perf_counter()
            try:
                # A request in flight at the deadline gets a grace period, then counts as an error.
                async with asyncio.timeout_at(phase.deadline + GRACE_S):
                    answer = await self.connection.exchange()
            except (OSError, EOFError, TimeoutError, ValueError, asyncio.IncompleteReadError,
                    asyncio.LimitOverrunError) as error:
                answer = Answer(type(error).__name__, ok=False, keep_alive=False)
            if answer.ok:
                phase.latencies_ms.append((time.perf_counter() - start) * 1000.0)
            phase.statuses[answer.outcome] = phase.statuses.get(answer.outcome, 0) + 1
            if not answer.keep_alive:
                await self.connection.close()


@dataclass(frozen=True)
class Load:
    """What one cell's clients did: the measured phase, and the warm-up requests before it."""

    measured: Phase
    warmup_sent: int
    wall_s: float
    client_cpu_s: float


def drive(connect: Callable[[], Connection], concurrency: int, warmup: int, requests: int,
          time_limit: float) -> Load:
    """`concurrency` clients, each on a connection from `connect`, send `warmup` requests, then
    `requests` measured ones, all within `time_limit` seconds."""
    return asyncio.run(_drive(connect, concurrency, warmup, requests, time_limit))


async def _drive(connect: Callable[[], Connection], concurrency: int, warmup: int,
                 requests: int, time_limit: float) -> Load:
    deadline = asyncio.get_running_loop().time() + time_limit
    clients = [Client(connect()) for _ in range(concurrency)]  # in the loop: gRPC's channels bind to it
    try:
        warm = Phase(warmup, deadline)
        await asyncio.gather(*(client.run(warm) for client in clients))
        measured = Phase(requests, deadline)
        cpu_start = time.process_time()
        start = time.perf_counter()
        await asyncio.gather(*(client.run(measured) for client in clients))
        wall = time.perf_counter() - start
        cpu = time.process_time() - cpu_start
    finally:
        for client in clients:
            await client.connection.close()
    return Load(measured, warm.sent, wall, cpu)


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if values else None


@dataclass(frozen=True)
class Cell:
    """One model at one concurrency level against one server."""

    server: str
    model: str
    concurrency: int
    requests: int
    sent: int
    ok: int
    errors: int
    statuses: dict[str, int]
    time_limited: bool
    wall_s: float
    requests_per_s: float
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    client_cpu_ms_per_request: float
    server_cpu_ms_per_request: float | None
    intra_op_threads: int | None = None  # the server's, and so the bare run's beside it
    bare_p50_ms: float | None = None
    preprocess_p50_ms: float | None = None  # decode + preprocess of the photo, in the bench process
    protocol: str = "predict"  # how the photo was sent: bench.measure.PROTOCOLS


def summarise(server: str, model: str, concurrency: int, requests: int, load: Load,
              server_cpu_s: float | None) -> Cell:
    """The cell of a load; `server_cpu_s` is the server's CPU over warm-up and measured requests
    alike, since it can only be read before and after both."""
    phase = load.measured
    ok = len(phase.latencies_ms)
    return Cell(
        server=server, model=model, concurrency=concurrency, requests=requests,
        sent=phase.sent, ok=ok, errors=phase.sent - ok, statuses=phase.statuses,
        time_limited=phase.sent < requests, wall_s=round(load.wall_s, 3),
        requests_per_s=round(ok / load.wall_s, 2) if load.wall_s > 0 else 0.0,
        p50_ms=percentile(phase.latencies_ms, 50), p90_ms=percentile(phase.latencies_ms, 90),
        p99_ms=percentile(phase.latencies_ms, 99),
        mean_ms=round(float(np.mean(phase.latencies_ms)), 3) if ok else None,
        client_cpu_ms_per_request=round(load.client_cpu_s * 1000.0 / max(phase.sent, 1), 3),
        server_cpu_ms_per_request=None if server_cpu_s is None else
        round(server_cpu_s * 1000.0 / max(phase.sent + load.warmup_sent, 1), 3),
    )
