"""A user's view of the service: a real `python -m service` over all seven exported models, real HTTP."""
import asyncio
import base64
import hashlib
import io
import json
import re

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from contract import Preprocessing
from service.preprocess import preprocess
from tests.service_fixtures import (
    IMAGENET,
    ROOT,
    assert_matches_reference,
    copy_repository,
    encode,
    logged,
    metric,
    metric_samples,
    rss_bytes,
    running_server,
)

MAX_BODY_BYTES = 2_000_000
MAX_IMAGE_PIXELS = 20_000_000
SEVEN_MODELS = 7


@pytest.fixture(scope="module")
def server(served):
    server = served(MAX_BODY_BYTES=str(MAX_BODY_BYTES), MAX_IMAGE_PIXELS=str(MAX_IMAGE_PIXELS))
    print(f"\nstart-up to ready with all models: {server.wait_ready():.2f} s, "
          f"RSS {rss_bytes(server.process.pid) / 2**20:.0f} MiB")
    return server


@pytest.fixture(scope="module")
def models(client) -> dict[str, dict]:
    return {m["name"]: m for m in client.get("/models").json()["models"]}


def metadata(model_repository, name: str) -> dict:
    return json.loads((model_repository / name / "metadata.json").read_text())


def direct_probabilities(model_repository, name: str, image: bytes) -> np.ndarray:
    """What onnxruntime itself says for this image, without the service."""
    meta = metadata(model_repository, name)
    session = ort.InferenceSession(str(model_repository / name / meta["model_file"]),
                                   providers=["CPUExecutionProvider"])
    x = preprocess(image, Preprocessing(**meta["preprocessing"]), 10**9)
    logits = session.run(None, {meta["input"]["name"]: x})[0][0].astype(np.float64)
    exp = np.exp(logits - logits.max())
    return exp / exp.sum()


# Uploading ---------------------------------------------------------------------------------------
def test_the_three_upload_styles_users_try_give_the_same_answer(client, photos):
    cat = photos["chelsea"].read_bytes()
    answers = [
        client.post("/predict/mobilenetv3_large", files={"file": ("cat.jpg", cat, "image/jpeg")}),
        client.post("/predict/mobilenetv3_large", content=cat, headers={"Content-Type": "image/jpeg"}),
        client.post("/predict/mobilenetv3_large", content=cat,
                    headers={"Content-Type": "application/octet-stream"}),
        client.put("/predict/mobilenetv3_large", content=cat),  # curl -T sends no Content-Type
    ]
    for response in answers:
        assert response.status_code == 200, response.text
    bodies = [r.json() for r in answers]
    assert all(b["predictions"] == bodies[0]["predictions"] for b in bodies)
    assert bodies[0]["image"] == {"width": 451, "height": 300, "format": "JPEG"}


def test_input_image_returns_the_crop_the_model_saw(client, photos):
    plain = client.post("/predict/mobilenetv2", content=photos["chelsea"].read_bytes()).json()
    assert "input_image" not in plain
    body = client.post("/predict/mobilenetv2", params={"input_image": "true"},
                       content=photos["chelsea"].read_bytes()).json()
    prefix = "data:image/png;base64,"
    assert body["input_image"].startswith(prefix)
    seen = Image.open(io.BytesIO(base64.b64decode(body["input_image"][len(prefix):])))
    assert seen.size == (224, 224) and seen.mode == "RGB"
    # Normalised again, it is the reference tensor: the picture is the model's input, not the photo.
    p = IMAGENET
    tensor = ((np.asarray(seen, np.float32) / p["scale"] - p["mean"]) / p["std"]).transpose(2, 0, 1)[None]
    assert_matches_reference(tensor.astype(np.float32), Image.open(photos["chelsea"]).convert("RGB"))
    assert [p["class_id"] for p in body["predictions"]] == [p["class_id"] for p in plain["predictions"]]


def test_a_prediction_names_the_model_its_weights_and_times_every_stage(client, photos):
    response = client.post("/predict/shufflenetv2", content=photos["coffee"].read_bytes(),
                           headers={"Content-Type": "image/jpeg"})
    body = response.json()
    assert body["model"] == "shufflenetv2"
    assert body["weights"]["kind"] == "random" and "meaningless" in body["weights"]["note"]
    assert body["image"] == {"width": 600, "height": 400, "format": "JPEG"}
    timings = body["timings_ms"]
    assert set(timings) == {"read", "decode", "preprocess", "queue", "inference", "total"}
    assert all(v >= 0 for v in timings.values())
    assert timings["total"] >= timings["decode"] + timings["preprocess"] + timings["inference"]
    header = dict(re.findall(r"(\w+);dur=([\d.]+)", response.headers["Server-Timing"]))
    assert set(header) == set(timings) | {"encode"}  # the body cannot time its own encoding
    assert all(abs(float(header[k]) - timings[k]) < 0.01 for k in timings)


def test_every_model_answers_what_onnxruntime_itself_answers(client, models, model_repository, photos):
    assert len(models) == SEVEN_MODELS
    image = photos["astronaut"].read_bytes()
    for name in models:
        body = client.post(f"/predict/{name}", files={"file": ("a.jpg", image)}).json()
        labels = (model_repository / name / "labels.txt").read_text(encoding="utf-8").splitlines()
        expected = direct_probabilities(model_repository, name, image)
        top = np.argsort(-expected)[:5]
        predictions = body["predictions"]
        assert [p["class_id"] for p in predictions] == top.tolist(), name
        assert [p["label"] for p in predictions] == [labels[i] for i in top]
        np.testing.assert_allclose([p["probability"] for p in predictions], expected[top], rtol=1e-4,
                                   atol=1e-6)


@pytest.mark.parametrize("top_k, expected", [(None, 5), (1, 1), (10, 10)])
def test_top_k_picks_how_many_classes_come_back(client, photos, top_k, expected):
    params = {} if top_k is None else {"top_k": top_k}
    body = client.post("/predict/effnet", params=params, content=photos["rocket"].read_bytes(),
                       headers={"Content-Type": "image/jpeg"}).json()
    probabilities = [p["probability"] for p in body["predictions"]]
    assert len(probabilities) == expected and probabilities == sorted(probabilities, reverse=True)
    if expected == 10:  # every CIFAR-10 class: a full distribution
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("model, top_k, classes", [("effnet", 11, 10), ("effnet", 0, 10),
                                                    ("mobilenetv2", 1001, 1000)])
def test_top_k_outside_the_models_class_count_is_refused(client, photos, model, top_k, classes):
    response = client.post(f"/predict/{model}", params={"top_k": top_k},
                           content=photos["rocket"].read_bytes(), headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 422
    assert response.json()["code"] == "top_k_out_of_range"
    assert response.json()["error"] == (f"top_k must be between 1 and {classes} "
                                        f"(the model's class count), got {top_k}")


def test_a_1000_class_model_can_return_all_its_classes(client, photos):
    body = client.post("/predict/mobilenetv2", params={"top_k": 1000},
                       content=photos["rocket"].read_bytes(), headers={"Content-Type": "image/jpeg"}).json()
    assert sorted(p["class_id"] for p in body["predictions"]) == list(range(1000))


# Discovery and docs ------------------------------------------------------------------------------
def test_models_lists_every_model_with_what_a_user_compares_them_by(client, models, model_repository):
    assert sorted(models) == sorted(p.name for p in model_repository.iterdir()
                                    if (p / "metadata.json").is_file())
    for name, model in models.items():
        meta = metadata(model_repository, name)
        assert model["status"] == "ready" and model["error"] is None
        assert model["execution_provider"] == "CPUExecutionProvider"
        assert model["load_ms"] > 0 and model["warmup_ms"] > 0
        assert "meaningless" in model["weights_note"]
        served = model["metadata"]
        for field in ("architecture", "paper", "input", "labels", "params", "macs", "onnx", "weights",
                      "preprocessing"):
            assert served[field] == meta[field], (name, field)
        assert served["onnx"]["size_bytes"] == (model_repository / name / "model.onnx").stat().st_size
        assert client.get(f"/models/{name}").json() == model


def test_the_openapi_docs_show_the_real_response_schemas(client):
    assert client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()
    assert {"PredictResponse", "ModelList", "ModelInfo", "Readiness", "ErrorBody"} <= set(
        schema["components"]["schemas"])
    predict = schema["paths"]["/predict/{model}"]
    assert set(predict) == {"post", "put"}
    assert "multipart/form-data" in predict["post"]["requestBody"]["content"]


# Metrics -----------------------------------------------------------------------------------------
def test_metrics_counts_and_histograms_grow_with_requests(client, photos):
    def counts():
        text = client.get("/metrics").text
        return (metric(text, "cnn_serve_requests_total", model="mobilenetv1", status="200"),
                metric(text, "cnn_serve_stage_duration_seconds_count", model="mobilenetv1", stage="inference"),
                metric(text, "cnn_serve_batch_size_count", model="mobilenetv1"),
                metric(text, "cnn_serve_requests_total", model="mobilenetv1", status="422"))

    image = photos["motorcycle"].read_bytes()
    client.put("/predict/mobilenetv1", content=image)  # make sure the series exist
    client.put("/predict/mobilenetv1", params={"top_k": 0}, content=image)
    before = counts()
    for _ in range(3):
        assert client.put("/predict/mobilenetv1", content=image).status_code == 200
    client.put("/predict/mobilenetv1", params={"top_k": 0}, content=image)
    after = counts()
    assert [a - b for a, b in zip(after, before, strict=True)] == [3, 3, 3, 1]

    text = client.get("/metrics").text
    buckets = metric_samples(text, "cnn_serve_stage_duration_seconds_bucket")
    # load: the stage of a request that loaded its model on demand (MAX_LOADED_MODELS), kept at zero here
    assert {s.labels["stage"] for s in buckets} == {"load", "read", "decode", "preprocess", "queue", "inference",
                                                    "total"}
    assert {0.001, 0.5} <= {float(s.labels["le"]) for s in buckets}
    assert {} in [s.labels for s in metric_samples(text, "cnn_serve_requests_in_flight")]
    assert len(metric_samples(text, "cnn_serve_model_info")) == SEVEN_MODELS
    assert metric(text, "process_resident_memory_bytes") > 0


def test_the_latency_comparison_comes_as_json_and_as_a_table(client, photos):
    image = photos["coffee"].read_bytes()
    for _ in range(4):
        client.put("/predict/mobilenetv3_small", content=image)
    by_query = client.get("/metrics", params={"format": "json"})
    by_accept = client.get("/metrics", headers={"Accept": "application/json"})
    assert by_query.headers["content-type"] == by_accept.headers["content-type"] == "application/json"
    stats = by_accept.json()["models"]["mobilenetv3_small"]
    assert stats["requests"] >= 4 and stats["errors"] == 0 and stats["throughput_rps"] > 0
    total = stats["stages_ms"]["total"]
    assert total["count"] >= 4 and 0 < total["p50"] <= total["p90"] <= total["p95"] <= total["p99"]

    table = client.get("/metrics", params={"format": "table"}).text
    row = next(line for line in table.splitlines() if line.startswith("mobilenetv3_small"))
    assert row.split()[:3] == ["mobilenetv3_small", str(stats["requests"]), "0"]
    assert table.splitlines()[0].split()[:4] == ["model", "requests", "errors", "req/s"]

    # Refusals by status (a 503 is shed load) and the realised batch sizes, for the page.
    assert client.put("/predict/mobilenetv3_small", params={"top_k": 0}, content=image).status_code == 422
    stats = client.get("/metrics", params={"format": "json"}).json()["models"]["mobilenetv3_small"]
    assert stats["statuses"]["200"] >= 4 and stats["statuses"]["422"] >= 1
    assert sum(stats["statuses"].values()) == stats["requests"]
    runs = stats["batch_sizes"]  # session.run calls by batch size: every image was in one
    assert sum(int(size) * n for size, n in runs.items()) >= stats["statuses"]["200"]


def test_each_request_leaves_one_log_line_with_model_status_and_timings(client, server, photos):
    client.put("/predict/mobilenetv2", params={"top_k": 3}, content=photos["rocket"].read_bytes())
    text = logged(server, r"PUT /predict/mobilenetv2 .* total=")
    lines = [line for line in text.splitlines() if "PUT /predict/mobilenetv2 " in line]
    assert re.search(r"model=mobilenetv2 status=200 read=[\d.]+ms decode=[\d.]+ms preprocess=[\d.]+ms "
                     r"queue=[\d.]+ms inference=[\d.]+ms total=[\d.]+ms$", lines[-1])


# Concurrency -------------------------------------------------------------------------------------
def test_32_concurrent_requests_for_mixed_models_each_get_their_own_result(client, models,
                                                                          model_repository, photos):
    chosen = ["chelsea", "rocket", "astronaut", "coffee"]
    images = {p: photos[p].read_bytes() for p in chosen}
    expected = {(m, p): direct_probabilities(model_repository, m, images[p]) for m in models for p in chosen}
    # Only models that tell the four photos apart can show a mix-up (random weights may not).
    mixed = [m for m in sorted(models)
             if len({int(np.argmax(expected[m, p])) for p in chosen}) == len(chosen)][:4]
    assert len(mixed) == 4, "fewer than four models give four different top-1 classes for the photos"
    jobs = [(mixed[i % 4], chosen[(i // 4) % 4]) for i in range(32)]

    async def send_all():
        async with httpx.AsyncClient(base_url=str(client.base_url), timeout=120) as aclient:
            return await asyncio.gather(*(aclient.post(f"/predict/{m}", files={"file": (p, images[p])})
                                          for m, p in jobs))

    responses = asyncio.run(send_all())
    for (model, photo), response in zip(jobs, responses, strict=True):
        body = response.json()
        want = expected[model, photo]
        assert body["model"] == model
        assert [p["class_id"] for p in body["predictions"]] == np.argsort(-want)[:5].tolist(), (model, photo)
        np.testing.assert_allclose([p["probability"] for p in body["predictions"]],
                                   np.sort(want)[::-1][:5], rtol=1e-4, atol=1e-6)


# Errors ------------------------------------------------------------------------------------------
def test_an_unknown_model_is_404_listing_the_valid_names(client, models, photos):
    response = client.put("/predict/resnet50", content=photos["rocket"].read_bytes())
    assert response.status_code == 404
    body = response.json()
    assert body["error"].startswith("unknown model 'resnet50'; valid names: ")
    assert body["models"] == sorted(models)
    assert client.get("/models/resnet50").status_code == 404


@pytest.mark.parametrize("content, content_type, status, message", [
    (b"", "image/jpeg", 400, "empty body"),
    (b"GIF89a but not really", "image/gif", 400, "could not decode image: not an image format"),
    (b'{"image": "cat.jpg"}', "application/json", 415, "unsupported Content-Type 'application/json'"),
    (b"cat.jpg", "text/plain", 415, "unsupported Content-Type 'text/plain'"),
])
def test_a_body_that_is_no_image_says_what_was_wrong_and_what_is_accepted(client, content,
                                                                          content_type, status, message):
    response = client.post("/predict/effnet", content=content, headers={"Content-Type": content_type})
    assert response.status_code == status
    body = response.json()
    assert body["error"].startswith(message)
    assert "JPEG" in body["accepted_formats"] and "PNG" in body["accepted_formats"]


def test_a_truncated_upload_is_400_saying_truncated(client, photos):
    data = photos["astronaut"].read_bytes()
    response = client.put("/predict/mobilenetv3_small", content=data[: len(data) // 2])
    assert response.status_code == 400
    assert "truncated" in response.json()["error"]


def test_a_multipart_upload_without_the_file_field_is_422(client, photos):
    response = client.post("/predict/effnet", files={"image": ("a.jpg", photos["rocket"].read_bytes())})
    assert response.status_code == 422
    assert response.json()["code"] == "missing_file_field"
    assert response.json()["error"] == "multipart body has no file in field 'file' (fields sent: image)"


def test_a_non_integer_top_k_is_a_clear_json_422(client, photos):
    response = client.put("/predict/effnet", params={"top_k": "five"}, content=photos["rocket"].read_bytes())
    assert response.status_code == 422
    assert response.json()["error"].startswith("invalid request: query.top_k: Input should be a valid integer")


def test_too_many_bytes_is_413_stating_the_limit(client):
    too_big = b"\xff" * (MAX_BODY_BYTES + 1)
    for response in (client.put("/predict/effnet", content=too_big),
                     # chunked, without Content-Length: cut off while reading
                     client.put("/predict/effnet", content=iter([too_big[:1_000_000], too_big[1_000_000:]]))):
        assert response.status_code == 413
        refusal = response.json()
        assert refusal["code"] == "body_too_large" and refusal["limit_bytes"] == MAX_BODY_BYTES
        assert str(MAX_BODY_BYTES) in refusal["error"]


def test_a_decompression_bomb_is_413_stating_the_pixel_limit(client):
    bomb = encode(Image.new("L", (5000, 4001)), "PNG")  # 20 million black pixels in a few KB
    assert len(bomb) < MAX_BODY_BYTES
    response = client.put("/predict/effnet", content=bomb)
    assert response.status_code == 413
    assert response.json()["code"] == "image_too_large"
    assert response.json()["error"] == ("image too large (5000x4001 = 20005000 pixels): the limit is "
                                        f"{MAX_IMAGE_PIXELS} pixels (MAX_IMAGE_PIXELS)")


@pytest.mark.parametrize("method", ["GET", "DELETE", "PATCH"])
def test_a_wrong_method_is_a_json_405(client, method):
    response = client.request(method, "/predict/effnet")
    assert response.status_code == 405
    body = response.json()
    assert body["code"] == "method_not_allowed" and body["error"].endswith("allowed: POST, PUT")
    assert response.headers["Allow"] == "POST, PUT"


def test_nothing_a_client_sends_is_answered_with_a_500(client, photos):
    image = photos["rocket"].read_bytes()
    sent = [client.put("/predict/effnet", content=b""),
            client.put("/predict/effnet", content=b"\x00" * 1000),
            client.put("/predict/effnet", content=image[:100]),
            client.post("/predict/effnet", content=image, headers={"Content-Type": "multipart/form-data"}),
            client.post("/predict/effnet", content=b"--x\r\n", headers={
                "Content-Type": "multipart/form-data; boundary=x"}),
            client.put("/predict/effnet", params={"top_k": "-1"}, content=image),
            client.put("/predict/no_such_model", content=image),
            client.put("/predict/effnet", content=b"\xff" * (MAX_BODY_BYTES + 1)),
            client.get("/predict/effnet")]
    assert [r.status_code for r in sent if r.status_code >= 500] == []
    assert all("error" in r.json() for r in sent)
    statuses = {s.labels["status"] for s in metric_samples(client.get("/metrics").text, "cnn_serve_requests_total")
                if s.value > 0}
    assert not [s for s in statuses if s.startswith("5")]


# Start-up and broken models ----------------------------------------------------------------------
def test_readiness_is_503_while_models_load_and_200_once_all_are_warm(model_repository, tmp_path, photos):
    # Many warm-up runs stretch loading so the 503 phase can be seen.
    with running_server(model_repository, tmp_path / "service.log", WARMUP_RUNS="60") as server:
        server.wait_live()
        early = httpx.get(server.url + "/health/ready")
        assert early.status_code == 503
        assert early.json()["ready"] is False and "loading" in early.json()["models"].values()
        waiting = [n for n, s in early.json()["models"].items() if s == "loading"][-1]
        response = httpx.put(f"{server.url}/predict/{waiting}", content=photos["rocket"].read_bytes())
        assert response.status_code == 503 and response.json()["code"] == "model_unavailable"
        assert response.json()["error"] == f"model {waiting!r} is loading"
        server.wait_ready()
        ready = httpx.get(server.url + "/health/ready").json()
        assert ready["ready"] and set(ready["models"].values()) == {"ready"} and ready["failed"] == {}
        assert httpx.get(server.url + "/health/live").json() == {"status": "alive"}


def test_a_corrupt_onnx_file_fails_that_model_only(model_repository, tmp_path, photos):
    repository = copy_repository(model_repository, tmp_path / "repository")
    # A file that is not ONNX, with metadata updated to match, so onnxruntime itself must refuse it.
    broken = repository / "shufflenetv1"
    garbage = b"this is not an onnx graph" * 100
    (broken / "model.onnx").write_bytes(garbage)
    meta = json.loads((broken / "metadata.json").read_text())
    meta["onnx"].update(size_bytes=len(garbage), sha256=hashlib.sha256(garbage).hexdigest())
    (broken / "metadata.json").write_text(json.dumps(meta))
    # A file changed after export (one byte flipped): the recorded sha256 no longer matches.
    tampered = repository / "mobilenetv2" / "model.onnx"
    data = bytearray(tampered.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tampered.write_bytes(bytes(data))

    with running_server(repository, tmp_path / "service.log") as server:
        readiness = server.wait_loaded()
        assert httpx.get(server.url + "/health/ready").status_code == 503
        assert set(readiness["failed"]) == {"shufflenetv1", "mobilenetv2"}
        assert "model.onnx sha256 " in readiness["failed"]["mobilenetv2"]  # the check that failed, named
        assert "onnxruntime" in readiness["failed"]["shufflenetv1"].lower() or \
            "protobuf" in readiness["failed"]["shufflenetv1"].lower(), readiness["failed"]
        listed = {m["name"]: m for m in httpx.get(server.url + "/models").json()["models"]}
        assert listed["shufflenetv1"]["status"] == "failed" and listed["shufflenetv1"]["error"]
        assert sum(m["status"] == "ready" for m in listed.values()) == SEVEN_MODELS - 2

        image = photos["chelsea"].read_bytes()
        refused = httpx.put(server.url + "/predict/shufflenetv1", content=image)
        assert refused.status_code == 503
        error = refused.json()["error"]
        assert error.startswith("model 'shufflenetv1' failed to load: ") and "InvalidProtobuf" in error
        assert httpx.put(server.url + "/predict/shufflenetv2", content=image).status_code == 200


def test_a_file_named_only_by_rfc_5987_filename_star_is_the_upload(client, photos):
    """What a client sends for a non-ASCII file name: filename*=UTF-8''..., without filename=."""
    body = (b"--xx\r\nContent-Disposition: form-data; name=\"file\"; filename*=UTF-8''caf%C3%A9.jpg\r\n"
            b"Content-Type: image/jpeg\r\n\r\n" + photos["coffee"].read_bytes() + b"\r\n--xx--\r\n")
    response = client.post("/predict/effnet", content=body,
                           headers={"Content-Type": "multipart/form-data; boundary=xx"})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("body, content_type", [
    (b"--x\r\n", "multipart/form-data; boundary=x"),
    (b"--x\r\nContent-Disposition: form-data; name=\"file\"", "multipart/form-data; boundary=x"),
    (b"anything", "multipart/form-data")])
def test_a_broken_multipart_body_is_a_400_with_a_documented_code(client, body, content_type):
    response = client.post("/predict/effnet", content=body, headers={"Content-Type": content_type})
    assert response.status_code == 400
    assert response.json()["code"] == "invalid_multipart"
    assert "`invalid_multipart`" in (ROOT / "docs" / "api.md").read_text()


def test_the_api_docs_load_nothing_from_another_host(client):
    page = client.get("/docs")
    assert page.status_code == 200
    urls = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", page.text)
    assert urls and all(u.startswith("/") and not u.startswith("//") for u in urls), urls
    assert not re.search(r"https?://", page.text), "the page names another host"
    for url in urls:
        assert client.get(url).status_code == 200, url
    assert client.get("/redoc").status_code == 404
