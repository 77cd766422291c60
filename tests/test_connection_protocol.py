"""The connection protocol in process, over a mock transport (as uvicorn tests its own): the bytes
a client sends go in through `data_received`, the answers come out of `transport.write`, and each
bound is seen to hold without a socket or a server process.

The protocol subclasses uvicorn's HttpToolsProtocol and relies on these of its internals:
`parser`, `cycle` (`more_body`, `response_complete`, `keep_alive`), `pipeline`, `flow`
(`read_paused`), `headers`, `connections`, `server_state.default_headers`, the parser callbacks
(`on_message_begin`, `on_url`, `on_header`, `on_headers_complete`, `on_body`,
`on_message_complete`), `on_response_complete`, `send_400_response`,
`_unset_keepalive_if_required`, `timeout_keep_alive_task`. These tests fail when their shape changes.
"""
import asyncio
import json

import uvicorn
from uvicorn.server import ServerState

from service.connections import PARSE_STEP, BoundedHttpProtocol, ConnectionLimits

LIMITS = ConnectionLimits(max_connections=10, idle_timeout=5, headers_timeout=5, body_timeout=5,
                          max_header_bytes=1024, retry_after=1, write_timeout=0.2, backlog=10,
                          descriptors=1000)
GET = b"GET /echo HTTP/1.1\r\nHost: test\r\n\r\n"


class Transport(asyncio.Transport):
    """What the protocol writes, and whether it paused reading, closed or aborted."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = self.aborted = False
        self.reading = True

    def get_extra_info(self, name, default=None):
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(name, default)

    def write(self, data) -> None:
        if not self.closed:
            self.written += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = self.aborted = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def answers(self) -> list[tuple[int, dict[str, str], bytes]]:
        """Each answer's status, headers and body (bodies have a Content-Length here)."""
        answers, rest = [], bytes(self.written)
        while rest:
            head, _, rest = rest.partition(b"\r\n\r\n")
            status_line, *lines = head.decode().split("\r\n")
            headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines)}
            length = int(headers.get("content-length", 0))
            answers.append((int(status_line.split()[1]), headers, rest[:length]))
            rest = rest[length:]
        return answers


class App:
    """Answers each request with its body and the header names it saw; a request to /hold waits
    for `release`."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.release = asyncio.Event()

    async def __call__(self, scope, receive, send) -> None:
        self.seen.append(scope["path"])
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message.get("body", b""), message.get("more_body", False)
        if scope["path"] == "/hold":
            await self.release.wait()
        names = ",".join(name.decode() for name, _ in scope["headers"])
        content = json.dumps({"body": body.decode(), "headers": names}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(content)).encode())]})
        await send({"type": "http.response.body", "body": content})


def connection(app: App, limits: ConnectionLimits = LIMITS) -> tuple[BoundedHttpProtocol, Transport]:
    config = uvicorn.Config(app, ws="none", lifespan="off", log_config=None)
    protocol = BoundedHttpProtocol(config=config, server_state=ServerState(), app_state={},
                                   _loop=asyncio.get_running_loop(), limits=limits)
    transport = Transport()
    protocol.connection_made(transport)
    return protocol, transport


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def run(scenario) -> None:
    asyncio.run(scenario())


def test_a_header_block_over_the_limit_in_one_read_is_431_and_never_reaches_the_app():
    async def scenario():
        app = App()
        protocol, transport = connection(app)
        protocol.data_received(b"GET /echo HTTP/1.1\r\nHost: test\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n")
        await settle()
        [(status, _headers, body)] = transport.answers()
        assert status == 431 and json.loads(body)["code"] == "headers_too_large"
        assert transport.closed and app.seen == []
        # Under the limit, in one read too, it is served.
        app = App()
        protocol, transport = connection(app)
        protocol.data_received(b"GET /echo HTTP/1.1\r\nHost: test\r\nX-Big: " + b"a" * 800 + b"\r\n\r\n")
        await settle()
        assert [a[0] for a in transport.answers()] == [200]
    run(scenario)


def test_trailers_count_against_the_header_limit_and_never_reach_the_app():
    async def scenario():
        chunked = b"POST /echo HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n"
        app = App()
        protocol, transport = connection(app)
        protocol.data_received(chunked + b"X-Trailer: 1\r\n\r\n")
        await settle()
        [(status, _, body)] = transport.answers()
        assert status == 200 and json.loads(body) == {"body": "abc", "headers": "host,transfer-encoding"}
        app = App()
        protocol, transport = connection(app)
        protocol.data_received(chunked)
        for _ in range(100):  # 2 KB of trailer fields, a few per read
            if transport.closed:
                break
            protocol.data_received(b"X-Trailer: " + b"t" * 10 + b"\r\n")
        await settle()
        assert transport.closed
        assert json.loads(transport.answers()[-1][2])["code"] == "headers_too_large"
    run(scenario)


def test_a_pipeline_waits_unparsed_while_its_first_request_is_answered():
    async def scenario():
        app = App()
        protocol, transport = connection(app)
        pipeline = b"GET /hold HTTP/1.1\r\nHost: test\r\n\r\n" + GET * 50
        protocol.data_received(pipeline)
        await settle()
        assert app.seen == ["/hold"] and not transport.reading
        # Bytes, not parsed requests, but for the rest of the piece the first one ended in.
        assert len(protocol.kept) >= len(pipeline) - PARSE_STEP
        app.release.set()
        await settle()
        for _ in range(50):
            await settle()
        assert app.seen == ["/hold"] + ["/echo"] * 50
        assert [a[0] for a in transport.answers()] == [200] * 51 and transport.reading
    run(scenario)


def test_an_answer_the_client_does_not_read_is_dropped_after_the_write_timeout():
    async def scenario():
        protocol, transport = connection(App())
        protocol.pause_writing()  # the transport's buffer is over its high-water mark
        await asyncio.sleep(LIMITS.write_timeout / 2)
        protocol.resume_writing()  # the client read some
        protocol.pause_writing()
        await asyncio.sleep(LIMITS.write_timeout / 2)
        assert not transport.aborted
        await asyncio.sleep(LIMITS.write_timeout)
        assert transport.aborted
    run(scenario)


def test_a_request_the_parser_cannot_read_gets_a_json_400():
    async def scenario():
        for garbage in [b"GET /echo HTTP/1.1\r\nHost: te st\r\nBad Header\r\n\r\n", b"\x16\x03\x01\x00 TLS\r\n\r\n",
                        b"POST /echo HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"]:
            app = App()
            protocol, transport = connection(app)
            protocol.data_received(garbage)
            await settle()
            [(status, headers, body)] = transport.answers()
            assert status == 400 and headers["content-type"] == "application/json"
            assert json.loads(body)["code"] == "bad_http_request" and headers["connection"] == "close"
            assert transport.closed and app.seen == []
    run(scenario)


def test_an_upgrade_request_with_a_body_is_refused_and_one_without_is_the_last_served():
    async def scenario():
        upgrade = b"POST /echo HTTP/1.1\r\nHost: test\r\nConnection: upgrade\r\nUpgrade: foo\r\n"
        app = App()
        protocol, transport = connection(app)
        protocol.data_received(upgrade + b"Content-Length: " + str(len(GET)).encode() + b"\r\n\r\n" + GET)
        await settle()
        [(status, _, body)] = transport.answers()
        assert status == 400 and json.loads(body)["code"] == "bad_http_request" and app.seen == []
        app = App()
        protocol, transport = connection(app)
        protocol.data_received(upgrade + b"\r\n" + GET)
        await settle()
        [(status, headers, _)] = transport.answers()
        assert status == 200 and headers["connection"] == "close" and app.seen == ["/echo"]
    run(scenario)


def test_a_client_that_half_closes_after_its_request_gets_its_answer():
    async def scenario():
        app = App()
        protocol, transport = connection(app)
        protocol.data_received(b"GET /hold HTTP/1.1\r\nHost: test\r\n\r\n" + GET)
        assert protocol.eof_received()  # keep the transport open to write
        app.release.set()
        for _ in range(5):
            await settle()
        assert [a[0] for a in transport.answers()] == [200, 200] and transport.closed
        # Nothing sent: the half-close closes.
        protocol, transport = connection(App())
        assert not protocol.eof_received()
    run(scenario)
