"""OpenTelemetry traces, configured the standard way (the `OTEL_*` environment variables), that
continue the caller's W3C trace: a server span per request, a span per stage of `timings_ms`, and a
span per batched inference linked to every request that shared it.

Tracing is on when an exporter or an OTLP endpoint is named (`OTEL_TRACES_EXPORTER`,
`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) and `OTEL_SDK_DISABLED` is not
true; otherwise `Tracing.off()` answers every call with nothing, at the cost of one attribute read.
The SDK reads the rest itself: the sampler (`OTEL_TRACES_SAMPLER`, `_ARG`), the resource
(`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`), the batch processor's bounds (`OTEL_BSP_*`) and the
exporter's endpoint, headers and timeout. Spans leave through the SDK's BatchSpanProcessor, on its
own thread with a bounded queue, so a collector that is down or slow costs dropped spans, counted
in `cnn_serve_trace_spans_dropped_total`, never a request's latency.

Every span is made after the fact with the start and end times the lifecycle measured, so a stage
span is exactly as long as the stage in `timings_ms` and `Server-Timing`.
"""
import functools
import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CollectorRegistry, Counter

log = logging.getLogger("service.tracing")
ENABLING_VARIABLES = ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT",
                      "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
DEFAULT_MAX_QUEUE_SIZE = 2048  # the SDK's own default for OTEL_BSP_MAX_QUEUE_SIZE
PROPAGATOR = TraceContextTextMapPropagator()
SCOPE = InstrumentationScope("cnn-serve")
SAMPLED = TraceFlags(TraceFlags.SAMPLED)


def enabled_by(environ: Mapping[str, str]) -> bool:
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return any(environ.get(name) for name in ENABLING_VARIABLES)


@dataclass(frozen=True)
class Stage:
    """One stage of a request as the lifecycle measured it (perf_counter seconds, ms)."""
    start: float
    duration_ms: float


def measured_stages(read: Stage, images: Sequence, inference, timings_ms: Mapping[str, float],
                    encode_start: float) -> dict[str, Stage]:
    """Each stage's start and duration, in the order a request lives them; the durations of the
    stages in `timings_ms` are its own numbers. Images decode in parallel, so their decode
    (preprocess) stage starts with the first image's and lasts as long as all of theirs together."""
    stages = {"read": read}
    if images:
        first = min(images, key=lambda image: image.started)
        stages["decode"] = Stage(first.started, timings_ms["decode"])
        stages["preprocess"] = Stage(first.started + first.decode_ms / 1000, timings_ms["preprocess"])
    stages["queue"] = Stage(inference.submitted, timings_ms["queue"])
    stages["inference"] = Stage(inference.started, timings_ms["inference"])
    stages["encode"] = Stage(encode_start, (time.perf_counter() - encode_start) * 1000)
    return stages


class Tracing:
    """The service's tracer; `enabled` False means every method is a no-op.

    Only the server span goes through the SDK's tracer (the sampler decides there). The stage and
    batch spans are already over when they are made, so they are built finished and handed to the
    span processor: a tenth of the CPU of starting and ending each through the tracer, which a
    request traced end to end would otherwise spend mostly there (measured on effnet)."""

    def __init__(self, processor: SpanProcessor | None, dropped: "DroppedSpans | None" = None) -> None:
        self.enabled = processor is not None
        self.processor = processor
        self.provider: TracerProvider | None = None
        self.tracer: trace.Tracer | None = None
        if processor is not None:  # off: no resource to detect, no provider
            self.provider = TracerProvider(resource=_Resource.create())  # sampler and resource from OTEL_*
            self.provider.add_span_processor(processor)
            self.tracer = self.provider.get_tracer(SCOPE.name)
        self.dropped = dropped

    @classmethod
    def off(cls) -> "Tracing":
        return cls(None)

    @classmethod
    def from_environment(cls, registry: CollectorRegistry,
                         environ: Mapping[str, str] = os.environ) -> "Tracing":
        if not enabled_by(environ):
            return cls.off()
        dropped = DroppedSpans(registry, int(environ.get("OTEL_BSP_MAX_QUEUE_SIZE", DEFAULT_MAX_QUEUE_SIZE)))
        exporter = _exporter(environ)
        if exporter is None:
            return cls.off()
        tracing = cls(dropped.counting(BatchSpanProcessor(dropped.exporting(exporter))), dropped)
        assert tracing.provider is not None
        log.info("tracing on: exporter %s, sampler %s", type(exporter).__name__,
                 tracing.provider.sampler.get_description())
        return tracing

    def start_server_span(self, name: str, headers: Iterable[tuple[bytes, bytes]], start: float
                          ) -> trace.Span | None:
        """The request's server span, a child of the caller's `traceparent` when it sent one."""
        if self.tracer is None:
            return None
        carrier = {key.decode("latin-1"): value.decode("latin-1") for key, value in headers
                   if key in (b"traceparent", b"tracestate")}
        parent = PROPAGATOR.extract(carrier) if carrier else Context()
        return self.tracer.start_span(name, parent, SpanKind.SERVER, start_time=wall_ns(start))

    def stage_spans(self, server: trace.Span, stages: Mapping[str, Stage], attributes: Mapping) -> None:
        """One child span per stage, timed exactly as the lifecycle timed it. The request's
        `attributes` are on its server span; a stage span carries only its own, the inference its
        batch's (each attribute is encoded again per span: on effnet, a tenth of tracing's CPU)."""
        parent = server.get_span_context()
        if not parent.trace_flags.sampled:
            return
        batch = {key: value for key, value in attributes.items() if key.startswith("batch")}
        for name, stage in stages.items():
            self._finished(name, parent, stage.start, stage.start + stage.duration_ms / 1000,
                           batch if name == "inference" else {})

    def model_span(self, server: trace.Span, name: str, lasted: Stage, stages: Mapping[str, Stage],
                   attributes: dict, code: str | None) -> None:
        """One model's part of a request several models answer (/compare): a span under the server
        span, its own stages under it, and its error, if it has one, as its status."""
        assert self.tracer is not None
        span = self.tracer.start_span(name, trace.set_span_in_context(server), start_time=wall_ns(lasted.start),
                                      attributes={**attributes, **({"error.code": code} if code else {})})
        if code is not None:
            span.set_status(Status(StatusCode.ERROR, code))
        self.stage_spans(span, stages, attributes)
        span.end(wall_ns(lasted.start + lasted.duration_ms / 1000))

    def batch_span(self, model: str, inference) -> None:
        """The span of the session.run an Inference (service/batching.py) came from, linked to each
        request that shared it, made by the one request it was given to (`shared_by`); recorded when
        one of them is sampled (a trace of its own, so a sampled request always finds its batch)."""
        requests: Sequence[SpanContext] = inference.shared_by
        if not any(context.trace_flags.sampled for context in requests):
            return
        self._finished("batch", None, inference.started, inference.started + inference.inference_ms / 1000,
                       {"model": model, "batch.requests": len(requests)},
                       [Link(context) for context in requests if context.is_valid])

    def _finished(self, name: str, parent: SpanContext | None, start: float, end: float,
                  attributes: dict, links: Sequence[Link] = ()) -> None:
        assert self.processor is not None and self.provider is not None
        ids = self.provider.id_generator
        trace_id = parent.trace_id if parent is not None else ids.generate_trace_id()
        state = parent.trace_state if parent is not None else None
        context = SpanContext(trace_id, ids.generate_span_id(), False, SAMPLED, state)
        self.processor.on_end(ReadableSpan(
            name, context, parent, resource=self.provider.resource, attributes=attributes, links=links,
            start_time=wall_ns(start), end_time=wall_ns(end), instrumentation_scope=SCOPE))

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()


class _Resource(Resource):
    """The SDK's resource, hashed once: the OTLP encoder groups every span by its resource, and
    Resource hashes itself by dumping its attributes to JSON each time (a fifth of encoding)."""

    @classmethod
    def create(cls, attributes=None, schema_url=None) -> "_Resource":
        resource = Resource.create(attributes, schema_url)
        return cls(resource.attributes, resource.schema_url)

    @functools.cached_property
    def _hash(self) -> int:
        return super().__hash__()

    def __hash__(self) -> int:
        return self._hash

    __eq__ = Resource.__eq__


def traceresponse(span: trace.Span) -> bytes | None:
    """The W3C `traceresponse` value naming the server span, so a client can find its trace."""
    context = span.get_span_context()
    if not context.is_valid:
        return None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}".encode()


def set_error(span: trace.Span, code: str | None, status: int) -> None:
    if status >= 500 or code is not None:
        span.set_status(Status(StatusCode.ERROR, code or f"HTTP {status}"))


# perf_counter has no epoch; one offset taken at import maps it to the wall clock spans need.
_EPOCH_OFFSET_NS = time.time_ns() - time.perf_counter_ns()


def wall_ns(perf_counter_seconds: float) -> int:
    return _EPOCH_OFFSET_NS + int(perf_counter_seconds * 1e9)


def _exporter(environ: Mapping[str, str]) -> SpanExporter | None:
    kind = environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
    if kind == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter
        return ConsoleSpanExporter()
    if kind != "otlp":
        log.warning("OTEL_TRACES_EXPORTER=%s is not supported (otlp, console, none); no spans leave", kind)
        return None
    protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                           environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")).strip().lower()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as Grpc
        return Grpc()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Http
    return Http()


class DroppedSpans:
    """Counts the spans that never reached the collector: the batch queue was full (the collector
    too slow or down for that long), or the export failed. The SDK drops them without a count
    we can read through its public API, so the queue is mirrored here: each span handed to the
    processor is pending until the exporter is handed it."""

    def __init__(self, registry: CollectorRegistry, max_queue_size: int) -> None:
        self.counter = Counter("cnn_serve_trace_spans_dropped", "Trace spans dropped before reaching "
                               "the collector, by reason (queue_full, export_failed)", ["reason"],
                               registry=registry)
        for reason in ("queue_full", "export_failed"):
            self.counter.labels(reason=reason)
        self.max_queue_size = max_queue_size
        self.pending = 0
        self._lock = threading.Lock()

    def counting(self, processor: SpanProcessor) -> SpanProcessor:
        return _CountingProcessor(processor, self)

    def exporting(self, exporter: SpanExporter) -> SpanExporter:
        return _CountingExporter(exporter, self)

    def queued(self) -> None:
        with self._lock:
            if self.pending >= self.max_queue_size:  # the processor drops one span to take this one
                self.counter.labels(reason="queue_full").inc()
            else:
                self.pending += 1

    def exported(self, spans: int, ok: bool) -> None:
        with self._lock:
            self.pending = max(0, self.pending - spans)
        if not ok:
            self.counter.labels(reason="export_failed").inc(spans)


class _CountingProcessor(SpanProcessor):
    def __init__(self, processor: SpanProcessor, dropped: DroppedSpans) -> None:
        self.processor, self.dropped = processor, dropped

    def on_start(self, span, parent_context=None) -> None:
        self.processor.on_start(span, parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        if span.context is not None and span.context.trace_flags.sampled:
            self.dropped.queued()
        self.processor.on_end(span)

    def shutdown(self) -> None:
        self.processor.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.processor.force_flush(timeout_millis)


class _CountingExporter(SpanExporter):
    def __init__(self, exporter: SpanExporter, dropped: DroppedSpans) -> None:
        self.exporter, self.dropped = exporter, dropped

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.exporter.export(spans)
        except Exception:
            self.dropped.exported(len(spans), ok=False)
            raise
        self.dropped.exported(len(spans), ok=result is SpanExportResult.SUCCESS)
        return result

    def shutdown(self) -> None:
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.exporter.force_flush(timeout_millis)
