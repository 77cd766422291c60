"""The gRPC adapter in process: ModelInferRequest to the lifecycle's Inputs and back, the status of
every error, and the committed stubs equal to what grpcio-tools generates from the .proto files."""
import filecmp

import numpy as np
import pytest
from grpc import StatusCode

from service.error_responses import ERRORS
from service.errors import InvalidInferenceRequest, JsonTooLarge, TooManyImages, UnknownModel
from service.protocols.grpc import codec
from service.protocols.grpc.generate import PROTOS, ROOT, generate
from service.protocols.grpc.proto.grpc_predict_v2_pb2 import ModelInferRequest
from service.protocols.grpc.status import GRPC_STATUS, grpc_status
from tests.onnx_models import SMALL_CIFAR, classifier_graph, metadata_for


@pytest.fixture(scope="module")
def small_metadata():
    """A small classifier's metadata: input (N, 3, 32, 32) FP32, ten classes."""
    return metadata_for(SMALL_CIFAR, classifier_graph(SMALL_CIFAR).SerializeToString())


def test_every_error_code_has_a_grpc_status():
    assert {code for _, code in ERRORS.values()} <= GRPC_STATUS.keys()
    assert grpc_status(UnknownModel("x", ["a"]))[0] == StatusCode.NOT_FOUND
    assert grpc_status(TooManyImages(17, 16))[0] == StatusCode.RESOURCE_EXHAUSTED


def test_the_committed_stubs_are_what_the_protos_generate(tmp_path):
    generate(tmp_path)
    for proto in PROTOS:
        folder = proto.parent.relative_to(ROOT)
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            name = proto.stem + suffix
            assert filecmp.cmp(tmp_path / folder / name, ROOT / folder / name, shallow=False), name


def bytes_request(*files: bytes, raw: bool = True) -> ModelInferRequest:
    request = ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="image", datatype="BYTES", shape=[len(files)])
    if raw:
        request.raw_input_contents.append(b"".join(len(f).to_bytes(4, "little") + f for f in files))
    else:
        tensor.contents.bytes_contents.extend(files)
    return request


@pytest.mark.parametrize("raw", [True, False])
def test_jpeg_bytes_raw_or_typed_become_the_same_images(small_metadata, raw):
    decoded = codec.decode(bytes_request(b"one", b"two", raw=raw), small_metadata, 1000, 16)
    assert decoded.images == [b"one", b"two"] and decoded.tensor is None


def test_typed_fp32_contents_become_the_tensor_and_are_bounded_like_json(small_metadata):
    shape = [1, *[d for d in small_metadata.input.shape[1:]]]
    values = np.arange(np.prod(shape), dtype=np.float32)
    request = ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name=small_metadata.input.name, datatype="FP32", shape=shape)
    tensor.contents.fp32_contents.extend(values.tolist())
    decoded = codec.decode(request, small_metadata, 10 ** 7, 16)
    np.testing.assert_array_equal(decoded.tensor.ravel(), values)
    with pytest.raises(JsonTooLarge):
        codec.decode(request, small_metadata, 10, 16)


def test_more_images_than_allowed_or_a_bad_shape_is_refused_before_reading(small_metadata):
    with pytest.raises(TooManyImages):
        codec.decode(bytes_request(*[b"x"] * 17), small_metadata, 1000, 16)
    request = bytes_request(b"x")
    request.inputs[0].shape[:] = [-1]
    with pytest.raises(InvalidInferenceRequest):
        codec.decode(request, small_metadata, 1000, 16)
