"""`python -m service` (or the `cnn-serve` script): serve the repository with uvicorn.

On SIGTERM (or a first Ctrl-C) readiness turns 503 at once; requests keep being served for
DRAIN_SECONDS so a load balancer can take the instance out, then uvicorn closes the listener and
waits up to GRACEFUL_SHUTDOWN_SECONDS for the requests in flight before the process exits.
Connections are served by service/connections.py's protocol, which bounds what clients may hold.
"""
import asyncio
import logging
import socket
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

from service.app import create_app
from service.connections import bounded_http_protocol, connection_limits
from service.settings import Settings


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_seconds: float) -> None:
        super().__init__(config)
        self.served_app = app
        self.drain_seconds = drain_seconds
        self.close_at: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.served_app.state.draining = True
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
        await super().shutdown(sockets)

    def _protocol(self) -> asyncio.Protocol:
        """A connection's protocol, made as uvicorn's own listener makes it."""
        return self.config.http_protocol_class(config=self.config, server_state=self.server_state,
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


def main() -> None:
    settings = Settings()
    limits = connection_limits(settings)
    app = create_app(settings)
    # Our own middleware logs one line per request with timings, so uvicorn's access log is off.
    # The app serves no WebSockets: an upgrade would hand the socket to a protocol without our bounds.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            access_log=False, http=bounded_http_protocol(limits), ws="none",
                            timeout_keep_alive=limits.idle_timeout, backlog=limits.backlog,
                            timeout_graceful_shutdown=settings.graceful_shutdown_seconds)
    logging.getLogger("service.connections").info(
        "up to %d connections (%d open files allowed)", limits.max_connections, limits.descriptors)
    DrainingServer(config, app, settings.drain_seconds).run()


if __name__ == "__main__":
    main()
