"""Benchmark the model server: requests/s and latency per model and concurrency level.

    python -m service.bench --image photo.jpg --model-repository DIR [--baseline]
    python -m service.bench --image photo.jpg --url http://127.0.0.1:8000 --model-repository DIR

Without `--url` it starts `python -m service` on a free loopback port and stops it at the end.
Each model gets, per concurrency level, a short warm-up and then `--requests` multipart uploads of
the photo (stopped early at `--time-limit` seconds), from one keep-alive connection per client.
Beside each model it times bare onnxruntime `session.run` on the same model file with the same
threads, so the server's overhead reads as a ratio. `--baseline` also starts the plain FastAPI app
of `service.baseline` on the same repository and measures it in the same run.
Results go to `--out` as bench.json and bench.png.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import mimetypes
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlsplit

import numpy as np
import onnxruntime as ort

from service.baseline import INTRA_OP_THREADS as BASELINE_THREADS
from service.engine import servable_onnx_file, session_options
from service.model_repository import ModelFolder, read_metadata
from service.preprocess import preprocess
from service.settings import Settings, available_cores

READY_TIMEOUT_S = 120.0
SETTLE_S = 2.0
GRACE_S = 10.0


class BenchError(Exception):
    """A reason the bench cannot run, told to the user as one line."""


# --- the load generator -----------------------------------------------------------------------

def multipart_request(host: str, port: int, path: str, image: bytes, filename: str) -> bytes:
    """One complete HTTP/1.1 request, built once and sent as is by every client."""
    boundary = uuid.uuid4().hex
    content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
    body = b"".join([
        f"--{boundary}\r\n".encode(),
        f'Content-Disposition: form-data; name="file"; filename="{filename}"\r\n'.encode(),
        f"Content-Type: {content_type}\r\n\r\n".encode(),
        image,
        f"\r\n--{boundary}--\r\n".encode(),
    ])
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    )
    return head.encode() + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one response; return its status and whether the server keeps the connection."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length, chunked, keep = 0, False, True
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value
        elif name == b"connection":
            keep = value != b"close"
    if not chunked:
        await reader.readexactly(length)
        return status, keep
    while size := int((await reader.readline()).split(b";")[0], 16):
        await reader.readexactly(size + 2)
    await reader.readuntil(b"\r\n")  # the empty trailer
    return status, keep


@dataclass
class Phase:
    """Requests still to send in one phase of a cell, and what came back."""

    to_send: int
    deadline: float  # event-loop time after which no request is sent
    latencies_ms: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    sent: int = 0


class Client:
    """One simulated user: sends the request, awaits the answer, repeats, on one kept-alive connection."""

    def __init__(self, host: str, port: int, request: bytes) -> None:
        self.host, self.port, self.request = host, port, request
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def run(self, phase: Phase) -> None:
        loop = asyncio.get_running_loop()
        while phase.sent < phase.to_send and loop.time() < phase.deadline:
            phase.sent += 1
            start = time.perf_counter()
            try:
                # A request in flight at the deadline gets a grace period, then counts as an error.
                async with asyncio.timeout_at(phase.deadline + GRACE_S):
                    status, keep = await self._exchange()
                outcome = str(status)
            except (OSError, EOFError, TimeoutError, ValueError, asyncio.IncompleteReadError,
                    asyncio.LimitOverrunError) as error:
                outcome, keep = type(error).__name__, False
            if outcome == "200":
                phase.latencies_ms.append((time.perf_counter() - start) * 1000.0)
            phase.statuses[outcome] = phase.statuses.get(outcome, 0) + 1
            if not keep:
                self.close()

    async def _exchange(self) -> tuple[int, bool]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(self.request)
        return await _read_response(self.reader)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


@dataclass
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


def _percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if values else None


async def _load(host: str, port: int, request: bytes, concurrency: int, warmup: int,
                requests: int, time_limit: float) -> tuple[Phase, int, float, float]:
    deadline = asyncio.get_running_loop().time() + time_limit
    clients = [Client(host, port, request) for _ in range(concurrency)]
    try:
        warm = Phase(warmup, deadline)
        await asyncio.gather(*(client.run(warm) for client in clients))
        measured = Phase(requests, deadline)
        cpu, start = time.process_time(), time.perf_counter()
        await asyncio.gather(*(client.run(measured) for client in clients))
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    finally:
        for client in clients:
            client.close()
    return measured, warm.sent, wall, cpu


def run_cell(server: "Server", model: str, request: bytes, concurrency: int, warmup: int,
             requests: int, time_limit: float) -> Cell:
    """Drive one server with `concurrency` clients and summarise what it did."""
    server_cpu = server.cpu_seconds()
    phase, warm_sent, wall, client_cpu = asyncio.run(
        _load(server.host, server.port, request, concurrency, warmup, requests, time_limit)
    )
    server_cpu_after = server.cpu_seconds()
    ok = len(phase.latencies_ms)
    per_request = 1000.0 / max(phase.sent, 1)
    return Cell(
        server=server.name, model=model, concurrency=concurrency, requests=requests,
        sent=phase.sent, ok=ok, errors=phase.sent - ok, statuses=phase.statuses,
        time_limited=phase.sent < requests, wall_s=round(wall, 3),
        requests_per_s=round(ok / wall, 2) if wall > 0 else 0.0,
        p50_ms=_percentile(phase.latencies_ms, 50), p90_ms=_percentile(phase.latencies_ms, 90),
        p99_ms=_percentile(phase.latencies_ms, 99),
        mean_ms=round(float(np.mean(phase.latencies_ms)), 3) if ok else None,
        client_cpu_ms_per_request=round(client_cpu * per_request, 3),
        # Over warm-up and measured requests: the server's CPU is only read before and after both.
        server_cpu_ms_per_request=(round((server_cpu_after - server_cpu) * 1000.0 / max(phase.sent + warm_sent, 1), 3)
                                   if server_cpu is not None and server_cpu_after is not None else None),
    )


# --- bare onnxruntime ------------------------------------------------------------------------

def bare_session_run(model_dir: Path, image: bytes, threads: int, runs: int,
                     time_limit: float) -> dict:
    """p50 of `session.run` at batch 1 on the photo, with the service's session options, and of
    the photo's decode + preprocess, both on this process's one thread."""
    metadata = read_metadata(model_dir)
    settings = Settings()
    path = model_dir / servable_onnx_file(ModelFolder(model_dir.name, model_dir, metadata))
    session = ort.InferenceSession(str(path), session_options(settings, threads),
                                   providers=["CPUExecutionProvider"])
    prepare = lambda: preprocess(image, metadata.preprocessing, settings.max_image_pixels)
    feed = {metadata.input.name: prepare()}
    inference = _timed(lambda: session.run(None, feed), runs, time_limit / 2)
    preprocessing = _timed(prepare, runs, time_limit / 2)
    return {"model_file": path.name, "intra_op_threads": threads, "runs": len(inference),
            "p50_ms": _percentile(inference, 50), "p90_ms": _percentile(inference, 90),
            "preprocess_p50_ms": _percentile(preprocessing, 50)}


def _timed(call: Callable[[], object], runs: int, time_limit: float) -> list[float]:
    """Milliseconds of up to `runs` calls after 5 unmeasured ones, within `time_limit` seconds."""
    for _ in range(5):
        call()
    timings, deadline = [], time.perf_counter() + time_limit
    while len(timings) < runs and time.perf_counter() < deadline:
        start = time.perf_counter()
        call()
        timings.append((time.perf_counter() - start) * 1000.0)
    return timings


# --- the servers under test ------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def http_get(host: str, port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    # An empty ProxyHandler: a proxy set in the environment must not see loopback traffic.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://{host}:{port}{path}", timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@dataclass
class Server:
    """A server under test: one we started (with its process) or one given by URL."""

    name: str
    host: str
    port: int
    process: subprocess.Popen | None = None
    ready_s: float | None = None  # from process start to /health/ready answering 200
    model_threads: dict[str, int] = field(default_factory=dict)  # where it differs by model
    rss_ready_mb: float | None = None  # every model loaded, before any request
    intra_op_threads: int | None = None

    def threads(self, model: str) -> int | None:
        return self.model_threads.get(model, self.intra_op_threads)

    def cpu_seconds(self) -> float | None:
        """User+system CPU of a server we started (its main process), from /proc where there is one."""
        stat = self._proc("stat")
        if stat is None:
            return None
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mb(self) -> float | None:
        status = self._proc("status")
        for line in (status or "").splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
        return None

    def describe(self, rss_mb: float | None, rss_settled_mb: float | None) -> dict:
        return {"name": self.name, "url": f"http://{self.host}:{self.port}", "started_here": bool(self.process),
                "intra_op_threads": self.intra_op_threads, "model_threads": self.model_threads,
                "ready_s": self.ready_s,
                "rss_ready_mb": self.rss_ready_mb, "rss_mb": rss_mb,
                "rss_settled_mb": rss_settled_mb}

    def _proc(self, name: str) -> str | None:
        if self.process is None:
            return None
        try:
            return Path(f"/proc/{self.process.pid}/{name}").read_text()
        except OSError:
            return None


def wait_ready(server: Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process is not None and server.process.poll() is not None:
            raise BenchError(f"{server.name} exited with code {server.process.returncode} before ready")
        with contextlib.suppress(OSError):
            if http_get(server.host, server.port, "/health/ready", timeout=2.0)[0] == 200:
                return
        time.sleep(0.1)
    raise BenchError(f"{server.name} was not ready within {timeout:.0f} s")


@contextlib.contextmanager
def started(name: str, command: list[str], env: dict[str, str], log: Path) -> Iterator[Server]:
    """Run a server process on a free loopback port until the block ends."""
    port = free_port()
    env = {**os.environ, **env, "HOST": "127.0.0.1", "PORT": str(port)}
    with open(log, "wb") as log_file:
        start = time.perf_counter()
        process = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        server = Server(name, "127.0.0.1", port, process)
        try:
            wait_ready(server, READY_TIMEOUT_S)
            server.ready_s = round(time.perf_counter() - start, 2)
            server.rss_ready_mb = server.rss_mb()
            yield server
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def model_threads(server: Server) -> dict[str, int]:
    """The threads of a lone inference, per model, as the server's /models reports them."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        status, body = http_get(server.host, server.port, "/models")
        if status == 200:
            return {m["name"]: int(m["intra_op_threads"]) for m in json.loads(body)["models"]}
    return {}


# --- reporting -------------------------------------------------------------------------------

COLUMNS = ("server", "model", "clients", "req/s", "p50 ms", "p90 ms", "p99 ms", "errors",
           "threads", "bare p50 ms", "p50/bare", "prep p50 ms", "server CPU ms/req")


def table_rows(cells: list[Cell]) -> list[tuple[str, ...]]:
    rows = []
    for cell in cells:
        bare_p50 = cell.bare_p50_ms
        ratio = cell.p50_ms / bare_p50 if cell.p50_ms and bare_p50 else None
        rows.append((cell.server, cell.model, str(cell.concurrency), f"{cell.requests_per_s:.1f}",
                     _ms(cell.p50_ms), _ms(cell.p90_ms), _ms(cell.p99_ms),
                     f"{cell.errors}/{cell.sent}" + ("*" if cell.time_limited else ""),
                     str(cell.intra_op_threads or "-"), _ms(bare_p50),
                     f"{ratio:.2f}" if ratio else "-", _ms(cell.preprocess_p50_ms),
                     _ms(cell.server_cpu_ms_per_request)))
    return rows


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def comparisons(cells: list[Cell]) -> list[dict]:
    """Service against baseline, per model and concurrency, where both were measured."""
    baseline = {(c.model, c.concurrency): c for c in cells if c.server == "baseline"}
    found = []
    for cell in cells:
        other = baseline.get((cell.model, cell.concurrency))
        if cell.server != "baseline" and other and other.requests_per_s:
            found.append({"model": cell.model, "concurrency": cell.concurrency,
                          "throughput_ratio": round(cell.requests_per_s / other.requests_per_s, 3),
                          "service_p99_ms": cell.p99_ms, "baseline_p99_ms": other.p99_ms})
    return found


def _clients(count: int) -> str:
    return f"{count} client" + ("s" if count > 1 else "")


def write_chart(cells: list[Cell], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(c.model for c in cells))
    series = list(dict.fromkeys((c.server, c.concurrency) for c in cells))
    by_key = {(c.server, c.concurrency, c.model): c for c in cells}
    figure, (throughput, latency) = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(models) + 4), 4.5))
    width = 0.8 / max(len(series), 1)
    positions = np.arange(len(models))
    for i, (server, concurrency) in enumerate(series):
        values = [by_key[(server, concurrency, m)].requests_per_s if (server, concurrency, m) in by_key
                  else 0.0 for m in models]
        throughput.bar(positions + i * width, values, width, label=f"{server}, {_clients(concurrency)}",
                       hatch="//" if server == "baseline" else None)
    lowest = min(c.concurrency for c in cells)
    latency_series = []
    for server in dict.fromkeys(c.server for c in cells):
        lowest_cells = [by_key.get((server, lowest, m)) for m in models]
        threads = next((c.intra_op_threads for c in lowest_cells if c), None)
        latency_series.append((f"bare session.run, {threads} thread" + ("s" if threads != 1 else ""),
                               [(c and c.bare_p50_ms) or 0.0 for c in lowest_cells]))
        latency_series.append((f"{server}, {_clients(lowest)}", [(c and c.p50_ms) or 0.0 for c in lowest_cells]))
    lat_width = 0.8 / len(latency_series)
    for i, (label, values) in enumerate(latency_series):
        latency.bar(positions + i * lat_width, values, lat_width, label=label)
    for axes, title, ylabel, w, n in ((throughput, "Throughput", "requests/s", width, len(series)),
                                      (latency, "Median latency", "p50 ms", lat_width, len(latency_series))):
        axes.set_title(title)
        axes.set_ylabel(ylabel)
        axes.set_xticks(positions + w * (n - 1) / 2, models, rotation=30, ha="right")
        axes.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncols=2)
    figure.tight_layout()
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)


# --- the command ---------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m service.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--image", type=Path, required=True, help="a real photo to upload, e.g. a 600x400 JPEG")
    parser.add_argument("--url", help="a running server; default: start `python -m service` here")
    parser.add_argument("--model-repository", type=Path, default=os.environ.get("MODEL_REPOSITORY"),
                        help="the repository the server serves (default: $MODEL_REPOSITORY)")
    parser.add_argument("--models", help="comma-separated model names (default: all in the repository)")
    parser.add_argument("--concurrency", default="1,16", help="comma-separated client counts")
    parser.add_argument("--requests", type=int, default=400, help="measured requests per cell")
    parser.add_argument("--warmup", type=int, help="warm-up requests per cell (default: 2 per client, at least 10)")
    parser.add_argument("--time-limit", type=float, default=30.0, help="seconds per cell, warm-up included")
    parser.add_argument("--bare-runs", type=int, default=200, help="bare session.run calls per model")
    parser.add_argument("--intra-op-threads", type=int,
                        help="given to a started server and the bare run (default: what the server reports, else the core count)")
    parser.add_argument("--baseline", action="store_true", help="also start and measure service.baseline")
    parser.add_argument("--allow-remote", action="store_true", help="allow a --url that is not loopback")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    if min(args.concurrency) < 1 or args.requests < 1:
        parser.error("--concurrency and --requests must be positive")
    return args


def _check_url(url: str, allow_remote: bool) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise BenchError(f"--url must be http://host:port, not {url!r}")
    if not is_loopback(parts.hostname) and not allow_remote:
        raise BenchError(f"refusing non-loopback URL {url!r}: pass --allow-remote to load a remote server")
    return parts.hostname, parts.port or 80


def _model_names(args: argparse.Namespace) -> list[str]:
    if args.models:
        return args.models.split(",")
    if args.model_repository is None:
        raise BenchError("name the models with --models or the repository with --model-repository")
    names = sorted(p.parent.name for p in args.model_repository.glob("*/metadata.json"))
    if not names:
        raise BenchError(f"no models (folders with metadata.json) in {args.model_repository}")
    return names


def run(args: argparse.Namespace) -> dict:
    try:
        image = args.image.read_bytes()
    except OSError as error:
        raise BenchError(f"cannot read --image: {error}") from error
    models = _model_names(args)
    if args.url is None and args.model_repository is None:
        raise BenchError("to start a server, give --model-repository (or MODEL_REPOSITORY)")
    args.out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if args.url:
            server = Server("service", *_check_url(args.url, args.allow_remote))
            wait_ready(server, 10.0)
        else:
            env = {"MODEL_REPOSITORY": str(args.model_repository)}
            if args.intra_op_threads:
                env["INTRA_OP_THREADS"] = str(args.intra_op_threads)
            server = stack.enter_context(started("service", [sys.executable, "-m", "service"], env,
                                                 args.out / "service.log"))
        servers = [server]
        if args.baseline:
            if args.model_repository is None:
                raise BenchError("--baseline needs --model-repository")
            servers.append(stack.enter_context(started(
                "baseline", [sys.executable, "-m", "service.baseline", "--model-repository",
                             str(args.model_repository), "--models", ",".join(models)],
                {}, args.out / "baseline.log")))
            servers[-1].intra_op_threads = BASELINE_THREADS
        server.intra_op_threads = args.intra_op_threads or available_cores()
        server.model_threads = model_threads(server)
        return measure(args, image, models, servers)


def described(servers: list[Server]) -> list[dict]:
    """Each server, with its RSS right after the last cell and again once it has been idle a while
    (the service hands freed inference memory back to the OS after a second without inference)."""
    after = [server.rss_mb() for server in servers]
    if any(server.process for server in servers):
        time.sleep(SETTLE_S)
    return [server.describe(rss, server.rss_mb()) for server, rss in zip(servers, after)]


def measure(args: argparse.Namespace, image: bytes, models: list[str], servers: list[Server]) -> dict:
    cells, bare = [], []
    for model in models:
        bare_by_threads = {}
        # A name the repository lacks is still sent: the server's answers show as errors.
        if args.model_repository is not None and (args.model_repository / model / "metadata.json").exists():
            for threads in dict.fromkeys(server.threads(model) for server in servers):
                bare.append({"model": model, **bare_session_run(
                    args.model_repository / model, image, threads, args.bare_runs, args.time_limit)})
                bare_by_threads[threads] = bare[-1]
        for concurrency in args.concurrency:
            for server in servers:
                request = multipart_request(server.host, server.port, f"/predict/{model}?top_k=5",
                                            image, args.image.name)
                warmup = args.warmup if args.warmup is not None else max(10, 2 * concurrency)
                cell = run_cell(server, model, request, concurrency, warmup, args.requests, args.time_limit)
                cell.intra_op_threads = server.threads(model)
                same = bare_by_threads.get(cell.intra_op_threads, {})
                cell.bare_p50_ms, cell.preprocess_p50_ms = same.get("p50_ms"), same.get("preprocess_p50_ms")
                cells.append(cell)
                print(f"{server.name} {model} x{concurrency}: {cell.requests_per_s:.1f} req/s, "
                      f"p50 {_ms(cell.p50_ms)} ms, {cell.errors} errors", file=sys.stderr, flush=True)
    return {
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "onnxruntime": ort.__version__},
        "image": {"name": args.image.name, "bytes": len(image)},
        "settings": {"concurrency": args.concurrency, "requests": args.requests,
                     "warmup": args.warmup, "time_limit_s": args.time_limit, "url": args.url},
        "bare_session_run": bare,
        "servers": described(servers),
        "cells": [asdict(c) for c in cells],
        "service_vs_baseline": comparisons(cells),
    }


def report(results: dict) -> str:
    cells = [Cell(**c) for c in results["cells"]]
    lines = [format_table(COLUMNS, table_rows(cells))]
    if any(c.time_limited for c in cells):
        lines.append("* stopped by --time-limit before all --requests were sent")
    versus = results["service_vs_baseline"]
    if versus:
        lines += ["", format_table(
            ("model", "clients", "service/baseline req/s", "service p99 ms", "baseline p99 ms"),
            [(v["model"], str(v["concurrency"]), f"{v['throughput_ratio']:.2f}",
              _ms(v["service_p99_ms"]), _ms(v["baseline_p99_ms"])) for v in versus])]
    lines.append("")
    for server in results["servers"]:
        if server["started_here"]:
            lines.append(f"{server['name']}: ready {_ms(server['ready_s'])} s after start; RSS "
                         f"{_ms(server['rss_ready_mb'])} MB when ready, {_ms(server['rss_mb'])} MB "
                         f"after the run, {_ms(server['rss_settled_mb'])} MB {SETTLE_S:.0f} s later")
    client_cpu = [c.client_cpu_ms_per_request for c in cells]
    lines += [f"load generator CPU: {np.median(client_cpu):.3f} ms per request "
                  f"(median over cells, max {max(client_cpu):.3f})"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import matplotlib  # noqa: F401  (checked now, not after minutes of measuring)
    except ImportError:
        print("bench: the chart needs matplotlib: pip install 'cnn-serve[bench]'", file=sys.stderr)
        return 2
    try:
        if args.url:
            _check_url(args.url, args.allow_remote)  # refuse before touching anything
        results = run(args)
    except BenchError as error:
        print(f"bench: {error}", file=sys.stderr)
        return 2
    (args.out / "bench.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    write_chart([Cell(**c) for c in results["cells"]], args.out / "bench.png")
    print(report(results))
    print(f"\nwrote {args.out / 'bench.json'} and {args.out / 'bench.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
