"""A tiny OTLP/HTTP trace receiver on loopback for the tests, reading what it is sent with
opentelemetry-proto's own messages."""
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from tests.service_fixtures import free_port


def spans_of(export: ExportTraceServiceRequest) -> list[tuple[dict, object]]:
    """Each span of an export request, with its resource's attributes."""
    return [({a.key: a.value.string_value for a in resource_spans.resource.attributes}, span)
            for resource_spans in export.resource_spans for scope in resource_spans.scope_spans
            for span in scope.spans]


class Collector:
    """An OTLP/HTTP trace receiver on loopback: keeps every span it is sent, with its resource."""

    def __init__(self) -> None:
        self.spans: list[tuple[dict, object]] = []  # (resource attributes, span)
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                collector.spans += spans_of(ExportTraceServiceRequest.FromString(
                    self.rfile.read(int(self.headers["Content-Length"]))))
                body = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, trace_id: str, count: int, timeout: float = 10) -> list:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [(r, s) for r, s in self.spans if s.trace_id.hex() == trace_id]
            if len(found) >= count:
                return found
            time.sleep(0.05)
        return [(r, s) for r, s in self.spans if s.trace_id.hex() == trace_id]

    def close(self) -> None:
        self.server.shutdown()
