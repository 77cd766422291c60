"""`POST /compare` against a real server: one upload, every model's own `/predict` answer side by
side, the bounds checked before any work, and a model that cannot answer leaving the others to."""
import threading
import time

import httpx
import pytest
from PIL import Image

from tests.image_bombs import with_last_scan_repeated
from tests.service_fixtures import copy_repository, encode, metric, running_server

BIG_JPEG_SIDE = 2400  # JPEG draft mode decodes it at 1/4 for the 224-pixel models, 1/8 for effnet
KEY = {"X-API-Key": "compare-key"}


@pytest.fixture(scope="module")
def server(served):
    return served()


@pytest.fixture(scope="module")
def uploads(photos) -> dict[str, bytes]:
    """A photo as the bench sends it, the same scaled up (decoded reduced, differently per model)
    and as a PNG (no draft mode)."""
    photo = Image.open(photos["coffee"])
    big = photo.resize((BIG_JPEG_SIDE, BIG_JPEG_SIDE * photo.height // photo.width))
    return {"photo": photos["coffee"].read_bytes(), "big_jpeg": encode(big, "JPEG", quality=90),
            "png": encode(photo, "PNG")}


@pytest.mark.parametrize("kind", ["photo", "big_jpeg", "png"])
def test_each_models_entry_is_what_its_own_predict_answers(client, uploads, kind):
    data = uploads[kind]
    compared = client.post("/compare?input_image=true&sequential=true", files={"file": data})
    assert compared.status_code == 200, compared.text
    body = compared.json()
    models = [m["name"] for m in client.get("/models").json()["models"]]
    assert body["models"] == models and list(body["results"]) == models
    for name in models:
        own = client.post(f"/predict/{name}?input_image=true", files={"file": data}).json()
        entry = body["results"][name]
        assert [p["class_id"] for p in entry["predictions"]] == [p["class_id"] for p in own["predictions"]], name
        for mine, theirs in zip(entry["predictions"], own["predictions"], strict=True):
            assert mine["label"] == theirs["label"]
            assert abs(mine["probability"] - theirs["probability"]) <= 1e-6, name
        assert entry["input_image"] == own["input_image"], f"{name} saw another picture than via /predict"
        assert (entry["model"], entry["weights"], entry["image"]) == (own["model"], own["weights"], own["image"])
        assert set(entry["timings_ms"]) == set(own["timings_ms"])
    assert set(body["timings_ms"]) == {"read", "decode", "preprocess", "total"}
    assert body["image"] == body["results"][models[0]]["image"]


def test_models_picks_the_models_and_their_order(client, photos):
    response = client.put("/compare?models=mobilenetv2,effnet,mobilenetv2&top_k=2",
                          content=photos["chelsea"].read_bytes())
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["models"] == ["mobilenetv2", "effnet"] and list(body["results"]) == body["models"]
    assert all(len(entry["predictions"]) == 2 for entry in body["results"].values())
    assert all("input_image" not in entry for entry in body["results"].values())
    agreement = body["agreement"]
    assert agreement["top1_models"] and set(agreement["top1_models"]) <= set(body["models"])
    assert 0 <= agreement["top_k_overlap"] <= 1
    timing = response.headers["Server-Timing"]
    assert "decode;dur=" in timing and "preprocess;dur=" in timing


def test_an_unknown_name_is_a_404_naming_it_before_the_upload_is_looked_at(client):
    before = client.get("/metrics").text
    response = client.post("/compare?models=effnet,resnet50", content=b"not even an image",
                           headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 404
    body = response.json()
    assert body["code"] == "unknown_model" and "resnet50" in body["error"] and "effnet" in body["models"]
    after = client.get("/metrics").text
    stage = {"name": "cnn_serve_stage_duration_seconds_count", "stage": "decode"}
    assert metric(after, **stage, model="_compare") == metric(before, **stage, model="_compare")


def test_an_undecodable_upload_is_a_4xx_with_a_code(client):
    response = client.post("/compare", files={"file": b"these bytes are not an image"})
    assert response.status_code == 400
    assert response.json()["code"] == "undecodable_image"


def test_each_model_counts_in_its_own_series_and_the_decode_once(client, photos):
    before = client.get("/metrics").text
    assert client.post("/compare?models=effnet,mobilenetv2", files={"file": photos["coffee"].read_bytes()}
                       ).status_code == 200
    after = client.get("/metrics").text

    def grew(**labels: str) -> float:
        return metric(after, **labels) - metric(before, **labels)

    stage = "cnn_serve_stage_duration_seconds_count"
    for model in ("effnet", "mobilenetv2"):
        assert grew(name="cnn_serve_requests_total", model=model, status="200") == 1
        assert grew(name=stage, model=model, stage="inference") == 1
        assert grew(name=stage, model=model, stage="decode") == 0
    assert grew(name="cnn_serve_requests_total", model="mobilenetv1") == 0
    assert grew(name=stage, model="_compare", stage="decode") == 1
    assert grew(name="cnn_serve_requests_total", model="_compare", status="200") == 1


@pytest.fixture(scope="module")
def strained(model_repository, tmp_path_factory):
    """One request in flight per model, a key, at most two models per comparison, and a model
    whose ONNX file does not match its metadata, so it failed to load."""
    folder = tmp_path_factory.mktemp("strained")
    repository = copy_repository(model_repository, folder / "repository", "effnet", "mobilenetv2", "shufflenetv2")
    for onnx in (repository / "shufflenetv2").glob("*.onnx"):
        onnx.write_bytes(onnx.read_bytes() + b"changed")
    with running_server(repository, folder / "service.log", MAX_IN_FLIGHT_PER_MODEL="1",
                        PREPROCESS_WORKERS="1", API_KEY="compare-key", MAX_COMPARE_MODELS="2",
                        STRICT_READINESS="false") as server:
        server.wait_ready()
        yield server


def test_a_comparison_needs_the_api_key(strained, photos):
    response = httpx.post(f"{strained.url}/compare?models=effnet", files={"file": photos["coffee"].read_bytes()})
    assert response.status_code == 401 and response.json()["code"] == "unauthorized"


def test_more_models_than_the_maximum_is_a_422(strained, photos):
    response = httpx.post(f"{strained.url}/compare?models=effnet,mobilenetv2,shufflenetv2",
                          files={"file": photos["coffee"].read_bytes()}, headers=KEY)
    assert response.status_code == 422 and response.json()["code"] == "too_many_models"


def test_a_model_that_failed_to_load_gets_its_error_and_the_other_answers(strained, photos):
    response = httpx.post(f"{strained.url}/compare?models=shufflenetv2,effnet",
                          files={"file": photos["coffee"].read_bytes()}, headers=KEY)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert results["shufflenetv2"]["code"] == "model_unavailable" and results["shufflenetv2"]["http_status"] == 503
    assert results["effnet"]["predictions"]
    every_ready = httpx.post(f"{strained.url}/compare", files={"file": photos["coffee"].read_bytes()},
                             headers=KEY).json()
    assert every_ready["models"] == ["effnet", "mobilenetv2"]


def test_a_model_at_its_in_flight_limit_is_overloaded_in_its_entry_only(strained, photos):
    # A JPEG that takes its one decoding thread seconds holds mobilenetv2's only slot meanwhile.
    slow = with_last_scan_repeated(encode(Image.new("L", (6000, 6600), 128), "JPEG", progressive=True), 2)
    held = threading.Thread(target=httpx.put, args=(f"{strained.url}/predict/mobilenetv2",),
                            kwargs={"content": slow, "headers": KEY, "timeout": 60})
    held.start()
    deadline = time.monotonic() + 10
    while metric(httpx.get(f"{strained.url}/metrics").text, "cnn_serve_admitted_requests",
                 model="mobilenetv2") < 1:
        assert time.monotonic() < deadline, "the slow upload was never admitted"
        time.sleep(0.01)
    response = httpx.post(f"{strained.url}/compare?models=effnet,mobilenetv2",
                          files={"file": photos["coffee"].read_bytes()}, headers=KEY, timeout=60)
    held.join()
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert results["mobilenetv2"]["code"] == "overloaded" and results["mobilenetv2"]["http_status"] == 503
    assert results["effnet"]["predictions"]

