"""The one request lifecycle, in process: both protocols give the same answer for the same photo, and
every bound (body bytes, images per request, pixels, in-flight requests, deadline) refuses a request
the same way whichever protocol carries it."""
import asyncio
import base64
import struct
from contextlib import asynccontextmanager

import httpx
import numpy as np
import pytest
from PIL import Image

from service.app import create_app
from service.settings import Settings
from tests.service_fixtures import copy_repository, encode, slow_png

MODEL = "mobilenetv3_small"


@pytest.fixture(scope="module")
def repository(model_repository, tmp_path_factory):
    return copy_repository(model_repository, tmp_path_factory.mktemp("lifecycle") / "repository", MODEL)


@asynccontextmanager
async def serving(repository, **settings):
    """The app with its lifespan running and every model loaded, and a client calling it in process."""
    app = create_app(Settings(model_repository=repository, warmup_runs=0, **settings))
    async with app.router.lifespan_context(app):
        while not app.state.data_plane.engine.loading_done:
            await asyncio.sleep(0.01)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
            yield client


def predict(images: list[bytes]) -> dict:
    return {"method": "PUT", "url": f"/predict/{MODEL}", "content": images[0]}


def infer_json(images: list[bytes]) -> dict:
    return {"method": "POST", "url": f"/v2/models/{MODEL}/infer", "json": {"inputs": [
        {"name": "image", "shape": [len(images)], "datatype": "BYTES",
         "data": [base64.b64encode(i).decode() for i in images]}]}}


def infer_binary(images: list[bytes]) -> dict:
    data = b"".join(struct.pack("<I", len(i)) + i for i in images)
    header = httpx.Request("POST", "/", json={"inputs": [
        {"name": "image", "shape": [len(images)], "datatype": "BYTES",
         "parameters": {"binary_data_size": len(data)}}]}).content
    return {"method": "POST", "url": f"/v2/models/{MODEL}/infer", "content": header + data,
            "headers": {"Inference-Header-Content-Length": str(len(header))}}


def infer_tensor(images: list[bytes]) -> dict:
    rows = np.zeros((len(images), 3, 224, 224), np.float32)
    header = httpx.Request("POST", "/", json={"inputs": [
        {"name": "input", "shape": list(rows.shape), "datatype": "FP32",
         "parameters": {"binary_data_size": rows.nbytes}}]}).content
    return {"method": "POST", "url": f"/v2/models/{MODEL}/infer", "content": header + rows.tobytes(),
            "headers": {"Inference-Header-Content-Length": str(len(header))}}


IMAGE_PROTOCOLS = [predict, infer_json, infer_binary]


def stalled(request: dict, seconds: float) -> dict:
    """The same request, its body held back for `seconds` after the first byte."""
    body = request.pop("content", None) or httpx.Request("POST", "/", json=request.pop("json")).content

    async def chunks():
        yield body[:1]
        await asyncio.sleep(seconds)
        yield body[1:]

    return {**request, "content": chunks()}


def refused(response: httpx.Response, status: int, code: str, *named: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == code
    for cause in named:
        assert cause in body["error"]


def photo(photos) -> bytes:
    return photos["chelsea"].read_bytes()


def test_the_same_photo_gets_the_same_top_5_through_both_protocols(repository, photos):
    async def scenario():
        async with serving(repository) as client:
            answer = (await client.put(f"/predict/{MODEL}", content=photo(photos))).json()
            request = infer_json([photo(photos)])
            request["json"]["outputs"] = [{"name": "logits", "parameters": {"classification": 5}}]
            classified = (await client.request(**request)).json()
        return answer, classified

    answer, classified = asyncio.run(scenario())
    expected = [f"{p['probability']}:{p['class_id']}:{p['label']}" for p in answer["predictions"]]
    assert classified["outputs"][0]["data"] == expected


@pytest.mark.parametrize("protocol", IMAGE_PROTOCOLS)
def test_a_body_over_the_byte_limit_is_413_whichever_the_protocol(repository, photos, protocol):
    async def scenario():
        async with serving(repository, max_body_bytes=20_000) as client:
            return await client.request(**protocol([photo(photos)]))

    assert len(photo(photos)) > 20_000
    refused(asyncio.run(scenario()), 413, "body_too_large", "20000")


@pytest.mark.parametrize("protocol", [infer_json, infer_binary, infer_tensor])
def test_more_images_than_allowed_are_413_before_any_is_decoded(repository, photos, protocol):
    async def scenario():
        async with serving(repository, max_images_per_request=2) as client:
            return await client.request(**protocol([photo(photos)] * 3))

    refused(asyncio.run(scenario()), 413, "too_many_images", "3 images", "2")


@pytest.mark.parametrize("protocol", IMAGE_PROTOCOLS)
def test_an_image_over_the_pixel_limit_is_413_whichever_the_protocol(repository, protocol):
    big = encode(Image.new("RGB", (300, 200)), "PNG")

    async def scenario():
        async with serving(repository, max_image_pixels=50_000) as client:
            return await client.request(**protocol([big]))

    refused(asyncio.run(scenario()), 413, "image_too_large", "300x200", "50000")


@pytest.mark.parametrize("protocol", [*IMAGE_PROTOCOLS, infer_tensor])
def test_past_the_deadline_a_request_is_504_whichever_the_protocol(repository, photos, protocol):
    async def scenario():
        async with serving(repository, request_timeout_seconds=0.2, inference_workers=1,
                           preprocess_workers=1) as client:
            # Decoded on the only inference worker, so the next request waits for it.
            blocker = asyncio.ensure_future(client.put(f"/predict/{MODEL}", content=slow_png()))
            await asyncio.sleep(0.05)
            late = await client.request(**protocol([photo(photos)]))
            await blocker
            for _ in range(100):  # once the blocker's decode, which cannot be stopped, is over
                on_time = await client.request(**protocol([photo(photos)]))
                if on_time.status_code != 504:
                    break
                await asyncio.sleep(0.1)
        return late, on_time

    late, on_time = asyncio.run(scenario())
    refused(late, 504, "timeout", MODEL)
    assert on_time.status_code == 200  # the next request is unharmed


@pytest.mark.parametrize("protocol", [*IMAGE_PROTOCOLS, infer_tensor])
def test_past_the_in_flight_limit_a_request_is_503_whichever_the_protocol(repository, photos, protocol):
    async def scenario():
        async with serving(repository, max_in_flight_per_model=1, retry_after_seconds=3) as client:
            return await asyncio.gather(*(client.request(**protocol([photo(photos)])) for _ in range(3)))

    answers = asyncio.run(scenario())
    assert answers[0].status_code == 200  # admitted first; the others arrived while it ran
    for shed in answers[1:]:
        refused(shed, 503, "overloaded", MODEL)
        assert shed.headers["Retry-After"] == "3"


@pytest.mark.parametrize("protocol", [*IMAGE_PROTOCOLS, infer_tensor])
def test_a_stalled_upload_holds_no_slot_and_times_out_as_408(repository, photos, protocol):
    async def scenario():
        async with serving(repository, max_in_flight_per_model=1, body_timeout_seconds=0.5) as client:
            stalled_upload = asyncio.ensure_future(client.request(**stalled(protocol([photo(photos)]), 2.0)))
            await asyncio.sleep(0.1)  # it has sent one byte
            meanwhile = await client.request(**protocol([photo(photos)]))
            return meanwhile, await stalled_upload

    meanwhile, late = asyncio.run(scenario())
    assert meanwhile.status_code == 200  # the model's only slot was free for it
    refused(late, 408, "body_timeout", "0.5")


@pytest.mark.parametrize("protocol", [infer_json, infer_binary])
def test_past_the_pixel_budget_of_a_request_it_is_413(repository, protocol):
    image = encode(Image.new("RGB", (200, 200)), "PNG")

    async def scenario():
        async with serving(repository, max_request_pixels=100_000) as client:
            return (await client.request(**protocol([image] * 3)),
                    await client.request(**protocol([image] * 2)))

    over, within = asyncio.run(scenario())
    refused(over, 413, "too_many_pixels", "100000")
    assert within.status_code == 200


@pytest.mark.parametrize("protocol", IMAGE_PROTOCOLS)
def test_every_stage_is_timed_whichever_the_protocol(repository, photos, protocol):
    async def scenario():
        async with serving(repository) as client:
            return await client.request(**protocol([photo(photos)]))

    response = asyncio.run(scenario())
    assert response.status_code == 200
    stages = [part.split(";")[0] for part in response.headers["Server-Timing"].split(", ")]
    assert stages == ["read", "decode", "preprocess", "queue", "inference", "total", "encode"]
