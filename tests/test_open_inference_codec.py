"""The Open Inference Protocol's codec on its own: a request's bytes to arrays and back, and a clear
`invalid_inference_request` for every way a body can be wrong."""
import asyncio
import base64
import contextlib
import struct
import time
from types import SimpleNamespace

import numpy as np
import pytest

from contract import ModelMetadata
from service.errors import InvalidInferenceRequest, JsonTooLarge, TooManyImages
from service.lifecycle import Result
from service.protocols.open_inference.codec import DecodedRequest, WantedOutput, decode_request, encode_output
from service.protocols.open_inference.routes import OpenInferenceAdapter
from service.protocols.open_inference.wire import InferenceRequest

META = ModelMetadata.model_validate({
    "schema_version": 1, "name": "tiny", "architecture": "test", "model_file": "model.onnx",
    "onnx": {"opset": 18, "size_bytes": 1, "sha256": "0" * 64},
    "input": {"name": "input", "dtype": "float32", "layout": "NCHW", "shape": [None, 3, 2, 2]},
    "output": {"name": "logits", "dtype": "float32", "shape": [None, 3], "kind": "logits"},
    "preprocessing": {"resize": 2, "crop": 2, "mean": [0, 0, 0], "std": [1, 1, 1]},
    "labels": {"file": "labels.txt", "set": "test", "count": 3},
    "weights": {"kind": "random"}})
LABELS = ("cat", "dog", "ship")


def binary_request(header: bytes, data: bytes) -> tuple[bytes, str]:
    return header + data, str(len(header))


def test_fp32_rows_come_in_as_json_or_binary_and_decode_to_the_same_array():
    rows = np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2)
    as_json = b'{"inputs": [{"name": "input", "shape": [2, 3, 2, 2], "datatype": "FP32", "data": %s}]}' \
        % str(rows.ravel().tolist()).encode()
    header = b'{"inputs": [{"name": "input", "shape": [2, 3, 2, 2], "datatype": "FP32", ' \
             b'"parameters": {"binary_data_size": 96}}]}'
    for body, length in ((as_json, None), binary_request(header, rows.tobytes())):
        decoded = decode_request(body, length, META)
        np.testing.assert_array_equal(decoded.tensor, rows)
        assert decoded.images is None


def test_bytes_elements_come_in_length_prefixed_or_base64():
    files = [b"\x89PNG first", b"GIF89a second"]
    data = b"".join(struct.pack("<I", len(f)) + f for f in files)
    header = b'{"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", ' \
             b'"parameters": {"binary_data_size": %d}}]}' % len(data)
    as_json = b'{"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": ["%s", "%s"]}]}' \
        % tuple(base64.b64encode(f) for f in files)
    for body, length in (binary_request(header, data), (as_json, None)):
        assert decode_request(body, length, META).images == files


@pytest.mark.parametrize("body, length, named", [
    (b"not json", None, "body"),
    (b'{"inputs": []}', None, "exactly one input"),
    (b'{"inputs": [{"name": "input", "shape": [1, 3, 2, 2], "datatype": "FP32", "data": [1]}]}', None,
     "needs 12 numbers"),
    (b'{"inputs": [{"name": "input", "shape": [1, 3, 5, 5], "datatype": "FP32", "data": [1]}]}', None,
     "shape [1, 3, 5, 5]"),
    (b'{"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["%%%"]}]}', None, "base64"),
    (b'{"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [""]}]}', None,
     "empty element"),
    (b'{"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": ["QQ=="]}]}', None,
     "holds 1 images"),
    (b'{"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", '
     b'"parameters": {"binary_data_size": 6}}]}\x09\x00\x00\x00ab', "105", "says 9 bytes"),
    (b'{"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["QQ=="]}], '
     b'"outputs": [{"name": "logits", "parameters": {"classification": 4}}]}', None, "from 1 to 3"),
    (b'{"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["QQ=="]}], '
     b'"outputs": [{"name": "logits"}, {"name": "logits"}]}', None, "'logits' is named more than once"),
    (b'{"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", '
     b'"parameters": {"binary_data_size": 10}}]}\x01\x00\x00\x00a\x01\x00\x00\x00b', "106",
     "holds more elements"),
    (b'{"inputs": []}', "0", "raw binary requests"),
    (b'{"inputs": []}', "x", "not a number"),
])
def test_a_malformed_request_is_refused_naming_what_is_wrong(body, length, named):
    with pytest.raises(InvalidInferenceRequest, match=named.replace("[", r"\[").replace("]", r"\]")):
        decode_request(body, length, META)


def test_outputs_go_back_as_json_binary_or_classification_strings():
    scores = np.array([[0.0, 2.0, 1.0]], np.float32)
    as_json, raw = encode_output(WantedOutput("logits", False, None), scores, META, LABELS)
    assert raw is None and as_json.data == [0.0, 2.0, 1.0] and as_json.shape == [1, 3]
    as_binary, raw = encode_output(WantedOutput("logits", True, None), scores, META, LABELS)
    assert np.frombuffer(raw, "<f4").tolist() == [0.0, 2.0, 1.0]
    assert as_binary.parameters == {"binary_data_size": 12}
    classified, _ = encode_output(WantedOutput("logits", False, 2), scores, META, LABELS)
    assert [s.split(":")[1:] for s in classified.data] == [["1", "dog"], ["2", "ship"]]
    assert classified.datatype == "BYTES" and classified.shape == [1, 2]


# NaN and Infinity are not JSON, and an integer past a double's range is refused by the parser,
# which names the column; values that parse but are no finite FP32 number name the input.
@pytest.mark.parametrize("values, named", [
    ("[NaN, 0, 0]", "Invalid JSON"), ("[Infinity, 0, 0]", "Invalid JSON"),
    ("[1" + "0" * 400 + ", 0, 0]", "Invalid JSON"), ("[1e39, 0, 0]", "'input'"),
    ("[null, 0, 0]", "'input'"), ('["1", 0, 0]', "'input'"), ("[true, 0, 0]", "'input'"),
    ("[[1, 2], 0]", "'input'")])
def test_values_that_are_not_finite_fp32_numbers_are_refused(values, named):
    body = (f'{{"inputs": [{{"name": "input", "shape": [1, 3, 1, 1], "datatype": "FP32", '
            f'"data": {values}}}]}}').encode()
    meta = META.model_copy(update={"input": META.input.model_copy(update={"shape": [None, 3, 1, 1]})})
    with pytest.raises(InvalidInferenceRequest, match=named):
        decode_request(body, None, meta)


def test_non_finite_binary_fp32_is_refused_too():
    rows = np.zeros((1, 3, 2, 2), np.float32)
    rows[0, 1, 1, 1] = np.nan
    header = b'{"inputs": [{"name": "input", "shape": [1, 3, 2, 2], "datatype": "FP32", ' \
             b'"parameters": {"binary_data_size": 48}}]}'
    with pytest.raises(InvalidInferenceRequest, match="not finite"):
        decode_request(*binary_request(header, rows.tobytes()), META)


def test_a_json_body_of_more_values_than_allowed_is_refused_before_it_is_parsed():
    body = b'{"inputs": [{"name": "input", "shape": [1, 3, 2, 2], "datatype": "FP32", "data": [%s]}]}' \
        % b",".join([b"0"] * 12)
    assert decode_request(body, None, META, max_json_values=20).tensor.size == 12
    with pytest.raises(JsonTooLarge):
        decode_request(body, None, META, max_json_values=10)


def test_a_body_of_millions_of_empty_bytes_elements_costs_no_more_than_one_image_of_its_size():
    """Parse work is bounded by the shape and the image limit, not by how many elements a body packs."""
    def cpu_to_decode(shape: list[int], data: bytes) -> float:
        header = b'{"inputs": [{"name": "image", "shape": %s, "datatype": "BYTES", ' \
                 b'"parameters": {"binary_data_size": %d}}]}' % (str(shape).encode(), len(data))
        started = time.process_time()
        with contextlib.suppress(InvalidInferenceRequest, TooManyImages):
            decode_request(*binary_request(header, data), META, max_images=16)
        return time.process_time() - started

    empties = b"\0\0\0\0" * 2_500_000
    one_image = struct.pack("<I", len(empties) - 4) + b"\xff" * (len(empties) - 4)
    legitimate = cpu_to_decode([1], one_image)
    for shape in ([2_500_000], [16], [1]):
        with pytest.raises((InvalidInferenceRequest, TooManyImages)):
            decode_request(*binary_request(b'{"inputs": [{"name": "image", "shape": %s, "datatype": '
                                           b'"BYTES", "parameters": {"binary_data_size": %d}}]}'
                                           % (str(shape).encode(), len(empties)), empties), META,
                           max_images=16)
        assert cpu_to_decode(shape, empties) < 5 * legitimate + 0.02, shape


async def loop_stall_while_sent(make_response) -> tuple[bytes, float]:
    """The answer's bytes, and the longest the event loop was held while it was built and sent."""
    body, gaps, done = bytearray(), [], False

    async def send(message: dict) -> None:
        body.extend(message.get("body", b""))

    async def tick() -> None:
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(0)
            gaps.append(time.perf_counter() - last)
            last = time.perf_counter()

    ticker = asyncio.ensure_future(tick())
    await asyncio.sleep(0)
    await make_response()({"type": "http"}, None, send)
    done = True
    await ticker
    return bytes(body), max(gaps)


def test_a_large_answer_is_encoded_off_the_event_loop_and_reads_the_same():
    labels = tuple(f"class {i}" for i in range(1000))
    meta = META.model_copy(update={
        "output": META.output.model_copy(update={"shape": [None, 1000]}),
        "labels": META.labels.model_copy(update={"count": 1000})})
    model = SimpleNamespace(name="tiny", version="1", metadata=meta, labels=labels)
    wanted = [WantedOutput("logits", False, 1000)]  # 64 rows of 1000 strings: tens of ms to encode
    decoded = DecodedRequest(InferenceRequest(inputs=[]), wanted, None, None)
    scores = np.random.default_rng(0).standard_normal((64, 1000)).astype(np.float32)
    result = Result(model, scores, [], {}, decoded)
    adapter = OpenInferenceAdapter(max_json_values=1_000_000, max_images=64)
    inline, inline_stall = asyncio.run(loop_stall_while_sent(lambda: adapter.encoded(result)))
    threaded, threaded_stall = asyncio.run(loop_stall_while_sent(lambda: adapter.encode(result)))
    print(f"\nevent loop held {inline_stall * 1000:.1f} ms encoding on it, "
          f"{threaded_stall * 1000:.1f} ms encoding in a thread")
    assert threaded == inline
    assert threaded_stall < inline_stall / 3
