"""An attacker with no API key and a megabyte of traffic, against a real server with default limits:
each attack is refused or bounded, and the next ordinary request is answered as before."""
import base64
import http.client
import json
import socket
import struct
import threading
import time

import httpx
import pytest
from PIL import Image

from tests.service_fixtures import encode, ready_server, rss_bytes

MODEL = "mobilenetv3_small"


@pytest.fixture(scope="module")
def server(model_repository, tmp_path_factory):
    with ready_server(model_repository, tmp_path_factory.mktemp("hostile"), MODEL) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def served_normally(client, photos) -> None:
    response = client.put(f"/predict/{MODEL}", content=photos["coffee"].read_bytes())
    assert response.status_code == 200, response.text


def metric(client, name: str, **labels: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_batch_of_1500_tiny_gifs_is_refused_before_any_is_decoded(server, client, photos):
    gif = encode(Image.new("P", (1, 1)), "GIF")
    data = b"".join(struct.pack("<I", len(gif)) + gif for _ in range(1500))
    header = json.dumps({"inputs": [{"name": "image", "shape": [1500], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(data)}}],
                         "outputs": [{"name": "logits", "parameters": {"classification": 5}}]}).encode()
    before = rss_bytes(server.process.pid)
    started = time.perf_counter()
    response = client.post(f"/v2/models/{MODEL}/infer", content=header + data,
                           headers={"Inference-Header-Content-Length": str(len(header))})
    elapsed = time.perf_counter() - started
    growth = rss_bytes(server.process.pid) - before
    print(f"\n{len(header + data) / 1000:.0f} KB body of 1500 GIFs: {response.status_code} after "
          f"{elapsed * 1000:.0f} ms, RSS +{growth / 2**20:.1f} MiB")
    assert response.status_code == 413 and response.json()["code"] == "too_many_images"
    assert elapsed < 2 and growth < 50 * 2**20
    served_normally(client, photos)


def test_a_client_that_leaves_mid_upload_is_counted_as_499_not_500(server, client, photos):
    closed_before = metric(client, "cnn_serve_requests_total", model=MODEL, status="499")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as connection:
        connection.sendall(f"PUT /predict/{MODEL} HTTP/1.1\r\nHost: test\r\nContent-Type: image/jpeg\r\n"
                           "Content-Length: 100000\r\n\r\n".encode() + b"\xff" * 1000)
        time.sleep(0.2)
    deadline = time.monotonic() + 5
    while metric(client, "cnn_serve_requests_total", model=MODEL, status="499") == closed_before:
        assert time.monotonic() < deadline, "the abandoned upload was never counted"
        time.sleep(0.05)
    assert metric(client, "cnn_serve_requests_total", model=MODEL, status="500") == 0
    assert "Traceback" not in server.log.read_text()
    served_normally(client, photos)


def test_large_json_bodies_do_not_stall_the_health_check(server, client, photos):
    values = ",".join(["0.5"] * (8 * 3 * 224 * 224))
    body = ('{"inputs": [{"name": "input", "shape": [8, 3, 224, 224], "datatype": "FP32", '
            f'"data": [{values}]}}]}}').encode()  # about 5 MB of JSON numbers
    answers, worst = [], 0.0

    def send() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        connection.request("POST", f"/v2/models/{MODEL}/infer", body=body,
                           headers={"Content-Type": "application/json"})
        answers.append(connection.getresponse().status)
        connection.close()

    senders = [threading.Thread(target=send) for _ in range(10)]
    for sender in senders:
        sender.start()
    while any(s.is_alive() for s in senders):
        started = time.perf_counter()
        assert client.get("/health/live").status_code == 200
        worst = max(worst, time.perf_counter() - started)
        time.sleep(0.02)
    for sender in senders:
        sender.join()
    print(f"\n/health/live worst {worst * 1000:.0f} ms beside 10 JSON bodies of {len(body) / 1e6:.1f} MB")
    assert answers.count(200) + answers.count(503) == 10 and 200 in answers
    assert worst < 0.5


@pytest.mark.parametrize("value, named", [("NaN", "Invalid JSON"), ("Infinity", "Invalid JSON"),
                                          ("1" + "0" * 400, "Invalid JSON"), ("1e39", "'input'"),
                                          ("null", "'input'")])
def test_a_tensor_value_that_is_not_a_finite_number_is_a_400_saying_where(client, value, named):
    data = [0.0] * (3 * 224 * 224 - 1)
    body = ('{"inputs": [{"name": "input", "shape": [1, 3, 224, 224], "datatype": "FP32", '
            f'"data": [{value}, {",".join(map(str, data))}]}}]}}')
    response = client.post(f"/v2/models/{MODEL}/infer", content=body,
                           headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["code"] == "invalid_inference_request" and named in response.json()["error"]


def test_health_answers_head_as_it_answers_get(client):
    for path in ("/health/live", "/health/ready", "/v2/health/live", "/v2/health/ready"):
        assert client.head(path).status_code == client.get(path).status_code == 200


def test_base64_images_in_a_batch_beyond_the_limit_are_413(client, photos):
    image = base64.b64encode(photos["rocket"].read_bytes()).decode()
    response = client.post(f"/v2/models/{MODEL}/infer", json={"inputs": [
        {"name": "image", "shape": [17], "datatype": "BYTES", "data": [image] * 17}]})
    assert response.status_code == 413 and response.json()["code"] == "too_many_images"
