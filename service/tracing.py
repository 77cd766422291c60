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
from dataclasses import dataclass, field

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CollectorRegistry, Counter

from service import otlp_encoding

log = logging.getLogger("service.tracing")
ENABLING_VARIABLES = ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT",
                      "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
DEFAULT_MAX_QUEUE_SIZE = 2048  # the SDK's own default for OTEL_BSP_MAX_QUEUE_SIZE
PROPAGATOR = TraceContextTextMapPropagator()
SCOPE = InstrumentationScope("cnn-serve")
SAMPLED = TraceFlags(TraceFlags.SAMPLED)
UNSET = Status(StatusCode.UNSET)


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


@dataclass(eq=False)
class ServerSpan:
    """A request's server span while the request lives: its context (a batch links to it, the
    answer's `traceresponse` names it), its parent (the caller's, if it sent one), and what it will
    say when it ends. Tracing makes it and ends it finished, as the stage spans are, rather than
    through the SDK's tracer, whose span takes a lock and checks each attribute as it is set: a
    third of what tracing cost on the event loop (effnet, measured)."""
    name: str
    context: SpanContext
    parent: SpanContext | None
    start: float
    attributes: dict = field(default_factory=dict)
    status: Status = UNSET

    def current(self) -> Context:
        """A context in which this span is the current one (what service/batching.py reads)."""
        return trace.set_span_in_context(NonRecordingSpan(self.context))

    def set_error(self, code: str | None, status: int) -> None:
        if status >= 500 or code is not None:
            self.status = Status(StatusCode.ERROR, code or f"HTTP {status}")


class Tracing:
    """The service's tracer; `enabled` False means every method is a no-op.

    Every span is built finished (`ReadableSpan`) and handed to the span processor, a request's
    spans together: the sampler decides at the server span, as the SDK's tracer does, and the
    other spans of a sampled request follow it. Building them is a tenth of the CPU of starting and
    ending each through the SDK's tracer (measured on effnet)."""

    def __init__(self, processor: SpanProcessor | None, dropped: "DroppedSpans | None" = None) -> None:
        self.enabled = processor is not None
        self.processor = processor
        self.provider: TracerProvider | None = None
        if processor is not None:  # off: no resource to detect, no provider
            self.provider = TracerProvider(resource=_Resource.create())  # sampler and resource from OTEL_*
            self.provider.add_span_processor(processor)  # shut down with it
        self.dropped = dropped

    @classmethod
    def off(cls) -> "Tracing":
        return cls(None)

    @classmethod
    def from_environment(cls, registry: CollectorRegistry,
                         environ: Mapping[str, str] = os.environ) -> "Tracing":
        if not enabled_by(environ):
            return cls.off()
        exporter = _exporter(environ)
        if exporter is None:
            return cls.off()
        dropped = DroppedSpans(registry, int(environ.get("OTEL_BSP_MAX_QUEUE_SIZE", DEFAULT_MAX_QUEUE_SIZE)))
        tracing = cls(BatchSpanProcessor(dropped.exporting(exporter)), dropped)
        assert tracing.provider is not None
        log.info("tracing on: exporter %s, sampler %s", type(exporter).__name__,
                 tracing.provider.sampler.get_description())
        return tracing

    def start_server_span(self, name: str, headers: Iterable[tuple[bytes, bytes]], start: float
                          ) -> ServerSpan | None:
        """The request's server span, a child of the caller's `traceparent` when it sent one,
        sampled or not as the sampler decides (`OTEL_TRACES_SAMPLER`)."""
        if self.provider is None:
            return None
        carrier = {key.decode("latin-1"): value.decode("latin-1") for key, value in headers
                   if key in (b"traceparent", b"tracestate")}
        context = PROPAGATOR.extract(carrier) if carrier else Context()
        parent = trace.get_current_span(context).get_span_context()
        ids = self.provider.id_generator
        trace_id = parent.trace_id if parent.is_valid else ids.generate_trace_id()
        sampling = self.provider.sampler.should_sample(context, trace_id, name, SpanKind.SERVER)
        flags = SAMPLED if sampling.decision.is_sampled() else TraceFlags(TraceFlags.DEFAULT)
        return ServerSpan(name, SpanContext(trace_id, ids.generate_span_id(), False, flags, sampling.trace_state),
                          parent if parent.is_valid else None, start, dict(sampling.attributes or {}))

    def end(self, span: ServerSpan, stages: Mapping[str, Stage]) -> None:
        """The server span, over now, and one child span per stage, timed exactly as the lifecycle
        timed it. The request's attributes are on its server span; a stage span carries only its
        own, the inference its batch's (each attribute is encoded again per span)."""
        if span.context.trace_flags.sampled:
            self._emit([self._span(span.name, span.context, span.parent, span.start, time.perf_counter(),
                                   span.attributes, SpanKind.SERVER, span.status),
                        *self._stage_spans(span.context, stages, span.attributes)])

    def model_span(self, server: ServerSpan, name: str, lasted: Stage, stages: Mapping[str, Stage],
                   attributes: dict, code: str | None) -> None:
        """One model's part of a request several models answer (/compare): a span under the server
        span, its own stages under it, and its error, if it has one, as its status."""
        if not server.context.trace_flags.sampled:
            return
        context = self._context(server.context)
        self._emit([self._span(name, context, server.context, lasted.start, lasted.start + lasted.duration_ms / 1000,
                               {**attributes, **({"error.code": code} if code else {})}, SpanKind.INTERNAL,
                               Status(StatusCode.ERROR, code) if code is not None else UNSET),
                    *self._stage_spans(context, stages, attributes)])

    def batch_span(self, model: str, inference) -> None:
        """The span of the session.run an Inference (service/batching.py) came from, linked to each
        request that shared it, made by the one request it was given to (`shared_by`); recorded when
        one of them is sampled (a trace of its own, so a sampled request always finds its batch)."""
        requests: Sequence[SpanContext] = inference.shared_by
        if self.provider is None or not any(context.trace_flags.sampled for context in requests):
            return
        self._emit([self._span("batch", self._context(None), None, inference.started,
                               inference.started + inference.inference_ms / 1000,
                               {"model": model, "batch.requests": len(requests)},
                               links=[Link(context) for context in requests if context.is_valid])])

    def _stage_spans(self, parent: SpanContext, stages: Mapping[str, Stage], attributes: Mapping
                     ) -> list[ReadableSpan]:
        batch = {key: value for key, value in attributes.items() if key.startswith("batch")}
        return [self._span(name, self._context(parent), parent, stage.start, stage.start + stage.duration_ms / 1000,
                           batch if name == "inference" else {}) for name, stage in stages.items()]

    def _context(self, parent: SpanContext | None) -> SpanContext:
        """A new sampled span's context, in its parent's trace or a trace of its own."""
        assert self.provider is not None
        ids = self.provider.id_generator
        if parent is None:
            return SpanContext(ids.generate_trace_id(), ids.generate_span_id(), False, SAMPLED)
        return SpanContext(parent.trace_id, ids.generate_span_id(), False, SAMPLED, parent.trace_state)

    def _span(self, name: str, context: SpanContext, parent: SpanContext | None, start: float, end: float,
              attributes: Mapping, kind: SpanKind = SpanKind.INTERNAL, status: Status = UNSET,
              links: Sequence[Link] = ()) -> ReadableSpan:
        assert self.provider is not None
        return ReadableSpan(name, context, parent, resource=self.provider.resource, attributes=attributes,
                            kind=kind, status=status, links=links, start_time=wall_ns(start),
                            end_time=wall_ns(end), instrumentation_scope=SCOPE)

    def _emit(self, spans: list[ReadableSpan]) -> None:
        assert self.processor is not None
        if self.dropped is not None:
            self.dropped.queued(len(spans))
        for span in spans:
            self.processor.on_end(span)

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


def traceresponse(span: ServerSpan) -> bytes:
    """The W3C `traceresponse` value naming the server span, so a client can find its trace."""
    context = span.context
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}".encode()


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
        from opentelemetry.exporter.otlp.proto.grpc import trace_exporter
    else:
        from opentelemetry.exporter.otlp.proto.http import trace_exporter  # type: ignore[no-redef]
    # Each exporter calls the encoder by this module-level name: the same bytes, in half the time.
    trace_exporter.encode_spans = otlp_encoding.encode_spans
    return trace_exporter.OTLPSpanExporter()


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

    def exporting(self, exporter: SpanExporter) -> SpanExporter:
        return _CountingExporter(exporter, self)

    def queued(self, spans: int) -> None:
        """`spans` handed to the processor; those past its queue's bound make it drop as many."""
        with self._lock:
            taken = min(spans, self.max_queue_size - self.pending)
            self.pending += taken
        if taken < spans:
            self.counter.labels(reason="queue_full").inc(spans - taken)

    def exported(self, spans: int, ok: bool) -> None:
        with self._lock:
            self.pending = max(0, self.pending - spans)
        if not ok:
            self.counter.labels(reason="export_failed").inc(spans)


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
