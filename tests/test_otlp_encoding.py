"""The service's OTLP span encoder (service/otlp_encoding.py) makes the library's bytes exactly, for
spans of every shape; and both OTLP exporters, chosen by OTEL_EXPORTER_OTLP_PROTOCOL, send what it
encodes to a collector."""
from concurrent import futures

import grpc
import pytest
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as library_encode_spans
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState
from prometheus_client import CollectorRegistry

from service import otlp_encoding
from service.tracing import Tracing
from tests.otlp_receiver import Collector, spans_of

RESOURCE = Resource({"service.name": "cnn-serve", "host.cores": 2}, "https://opentelemetry.io/schemas/1.21.0")
OTHER_RESOURCE = Resource({"service.name": "other"})
SCOPE = InstrumentationScope("cnn-serve", "1.0", "https://schema", {"scope.attribute": True})
EVERY_TYPE = {"text": "café", "flag": False, "count": -3, "big": 2**62, "ratio": 0.25, "raw": b"\x00\xff",
              "words": ["a", "b"], "numbers": (1, 2, 3), "flags": [True], "empty": [], "none": None,
              "nested": {"inner": 1}}


def context(span_id: int, remote: bool = False, state: TraceState | None = None, sampled: bool = True
            ) -> SpanContext:
    return SpanContext(0x4BF92F3577B34DA6A3CE929D0E0E4736, span_id, remote,
                       TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT), state)


def shapes() -> list[ReadableSpan]:
    """Spans as the service makes them, and every field the library's encoder reads besides."""
    caller = context(1, remote=True, state=TraceState([("vendor", "value")]))
    bounded = BoundedAttributes(maxlen=2, attributes={"a": 1, "b": 2, "c": 3})  # drops one
    return [
        ReadableSpan("POST /predict/{model}", context(2, state=TraceState([("vendor", "value")])), caller,
                     resource=RESOURCE, kind=SpanKind.SERVER, attributes=EVERY_TYPE,
                     status=Status(StatusCode.ERROR, "image_too_complex"), start_time=10, end_time=20,
                     instrumentation_scope=SCOPE),
        ReadableSpan("read", context(3), context(2), resource=RESOURCE, attributes={}, start_time=11, end_time=12,
                     instrumentation_scope=SCOPE),
        ReadableSpan("batch", context(4), None, resource=RESOURCE, attributes={"batch.requests": 2},
                     links=[Link(context(2)), Link(caller, {"link.attribute": "x"})], start_time=13, end_time=14,
                     instrumentation_scope=SCOPE),
        ReadableSpan("evented", context(5), context(2), resource=RESOURCE, kind=SpanKind.CLIENT, attributes=bounded,
                     events=[Event("first", {"at": 1}, 15), Event("second", None, 16)],
                     status=Status(StatusCode.OK), start_time=15, end_time=17, instrumentation_scope=None),
        ReadableSpan("elsewhere", context(6), None, resource=OTHER_RESOURCE, kind=SpanKind.PRODUCER,
                     start_time=18, end_time=19, instrumentation_scope=InstrumentationScope("other")),
        ReadableSpan("consumer", context(7, sampled=False), None, resource=RESOURCE, kind=SpanKind.CONSUMER,
                     attributes={"bad": object()}, start_time=18, end_time=19, instrumentation_scope=SCOPE),
    ]


def test_the_encoder_makes_the_librarys_bytes_for_spans_of_every_shape():
    spans = shapes()
    ours = otlp_encoding.encode_spans(spans)
    assert ours.SerializeToString(deterministic=True) == \
        library_encode_spans(spans).SerializeToString(deterministic=True)
    assert len([s for r in ours.resource_spans for scope in r.scope_spans for s in scope.spans]) == len(spans)


class GrpcCollector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver on loopback, as tests/otlp_receiver.py's Collector is for HTTP."""

    def __init__(self) -> None:
        self.spans: list[tuple[dict, object]] = []
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.endpoint = f"http://127.0.0.1:{port}"

    def Export(self, request, context):  # the service's method name
        self.spans += spans_of(request)
        return ExportTraceServiceResponse()

    def close(self) -> None:
        self.server.stop(None)


@pytest.mark.parametrize("protocol, collector_type", [("http/protobuf", Collector), ("grpc", GrpcCollector)])
def test_each_otlp_protocol_sends_what_the_services_encoder_makes(protocol, collector_type, monkeypatch):
    collector = collector_type()
    encoded = []
    encode_span = otlp_encoding._encode_span

    def spying(span, into):
        encoded.append(span.name)
        encode_span(span, into)

    monkeypatch.setattr(otlp_encoding, "_encode_span", spying)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint)  # the exporters read os.environ
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    tracing = Tracing.from_environment(CollectorRegistry())
    try:
        spans = shapes()[:3]
        for span in spans:
            tracing.processor.on_end(span)
        assert tracing.processor.force_flush(10_000)
    finally:
        tracing.shutdown()
        collector.close()
    assert encoded == [span.name for span in spans]
    sent = [span for _, span in collector.spans]
    assert [s.name for s in sent] == [span.name for span in spans]
    server = sent[0]
    assert server.parent_span_id == (1).to_bytes(8, "big") and server.trace_state == "vendor=value"
    assert {a.key: a.value.string_value for a in server.attributes}["text"] == "café"
    assert server.status.message == "image_too_complex"
