"""Servers run the way their users run them: a command on a free loopback port, waited on over
HTTP, stopped at the end, and read from /proc. The one helper for these jobs, shared by the bench
and the tests."""
from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"
SERVICE = [sys.executable, "-m", "service"]
LOG_TAIL_LINES = 40


class ServerFailed(Exception):
    """A server exited or did not answer in time; the message ends with the tail of its log."""


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def http_get(host: str, port: int, path: str, timeout: float = 5.0) -> Reply:
    # An empty ProxyHandler: a proxy set in the environment must not see loopback traffic.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://{host}:{port}{path}", timeout=timeout) as response:
            return Reply(response.status, response.read())
    except urllib.error.HTTPError as error:
        return Reply(error.code, error.read())


def rss_bytes(pid: int) -> int | None:
    """Resident memory of a process; None once it has exited (or where there is no /proc)."""
    statm = _proc(pid, "statm")
    return None if statm is None else int(statm.split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU of a process (not of its children); None once it has exited."""
    stat = _proc(pid, "stat")
    if stat is None:
        return None
    # The command name in parentheses may hold spaces: count the fields after its closing one.
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _proc(pid: int, name: str) -> str | None:
    try:
        return Path(f"/proc/{pid}/{name}").read_text()
    except OSError:
        return None


def wait_for(host: str, port: int, path: str, done: Callable[[Reply], Any], timeout: float,
             server: ServerProcess | None = None) -> Reply:
    """Poll `path` until `done` says so; fail early if the `server` we started has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server is not None and server.process.poll() is not None:
            raise ServerFailed(f"{server.name} exited with code {server.process.returncode} before "
                               f"{path} answered{server.log_tail()}")
        # Refused, reset or half-written answers are what a server says while it starts.
        with contextlib.suppress(OSError, http.client.HTTPException, ValueError):
            reply = http_get(host, port, path, timeout=5.0)
            if done(reply):
                return reply
        time.sleep(0.05)
    raise ServerFailed(f"{path} on {host}:{port} not done after {timeout:.0f} s"
                       + (server.log_tail() if server else ""))


def answers_200(reply: Reply) -> bool:
    return reply.status == 200


class ServerProcess:
    """A server command on a free loopback port (given to it as HOST and PORT, and another as
    ADMIN_PORT), its output in a log file, until `stop`."""

    def __init__(self, command: list[str], log: Path, env: Mapping[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.host = LOOPBACK
        self.port = free_port()
        self.url = f"http://{self.host}:{self.port}"
        self.admin_port = free_port()
        self.admin_url = f"http://{self.host}:{self.admin_port}"
        self.grpc_port = free_port()
        self.grpc_address = f"{self.host}:{self.grpc_port}"
        self.log = log
        # What a reader recognises in a failure: "python -m service", not a virtualenv's path.
        self.name = " ".join([Path(command[0]).name, *command[1:3]])
        environment = {**os.environ, "HOST": self.host, "PORT": str(self.port),
                       "ADMIN_PORT": str(self.admin_port), "GRPC_PORT": str(self.grpc_port), **(env or {})}
        self.started = time.perf_counter()
        with log.open("wb") as output:  # the child keeps its own copy of the handle
            self.process = subprocess.Popen(command, env=environment, cwd=cwd, stdout=output,
                                            stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_live(self, timeout: float = 30) -> None:
        wait_for(self.host, self.port, "/health/live", answers_200, timeout, self)

    def wait_ready(self, timeout: float = 180) -> float:
        """Seconds from process start until /health/ready said 200."""
        wait_for(self.host, self.port, "/health/ready", answers_200, timeout, self)
        return time.perf_counter() - self.started

    def wait_loaded(self, timeout: float = 180) -> dict:
        """The service's readiness body once every model is loaded or failed (ready or not)."""

        def loaded(reply: Reply) -> bool:
            return bool(reply.json().get("loading_done"))

        return wait_for(self.host, self.port, "/health/ready", loaded, timeout, self).json()

    def log_tail(self) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        except OSError:
            return ""
        return f"; the end of {self.log}:\n" + "\n".join(lines)

    def stop(self) -> None:
        """Ctrl+C, as a user stops it; killed if it has not finished within 20 s."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextlib.contextmanager
def running(command: list[str], log: Path, env: Mapping[str, str] | None = None,
            cwd: Path | None = None) -> Iterator[ServerProcess]:
    """A server process for the length of the block."""
    server = ServerProcess(command, log, env, cwd)
    try:
        yield server
    finally:
        server.stop()


def running_service(repository: Path, log: Path, cwd: Path | None = None,
                    **env: str) -> contextlib.AbstractContextManager[ServerProcess]:
    """`python -m service` on `repository`, as a user starts it."""
    return running(SERVICE, log, {"MODEL_REPOSITORY": str(repository), **env}, cwd)
