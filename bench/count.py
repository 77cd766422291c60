"""The work a request costs, counted: instructions per request under valgrind's callgrind.

Timing cannot settle a difference of a few per cent on a shared or small machine (there, one and
the same server's CPU per request moves by a third from one run to the next); counted
instructions repeat within about half a per cent. Each server runs `python -m service` under
callgrind with counting off; after its start-up and a warm-up, counting is switched on
(`callgrind_control`) for `--idle` seconds of no traffic, then for `--requests` uploads to
/predict from `--concurrency` clients, and each part's count is dumped. The idle part is what the
server executes by the clock (its event loops' timers): it is taken off pro rata, since under
valgrind a request lasts about sixty times as long as it does at full speed. `MAX_BATCH_SIZE=1`,
so that every request runs the same inference whatever the clients' timing.

What a count leaves out is time that is not instructions: waiting for memory, the kernel, threads
waiting for the GIL. Needs `valgrind` (Debian's package).

    python -m bench.count --image tests/data/coffee.jpg --model-repository models --model effnet \\
        --server off --server "traced:OTEL_TRACES_EXPORTER=console OTEL_TRACES_SAMPLER=always_on" \\
        --server "before@../old-checkout"
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.load import HttpConnection, drive, multipart_request
from bench.servers import LOOPBACK, running

TOTALS = re.compile(r"^totals: (\d+)", re.MULTILINE)
# valgrind names its control pipes after $HOST, which the servers are given as their address: the
# controlling tools must see the same.
VGDB_ENV = {**os.environ, "HOST": LOOPBACK}
UPLOADS_TIME_LIMIT_S = 3600.0  # under valgrind a request takes about sixty times as long


@dataclass(frozen=True)
class Server:
    """`name[@checkout][:VAR=value VAR=value]`: the service from a checkout (default: here), with
    environment variables of its own."""
    name: str
    checkout: Path | None
    env: dict[str, str]

    @classmethod
    def parse(cls, text: str) -> "Server":
        head, _, variables = text.partition(":")
        name, _, checkout = head.partition("@")
        env = dict(pair.split("=", 1) for pair in variables.split())
        return cls(name, Path(checkout).resolve() if checkout else None, env)


@dataclass(frozen=True)
class Count:
    server: str
    requests: int
    seconds: float
    instructions: int
    idle_per_second: float

    @property
    def per_request(self) -> float:
        return self.instructions / self.requests

    @property
    def per_request_less_idle(self) -> float:
        return (self.instructions - self.idle_per_second * self.seconds) / self.requests


def callgrind_pid(dumps: Path) -> int:
    """The pid valgrind runs as, found by the dump folder it was given: Debian's `valgrind` is a
    shell script that may run the tool under a pid of its own."""
    listed = subprocess.run(["vgdb", "-l"], capture_output=True, text=True, env=VGDB_ENV).stdout
    for line in listed.splitlines():
        if str(dumps) in line and (match := re.search(r"--pid=(\d+)", line)):
            return int(match.group(1))
    raise RuntimeError(f"no valgrind run writing to {dumps}: {listed}")


def dumped(pid: int, folder: Path) -> int:
    """Instructions counted since the last dump (callgrind zeroes its counters at each)."""
    before = set(folder.iterdir())
    _control(pid, "--dump")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for path in set(folder.iterdir()) - before:
            if (match := TOTALS.search(path.read_text(errors="replace"))) is not None:
                return int(match.group(1))
        time.sleep(0.2)
    raise RuntimeError(f"callgrind wrote no dump in {folder}: {sorted(p.name for p in folder.iterdir())}")


def counting(pid: int, on: bool) -> None:
    _control(pid, "--instr=" + ("on" if on else "off"))


def _control(pid: int, option: str) -> None:
    """callgrind_control says when it could not reach the run, yet exits 0."""
    said = subprocess.run(["callgrind_control", option, str(pid)], check=True, capture_output=True, text=True,
                          env=VGDB_ENV)
    if "error" in said.stderr.lower() or "OK" not in said.stdout:
        raise RuntimeError(f"callgrind_control {option}: {said.stdout}{said.stderr}")


def uploads(host: str, port: int, request: bytes, concurrency: int, total: int) -> None:
    """`total` uploads from `concurrency` clients (the bench's own load), every one answered 200."""
    load = drive(lambda: HttpConnection(host, port, request), concurrency, 0, total, UPLOADS_TIME_LIMIT_S)
    if len(load.measured.latencies_ms) != total:
        raise RuntimeError(f"not every upload succeeded: {load.measured.statuses}")


def count(server: Server, args: argparse.Namespace, folder: Path) -> Count:
    dumps = Path(tempfile.mkdtemp(dir=folder))  # valgrind reads % in its file names
    command = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
               f"--callgrind-out-file={dumps}/callgrind.out", sys.executable, "-m", "service"]
    env = {"MODEL_REPOSITORY": str(args.model_repository.resolve()), "MAX_BATCH_SIZE": "1",
           "REQUEST_TIMEOUT_SECONDS": "600", **server.env}
    with running(command, dumps / "service.log", env, server.checkout) as process:
        process.wait_ready(timeout=1800)
        pid = callgrind_pid(dumps)
        request = multipart_request(process.host, process.port, f"/predict/{args.model}",
                                    args.image.read_bytes(), args.image.name)
        uploads(process.host, process.port, request, args.concurrency, 2 * args.concurrency)  # warm-up
        counting(pid, True)
        dumped(pid, dumps)  # what ran between switching on and now, left out
        started = time.perf_counter()
        time.sleep(args.idle)
        idle = dumped(pid, dumps) / (time.perf_counter() - started)
        started = time.perf_counter()
        uploads(process.host, process.port, request, args.concurrency, args.requests)
        instructions = dumped(pid, dumps)
        seconds = time.perf_counter() - started
        counting(pid, False)
    return Count(server.name, args.requests, seconds, instructions, idle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, required=True, help="a real photo to upload")
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--model", default="effnet")
    parser.add_argument("--server", action="append", type=Server.parse,
                        help="name[@checkout][:VAR=value ...]; the first is the one compared against")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--idle", type=float, default=20.0, help="seconds of idle server counted")
    args = parser.parse_args()
    servers = args.server or [Server("service", None, {})]
    print(f"{'server':<16}{'instructions/request':>22}{'less idle':>14}{'idle/s':>10}{'against first':>15}")
    first = None
    with tempfile.TemporaryDirectory() as folder:
        for server in servers:  # each line as it is counted: a run takes minutes
            c = count(server, args, Path(folder))
            first = first or c.per_request_less_idle
            print(f"{c.server:<16}{c.per_request / 1e6:>20.3f} M{c.per_request_less_idle / 1e6:>12.3f} M"
                  f"{c.idle_per_second / 1e6:>8.2f} M{100 * (c.per_request_less_idle / first - 1):>+14.1f} %",
                  flush=True)


if __name__ == "__main__":
    main()
