"""The Open Inference Protocol (KServe V2) over REST, so tritonclient, KServe and OVMS clients work.

Extensions: `binary_tensor_data` (a JSON header of `Inference-Header-Content-Length` bytes, then
each binary input's bytes in order; outputs in binary when asked) and `classification` (output
parameter `classification: k` gives BYTES [N, k] of "score:class_id:label", most probable first;
the score is the probability /predict reports, where Triton puts the raw output value).
Not supported: raw binary requests (`Inference-Header-Content-Length: 0`), compressed bodies.
"""
import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request, Response
from starlette.types import Receive, Scope, Send

from service.auth import INFERENCE_DEPENDENCIES
from service.dataplane import data_plane
from service.engine import ServedModel
from service.error_responses import ErrorBody, json_response
from service.lifecycle import Inputs, Result
from service.protocols.open_inference.codec import (
    DATATYPES,
    EXTENSIONS,
    HEADER_LENGTH,
    IMAGE_INPUT,
    PLATFORM,
    DecodedRequest,
    answer_bytes,
    decode_request,
    encode_output,
    wire_shape,
)
from service.protocols.open_inference.wire import (
    InferenceRequest,
    InferenceResponse,
    ModelMetadataResponse,
    ModelReady,
    ServerLive,
    ServerMetadata,
    ServerReady,
    TensorMetadata,
    inlined_schema,
)

ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorBody} for code in (400, 401, 404, 413, 503, 504)}
# An answer of more values than this is encoded in a worker thread, not on the event loop, where
# health checks and every other request would wait for it. A classification string costs several
# numbers' work, so it counts as STRING_VALUES values.
LARGE_ANSWER_VALUES = 4096
STRING_VALUES = 8
INFER_BODY = {"requestBody": {"required": True, "description": (
    "An InferenceRequest as JSON; with binary tensor data, that JSON (its length in the "
    f"{HEADER_LENGTH} header) followed by each binary input's bytes. Content-Type is not needed."),
    "content": {"application/json": {"schema": inlined_schema(InferenceRequest)},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}


class EncodedInThread(Response):
    """An answer whose body is built in a worker thread when it is sent. Headers set on it before
    then (Server-Timing) are carried over to the built answer."""

    def __init__(self, build: Callable[[], Response]) -> None:
        super().__init__()
        self.build = build

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await asyncio.to_thread(self.build)
        for name, value in self.headers.items():
            if name != "content-length":
                response.headers[name] = value
        await response(scope, receive, send)


@dataclass(frozen=True)
class OpenInferenceAdapter:
    max_json_values: int
    max_images: int
    parses_body = True

    async def read(self, request: Request) -> tuple[bytes, str | None]:
        return await request.body(), request.headers.get(HEADER_LENGTH)

    def decode(self, payload: tuple[bytes, str | None], model: ServedModel) -> Inputs:
        decoded = decode_request(*payload, model.metadata, self.max_json_values, self.max_images)
        return Inputs(files=decoded.images, tensor=decoded.tensor, options=decoded)

    def answer_bytes(self, inputs: Inputs, model: ServedModel) -> int:
        return answer_bytes(inputs.options, inputs.count, model.metadata, model.longest_label_bytes)

    def encode(self, result: Result) -> Response:
        rows, classes = result.outputs.shape
        values = sum(rows * w.classification * STRING_VALUES if w.classification else rows * classes
                     for w in result.options.wanted)
        if values > LARGE_ANSWER_VALUES:
            return EncodedInThread(lambda: self.encoded(result))
        return self.encoded(result)

    def encoded(self, result: Result) -> Response:
        decoded: DecodedRequest = result.options
        model = result.model
        outputs, binaries = zip(*(encode_output(w, result.outputs, model.metadata, model.labels)
                                  for w in decoded.wanted), strict=True)  # each is an (output, binary) pair
        header = InferenceResponse(model_name=model.name, model_version=model.version, id=decoded.body.id,
                                   outputs=list(outputs)).model_dump_json(exclude_none=True).encode()
        if not any(b is not None for b in binaries):
            return Response(header, media_type="application/json")
        return Response(header + b"".join(b for b in binaries if b is not None),
                        media_type="application/octet-stream",
                        headers={HEADER_LENGTH: str(len(header))})


router = APIRouter(prefix="/v2", tags=["open inference protocol"])
inference_router = APIRouter(prefix="/v2", tags=["open inference protocol"],
                             dependencies=INFERENCE_DEPENDENCIES)


@router.get("", response_model=ServerMetadata)
async def server_metadata(request: Request) -> ServerMetadata:
    return ServerMetadata(name=request.app.title, version=request.app.version, extensions=EXTENSIONS)


@router.get("/health/live", response_model=ServerLive)
@router.head("/health/live", include_in_schema=False)
async def server_live() -> ServerLive:
    return ServerLive(live=True)


@router.get("/health/ready", response_model=ServerReady, responses={503: {"model": ServerReady}})
@router.head("/health/ready", include_in_schema=False)
async def server_ready(request: Request) -> Response:
    ready = data_plane(request).ready()
    return json_response(200 if ready else 503, ServerReady(ready=ready).model_dump())


@router.get("/models/{model}/ready", response_model=ModelReady, responses=ERRORS)
@router.get("/models/{model}/versions/{version}/ready", response_model=ModelReady, responses=ERRORS)
async def model_ready(model: str, request: Request, version: str | None = None) -> ModelReady:
    if not data_plane(request).engine.serves(model, version):
        _served(request, model, version)  # why not: 404 unknown, 503 not loaded, loading or failed
    return ModelReady(name=model, ready=True)


@router.get("/models/{model}", response_model=ModelMetadataResponse, responses=ERRORS)
@router.get("/models/{model}/versions/{version}", response_model=ModelMetadataResponse,
            responses=ERRORS)
async def model_metadata(model: str, request: Request, version: str | None = None
                         ) -> ModelMetadataResponse:
    meta = _served(request, model, version).metadata
    versions = [v for v, state in data_plane(request).engine.versions[model].items() if state.served]
    return ModelMetadataResponse(
        name=model, versions=versions, platform=PLATFORM,
        inputs=[TensorMetadata(name=meta.input.name, datatype=DATATYPES[meta.input.dtype],
                               shape=wire_shape(meta.input.shape)),
                TensorMetadata(name=IMAGE_INPUT, datatype="BYTES", shape=[-1])],
        outputs=[TensorMetadata(name=meta.output.name, datatype=DATATYPES[meta.output.dtype],
                                shape=wire_shape(meta.output.shape))])


@inference_router.post("/models/{model}/infer", openapi_extra=INFER_BODY,
                       responses={200: {"model": InferenceResponse}, **ERRORS})
@inference_router.post("/models/{model}/versions/{version}/infer", openapi_extra=INFER_BODY,
                       responses={200: {"model": InferenceResponse}, **ERRORS})
async def infer(model: str, request: Request, version: str | None = None) -> Response:
    plane = data_plane(request)
    adapter = OpenInferenceAdapter(plane.settings.max_json_values, plane.settings.max_images_per_request)
    return await plane.lifecycle.handle(request, model, adapter, version)


def _served(request: Request, model: str, version: str | None) -> ServedModel:
    return data_plane(request).engine.model(model, version)
