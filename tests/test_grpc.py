"""A Triton user's view over gRPC: the official tritonclient.grpc, unchanged, against a real
`python -m service` on its GRPC_PORT; the answers must equal the REST protocol's and /predict's.

(This module imports tritonclient's own stubs of the `inference` package, never the service's: both
define the same message names, and protobuf keeps one definition per name in a process.)"""
import time

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.http as triton_http
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.onnx_models import SMALL_CIFAR, write_model_folder
from tests.service_fixtures import metric, running_server

MODEL = "mobilenetv2"
KEY = "grpc-s3cret"
BEARER = {"authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(served):
    return served([MODEL, "effnet"], API_KEY=KEY)


@pytest.fixture(scope="module")
def client(server):
    client = triton.InferenceServerClient(server.grpc_address)
    yield client
    client.close()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60, headers=BEARER) as http:
        yield http


def image_input(*files: bytes) -> triton.InferInput:
    given = triton.InferInput("image", [len(files)], "BYTES")
    given.set_data_from_numpy(np.array(files, dtype=object))
    return given


def status_of(call, *args, **kwargs) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as raised:
        call(*args, **kwargs)
    return raised.value.status(), raised.value.message()


def test_the_client_sees_a_live_ready_server_and_a_ready_model(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL)
    assert client.get_server_metadata(as_json=True)["name"] == "cnn-serve"


def test_model_metadata_and_config_describe_the_tensors(client, http):
    meta = client.get_model_metadata(MODEL, as_json=True)
    assert [i["name"] for i in meta["inputs"]] == ["input", "image"]
    assert meta["inputs"][0]["shape"] == ["-1", "3", "224", "224"]
    config = client.get_model_config(MODEL, as_json=True)["config"]
    assert config["input"][0]["dims"] == ["3", "224", "224"]
    assert config["input"][0]["data_type"] == "TYPE_FP32"
    rest = http.get(f"/v2/models/{MODEL}/config").json()
    assert rest["input"][0]["dims"] == [3, 224, 224] and rest["max_batch_size"] == int(config["max_batch_size"])


def test_an_fp32_tensor_gets_the_rest_protocols_answer(client, server):
    batch = np.random.default_rng(0).standard_normal((2, 3, 224, 224), dtype=np.float32)
    given = triton.InferInput("input", list(batch.shape), "FP32")
    given.set_data_from_numpy(batch)
    over_grpc = client.infer(MODEL, [given], headers=BEARER).as_numpy("logits")
    rest = triton_http.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=60)
    rest_input = triton_http.InferInput("input", list(batch.shape), "FP32")
    rest_input.set_data_from_numpy(batch, binary_data=True)
    # A copy: tritonclient.http writes its Inference-Header-Content-Length into the dict it is given.
    over_rest = rest.infer(MODEL, [rest_input], headers=dict(BEARER)).as_numpy("logits")
    assert over_grpc.shape == (2, 1000)
    np.testing.assert_allclose(over_grpc, over_rest, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", [MODEL, "effnet"])
def test_a_jpeg_as_bytes_with_class_count_5_equals_predicts_top5(client, http, photos, name):
    jpeg = photos["chelsea"].read_bytes()
    result = client.infer(name, [image_input(jpeg)], headers=BEARER,
                          outputs=[triton.InferRequestedOutput("logits", class_count=5)])
    top5 = [(float(s), int(i), label) for s, i, label in
            (e.decode().split(":", 2) for e in result.as_numpy("logits")[0])]
    predicted = http.put(f"/predict/{name}", content=jpeg).json()["predictions"]
    assert top5 == [(p["probability"], p["class_id"], p["label"]) for p in predicted]


def test_statistics_grow_with_inferences_over_both_protocols(client, http, photos, server):
    def successes() -> int:
        stats = client.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]
        return int(stats["inference_stats"]["success"].get("count", 0))

    before = successes()
    for _ in range(3):
        client.infer(MODEL, [image_input(photos["coffee"].read_bytes())], headers=BEARER)
    assert successes() == before + 3
    rest = http.get("/v2/models/stats").json()["model_stats"]
    ours = next(s for s in rest if s["name"] == MODEL)
    assert ours["inference_stats"]["success"]["count"] == before + 3
    assert ours["inference_stats"]["compute_infer"]["ns"] > 0
    scraped = http.get("/metrics").text
    assert metric(scraped, "cnn_serve_requests_total", model=MODEL, status="200", protocol="grpc") >= 3


def test_each_mistake_has_the_status_a_client_can_act_on(client, photos):
    jpeg = photos["coffee"].read_bytes()
    status, message = status_of(client.infer, "nope", [image_input(jpeg)], headers=BEARER)
    assert status == "StatusCode.NOT_FOUND" and MODEL in message and "effnet" in message
    status, message = status_of(client.infer, MODEL, [image_input(jpeg)])
    assert status == "StatusCode.UNAUTHENTICATED"
    status, _ = status_of(client.infer, MODEL, [image_input(jpeg)], headers={"x-api-key": "wrong"})
    assert status == "StatusCode.UNAUTHENTICATED"
    status, _ = status_of(client.infer, MODEL, [image_input(jpeg)], headers={"x-api-key": KEY},
                          client_timeout=0.001)
    assert status == "StatusCode.DEADLINE_EXCEEDED"
    status, _ = status_of(client.infer, MODEL, [image_input(b"\0" * (40 * 1024 * 1024))], headers=BEARER)
    assert status == "StatusCode.RESOURCE_EXHAUSTED"
    status, message = status_of(client.infer, MODEL, [image_input(b"not an image")], headers=BEARER)
    assert status == "StatusCode.INVALID_ARGUMENT" and "decode" in message
    status, message = status_of(client.infer, MODEL, [image_input(*[jpeg] * 17)], headers=BEARER)
    assert status == "StatusCode.RESOURCE_EXHAUSTED" and "MAX_IMAGES_PER_REQUEST" in message


def test_stage_timings_and_the_error_code_come_back_in_the_trailing_metadata(server, photos):
    request = service_pb2.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="image", datatype="BYTES", shape=[1])
    jpeg = photos["coffee"].read_bytes()
    request.raw_input_contents.append(len(jpeg).to_bytes(4, "little") + jpeg)
    with grpc.insecure_channel(server.grpc_address) as channel:
        infer = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer
        _, call = infer.with_call(request, metadata=tuple(BEARER.items()))
        trailing = dict(call.trailing_metadata())
        assert "inference;dur=" in trailing["server-timing"] and "total;dur=" in trailing["server-timing"]
        with pytest.raises(grpc.RpcError) as refused:
            infer(request)
        assert dict(refused.value.trailing_metadata())["code"] == "unauthorized"


def test_grpc_health_says_serving_only_once_the_models_are_ready(model_repository, tmp_path):
    with running_server(model_repository, tmp_path / "service.log", WARMUP_RUNS="40") as server, \
            grpc.insecure_channel(server.grpc_address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        seen = []
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
            except grpc.RpcError:  # not listening yet
                time.sleep(0.05)
                continue
            ready = httpx.get(server.url + "/health/ready").status_code == 200
            seen.append(status)
            assert ready or status != health_pb2.HealthCheckResponse.SERVING
            if status == health_pb2.HealthCheckResponse.SERVING:
                break
            time.sleep(0.1)
        assert seen[0] == health_pb2.HealthCheckResponse.NOT_SERVING
        assert seen[-1] == health_pb2.HealthCheckResponse.SERVING


def test_the_repository_index_lists_the_models_and_load_and_unload_round_trip(tmp_path):
    repository = tmp_path / "repository"
    for version in (1, 2):
        write_model_folder(repository, SMALL_CIFAR, seed=version, version=version)
    with running_server(repository, tmp_path / "service.log", MODEL_CONTROL_MODE="explicit",
                        API_KEY=KEY) as server:
        server.wait_ready()
        client = triton.InferenceServerClient(server.grpc_address)
        name = SMALL_CIFAR.name
        index = client.get_model_repository_index(headers=BEARER, as_json=True)["models"]
        assert [(e["name"], e["version"], e["state"]) for e in index] == [(name, "2", "READY")]
        client.unload_model(name, headers=BEARER)
        assert not client.is_model_ready(name)  # an answer, as Triton's: not ready, no error
        index = client.get_model_repository_index(headers=BEARER, as_json=True)["models"]
        assert index[0]["state"] == "UNAVAILABLE" and index[0]["reason"]
        client.load_model(name, headers=BEARER)
        assert client.is_model_ready(name)
        status, message = status_of(client.load_model, "nope", headers=BEARER)
        assert status == "StatusCode.NOT_FOUND" and name in message
        client.close()


def test_the_repository_rpcs_need_the_key_and_load_and_unload_are_refused_in_mode_none(client):
    status, _ = status_of(client.get_model_repository_index)
    assert status == "StatusCode.UNAUTHENTICATED"
    status, _ = status_of(client.unload_model, MODEL)
    assert status == "StatusCode.UNAUTHENTICATED"
    listed = client.get_model_repository_index(headers=BEARER, as_json=True)["models"]
    assert {e["name"] for e in listed} == {MODEL, "effnet"}
    for change in (client.unload_model, client.load_model):
        status, message = status_of(change, MODEL, headers=BEARER)
        assert status == "StatusCode.FAILED_PRECONDITION" and "MODEL_CONTROL_MODE" in message
    assert client.is_model_ready(MODEL)
