"""The Open Inference Protocol (KServe V2) over REST, so tritonclient, KServe and OVMS clients work.

One more thin protocol over the same engine, preprocessing, error table, metrics and limits as
/predict: routes parse the request, call `preprocess.prepare` / `Engine.infer`, shape the response.

Which input a request uses: it carries exactly one input, and its datatype decides.
- FP32: the model's own tensor input, named and shaped as the model repository declares
  (e.g. `input`, [N, 3, 224, 224]), already preprocessed by the client.
- BYTES: N encoded images (JPEG, PNG...), preprocessed exactly as /predict does. Named `image`,
  or the tensor input's own name as OpenVINO Model Server clients send it. In binary form each
  element is a 4-byte little-endian length then the file bytes; in JSON, a base64 string.

Extensions: `binary_tensor_data` (a JSON header of `Inference-Header-Content-Length` bytes, then
each binary input's bytes in order; outputs in binary when asked) and `classification` (output
parameter `classification: k` gives BYTES [N, k] of "score:class_id:label", most probable first;
the score is the probability /predict reports, where Triton puts the raw output value).
Not supported: raw binary requests (`Inference-Header-Content-Length: 0`), compressed bodies.
"""
import asyncio
import base64
import binascii
import math
import struct
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, NonNegativeInt, ValidationError

from service import preprocess
from service.engine import Engine, LoadedModel
from service.errors import InvalidInferenceRequest, UnknownModelVersion, json_error
from service.metrics import server_timing
from service.model_repository import ModelMetadata
from service.postprocess import top_k as best_classes
from service.schemas import ErrorBody

VERSION = "1"  # a repository folder holds one version of its model
PLATFORM = "onnxruntime_onnx"
IMAGE_INPUT = "image"
EXTENSIONS = ["binary_tensor_data", "classification"]
DATATYPES = {"float32": "FP32"}
HEADER_LENGTH = "Inference-Header-Content-Length"
LENGTH_PREFIX = struct.Struct("<I")
ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 404, 413, 503, 504)}


# Wire shapes --------------------------------------------------------------------------------------
class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ServerLive(BaseModel):
    live: bool


class ServerReady(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadataResponse(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class RequestInput(BaseModel):
    name: str
    shape: list[NonNegativeInt]
    datatype: str
    parameters: dict[str, Any] = {}
    data: list[Any] | None = None


class RequestOutput(BaseModel):
    name: str
    parameters: dict[str, Any] = {}


class InferenceRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] = {}
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferenceResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[ResponseOutput]


def _inlined_schema(model: type[BaseModel]) -> dict:
    """The model's JSON schema with its $defs written in place, for an openapi_extra body."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {key: inline(value) for key, value in node.items()}
        return [inline(item) for item in node] if isinstance(node, list) else node

    return inline(schema)


INFER_BODY = {"requestBody": {"required": True, "description": (
    "An InferenceRequest as JSON; with binary tensor data, that JSON (its length in the "
    f"{HEADER_LENGTH} header) followed by each binary input's bytes. Content-Type is not needed."),
    "content": {"application/json": {"schema": _inlined_schema(InferenceRequest)},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}

router = APIRouter(prefix="/v2", tags=["open inference protocol"])


# Routes -------------------------------------------------------------------------------------------
@router.get("", response_model=ServerMetadata)
async def server_metadata(request: Request) -> ServerMetadata:
    return ServerMetadata(name=request.app.title, version=request.app.version, extensions=EXTENSIONS)


@router.get("/health/live", response_model=ServerLive)
async def server_live() -> ServerLive:
    return ServerLive(live=True)


@router.get("/health/ready", response_model=ServerReady, responses={503: {"model": ServerReady}})
async def server_ready(request: Request) -> Response:
    ready = request.app.state.engine.is_ready(request.app.state.settings.strict_readiness) \
        and not request.app.state.draining
    return json_error(200 if ready else 503, ServerReady(ready=ready).model_dump())


@router.get("/models/{model}/ready", response_model=ModelReady, responses=ERRORS)
@router.get("/models/{model}/versions/{version}/ready", response_model=ModelReady, responses=ERRORS)
async def model_ready(model: str, request: Request, version: str | None = None) -> ModelReady:
    _served(request.app.state.engine, model, version)  # 404 unknown, 503 loading or failed
    return ModelReady(name=model, ready=True)


@router.get("/models/{model}", response_model=ModelMetadataResponse, responses=ERRORS)
@router.get("/models/{model}/versions/{version}", response_model=ModelMetadataResponse,
            responses=ERRORS)
async def model_metadata(model: str, request: Request, version: str | None = None
                         ) -> ModelMetadataResponse:
    meta = _served(request.app.state.engine, model, version).folder.metadata
    return ModelMetadataResponse(
        name=model, versions=[VERSION], platform=PLATFORM,
        inputs=[TensorMetadata(name=meta.input.name, datatype=DATATYPES[meta.input.dtype],
                               shape=_wire_shape(meta.input.shape)),
                TensorMetadata(name=IMAGE_INPUT, datatype="BYTES", shape=[-1])],
        outputs=[TensorMetadata(name=meta.output.name, datatype=DATATYPES[meta.output.dtype],
                                shape=_wire_shape(meta.output.shape))])


@router.post("/models/{model}/infer", openapi_extra=INFER_BODY,
             responses={200: {"model": InferenceResponse}, **ERRORS})
@router.post("/models/{model}/versions/{version}/infer", openapi_extra=INFER_BODY,
             responses={200: {"model": InferenceResponse}, **ERRORS})
async def infer(model: str, request: Request, version: str | None = None) -> Response:
    started = time.perf_counter()
    engine: Engine = request.app.state.engine
    served = _served(engine, model, version)
    meta = served.folder.metadata
    async with request.app.state.admission.admit(model):
        body, binary = _split_body(await request.body(), request.headers.get(HEADER_LENGTH))
        wanted = _wanted_outputs(body, meta)
        tensor, timings = await _input_tensor(request, body, binary, meta)
        inference = await engine.infer(model, tensor)
    outputs, binaries = zip(*(_encode(w, inference.outputs, served) for w in wanted))
    timings.update(queue=inference.queue_ms, inference=inference.inference_ms,
                   total=(time.perf_counter() - started) * 1000)
    request.state.timings = timings
    header = InferenceResponse(model_name=model, model_version=VERSION, id=body.id,
                               outputs=list(outputs)).model_dump_json(exclude_none=True).encode()
    headers = {"Server-Timing": server_timing(timings)}
    if not any(b is not None for b in binaries):
        return Response(header, media_type="application/json", headers=headers)
    headers[HEADER_LENGTH] = str(len(header))
    return Response(header + b"".join(b for b in binaries if b is not None),
                    media_type="application/octet-stream", headers=headers)


# Request decoding ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class WantedOutput:
    name: str
    binary: bool
    classification: int | None  # top-k as "score:class_id:label" instead of the raw tensor


def _served(engine: Engine, model: str, version: str | None) -> LoadedModel:
    served = engine.model(model)
    if version is not None and version != VERSION:
        raise UnknownModelVersion(model, version, [VERSION])
    return served


def _wire_shape(shape: list[int | None]) -> list[int]:
    return [-1 if d is None else d for d in shape]


def _split_body(body: bytes, header_length: str | None) -> tuple[InferenceRequest, bytes]:
    """The JSON header parsed, and the binary tensor data after it."""
    json_part, binary = body, b""
    if header_length is not None:
        try:
            length = int(header_length)
        except ValueError:
            raise InvalidInferenceRequest(f"{HEADER_LENGTH} {header_length!r} is not a number") from None
        if length == 0:
            raise InvalidInferenceRequest(f"raw binary requests ({HEADER_LENGTH}: 0) are not "
                                          "supported; send the JSON header before the binary data")
        if not 0 < length <= len(body):
            raise InvalidInferenceRequest(f"{HEADER_LENGTH} is {length} but the body has {len(body)} bytes")
        json_part, binary = body[:length], body[length:]
    try:
        return InferenceRequest.model_validate_json(json_part), binary
    except ValidationError as exc:
        raise InvalidInferenceRequest("; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())) from None


def _wanted_outputs(body: InferenceRequest, meta: ModelMetadata) -> list[WantedOutput]:
    all_binary = body.parameters.get("binary_data_output") is True
    if not body.outputs:  # none named: every output
        return [WantedOutput(meta.output.name, all_binary, None)]
    wanted = []
    for output in body.outputs:
        if output.name != meta.output.name:
            raise InvalidInferenceRequest(f"unknown output {output.name!r}; the model's output is "
                                          f"{meta.output.name!r}")
        k = output.parameters.get("classification")
        if k is not None and (type(k) is not int or not 1 <= k <= meta.labels.count):
            raise InvalidInferenceRequest(f"classification must be a whole number from 1 to "
                                          f"{meta.labels.count} (the model's class count), got {k!r}")
        wanted.append(WantedOutput(output.name, output.parameters.get("binary_data", all_binary) is True, k))
    return wanted


async def _input_tensor(request: Request, body: InferenceRequest, binary: bytes,
                        meta: ModelMetadata) -> tuple[np.ndarray, dict[str, float]]:
    """The model's input batch, and the decode/preprocess times (ms) when images were sent."""
    if len(body.inputs) != 1:
        raise InvalidInferenceRequest(
            f"send exactly one input: {meta.input.name!r} (FP32 {_wire_shape(meta.input.shape)}) "
            f"or {IMAGE_INPUT!r} (BYTES [N], encoded images); got {len(body.inputs)}")
    given = body.inputs[0]
    size = given.parameters.get("binary_data_size")
    if size is None and binary:
        raise InvalidInferenceRequest(f"{len(binary)} bytes follow the JSON header but input "
                                      f"{given.name!r} has no binary_data_size")
    if size is not None and size != len(binary):
        raise InvalidInferenceRequest(f"input {given.name!r} says binary_data_size {size} but "
                                      f"{len(binary)} bytes follow the JSON header")
    if size is None and given.data is None:
        raise InvalidInferenceRequest(f"input {given.name!r} has neither data nor binary_data_size")
    raw = binary if size is not None else None
    if given.datatype == "BYTES":
        images = _encoded_images(given, raw, meta)
        settings = request.app.state.settings
        tensor, decode_ms, preprocess_ms = await asyncio.get_running_loop().run_in_executor(
            request.app.state.preprocess_pool, _prepare_images, images, meta.preprocessing,
            settings.max_image_pixels)
        return tensor, {"decode": decode_ms, "preprocess": preprocess_ms}
    return _tensor(given, raw, meta), {}


def _tensor(given: RequestInput, raw: bytes | None, meta: ModelMetadata) -> np.ndarray:
    declared = meta.input.shape
    datatype = DATATYPES[meta.input.dtype]
    if given.name != meta.input.name or given.datatype != datatype:
        raise InvalidInferenceRequest(
            f"input {given.name!r} {given.datatype}: the model takes {meta.input.name!r} "
            f"{datatype} {_wire_shape(declared)} or {IMAGE_INPUT!r} BYTES [N]")
    if len(given.shape) != len(declared) or given.shape[0] < 1 or any(
            d is not None and d != s for d, s in zip(declared, given.shape)):
        raise InvalidInferenceRequest(f"input {given.name!r} has shape {given.shape}; the model "
                                      f"takes {_wire_shape(declared)} (-1: any batch size from 1)")
    count = math.prod(given.shape)
    if raw is not None:
        if len(raw) != count * 4:
            raise InvalidInferenceRequest(f"input {given.name!r} of shape {given.shape} needs "
                                          f"{count * 4} bytes of FP32, got {len(raw)}")
        return np.frombuffer(raw, dtype="<f4").reshape(given.shape)
    try:
        array = np.asarray(given.data, dtype=np.float32)
    except (ValueError, TypeError):
        raise InvalidInferenceRequest(f"data of input {given.name!r} is not a (nested) list of "
                                      "numbers") from None
    if array.size != count:
        raise InvalidInferenceRequest(f"input {given.name!r} of shape {given.shape} needs {count} "
                                      f"numbers, got {array.size}")
    return array.reshape(given.shape)


def _encoded_images(given: RequestInput, raw: bytes | None, meta: ModelMetadata) -> list[bytes]:
    if given.name not in (IMAGE_INPUT, meta.input.name):
        raise InvalidInferenceRequest(f"BYTES input {given.name!r}: encoded images go in "
                                      f"{IMAGE_INPUT!r} (or {meta.input.name!r})")
    if len(given.shape) != 1 or given.shape[0] < 1:
        raise InvalidInferenceRequest(f"input {given.name!r} has shape {given.shape}; encoded "
                                      "images take shape [N], N >= 1")
    images = _length_prefixed(raw) if raw is not None else [_base64(item) for item in given.data]
    if len(images) != given.shape[0]:
        raise InvalidInferenceRequest(f"input {given.name!r} has shape {given.shape} but holds "
                                      f"{len(images)} images")
    return images


def _length_prefixed(raw: bytes) -> list[bytes]:
    """BYTES elements as the binary extension lays them out: 4-byte LE length, then the bytes."""
    elements, offset = [], 0
    while offset < len(raw):
        if offset + LENGTH_PREFIX.size > len(raw):
            raise InvalidInferenceRequest("BYTES data ends inside an element's 4-byte length")
        (length,) = LENGTH_PREFIX.unpack_from(raw, offset)
        offset += LENGTH_PREFIX.size
        if offset + length > len(raw):
            raise InvalidInferenceRequest(f"a BYTES element says {length} bytes but only "
                                          f"{len(raw) - offset} remain")
        elements.append(raw[offset:offset + length])
        offset += length
    return elements


def _base64(item: Any) -> bytes:
    try:
        return base64.b64decode(item, validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise InvalidInferenceRequest("BYTES data in JSON must be base64 strings of the image "
                                      "files") from None


def _prepare_images(images: list[bytes], preprocessing: preprocess.Preprocessing, max_pixels: int
                    ) -> tuple[np.ndarray, float, float]:
    """One batch from N encoded images, with the decode and preprocess times summed (ms)."""
    tensors, decode_ms, preprocess_ms = [], 0.0, 0.0
    for data in images:
        _, tensor, decoded_in, preprocessed_in = preprocess.prepare(data, preprocessing, max_pixels)
        tensors.append(tensor)
        decode_ms += decoded_in
        preprocess_ms += preprocessed_in
    return np.concatenate(tensors), decode_ms, preprocess_ms


# Response encoding --------------------------------------------------------------------------------
def _encode(wanted: WantedOutput, scores: np.ndarray, served: LoadedModel
            ) -> tuple[ResponseOutput, bytes | None]:
    """One output in JSON or binary form: the raw tensor, or its top-k classification strings."""
    if wanted.classification:
        kind, labels = served.folder.metadata.output.kind, served.folder.labels
        rows = [[f"{p}:{i}:{labels[i]}".encode() for i, p in best_classes(row, kind, wanted.classification)]
                for row in scores]
        shape, datatype = [len(rows), wanted.classification], "BYTES"
        elements = [s for row in rows for s in row]
        raw = b"".join(LENGTH_PREFIX.pack(len(s)) + s for s in elements) if wanted.binary else b""
        data = [s.decode() for s in elements]
    else:
        shape, datatype = list(scores.shape), DATATYPES[served.folder.metadata.output.dtype]
        raw = np.ascontiguousarray(scores, dtype="<f4").tobytes() if wanted.binary else b""
        data = scores.ravel().tolist()
    if wanted.binary:
        return ResponseOutput(name=wanted.name, shape=shape, datatype=datatype,
                              parameters={"binary_data_size": len(raw)}), raw
    return ResponseOutput(name=wanted.name, shape=shape, datatype=datatype, data=data), None
