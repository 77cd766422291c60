"""The OTLP encoding of finished spans, byte for byte what the OTLP exporters' own encoder makes
(`encode_spans` of opentelemetry-exporter-otlp-proto-common), in about half its time.

The exporters encode every span on their thread, which holds the GIL while it builds the protobuf
messages: with every request traced, the cheapest model's requests spent more there than in
everything else tracing does (effnet, measured). Most of that went to building each span and each
attribute as a message of its own, then copying it into its parent: this encoder builds them in
place (`add()`), and sets only what a span has. A test holds it to the library's bytes, spans of
every shape and attributes of every type included, so an upgrade that changes the encoding fails it
rather than sending something else.
"""
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence

from opentelemetry.exporter.otlp.proto.common._internal import (
    _encode_instrumentation_scope,
    _encode_resource,
    _encode_value,
)
from opentelemetry.exporter.otlp.proto.common._internal.trace_encoder import _SPAN_KIND_MAP, _encode_trace_state
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import SpanFlags
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanContext

log = logging.getLogger("service.otlp_encoding")
HAS_IS_REMOTE = SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
IS_REMOTE = SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK
VALUE_FIELDS = {bool: "bool_value", str: "string_value", int: "int_value", float: "double_value",
                bytes: "bytes_value"}  # any other type (arrays, maps, subclasses): the library's _encode_value


def encode_spans(sdk_spans: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
    """The export request for the spans, grouped by resource and then by instrumentation scope
    (the library's signature: its exporters call it in its place)."""
    grouped: dict = defaultdict(lambda: defaultdict(list))
    for span in sdk_spans:
        grouped[span.resource][span.instrumentation_scope or None].append(span)
    request = ExportTraceServiceRequest()
    for resource, scopes in grouped.items():
        resource_spans = request.resource_spans.add(resource=_encode_resource(resource),
                                                    schema_url=resource.schema_url)
        for scope, members in scopes.items():
            scope_spans = resource_spans.scope_spans.add(scope=_encode_instrumentation_scope(scope),
                                                         schema_url=scope.schema_url if scope else None)
            for span in members:
                _encode_span(span, scope_spans.spans)
    return request


def _encode_span(span: ReadableSpan, into) -> None:
    context, parent, status = span.context, span.parent, span.status
    encoded = into.add(trace_id=context.trace_id.to_bytes(16, "big"), span_id=context.span_id.to_bytes(8, "big"),
                       name=span.name, kind=_SPAN_KIND_MAP[span.kind], start_time_unix_nano=span.start_time,
                       end_time_unix_nano=span.end_time, flags=_flags(parent),
                       dropped_attributes_count=span.dropped_attributes, dropped_events_count=span.dropped_events,
                       dropped_links_count=span.dropped_links)
    if parent is not None:
        encoded.parent_span_id = parent.span_id.to_bytes(8, "big")
    if context.trace_state:  # never None in a SpanContext; empty is encoded as nothing
        encoded.trace_state = _encode_trace_state(context.trace_state)
    _encode_attributes(span.attributes, encoded.attributes)
    for event in span.events:
        added = encoded.events.add(name=event.name, time_unix_nano=event.timestamp,
                                   dropped_attributes_count=event.dropped_attributes)
        _encode_attributes(event.attributes, added.attributes)
    for link in span.links:
        added = encoded.links.add(trace_id=link.context.trace_id.to_bytes(16, "big"),
                                  span_id=link.context.span_id.to_bytes(8, "big"),
                                  dropped_attributes_count=link.dropped_attributes, flags=_flags(link.context))
        _encode_attributes(link.attributes, added.attributes)
    encoded.status.code = status.status_code.value  # present even when UNSET, as the library sends it
    if status.description is not None:
        encoded.status.message = status.description


def _flags(context: SpanContext | None) -> int:
    return HAS_IS_REMOTE | IS_REMOTE if context is not None and context.is_remote else HAS_IS_REMOTE


def _encode_attributes(attributes: Mapping | None, into) -> None:
    """Each attribute as a KeyValue made in place; one that cannot be encoded is left out and
    logged, as the library does."""
    for key, value in (attributes or {}).items():
        field = VALUE_FIELDS.get(type(value))
        if field is not None:
            setattr(into.add(key=key).value, field, value)
            continue
        try:
            encoded = _encode_value(value)
        except Exception:
            log.exception("Failed to encode key %s", key)
            continue
        into.add(key=key).value.CopyFrom(encoded)
