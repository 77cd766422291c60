"""The Open Inference Protocol's wire format to arrays and back: JSON header, binary tensor data,
length-prefixed or base64 BYTES elements, and the classification extension's strings.

Which input a request uses: it carries exactly one input, and its datatype decides.
- FP32: the model's own tensor input, named and shaped as the model repository declares
  (e.g. `input`, [N, 3, 224, 224]), already preprocessed by the client.
- BYTES: N encoded images (JPEG, PNG...), preprocessed exactly as /predict does. Named `image`,
  or the tensor input's own name as OpenVINO Model Server clients send it. In binary form each
  element is a 4-byte little-endian length then the file bytes; in JSON, a base64 string.
"""
import base64
import binascii
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from pydantic import ValidationError

from contract import ModelMetadata
from service.errors import InvalidInferenceRequest, JsonTooLarge, TooManyImages
from service.postprocess import top_k as best_classes
from service.protocols.open_inference.wire import InferenceRequest, RequestInput, ResponseOutput

IMAGE_INPUT = "image"
PLATFORM = "onnxruntime_onnx"  # how Triton names an ONNX model served by onnxruntime
EXTENSIONS = ["binary_tensor_data", "classification"]
DATATYPES = {"float32": "FP32"}
HEADER_LENGTH = "Inference-Header-Content-Length"
LENGTH_PREFIX = struct.Struct("<I")
# Answer sizes, for holding an answer before it is built: the longest a float prints in JSON
# ("-1.2345678901234567e-05"), and a generous allowance for an answer's header and names.
NUMBER_CHARS = 24
ANSWER_HEADER_BYTES = 1024


@dataclass(frozen=True)
class WantedOutput:
    name: str
    binary: bool
    classification: int | None  # top-k as "score:class_id:label" instead of the raw tensor


@dataclass(frozen=True)
class DecodedRequest:
    body: InferenceRequest
    wanted: list[WantedOutput]
    images: list[bytes] | None   # BYTES input: the encoded image files
    tensor: np.ndarray | None    # FP32 input


def wire_shape(shape: list[int | None]) -> list[int]:
    return [-1 if d is None else d for d in shape]


def decode_request(body: bytes, header_length: str | None, meta: ModelMetadata,
                   max_json_values: int = 1_000_000, max_images: int = 16) -> DecodedRequest:
    """A whole infer request, checked against the model's metadata. The declared batch size is
    checked against `max_images` before the data is read, so no body costs more parse work than
    the limits allow, whatever it holds."""
    request, binary = _split_body(body, header_length, max_json_values)
    return decode_parsed(request, binary, meta, max_images)


def decode_parsed(request: InferenceRequest, binary: bytes, meta: ModelMetadata,
                  max_images: int = 16) -> DecodedRequest:
    """A request whose header is parsed already (from JSON, or from gRPC's protobuf), its binary
    data apart, checked against the model's metadata."""
    wanted = _wanted_outputs(request, meta)
    if len(request.inputs) != 1:
        raise InvalidInferenceRequest(
            f"send exactly one input: {meta.input.name!r} (FP32 {wire_shape(meta.input.shape)}) "
            f"or {IMAGE_INPUT!r} (BYTES [N], encoded images); got {len(request.inputs)}")
    given = request.inputs[0]
    if given.shape and given.shape[0] > max_images:
        raise TooManyImages(given.shape[0], max_images)
    data = _input_data(given, binary)
    if given.datatype == "BYTES":
        return DecodedRequest(request, wanted, _encoded_images(given, data, meta), None)
    return DecodedRequest(request, wanted, None, _tensor(given, data, meta))


def _split_body(body: bytes, header_length: str | None, max_json_values: int
                ) -> tuple[InferenceRequest, bytes]:
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
    # Counted before parsing: a JSON parser holds the GIL through a whole body, about 0.1 s per
    # million numbers, and every number becomes a Python object. Base64 images hold no commas.
    if json_part.count(b",") >= max_json_values:
        raise JsonTooLarge(max_json_values)
    try:
        # orjson first: it parses a body of millions of numbers several times faster than the
        # model's own JSON reader, and the event loop waits for the GIL meanwhile.
        return InferenceRequest.model_validate(orjson.loads(json_part)), binary
    except orjson.JSONDecodeError as exc:
        raise InvalidInferenceRequest(f"body: Invalid JSON: {exc}") from None
    except ValidationError as exc:
        raise InvalidInferenceRequest("; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())) from None


def _wanted_outputs(body: InferenceRequest, meta: ModelMetadata) -> list[WantedOutput]:
    all_binary = body.parameters.get("binary_data_output") is True
    if not body.outputs:  # none named: every output
        return [WantedOutput(meta.output.name, all_binary, None)]
    wanted: list[WantedOutput] = []
    for output in body.outputs:
        if output.name != meta.output.name:
            raise InvalidInferenceRequest(f"unknown output {output.name!r}; the model's output is "
                                          f"{meta.output.name!r}")
        if wanted:  # each copy would be one more answer to build and encode
            raise InvalidInferenceRequest(f"output {output.name!r} is named more than once; name "
                                          "each output once")
        k = output.parameters.get("classification")
        if k is not None and (type(k) is not int or not 1 <= k <= meta.labels.count):
            raise InvalidInferenceRequest(f"classification must be a whole number from 1 to "
                                          f"{meta.labels.count} (the model's class count), got {k!r}")
        wanted.append(WantedOutput(output.name, output.parameters.get("binary_data", all_binary) is True, k))
    return wanted


def _input_data(given: RequestInput, binary: bytes) -> bytes | list[Any]:
    """The input's data: its binary bytes, or its JSON `data` list."""
    size = given.parameters.get("binary_data_size")
    if size is None and binary:
        raise InvalidInferenceRequest(f"{len(binary)} bytes follow the JSON header but input "
                                      f"{given.name!r} has no binary_data_size")
    if size is not None:
        if size != len(binary):
            raise InvalidInferenceRequest(f"input {given.name!r} says binary_data_size {size} but "
                                          f"{len(binary)} bytes follow the JSON header")
        return binary
    if given.data is None:
        raise InvalidInferenceRequest(f"input {given.name!r} has neither data nor binary_data_size")
    return given.data


def _tensor(given: RequestInput, data: bytes | list[Any], meta: ModelMetadata) -> np.ndarray:
    declared = meta.input.shape
    datatype = DATATYPES[meta.input.dtype]
    if given.name != meta.input.name or given.datatype != datatype:
        raise InvalidInferenceRequest(
            f"input {given.name!r} {given.datatype}: the model takes {meta.input.name!r} "
            f"{datatype} {wire_shape(declared)} or {IMAGE_INPUT!r} BYTES [N]")
    if len(given.shape) != len(declared) or given.shape[0] < 1 or any(
            d is not None and d != s for d, s in zip(declared, given.shape, strict=True)):
        raise InvalidInferenceRequest(f"input {given.name!r} has shape {given.shape}; the model "
                                      f"takes {wire_shape(declared)} (-1: any batch size from 1)")
    count = math.prod(given.shape)
    if isinstance(data, list):
        array = _json_numbers(given.name, data)
        if array.size != count:
            raise InvalidInferenceRequest(f"input {given.name!r} of shape {given.shape} needs {count} "
                                          f"numbers, got {array.size}")
    else:
        if len(data) != count * 4:
            raise InvalidInferenceRequest(f"input {given.name!r} of shape {given.shape} needs "
                                          f"{count * 4} bytes of FP32, got {len(data)}")
        array = np.frombuffer(data, dtype="<f4")
    if not np.isfinite(array).all():  # NaN, Infinity, or beyond FP32's range, as 1e39 is
        raise InvalidInferenceRequest(f"input {given.name!r} holds values that are not finite FP32 "
                                      "numbers (NaN, Infinity, null or beyond +-3.4e38)")
    return array.reshape(given.shape)


def _json_numbers(name: str, data: list[Any]) -> np.ndarray:
    """JSON numbers as float32; booleans, strings and nulls are refused, not read as 1, 0 or NaN."""
    try:
        values = np.asarray(data, dtype=object).ravel()
        numbers = set(map(type, values)) <= {int, float}
    except ValueError:  # nesting numpy cannot shape
        numbers = False
    if not numbers:
        raise InvalidInferenceRequest(f"data of input {name!r} is not a (nested) list of "
                                      "numbers")
    with np.errstate(over="ignore"):  # a too large number becomes inf, refused by the caller
        try:
            return values.astype(np.float32)
        except OverflowError:  # an integer with hundreds of digits
            return np.full(values.size, np.inf, np.float32)


def _encoded_images(given: RequestInput, data: bytes | list[Any], meta: ModelMetadata) -> list[bytes]:
    if given.name not in (IMAGE_INPUT, meta.input.name):
        raise InvalidInferenceRequest(f"BYTES input {given.name!r}: encoded images go in "
                                      f"{IMAGE_INPUT!r} (or {meta.input.name!r})")
    if len(given.shape) != 1 or given.shape[0] < 1:
        raise InvalidInferenceRequest(f"input {given.name!r} has shape {given.shape}; encoded "
                                      "images take shape [N], N >= 1")
    count = given.shape[0]
    if isinstance(data, list):
        if len(data) != count:
            raise InvalidInferenceRequest(f"input {given.name!r} has shape {given.shape} but holds "
                                          f"{len(data)} images")
        images = [_base64(item) for item in data]
    else:
        images = _length_prefixed(data, count, given)
    if any(not image for image in images):
        raise InvalidInferenceRequest(f"input {given.name!r} holds an empty element: each element "
                                      "must be one encoded image file")
    return images


def _length_prefixed(raw: bytes, count: int, given: RequestInput) -> list[bytes]:
    """The `count` BYTES elements the shape declares, as the binary extension lays them out: 4-byte
    LE length, then the bytes. Never more are read: a body of millions of empty elements costs
    no more than one of `count` images."""
    elements: list[bytes] = []
    offset = 0
    while offset < len(raw) and len(elements) < count:
        if offset + LENGTH_PREFIX.size > len(raw):
            raise InvalidInferenceRequest("BYTES data ends inside an element's 4-byte length")
        (length,) = LENGTH_PREFIX.unpack_from(raw, offset)
        offset += LENGTH_PREFIX.size
        if offset + length > len(raw):
            raise InvalidInferenceRequest(f"a BYTES element says {length} bytes but only "
                                          f"{len(raw) - offset} remain")
        elements.append(raw[offset:offset + length])
        offset += length
    if offset < len(raw) or len(elements) < count:
        raise InvalidInferenceRequest(f"input {given.name!r} has shape {given.shape} but its BYTES "
                                      f"data holds {'more' if offset < len(raw) else len(elements)} "
                                      "elements")
    return elements


def _base64(item: Any) -> bytes:
    try:
        return base64.b64decode(item, validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise InvalidInferenceRequest("BYTES data in JSON must be base64 strings of the image "
                                      "files") from None


def answer_bytes(decoded: DecodedRequest, rows: int, meta: ModelMetadata, longest_label: int) -> int:
    """The most bytes the answer's outputs take for `rows` images, in JSON or binary as asked,
    plus its header: known before inference, so the answer is held in the memory budget first."""
    classes = meta.labels.count
    total = ANSWER_HEADER_BYTES + len(decoded.body.id or "")
    for wanted in decoded.wanted:
        if wanted.classification:  # "score:class_id:label", length-prefixed or quoted
            element = NUMBER_CHARS + 1 + len(str(classes)) + 1 + longest_label + LENGTH_PREFIX.size
            total += rows * wanted.classification * element
        else:  # FP32: four bytes in binary, a number and its comma in JSON
            total += rows * classes * (4 if wanted.binary else NUMBER_CHARS + 1)
    return total


def encode_output(wanted: WantedOutput, scores: np.ndarray, meta: ModelMetadata,
                  labels: tuple[str, ...]) -> tuple[ResponseOutput, bytes | None]:
    """One output in JSON or binary form: the raw tensor, or its top-k classification strings."""
    if wanted.classification:
        rows = [[f"{p}:{i}:{labels[i]}".encode()
                 for i, p in best_classes(row, meta.output.kind, wanted.classification)]
                for row in scores]
        shape = [len(rows), wanted.classification]
        datatype = "BYTES"
        elements = [s for row in rows for s in row]
        raw = b"".join(LENGTH_PREFIX.pack(len(s)) + s for s in elements) if wanted.binary else b""
        data = [s.decode() for s in elements]
    else:
        shape = list(scores.shape)
        datatype = DATATYPES[meta.output.dtype]
        raw = np.ascontiguousarray(scores, dtype="<f4").tobytes() if wanted.binary else b""
        data = scores.ravel().tolist()
    if wanted.binary:
        return ResponseOutput(name=wanted.name, shape=shape, datatype=datatype,
                              parameters={"binary_data_size": len(raw)}), raw
    return ResponseOutput(name=wanted.name, shape=shape, datatype=datatype, data=data), None
