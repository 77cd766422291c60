"""`inference.GRPCInferenceService`: the Open Inference Protocol's RPCs, Triton's ModelConfig and
ModelStatistics, and Triton's repository RPCs (the same model control as REST's
/v2/repository), over the same data plane as the REST routes. ModelInfer goes through the one
lifecycle (`Lifecycle.answer`) as a `GrpcCall`: the message is the payload, the client's deadline
counts with REQUEST_TIMEOUT_SECONDS (the smaller wins), and a client that cancels stops its work.

Every RPC gets a request record, an access-log line and, for ModelInfer, the per-model metrics
(protocol="grpc", status as the HTTP status of the same answer); an error answers with its gRPC
status (status.py), its stable code in the trailing metadata as `code`, and its message. While
tracing is on, an RPC continues the `traceparent` in its metadata as an HTTP request does its header.
"""
import asyncio
import logging
from collections.abc import Awaitable, Callable
from contextvars import Token
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import json_format
from grpc import aio
from opentelemetry import context as otel_context
from opentelemetry.context import Context

from service.auth import check_api_key
from service.dataplane import DataPlane
from service.errors import ClientClosedRequest, RequestTimedOut, ServiceError
from service.lifecycle import Inputs, Result
from service.metrics import server_timing
from service.protocols.grpc import codec
from service.protocols.grpc.proto import grpc_predict_v2_pb2 as pb
from service.protocols.grpc.proto import triton_extensions_pb2 as triton
from service.protocols.grpc.status import grpc_status
from service.protocols.open_inference.codec import (
    DATATYPES,
    EXTENSIONS,
    IMAGE_INPUT,
    PLATFORM,
    answer_bytes,
    wire_shape,
)
from service.protocols.open_inference.triton_extensions import model_config, model_statistics
from service.record import RequestRecord, request_id
from service.tracing import traceresponse

SERVICE = "inference.GRPCInferenceService"
UNTRACED_RPCS = ("ServerLive", "ServerReady")  # probes, every few seconds: no spans, as HTTP's /health
log = logging.getLogger("service.access")


@dataclass(frozen=True)
class InferAdapter:
    """ModelInfer's wire format for the lifecycle (service/lifecycle.py's `Adapter`)."""

    max_values: int
    max_images: int
    parses_body = True  # protobuf to arrays (typed contents) runs off the event loop

    def decode(self, payload: pb.ModelInferRequest, model) -> Inputs:
        return codec.inputs(codec.decode(payload, model.metadata, self.max_values, self.max_images))

    def encode(self, result: Result) -> pb.ModelInferResponse:
        return codec.encode(result)

    def answer_bytes(self, inputs: Inputs, model) -> int:
        # Every output in binary (codec.decode): raw contents, as the answer carries them.
        return answer_bytes(inputs.options, inputs.count, model.metadata, model.longest_label_bytes)


@dataclass
class GrpcCall:
    """A ModelInfer call as the lifecycle's `Call`: grpc.aio has received the whole message (at most
    MAX_BODY_BYTES) before the servicer runs."""

    message: pb.ModelInferRequest
    context: aio.ServicerContext
    record: RequestRecord
    time_left: float | None = field(init=False)

    def __post_init__(self) -> None:
        remaining = self.context.time_remaining()
        self.time_left = remaining if remaining is not None and remaining >= 0 else None

    async def read(self) -> pb.ModelInferRequest:
        return self.message

    async def client_left(self) -> bool:
        done = asyncio.Event()
        self.context.add_done_callback(lambda _: done.set())
        await done.wait()
        return self.context.cancelled()


class InferenceServicer:
    def __init__(self, plane: DataPlane, name: str, version: str) -> None:
        self.plane, self.name, self.version = plane, name, version
        settings = plane.settings
        self.adapter = InferAdapter(settings.max_json_values, settings.max_images_per_request)

    # The protocol's RPCs -------------------------------------------------------------------
    async def ServerLive(self, request, context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.plane.ready())

    async def ServerMetadata(self, request, context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=self.name, version=self.version, extensions=EXTENSIONS)

    async def ModelReady(self, request, context) -> pb.ModelReadyResponse:
        # An answer, never an error, as Triton's: a model or version unknown, not loaded, loading or
        # failed is not ready (tritonclient's is_model_ready returns False instead of raising).
        return pb.ModelReadyResponse(ready=self.plane.engine.serves(request.name, request.version or None))

    async def ModelMetadata(self, request, context) -> pb.ModelMetadataResponse:
        meta = self._served(request.name, request.version).metadata
        versions = [v for v, state in self.plane.engine.versions[request.name].items() if state.served]
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=request.name, versions=versions, platform=PLATFORM,
            inputs=[tensor(name=meta.input.name, datatype=DATATYPES[meta.input.dtype],
                           shape=wire_shape(meta.input.shape)),
                    tensor(name=IMAGE_INPUT, datatype="BYTES", shape=[-1])],
            outputs=[tensor(name=meta.output.name, datatype=DATATYPES[meta.output.dtype],
                            shape=wire_shape(meta.output.shape))])

    async def ModelConfig(self, request, context) -> triton.ModelConfigResponse:
        served = self._served(request.name, request.version)
        config = model_config(served, self.plane.settings.max_images_per_request)
        return triton.ModelConfigResponse(config=json_format.ParseDict(config, triton.ModelConfig()))

    async def ModelStatistics(self, request, context) -> triton.ModelStatisticsResponse:
        stats = model_statistics(self.plane, request.name or None, request.version or None)
        return json_format.ParseDict(stats, triton.ModelStatisticsResponse())

    # Triton's repository RPCs: the API key, as over REST; refused in mode none by the control
    async def RepositoryIndex(self, request, context) -> triton.RepositoryIndexResponse:
        self._check_key(context)
        index = triton.RepositoryIndexResponse.ModelIndex
        return triton.RepositoryIndexResponse(models=[
            index(name=e.name, version=e.version, state=e.state, reason=e.reason)
            for e in self.plane.control.index() if not request.ready or e.state == "READY"])

    async def RepositoryModelLoad(self, request, context) -> triton.TritonRepositoryModelLoadResponse:
        self._check_key(context)
        await self.plane.control.load(request.model_name)
        return triton.TritonRepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context
                                    ) -> triton.TritonRepositoryModelUnloadResponse:
        self._check_key(context)
        await self.plane.control.unload(request.model_name)
        return triton.TritonRepositoryModelUnloadResponse()

    async def ModelInfer(self, request: pb.ModelInferRequest, context, record: RequestRecord
                         ) -> pb.ModelInferResponse:
        record.model = request.model_name
        self._check_key(context)
        call = GrpcCall(request, context, record)
        try:
            with self.plane.budget.account() as account:
                record.memory = account
                account.reserve(request.ByteSize())  # grpc.aio holds the message already
                answer = await self.plane.lifecycle.answer(call, request.model_name, self.adapter,
                                                           request.model_version or None)
                account.hold_answer(answer.ByteSize())  # MemoryExhausted 503, as on HTTP
                return answer
        finally:
            if record.timings:
                context.set_trailing_metadata((("server-timing", server_timing(record.server_timings())),
                                               ("x-request-id", record.request_id)))

    def _check_key(self, context: aio.ServicerContext) -> None:
        check_api_key(self.plane.settings.api_key, dict(context.invocation_metadata() or ()))

    def _served(self, name: str, version: str):
        return self.plane.engine.model(name, version or None)

    # Around every RPC: the record, the error's status, the log line and the metrics ---------
    def handler(self, method: str) -> Callable[[Any, aio.ServicerContext], Awaitable[Any]]:
        rpc = getattr(self, method)
        takes_record = method == "ModelInfer"

        async def handle(request: Any, context: aio.ServicerContext) -> Any:
            record = RequestRecord(_request_id(context))
            failure = None  # the error's gRPC status, HTTP status and code, for the trace
            attached = None
            self.plane.metrics.in_flight.inc()
            try:
                attached = await self._continue_trace(method, context, record)
                answer = await (rpc(request, context, record) if takes_record else rpc(request, context))
                record.status = 200
                return answer
            except ServiceError as exc:
                failure = grpc_status(exc)
                await self._abort(context, record, exc.message, failure)
            except asyncio.CancelledError:  # the client cancelled, or its deadline passed
                left = context.time_remaining()
                gone = ClientClosedRequest() if left is None or left > 0 else \
                    RequestTimedOut(record.model or "", 0)
                failure = grpc_status(gone)
                record.status = failure[1]
                raise
            finally:
                if attached is not None:
                    otel_context.detach(attached)
                self.plane.metrics.in_flight.dec()
                self._record(method, record, failure)
        return handle

    async def _continue_trace(self, method: str, context: aio.ServicerContext, record: RequestRecord
                              ) -> Token[Context] | None:
        """While tracing is on, the RPC's server span, a child of the `traceparent` in its metadata
        when it has one, made current (batches link to it) and named to the client in the initial
        metadata's `traceresponse`, as HTTP's header does; the token to detach it with."""
        tracing = self.plane.tracing
        if not tracing.enabled or method in UNTRACED_RPCS:
            return None
        metadata = [(key.encode("latin-1"), value.encode("latin-1"))
                    for key, value in context.invocation_metadata() or () if isinstance(value, str)]
        record.span = tracing.start_server_span(f"{SERVICE}/{method}", metadata, record.started)
        if record.span is None:
            return None
        await context.send_initial_metadata((("traceresponse", traceresponse(record.span).decode()),))
        return otel_context.attach(record.span.current())

    async def _abort(self, context: aio.ServicerContext, record: RequestRecord, message: str,
                     failure: tuple[grpc.StatusCode, int, str]) -> None:
        """End the RPC with the error's gRPC status (`failure`, from grpc_status) and message."""
        status, record.status, code = failure
        context.set_trailing_metadata((("code", code), ("x-request-id", record.request_id)))
        await context.abort(status, message)

    def _record(self, method: str, record: RequestRecord, failure: tuple[grpc.StatusCode, int, str] | None
                ) -> None:
        record.count(self.plane.metrics, self.plane.engine.models, protocol="grpc")
        if record.span is not None:
            status = failure[0] if failure else grpc.StatusCode.OK if record.status == 200 else grpc.StatusCode.UNKNOWN
            record.end_span(self.plane.tracing, {"rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": method,
                                                 "rpc.grpc.status_code": status.value[0], "protocol": "grpc"},
                            failure[2] if failure else None)
        log.info("GRPC /%s/%s request_id=%s%s%s status=%d %s", SERVICE, method, record.request_id,
                 record.logged_trace(),
                 f" model={record.model}" if record.model else "", record.status, record.logged_stages())


METHODS: dict[str, tuple[Any, Any]] = {
    "ServerLive": (pb.ServerLiveRequest, pb.ServerLiveResponse),
    "ServerReady": (pb.ServerReadyRequest, pb.ServerReadyResponse),
    "ModelReady": (pb.ModelReadyRequest, pb.ModelReadyResponse),
    "ServerMetadata": (pb.ServerMetadataRequest, pb.ServerMetadataResponse),
    "ModelMetadata": (pb.ModelMetadataRequest, pb.ModelMetadataResponse),
    "ModelInfer": (pb.ModelInferRequest, pb.ModelInferResponse),
    "ModelConfig": (triton.ModelConfigRequest, triton.ModelConfigResponse),
    "ModelStatistics": (triton.ModelStatisticsRequest, triton.ModelStatisticsResponse),
    "RepositoryIndex": (triton.RepositoryIndexRequest, triton.RepositoryIndexResponse),
    "RepositoryModelLoad": (triton.TritonRepositoryModelLoadRequest,
                            triton.TritonRepositoryModelLoadResponse),
    "RepositoryModelUnload": (triton.TritonRepositoryModelUnloadRequest,
                              triton.TritonRepositoryModelUnloadResponse),
}


def inference_service(servicer: InferenceServicer) -> grpc.GenericRpcHandler:
    """The service's handler: the RPCs of grpc_predict_v2.proto and Triton's extensions, under one
    service name (the generated registration knows only the former, and KServe's shapes of the
    repository RPCs, not Triton's)."""
    return grpc.method_handlers_generic_handler(SERVICE, {
        method: grpc.unary_unary_rpc_method_handler(
            servicer.handler(method), request_deserializer=request.FromString,
            response_serializer=response.SerializeToString)
        for method, (request, response) in METHODS.items()})


def _request_id(context: aio.ServicerContext) -> str:
    given = dict(context.invocation_metadata() or ()).get("x-request-id")
    return request_id(given.encode() if isinstance(given, str) else None)

