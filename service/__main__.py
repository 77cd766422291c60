"""`python -m service` (or the `cnn-serve` script): serve the repository with uvicorn.

On SIGTERM (or a first Ctrl-C) readiness turns 503 at once; requests keep being served for
DRAIN_SECONDS so a load balancer can take the instance out, then uvicorn closes the listener and
waits up to GRACEFUL_SHUTDOWN_SECONDS for the requests in flight before the process exits.
Connections are served by service/connections.py's protocol, which bounds what clients may hold.

The admin listener (ADMIN_PORT) answers probes and scrapes from the same app, but with its own
connections, on its own thread and event loop: it starts with the main listener and stops after it,
so health keeps answering while the service drains (readiness 503, liveness 200).

The gRPC server (GRPC_PORT, service/protocols/grpc/) serves the same data plane on the same loop: it
starts once the app has started, its health says NOT_SERVING from the drain on, and at shutdown,
once the HTTP listener is closed, it refuses new calls and waits up to GRACEFUL_SHUTDOWN_SECONDS for
those in progress (HTTP connections keep being served meanwhile) before the app shuts down.
"""
import asyncio
import functools
import logging
import socket
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI
from grpc import aio
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.config import LOGGING_CONFIG, LifespanType
from uvicorn.lifespan.off import LifespanOff

from service.app import create_app
from service.connections import ConnectionLimits, admin_limits, bounded_http_protocol, connection_limits
from service.dataplane import data_plane
from service.error_responses import json_response
from service.protocols.grpc.server import grpc_server
from service.settings import Settings

# What the admin listener serves: answers that cost little, whatever the load.
ADMIN_ROUTES = frozenset({"/health/live", "/health/ready", "/v2/health/live", "/v2/health/ready",
                          "/metrics"})


def admin_app(app: FastAPI) -> ASGIApp:
    """`app` with only ADMIN_ROUTES; any other path is a 404."""
    async def admin(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in ADMIN_ROUTES:
            body = {"error": f"the admin port serves only {', '.join(sorted(ADMIN_ROUTES))}",
                    "code": "not_found"}
            await json_response(404, body)(scope, receive, send)
            return
        await app(scope, receive, send)
    return admin


class AdminServer(uvicorn.Server):
    """The admin listener, on a thread and an event loop of its own: however busy the main loop is
    (a flood of connections, a burst of parsing), a probe waits for the GIL, never behind the main
    loop's queue. No lifespan and no signal handling of its own (uvicorn leaves signals alone off
    the main thread); the main server starts and stops it."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.lifespan = LifespanOff(config)
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        listener = self.config.bind_socket()  # here, so a port in use fails the main start-up
        self.thread = threading.Thread(target=self.run, args=([listener],), name="admin-listener",
                                       daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.thread is not None:
            self.should_exit = True
            self.thread.join()


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_seconds: float,
                 admin: AdminServer | None = None,
                 grpc_server: Callable[[], aio.Server] | None = None) -> None:
        super().__init__(config)
        self.served_app = app
        self.drain_seconds = drain_seconds
        self.close_at: float | None = None
        self.admin = admin
        self.grpc_server = grpc_server  # made on the server's own loop, as grpc.aio needs
        self.grpc: aio.Server | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.admin is not None and self.started:
            self.admin.start()
        if self.grpc_server is not None and self.started:
            self.grpc = self.grpc_server()
            await self.grpc.start()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        data_plane(self.served_app).drain()
        if self.close_at is not None or self.drain_seconds == 0:  # a second signal, or no drain
            super().handle_exit(sig, frame)
            return
        self._captured_signals.append(sig)  # uvicorn re-raises them once it has shut down
        self.close_at = time.monotonic() + self.drain_seconds

    async def on_tick(self, counter: int) -> bool:
        if self.close_at is not None and time.monotonic() >= self.close_at:
            self.should_exit = True
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # Closing a listener resets the connections the kernel has completed but the loop has not
        # accepted yet, whose clients may have sent their request already. Accept those first, with
        # nothing awaited between the last accept and the close; uvicorn then shuts them down like
        # every other connection: the request on its way is answered, then the connection closes.
        waiting = [conn for server in self.servers for listener in server.sockets
                   for conn in _accept_waiting(listener)]
        for server in self.servers:
            server.close()
        loop = asyncio.get_running_loop()
        for conn in waiting:
            await loop.connect_accepted_socket(self._protocol, conn)
        if self.grpc is not None:  # before the app's shutdown closes the engine its calls use
            await self.grpc.stop(self.config.timeout_graceful_shutdown)
        await super().shutdown(sockets)
        if self.admin is not None:
            self.admin.stop()

    def _protocol(self) -> asyncio.Protocol:
        """A connection's protocol, made as uvicorn's own listener makes it."""
        # uvicorn types http_protocol_class as a bare asyncio.Protocol class, yet makes it with these
        # arguments itself (under the same ignore).
        make = self.config.http_protocol_class
        return make(config=self.config, server_state=self.server_state,  # type: ignore[call-arg]
                    app_state=self.lifespan.state)


def _accept_waiting(listener) -> list[socket.socket]:
    """The connections waiting in a listening socket's backlog, accepted without blocking."""
    accepted = []
    with listener.dup() as sock:
        sock.setblocking(False)
        while True:
            try:
                accepted.append(sock.accept()[0])
            except (BlockingIOError, InterruptedError):
                return accepted


def server_config(app: ASGIApp, port: int, limits: ConnectionLimits, settings: Settings,
                  lifespan: LifespanType = "auto", log_config: dict[str, Any] | None = LOGGING_CONFIG
                  ) -> uvicorn.Config:
    # Our own middleware logs one line per request with timings, so uvicorn's access log is off.
    # The app serves no WebSockets: an upgrade would hand the socket to a protocol without our bounds.
    # uvicorn declares `http` a protocol class and the timeouts int, but it only calls `http` (a
    # factory works: tests/test_uvicorn_internals.py) and hands the timeouts to asyncio, which
    # takes fractions of a second, as the settings do.
    return uvicorn.Config(app, host=settings.host, port=port, log_level=settings.log_level,
                          access_log=False, http=bounded_http_protocol(limits), ws="none",  # type: ignore[arg-type]
                          timeout_keep_alive=limits.idle_timeout, backlog=limits.backlog,  # type: ignore[arg-type]
                          timeout_graceful_shutdown=settings.graceful_shutdown_seconds,  # type: ignore[arg-type]
                          lifespan=lifespan, log_config=log_config)


def main() -> None:
    settings = Settings()
    limits = connection_limits(settings)
    app = create_app(settings)
    config = server_config(app, settings.port, limits, settings)
    admin = None
    if settings.admin_port:
        # log_config=None: the main config has set logging up already.
        admin = AdminServer(server_config(admin_app(app), settings.admin_port, admin_limits(limits),
                                          settings, lifespan="off", log_config=None))
    grpc = None
    if settings.grpc_port:
        grpc = functools.partial(grpc_server, data_plane(app), limits, app.title, app.version)
    logging.getLogger("service.connections").info(
        "up to %d connections (%d open files allowed); admin port %s; gRPC port %s",
        limits.max_connections, limits.descriptors, settings.admin_port or "off",
        settings.grpc_port or "off")
    DrainingServer(config, app, settings.drain_seconds, admin, grpc).run()


if __name__ == "__main__":
    main()
