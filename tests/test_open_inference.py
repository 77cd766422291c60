"""A platform team's view: the official tritonclient, unchanged, against a real `python -m service`.

Everything goes through the Open Inference Protocol (KServe V2) routes; /predict is only asked
for the answers the protocol must agree with.
"""
import base64
import json
import statistics
import struct
import time

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from contract import Preprocessing
from service.preprocess import preprocess
from tests.service_fixtures import copy_repository, cpu_seconds, reference_tensor, rss_bytes, running_server

IMAGENET_MODEL = "mobilenetv2"
CIFAR_MODEL = "effnet"
# Photos whose shorter side is below 512, so JPEG draft decoding cannot reduce them and the test's
# own preprocessing (reference_tensor) sees the very pixels the service sees.
UNREDUCED = ("chelsea", "coffee")


@pytest.fixture(scope="module")
def server(served):
    return served()  # every model


@pytest.fixture(scope="module")
def client(server):
    client = triton.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=60)
    yield client
    client.close()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        yield http


def metadata(model_repository, name: str) -> dict:
    return json.loads((model_repository / name / "metadata.json").read_text())


def onnxruntime_logits(model_repository, name: str, batch: np.ndarray) -> np.ndarray:
    """What onnxruntime itself computes for this batch, without the service."""
    meta = metadata(model_repository, name)
    session = ort.InferenceSession(str(model_repository / name / meta["model_file"]),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {meta["input"]["name"]: batch})[0]


def photo_batch(model_repository, name: str, photos, which) -> np.ndarray:
    preprocessing = metadata(model_repository, name)["preprocessing"]
    return np.concatenate([reference_tensor(Image.open(photos[p]).convert("RGB"), preprocessing)
                           for p in which])


def tensor_input(batch: np.ndarray, binary: bool, datatype: str = "FP32") -> triton.InferInput:
    given = triton.InferInput("input", list(batch.shape), datatype)
    given.set_data_from_numpy(batch, binary_data=binary)
    return given


def image_input(*files: bytes, name: str = "image") -> triton.InferInput:
    given = triton.InferInput(name, [len(files)], "BYTES")
    given.set_data_from_numpy(np.array(files, dtype=object))  # 4-byte LE length + bytes each
    return given


def top5(result: triton.InferResult) -> list[list[tuple[float, int, str]]]:
    rows = result.as_numpy("logits")  # bytes when sent binary, str when sent as JSON
    return [[(float(s), int(i), label) for s, i, label in
             ((e.decode() if isinstance(e, bytes) else e).split(":", 2) for e in row)]
            for row in rows]


def predict_top5(http, name: str, image: bytes) -> list[tuple[float, int, str]]:
    response = http.put(f"/predict/{name}", content=image)
    assert response.status_code == 200, response.text
    return [(p["probability"], p["class_id"], p["label"]) for p in response.json()["predictions"]]


def with_binary(header: dict, binary: bytes) -> tuple[bytes, dict[str, str]]:
    """A body in the binary tensor extension's layout, and the header that says where JSON ends."""
    text = json.dumps(header).encode()
    return text + binary, {"Inference-Header-Content-Length": str(len(text))}


def metric_samples(http) -> dict[tuple, float]:
    """Each series' value by name and labels, summed over the protocols that answered it."""
    values: dict[tuple, float] = {}
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for s in family.samples:
            key = (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "protocol")))
            values[key] = values.get(key, 0) + s.value
    return values


# Health and metadata ------------------------------------------------------------------------------
def test_the_client_sees_a_live_ready_server_that_speaks_binary_tensors_and_classification(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(IMAGENET_MODEL) and client.is_model_ready(IMAGENET_MODEL, "1")
    assert not client.is_model_ready("resnet50") and not client.is_model_ready(IMAGENET_MODEL, "2")
    server = client.get_server_metadata()
    assert server["name"] == "cnn-serve"
    assert {"binary_tensor_data", "classification"} <= set(server["extensions"])


def test_a_repository_with_a_broken_model_is_live_but_not_ready(model_repository, tmp_path):
    repository = copy_repository(model_repository, tmp_path / "repository")
    tampered = repository / "shufflenetv1" / "model.onnx"
    data = bytearray(tampered.read_bytes())
    data[len(data) // 2] ^= 0xFF  # the recorded sha256 no longer matches: the model fails to load
    tampered.write_bytes(bytes(data))
    with running_server(repository, tmp_path / "service.log") as server:
        server.wait_loaded()
        client = triton.InferenceServerClient(server.url.removeprefix("http://"))
        try:
            assert client.is_server_live()
            assert not client.is_server_ready()  # strict readiness: one model failed
            assert not client.is_model_ready("shufflenetv1")
            assert client.is_model_ready("shufflenetv2")
            with pytest.raises(InferenceServerException, match=r"failed to load: .*model.onnx sha256") as error:
                client.get_model_metadata("shufflenetv1")
            assert error.value.status() == "503"
        finally:
            client.close()


def test_model_metadata_declares_the_repositorys_tensors_and_the_image_input(client, model_repository):
    for name in (IMAGENET_MODEL, CIFAR_MODEL):
        meta = metadata(model_repository, name)
        for version in ("", "1"):
            assert client.get_model_metadata(name, version) == {
                "name": name, "versions": ["1"], "platform": "onnxruntime_onnx",
                "inputs": [{"name": meta["input"]["name"], "datatype": "FP32",
                            "shape": [-1 if d is None else d for d in meta["input"]["shape"]]},
                           {"name": "image", "datatype": "BYTES", "shape": [-1]}],
                "outputs": [{"name": meta["output"]["name"], "datatype": "FP32",
                             "shape": [-1, meta["labels"]["count"]]}]}


# Inference on tensors ------------------------------------------------------------------------------
@pytest.mark.parametrize("binary_in, binary_out", [(True, True), (False, False), (True, False),
                                                   (False, True)])
def test_a_batch_of_tensors_gets_the_logits_onnxruntime_computes(client, model_repository, photos,
                                                                 binary_in, binary_out):
    batch = photo_batch(model_repository, IMAGENET_MODEL, photos, UNREDUCED)
    result = client.infer(IMAGENET_MODEL, [tensor_input(batch, binary_in)], request_id="42",
                          outputs=[triton.InferRequestedOutput("logits", binary_data=binary_out)])
    response = result.get_response()
    assert response["model_name"] == IMAGENET_MODEL and response["model_version"] == "1"
    assert response["id"] == "42"
    assert ("binary_data_size" in response["outputs"][0].get("parameters", {})) == binary_out
    logits = result.as_numpy("logits")
    assert logits.shape == (2, 1000) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, onnxruntime_logits(model_repository, IMAGENET_MODEL, batch),
                               rtol=1e-5, atol=1e-5)


def test_without_requested_outputs_every_output_comes_back_binary(client, model_repository, photos):
    batch = photo_batch(model_repository, CIFAR_MODEL, photos, ["chelsea"])
    result = client.infer(CIFAR_MODEL, [tensor_input(batch, True)], model_version="1")
    assert result.get_response()["outputs"][0]["parameters"] == {"binary_data_size": 10 * 4}
    np.testing.assert_allclose(result.as_numpy("logits"),
                               onnxruntime_logits(model_repository, CIFAR_MODEL, batch), rtol=1e-5,
                               atol=1e-5)


def test_an_empty_outputs_list_means_every_output_as_json(http, model_repository, photos):
    batch = photo_batch(model_repository, CIFAR_MODEL, photos, ["coffee"])
    response = http.post(f"/v2/models/{CIFAR_MODEL}/infer", json={
        "inputs": [{"name": "input", "shape": list(batch.shape), "datatype": "FP32",
                    "data": batch.tolist()}], "outputs": []})  # nested data, as the spec allows
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    [output] = response.json()["outputs"]
    assert (output["name"], output["shape"], output["datatype"]) == ("logits", [1, 10], "FP32")
    np.testing.assert_allclose(output["data"], onnxruntime_logits(model_repository, CIFAR_MODEL,
                                                                  batch).ravel(), rtol=1e-5, atol=1e-5)


def test_the_binary_extension_works_over_raw_http_without_a_content_type(http, model_repository,
                                                                         photos):
    batch = photo_batch(model_repository, IMAGENET_MODEL, photos, ["coffee"])
    header = json.dumps({"inputs": [{"name": "input", "shape": list(batch.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": batch.nbytes}}],
                         "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}).encode()
    request = http.build_request("POST", f"/v2/models/{IMAGENET_MODEL}/infer",
                                 content=header + batch.astype("<f4").tobytes(),
                                 headers={"Inference-Header-Content-Length": str(len(header))})
    assert "content-type" not in request.headers
    response = http.send(request)
    assert response.status_code == 200, response.text
    length = int(response.headers["Inference-Header-Content-Length"])
    body = json.loads(response.content[:length])
    assert body["outputs"] == [{"name": "logits", "shape": [1, 1000], "datatype": "FP32",
                                "parameters": {"binary_data_size": 4000}}]
    logits = np.frombuffer(response.content[length:], dtype="<f4").reshape(1, 1000)
    np.testing.assert_allclose(logits, onnxruntime_logits(model_repository, IMAGENET_MODEL, batch),
                               rtol=1e-5, atol=1e-5)


# Inference on encoded images -----------------------------------------------------------------------
@pytest.mark.parametrize("name", [IMAGENET_MODEL, CIFAR_MODEL])
def test_classification_top5_of_a_jpeg_equals_predicts_top5(client, http, photos, name):
    for photo in ("chelsea", "astronaut", "rocket"):
        jpeg = photos[photo].read_bytes()
        result = client.infer(name, [image_input(jpeg)],
                              outputs=[triton.InferRequestedOutput("logits", class_count=5)])
        assert result.get_response()["outputs"][0]["shape"] == [1, 5]
        assert top5(result) == [predict_top5(http, name, jpeg)], (name, photo)


def test_several_images_in_one_request_each_get_their_own_answer(client, http, photos):
    files = [photos[p].read_bytes() for p in ("rocket", "chelsea", "motorcycle")]
    result = client.infer(IMAGENET_MODEL, [image_input(*files)],
                          outputs=[triton.InferRequestedOutput("logits", binary_data=False,
                                                               class_count=5)])
    assert top5(result) == [predict_top5(http, IMAGENET_MODEL, f) for f in files]


def test_jpeg_bytes_get_the_same_logits_as_the_preprocessed_tensor(client, model_repository, photos):
    files = [photos[p].read_bytes() for p in UNREDUCED]
    by_image = client.infer(IMAGENET_MODEL, [image_input(*files)]).as_numpy("logits")
    # The service's own preprocessing, whose fidelity test_preprocess_images checks.
    spec = Preprocessing(**metadata(model_repository, IMAGENET_MODEL)["preprocessing"])
    batch = np.concatenate([preprocess(f, spec, 10**9) for f in files])
    np.testing.assert_allclose(by_image, onnxruntime_logits(model_repository, IMAGENET_MODEL, batch),
                               rtol=1e-4, atol=1e-4)
    # OpenVINO Model Server clients send the images under the tensor input's own name.
    ovms_style = client.infer(IMAGENET_MODEL, [image_input(*files, name="input")]).as_numpy("logits")
    np.testing.assert_array_equal(ovms_style, by_image)


def test_base64_images_in_json_work_as_kserve_clients_send_them(http, photos):
    jpeg = photos["chelsea"].read_bytes()
    response = http.post(f"/v2/models/{IMAGENET_MODEL}/infer", json={
        "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                    "data": [base64.b64encode(jpeg).decode()]}],
        "outputs": [{"name": "logits", "parameters": {"classification": 5}}]})
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    scores = [tuple(s.split(":", 2)) for s in response.json()["outputs"][0]["data"]]
    assert [(float(s), int(i), label) for s, i, label in scores] == predict_top5(http, IMAGENET_MODEL, jpeg)


# Metrics ------------------------------------------------------------------------------------------
def test_protocol_requests_are_counted_and_timed_like_predict(client, http, model_repository, photos):
    def counts():
        samples = metric_samples(http)
        keys = [("cnn_serve_requests_total", (("model", CIFAR_MODEL), ("status", status)))
                for status in ("200", "400")]
        keys += [("cnn_serve_stage_duration_seconds_count", (("model", CIFAR_MODEL), ("stage", stage)))
                 for stage in ("decode", "preprocess", "queue", "inference", "total")]
        return [samples.get(key, 0) for key in keys]

    batch = photo_batch(model_repository, CIFAR_MODEL, photos, ["chelsea"])
    before = counts()
    client.infer(CIFAR_MODEL, [image_input(photos["rocket"].read_bytes())])
    client.infer(CIFAR_MODEL, [tensor_input(batch, True)], model_version="1")
    with pytest.raises(InferenceServerException):
        client.infer(CIFAR_MODEL, [tensor_input(batch[:, :, :16], True)])
    after = counts()
    # ok, refused, then decode and preprocess only for the image; queue, inference, total for both
    assert [a - b for a, b in zip(after, before, strict=True)] == [2, 1, 1, 1, 2, 2, 2]


# Errors -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("call, status, message", [
    (lambda c, b: c.infer("resnet50", [tensor_input(b, True)]),
     "404", "unknown model 'resnet50'; valid names: effnet, "),
    (lambda c, b: c.infer(IMAGENET_MODEL, [tensor_input(b, True)], model_version="7"),
     "404", "model 'mobilenetv2' has no version '7'; versions: 1"),
    (lambda c, b: c.infer(IMAGENET_MODEL, [tensor_input(b[:, :, :100], True)]),
     "400", "invalid inference request: input 'input' has shape [1, 3, 100, 224]; the model takes "
            "[-1, 3, 224, 224]"),
    (lambda c, b: c.infer(IMAGENET_MODEL, [tensor_input(b.astype(np.float64), True, "FP64")]),
     "400", "invalid inference request: input 'input' FP64: the model takes 'input' FP32"),
    (lambda c, b: c.infer(IMAGENET_MODEL, [image_input(b"GIF89a but not really")]),
     "400", "could not decode image: not an image format Pillow recognises"),
    (lambda c, b: c.infer(IMAGENET_MODEL, [tensor_input(b, True)],
                          outputs=[triton.InferRequestedOutput("probabilities")]),
     "400", "invalid inference request: unknown output 'probabilities'; the model's output is 'logits'"),
    (lambda c, b: c.infer(IMAGENET_MODEL, [tensor_input(b, True)],
                          outputs=[triton.InferRequestedOutput("logits", class_count=1001)]),
     "400", "invalid inference request: classification must be a whole number from 1 to 1000"),
    (lambda c, b: c.get_model_metadata("resnet50"), "404", "unknown model 'resnet50'"),
])
def test_a_mistake_reaches_the_client_as_a_readable_exception(client, model_repository, photos,
                                                              call, status, message):
    batch = photo_batch(model_repository, IMAGENET_MODEL, photos, ["chelsea"])
    with pytest.raises(InferenceServerException) as error:
        call(client, batch)
    assert error.value.status() == status
    assert error.value.message().startswith(message), error.value.message()


@pytest.mark.parametrize("content, headers, message", [
    (b"", {}, "invalid inference request: body: Invalid JSON"),
    (b"{\"inputs\": 3}", {}, "invalid inference request: inputs: Input should be a valid"),
    (b"{}", {"Inference-Header-Content-Length": "0"}, "invalid inference request: raw binary requests"),
    (b"{}", {"Inference-Header-Content-Length": "99"},
     "invalid inference request: Inference-Header-Content-Length is 99 but the body has 2 bytes"),
    (*with_binary({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                               "parameters": {"binary_data_size": 8}}]}, struct.pack("<I", 100) + b"abcd"),
     "invalid inference request: a BYTES element says 100 bytes but only 4 remain"),
    (json.dumps({"inputs": [{"name": "input", "shape": [1, 3, 224, 224], "datatype": "FP32",
                             "data": [1.0, 2.0]}]}).encode(), {},
     "invalid inference request: input 'input' of shape [1, 3, 224, 224] needs 150528 numbers, got 2"),
])
def test_a_malformed_body_is_a_400_saying_what_is_wrong(http, content, headers, message):
    response = http.post(f"/v2/models/{IMAGENET_MODEL}/infer", content=content, headers=headers)
    assert response.status_code == 400
    assert response.json()["error"].startswith(message), response.json()


def test_a_wrong_method_on_infer_is_a_json_405(http):
    response = http.get(f"/v2/models/{IMAGENET_MODEL}/infer")
    assert response.status_code == 405
    body = response.json()
    assert body["code"] == "method_not_allowed" and "allowed: POST" in body["error"]


# Latency, printed ---------------------------------------------------------------------------------
def test_print_latency_of_an_image_through_the_protocol_and_through_predict(client, http, photos):
    jpeg = photos["chelsea"].read_bytes()
    requested = [triton.InferRequestedOutput("logits", class_count=5)]

    def median_ms(send, runs: int = 30) -> float:
        send()  # warm the path once
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            send()
            times.append((time.perf_counter() - started) * 1000)
        return statistics.median(times)

    oip = median_ms(lambda: client.infer(IMAGENET_MODEL, [image_input(jpeg)], outputs=requested))
    predict = median_ms(lambda: http.put(f"/predict/{IMAGENET_MODEL}", content=jpeg))
    batch = np.zeros((1, 3, 224, 224), np.float32)
    tensor = median_ms(lambda: client.infer(IMAGENET_MODEL, [tensor_input(batch, True)]))
    print(f"\n{IMAGENET_MODEL}, chelsea.jpg, median of 30 sequential requests: "
          f"OIP infer (BYTES image, top-5) {oip:.1f} ms, /predict {predict:.1f} ms, "
          f"OIP infer (binary FP32 tensor) {tensor:.1f} ms")


def test_an_output_named_5000_times_is_a_400_naming_it_and_costs_no_memory(server, client,
                                                                            model_repository, photos):
    batch = photo_batch(model_repository, IMAGENET_MODEL, photos, ["chelsea"])
    copies = [triton.InferRequestedOutput("logits")] * 5000  # each would be one more 1000-float answer
    before = rss_bytes(server.pid)
    started = time.perf_counter()
    with pytest.raises(InferenceServerException) as error:
        client.infer(IMAGENET_MODEL, [tensor_input(batch, True)], outputs=copies)
    elapsed, growth = time.perf_counter() - started, rss_bytes(server.pid) - before
    print(f"\n5,000 copies of one output: {error.value.status()} after {elapsed * 1000:.0f} ms, "
          f"RSS +{growth / 2**20:.1f} MiB")
    assert error.value.status() == "400"
    assert "'logits' is named more than once" in error.value.message()
    assert growth < 30 * 2**20 and elapsed < 2


def test_a_19_mb_body_of_empty_bytes_elements_costs_no_more_than_its_header(server, http, photos):
    """Millions of 4-byte zero lengths: refused from the shape (or at the first surplus element)
    before they are walked, so the one body parser stays free for every model's requests."""
    data = b"\0\0\0\0" * (19_000_000 // 4)
    answers = []
    cpu_before = cpu_seconds(server.pid)
    for shape in ([len(data) // 4], [1]):
        header = json.dumps({"inputs": [{"name": "image", "shape": shape, "datatype": "BYTES",
                                         "parameters": {"binary_data_size": len(data)}}]}).encode()
        answers.append(http.post(f"/v2/models/{CIFAR_MODEL}/infer", content=header + data,
                                 headers={"Inference-Header-Content-Length": str(len(header))}))
    cpu = cpu_seconds(server.pid) - cpu_before
    print(f"\ntwo 19 MB bodies of empty BYTES elements: {[a.status_code for a in answers]}, "
          f"server CPU {cpu:.2f} s")
    assert [a.json()["code"] for a in answers] == ["too_many_images", "invalid_inference_request"]
    assert cpu < 1.0  # receiving 38 MB; walking the elements took several seconds
