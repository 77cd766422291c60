"""The uvicorn internals the service builds on, checked one by one, so that a uvicorn release that
moves one fails here by name instead of misbehaving quietly in the running service.

service/connections.py subclasses uvicorn's httptools protocol (BoundedHttpProtocol) and
service/__main__.py subclasses `uvicorn.Server` (DrainingServer); neither is uvicorn's public API.
That is why pyproject.toml bounds uvicorn's version: raise the bound only with this file green.
"""
import asyncio
import inspect
import signal
import socket
from typing import Any, NoReturn

import pytest
import uvicorn
from uvicorn.server import ServerState

CONNECTIONS = "service/connections.py (BoundedHttpProtocol)"
MAIN = "service/__main__.py (DrainingServer)"
# The statuses the connection layer writes itself, with uvicorn's status lines: headers too slow,
# headers too large, too many connections.
REFUSAL_STATUSES = (408, 431, 503)
REQUEST = b"GET / HTTP/1.1\r\nhost: test\r\n\r\n"


def broken(internal: str, user: str, what: str) -> NoReturn:
    pytest.fail(f"uvicorn {uvicorn.__version__} changed an internal the service relies on: {internal} {what}. "
                f"Used by {user}; adapt it before raising uvicorn's upper bound in pyproject.toml.", pytrace=False)


def httptools_impl() -> Any:
    try:
        from uvicorn.protocols.http import httptools_impl
    except ImportError as error:
        failure = str(error)  # reported outside the handler, without the traceback of the import
    else:
        failure = ""
    if failure:
        broken("uvicorn.protocols.http.httptools_impl", CONNECTIONS, f"cannot be imported ({failure})")
    for name in ("HttpToolsProtocol", "STATUS_LINE"):
        if not hasattr(httptools_impl, name):
            broken(f"uvicorn.protocols.http.httptools_impl.{name}", CONNECTIONS, "is gone")
    return httptools_impl


def require_call(owner: type, name: str, user: str, *args: str, coroutine: bool = False, **kwargs: str) -> None:
    """`owner.name` exists and accepts the call the service makes, e.g. `handle_exit(sig, frame)`."""
    internal = f"{owner.__module__}.{owner.__qualname__}.{name}"
    method = getattr(owner, name, None)
    if not callable(method):
        broken(internal, user, "is gone")
    signature = inspect.signature(method)
    call = ", ".join([*args, *(f"{key}=..." for key in kwargs)])
    try:
        signature.bind("self", *args, **kwargs)
    except TypeError as error:
        mismatch = str(error)
    else:
        mismatch = ""
    if mismatch:
        broken(internal, user, f"no longer takes the call ({call}): its signature is now {signature} ({mismatch})")
    if coroutine and not inspect.iscoroutinefunction(method):
        broken(internal, user, "is no longer a coroutine function")


def require_attribute(instance: object, name: str, kind: type | tuple[type, ...], user: str) -> Any:
    internal = f"{type(instance).__qualname__}().{name}"
    if not hasattr(instance, name):
        broken(internal, user, "is gone")
    value = getattr(instance, name)
    if not isinstance(value, kind):
        broken(internal, user, f"is now a {type(value).__name__}, not {kind}")
    return value


async def app(scope: dict, receive: Any, send: Any) -> None:
    """An ASGI app with a lifespan that answers every request 204."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})


class MockTransport(asyncio.Transport):
    """A connection from 127.0.0.1:50000 that keeps what the protocol writes, as uvicorn's tests do."""

    def __init__(self) -> None:
        super().__init__()
        self.written = b""
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def test_the_httptools_module_has_the_protocol_and_the_status_lines_the_connection_layer_writes():
    module = httptools_impl()
    for status in REFUSAL_STATUSES:
        line = module.STATUS_LINE.get(status) if isinstance(module.STATUS_LINE, dict) else None
        if not (isinstance(line, bytes) and line.startswith(b"HTTP/1.1 %d " % status) and line.endswith(b"\r\n")):
            broken(f"httptools_impl.STATUS_LINE[{status}]", CONNECTIONS,
                   f"is {line!r}, not a whole 'HTTP/1.1 {status} ...\\r\\n' status line")


def test_the_httptools_protocol_keeps_every_method_bounded_http_protocol_overrides_or_calls():
    protocol = httptools_impl().HttpToolsProtocol
    require_call(protocol, "__init__", CONNECTIONS, config="config", server_state="state", app_state="state")
    require_call(protocol, "connection_made", CONNECTIONS, "transport")
    require_call(protocol, "data_received", CONNECTIONS, "data")
    require_call(protocol, "on_headers_complete", CONNECTIONS)
    require_call(protocol, "on_message_complete", CONNECTIONS)
    require_call(protocol, "on_response_complete", CONNECTIONS)
    require_call(protocol, "shutdown", CONNECTIONS)
    require_call(protocol, "connection_lost", CONNECTIONS, "exc")
    require_call(protocol, "timeout_keep_alive_handler", CONNECTIONS)


class HookRecorder:
    """Mixed into uvicorn's protocol: records the hooks uvicorn calls, as BoundedHttpProtocol's overrides."""

    hooks: list[str]

    def on_headers_complete(self) -> None:
        self.hooks.append("on_headers_complete")
        super().on_headers_complete()  # type: ignore[misc]

    def on_message_complete(self) -> None:
        self.hooks.append("on_message_complete")
        super().on_message_complete()  # type: ignore[misc]

    def on_response_complete(self) -> None:
        self.hooks.append("on_response_complete")
        super().on_response_complete()  # type: ignore[misc]


def test_a_connection_carries_the_state_and_calls_the_hooks_bounded_http_protocol_relies_on():
    recording = type("RecordingProtocol", (HookRecorder, httptools_impl().HttpToolsProtocol), {})
    config = uvicorn.Config(app, lifespan="off", access_log=False, timeout_keep_alive=7)
    state = ServerState()
    loop = asyncio.new_event_loop()
    try:
        protocol = recording(config=config, server_state=state, app_state={}, _loop=loop)
        protocol.hooks = []
        transport = MockTransport()
        protocol.connection_made(transport)
        connections = require_attribute(protocol, "connections", set, CONNECTIONS)
        if connections is not state.connections or protocol not in connections:
            broken("HttpToolsProtocol().connections", CONNECTIONS, "is no longer the server's set of open connections")
        if require_attribute(protocol, "loop", asyncio.AbstractEventLoop, CONNECTIONS) is not loop:
            broken("HttpToolsProtocol().loop", CONNECTIONS, "is not the loop the connection runs on")
        if require_attribute(protocol, "timeout_keep_alive", (int, float), CONNECTIONS) != 7:
            broken("HttpToolsProtocol().timeout_keep_alive", CONNECTIONS, "is not Config(timeout_keep_alive=...)")
        require_attribute(protocol, "timeout_keep_alive_task", (asyncio.TimerHandle, type(None)), CONNECTIONS)
        if require_attribute(protocol, "transport", asyncio.Transport, CONNECTIONS) is not transport:
            broken("HttpToolsProtocol().transport", CONNECTIONS, "is not the connection's transport")
        if require_attribute(protocol, "client", tuple, CONNECTIONS) != ("127.0.0.1", 50000):
            broken("HttpToolsProtocol().client", CONNECTIONS, "is not the peer's (host, port)")
        require_attribute(protocol.server_state, "default_headers", list, CONNECTIONS)
        if getattr(protocol, "cycle", "gone") is not None:
            broken("HttpToolsProtocol().cycle", CONNECTIONS, "is not None before the first request")

        protocol.data_received(REQUEST)
        cycle = protocol.cycle
        require_attribute(cycle, "keep_alive", bool, CONNECTIONS)
        require_attribute(cycle, "response_complete", bool, CONNECTIONS)
        loop.run_until_complete(asyncio.sleep(0.05))  # the app answers
    finally:
        loop.close()
    if not transport.written.startswith(b"HTTP/1.1 204 "):
        broken("HttpToolsProtocol", CONNECTIONS, f"answered {transport.written[:40]!r} to a plain GET")
    expected = ["on_headers_complete", "on_message_complete", "on_response_complete"]
    if protocol.hooks != expected:
        broken("HttpToolsProtocol's request hooks", CONNECTIONS, f"ran as {protocol.hooks}, not {expected}")
    if not cycle.response_complete:
        broken("RequestResponseCycle().response_complete", CONNECTIONS, "stays False once the answer is sent")


def test_config_takes_a_protocol_factory_as_http_and_hands_it_out_as_http_protocol_class():
    require_call(uvicorn.Config, "__init__", MAIN, "app", host="127.0.0.1", port="8000", log_level="info",
                 access_log="False", http="factory", ws="none", timeout_keep_alive="5.0", backlog="2048",
                 timeout_graceful_shutdown="30.0", lifespan="off", log_config="None")

    def factory(**kwargs: Any) -> asyncio.Protocol:
        return asyncio.Protocol()

    config = uvicorn.Config(app, http=factory, ws="none", lifespan="off")
    config.load()
    if getattr(config, "http_protocol_class", None) is not factory:
        broken("Config().http_protocol_class", MAIN, "is not the factory given as Config(http=...)")


def test_server_keeps_the_methods_draining_server_overrides_or_calls():
    require_call(uvicorn.Server, "__init__", MAIN, "config")
    require_call(uvicorn.Server, "handle_exit", MAIN, "sig", "frame")
    require_call(uvicorn.Server, "on_tick", MAIN, "counter", coroutine=True)
    require_call(uvicorn.Server, "shutdown", MAIN, "sockets", coroutine=True)
    require_call(uvicorn.Server, "capture_signals", MAIN)
    require_call(uvicorn.Server, "run", MAIN)


def test_a_started_server_exposes_its_listeners_and_makes_connections_as_draining_server_does():
    listener = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="warning"))
    require_attribute(server, "should_exit", bool, MAIN)

    async def started_then_stopped() -> None:
        serving = asyncio.create_task(server.serve(sockets=[listener]))
        while not server.started and not serving.done():
            await asyncio.sleep(0.01)
        try:
            listeners = require_attribute(server, "servers", list, MAIN)
            if not listeners or not all(isinstance(s, asyncio.AbstractServer) and s.sockets for s in listeners):
                broken("Server().servers", MAIN, f"is {listeners!r}, not the asyncio servers with their sockets")
            lifespan = require_attribute(server, "lifespan", object, MAIN)
            app_state = require_attribute(lifespan, "state", dict, MAIN)
            made = server.config.http_protocol_class(config=server.config, server_state=server.server_state,
                                                     app_state=app_state)
            if not isinstance(made, asyncio.Protocol):
                broken("Config().http_protocol_class(config=, server_state=, app_state=)", MAIN,
                       f"made a {type(made).__name__}, not a connection's protocol")
        finally:
            server.should_exit = True
            await serving

    try:
        asyncio.run(started_then_stopped())
    finally:
        listener.close()


def test_a_signal_the_server_holds_back_is_raised_again_once_it_stops():
    server = uvicorn.Server(uvicorn.Config(app))
    held_back = require_attribute(server, "_captured_signals", list, MAIN)
    raised = []
    previous = signal.signal(signal.SIGUSR1, lambda sig, frame: raised.append(sig))
    try:
        with server.capture_signals():
            held_back.append(signal.SIGUSR1)  # as DrainingServer.handle_exit holds SIGTERM during the drain
            assert raised == []
    finally:
        signal.signal(signal.SIGUSR1, previous)
    if raised != [signal.SIGUSR1]:
        broken("Server()._captured_signals", MAIN, "is no longer re-raised when capture_signals() ends")
