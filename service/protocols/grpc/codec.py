"""ModelInferRequest to the lifecycle's `Inputs` and the answer to ModelInferResponse, through the
REST codec's own checks (service/protocols/open_inference/codec.py): the message becomes the same
parsed request and binary data that a REST body with binary tensor data becomes, so both protocols
accept and refuse the very same requests. Tensors may come as `raw_input_contents` or typed
`contents` (fp32_contents, bytes_contents); outputs always go back in `raw_output_contents`, as
tritonclient reads them (BYTES: 4-byte little-endian length, then the bytes)."""
from dataclasses import replace

import numpy as np
from pydantic import ValidationError

from contract import ModelMetadata
from service.errors import InvalidInferenceRequest, JsonTooLarge
from service.lifecycle import Inputs, Result
from service.protocols.grpc.proto.grpc_predict_v2_pb2 import (
    InferParameter,
    ModelInferRequest,
    ModelInferResponse,
)
from service.protocols.open_inference.codec import (
    LENGTH_PREFIX,
    DecodedRequest,
    decode_parsed,
    encode_output,
)
from service.protocols.open_inference.wire import InferenceRequest


def parameter(value: InferParameter) -> bool | int | str | None:
    choice = value.WhichOneof("parameter_choice")
    return None if choice is None else getattr(value, choice)


def decode(message: ModelInferRequest, meta: ModelMetadata, max_values: int, max_images: int
           ) -> DecodedRequest:
    """The message checked against the model's metadata, as a REST request would be. Typed FP32
    contents count against `max_values` (MAX_JSON_VALUES) as JSON numbers do: each is a Python
    float on the way to an array."""
    if message.raw_input_contents and len(message.raw_input_contents) != len(message.inputs):
        raise InvalidInferenceRequest(f"{len(message.raw_input_contents)} raw_input_contents for "
                                      f"{len(message.inputs)} inputs; send one per input, in order")
    binary = [_binary(message, i, max_values) for i in range(len(message.inputs))]
    header = {"id": message.id or None,
              "parameters": {**_parameters(message.parameters), "binary_data_output": True},
              "inputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape),
                          "parameters": {**_parameters(t.parameters), "binary_data_size": len(b)}}
                         for t, b in zip(message.inputs, binary, strict=True)],
              "outputs": [{"name": o.name, "parameters": _parameters(o.parameters)}
                          for o in message.outputs] or None}
    try:
        request = InferenceRequest.model_validate(header)
    except ValidationError as exc:
        raise InvalidInferenceRequest("; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())) from None
    decoded = decode_parsed(request, b"".join(binary[:1]), meta, max_images)
    # Every output in raw form, whatever the request's binary_data parameters say.
    return replace(decoded, wanted=[replace(w, binary=True) for w in decoded.wanted])


def encode(result: Result) -> ModelInferResponse:
    decoded: DecodedRequest = result.options
    model = result.model
    answer = ModelInferResponse(model_name=model.name, model_version=model.version,
                                id=decoded.body.id or "")
    for wanted in decoded.wanted:
        output, raw = encode_output(wanted, result.outputs, model.metadata, model.labels)
        answer.outputs.add(name=output.name, datatype=output.datatype, shape=output.shape)
        answer.raw_output_contents.append(raw or b"")
    return answer


def inputs(decoded: DecodedRequest) -> Inputs:
    return Inputs(files=decoded.images, tensor=decoded.tensor, options=decoded)


def _binary(message: ModelInferRequest, index: int, max_values: int) -> bytes:
    """Input `index`'s data as the binary tensor data extension lays it out."""
    if message.raw_input_contents:
        return message.raw_input_contents[index]
    tensor = message.inputs[index]
    contents = tensor.contents
    if tensor.datatype == "BYTES":
        return b"".join(LENGTH_PREFIX.pack(len(e)) + e for e in contents.bytes_contents)
    if len(contents.fp32_contents) >= max_values:
        raise JsonTooLarge(max_values)
    return np.asarray(contents.fp32_contents, dtype="<f4").tobytes()


def _parameters(parameters) -> dict:
    return {name: parameter(value) for name, value in parameters.items()}

