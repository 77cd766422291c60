"""One bench run: the servers under test (started here or given by URL), and per model the bare
`session.run` beside each server's cells at every concurrency level, one cell per protocol."""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import onnxruntime as ort

from bench.bare import BareRun, bare_session_run
from bench.baseline import INTRA_OP_THREADS as BASELINE_THREADS
from bench.grpc_load import GrpcConnection, model_infer_message
from bench.load import TOP_K, Cell, Connection, HttpConnection, drive, infer_request, multipart_request, summarise
from bench.report import Results, ServerSummary, comparisons, grpc_vs_rest, ms
from bench.servers import (
    ServerProcess,
    answers_200,
    cpu_seconds,
    http_get,
    rss_bytes,
    running,
    running_service,
    wait_for,
)
from bench.tradeoff import served_metadata, tradeoff_points
from service.settings import available_cores

READY_TIMEOUT_S = 120.0
URL_READY_TIMEOUT_S = 10.0
# The service hands freed inference memory back to the OS after a second without inference.
SETTLE_S = 2.0
# How the photo is sent: a multipart upload to /predict, or as a BYTES input of the Open Inference
# Protocol's infer over REST (binary tensor data) or over gRPC (ModelInfer).
PROTOCOLS = ("predict", "rest", "grpc")


class BenchError(Exception):
    """A reason the bench cannot run, told to the user as one line."""


@dataclass(frozen=True)
class Target:
    """A server under test: one started here (with its process) or one given by URL."""

    name: str
    host: str
    port: int
    intra_op_threads: int
    model_threads: dict[str, int] = field(default_factory=dict)  # where it differs by model
    process: ServerProcess | None = None
    grpc_port: int | None = None  # the Open Inference Protocol over gRPC
    protocols: tuple[str, ...] = PROTOCOLS  # those it speaks
    ready_s: float | None = None
    rss_ready_mb: float | None = None

    def threads(self, model: str) -> int:
        return self.model_threads.get(model, self.intra_op_threads)

    def cpu_seconds(self) -> float | None:
        return cpu_seconds(self.process.pid) if self.process else None

    def rss_mb(self) -> float | None:
        return rss_mb(self.process) if self.process else None

    def summary(self, rss_mb: float | None, rss_settled_mb: float | None) -> ServerSummary:
        return ServerSummary(self.name, f"http://{self.host}:{self.port}", self.process is not None,
                             self.intra_op_threads, self.model_threads, self.ready_s,
                             self.rss_ready_mb, rss_mb, rss_settled_mb)


def rss_mb(process: ServerProcess) -> float | None:
    rss = rss_bytes(process.pid)
    return None if rss is None else round(rss / 2**20, 1)


def model_threads(host: str, port: int) -> dict[str, int]:
    """The threads of a lone inference, per model, as the service's /models reports them (a
    server without /models, like the baseline, has one count for all)."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        reply = http_get(host, port, "/models")
        if reply.status == 200:
            return {m["name"]: int(m["intra_op_threads"]) for m in reply.json()["models"]}
    return {}


@contextlib.contextmanager
def started(name: str, server: contextlib.AbstractContextManager[ServerProcess],
            intra_op_threads: int, protocols: tuple[str, ...] = PROTOCOLS) -> Iterator[Target]:
    """A server process, as a target once it is ready, until the block ends."""
    with server as process:
        ready_s = process.wait_ready(READY_TIMEOUT_S)
        yield Target(name, process.host, process.port, intra_op_threads,
                     model_threads(process.host, process.port), process, process.grpc_port,
                     protocols, round(ready_s, 2), rss_mb(process))


def given(host: str, port: int, intra_op_threads: int, grpc_port: int) -> Target:
    """A server someone else runs, once it is ready."""
    wait_for(host, port, "/health/ready", answers_200, URL_READY_TIMEOUT_S)
    return Target("service", host, port, intra_op_threads, model_threads(host, port), grpc_port=grpc_port)


def targets(args: argparse.Namespace, address: tuple[str, int] | None, models: list[str],
            stack: contextlib.ExitStack) -> list[Target]:
    """The service (at `address`, else started here) and, with --baseline, the baseline."""
    threads = args.intra_op_threads or available_cores()
    if address:
        found = [given(*address, threads, args.grpc_port)]
    else:
        env = {"INTRA_OP_THREADS": str(args.intra_op_threads)} if args.intra_op_threads else {}
        service = running_service(args.model_repository, args.out / "service.log", **env)
        found = [stack.enter_context(started("service", service, threads))]
    if args.baseline:
        command = [sys.executable, "-m", "bench.baseline", "--model-repository",
                   str(args.model_repository), "--models", ",".join(models)]
        baseline = running(command, args.out / "baseline.log")
        found.append(stack.enter_context(started("baseline", baseline, BASELINE_THREADS, ("predict",))))
    return found


def connector(protocol: str, target: Target, model: str, image: bytes, filename: str,
              output: str | None) -> Callable[[], Connection]:
    """A new connection for each simulated user, all sending the one request built here;
    `output` is the model's output tensor, named to ask the protocol for its top classes."""
    if protocol == "grpc":
        message = model_infer_message(model, image, output)
        return lambda: GrpcConnection(f"{target.host}:{target.grpc_port}", message)
    if protocol == "rest":
        request = infer_request(target.host, target.port, model, image, output)
    else:
        request = multipart_request(target.host, target.port, f"/predict/{model}?top_k={TOP_K}", image, filename)
    return lambda: HttpConnection(target.host, target.port, request)


def run_cell(target: Target, model: str, protocol: str, connect: Callable[[], Connection],
             concurrency: int, warmup: int, requests: int, time_limit: float, bare: BareRun | None) -> Cell:
    """Drive one server with `concurrency` clients; the bare run is the one with its threads."""
    cpu_before = target.cpu_seconds()
    load = drive(connect, concurrency, warmup, requests, time_limit)
    cpu_after = target.cpu_seconds()
    server_cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    cell = summarise(target.name, model, concurrency, requests, load, server_cpu)
    return replace(cell, intra_op_threads=target.threads(model),
                   bare_p50_ms=bare.p50_ms if bare else None,
                   preprocess_p50_ms=bare.preprocess_p50_ms if bare else None, protocol=protocol)



def bare_runs(args: argparse.Namespace, image: bytes, model: str, servers: list[Target]) -> list[BareRun]:
    """Bare `session.run` once with each thread count the servers use for `model`; none for a
    name the repository lacks (it is still sent: the servers' answers show as errors)."""
    if args.model_repository is None or not (args.model_repository / model / "metadata.json").exists():
        return []
    return [bare_session_run(args.model_repository / model, image, threads, args.bare_runs, args.time_limit)
            for threads in dict.fromkeys(server.threads(model) for server in servers)]


def cells_of(args: argparse.Namespace, image: bytes, model: str, servers: list[Target],
             bare: list[BareRun], output: str | None) -> list[Cell]:
    """Protocols take turns within each concurrency level, so drift in the machine's load touches
    them alike."""
    bare_by_threads = {run.intra_op_threads: run for run in bare}
    cells = []
    for concurrency in args.concurrency:
        warmup = args.warmup if args.warmup is not None else max(10, 2 * concurrency)
        for server in servers:
            for protocol in (p for p in args.protocol if p in server.protocols):
                connect = connector(protocol, server, model, image, args.image.name, output)
                cell = run_cell(server, model, protocol, connect, concurrency, warmup, args.requests,
                                args.time_limit, bare_by_threads.get(server.threads(model)))
                cells.append(cell)
                print(f"{server.name} {protocol} {model} x{concurrency}: {cell.requests_per_s:.1f} req/s, "
                      f"p50 {ms(cell.p50_ms)} ms, {cell.errors} errors", file=sys.stderr, flush=True)
    return cells


def summaries(servers: list[Target]) -> list[ServerSummary]:
    """Each server, with its RSS right after the last cell and again once it has been idle a while."""
    after = [server.rss_mb() for server in servers]
    if any(server.process for server in servers):
        time.sleep(SETTLE_S)
    return [server.summary(rss, server.rss_mb()) for server, rss in zip(servers, after, strict=True)]


def measure(args: argparse.Namespace, image: bytes, models: list[str], servers: list[Target]) -> Results:
    cells = []
    bare = []
    metadata = served_metadata(servers[0].host, servers[0].port)
    for model in models:
        bare_here = bare_runs(args, image, model, servers)
        bare += bare_here
        output = metadata.get(model, {}).get("output", {}).get("name")
        cells += cells_of(args, image, model, servers, bare_here, output)
    return Results(
        created_utc=datetime.now(UTC).isoformat(timespec="seconds"),
        machine={"cpus": os.cpu_count(), "platform": platform.platform(),
                 "python": platform.python_version(), "onnxruntime": ort.__version__},
        image={"name": args.image.name, "bytes": len(image)},
        settings={"concurrency": args.concurrency, "requests": args.requests,
                  "warmup": args.warmup, "time_limit_s": args.time_limit, "url": args.url,
                  "protocols": args.protocol},
        bare_session_run=bare, servers=summaries(servers), cells=cells,
        service_vs_baseline=comparisons(cells), grpc_vs_rest=grpc_vs_rest(cells),
        tradeoff=tradeoff_points(cells, metadata, servers[0].name, args.protocol[0]),
    )
