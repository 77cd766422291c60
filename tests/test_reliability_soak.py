"""A bounded soak: thousands of predictions across every model, through both protocols, and the
server's memory stays flat once it has warmed up."""
import asyncio
import base64
import itertools
import time

import httpx
from PIL import Image

from tests.service_fixtures import encode, rss_bytes

CONCURRENCY = 8
# Warm-up long enough for onnxruntime to have seen the batch sizes concurrent requests make: its
# memory grows once per new input shape (more so with its arena on), then stays.
WARMUP_PER_MODEL = 100
SOAK_REQUESTS = 2800
CHECKPOINTS = 4
MAX_RSS_GROWTH = 0.10
# The service hands inference memory back to the OS after a second without inference: RSS is read
# after this long idle, at the start and at the end alike, so both readings see the same state.
SETTLE_SECONDS = 2.5


def uploads(photos) -> list[bytes]:
    """The test photos as sent, plus a PNG and a small JPEG, so decoding varies too."""
    images = [p.read_bytes() for p in photos.values()]
    cat = Image.open(photos["chelsea"]).convert("RGB")
    return [*images, encode(cat, "PNG"), encode(cat.resize((120, 80)), "JPEG")]


async def run(url: str, jobs: list[tuple[str, bytes, bool]]) -> tuple[dict, float]:
    """Send every (model, image, through the Open Inference Protocol?) job, CONCURRENCY at a time."""
    statuses: dict[object, int] = {}
    queue = iter(jobs)
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        async def worker() -> None:
            for model, image, open_inference in queue:
                if open_inference:
                    response = await client.post(f"/v2/models/{model}/infer", json={"inputs": [{
                        "name": "image", "shape": [1], "datatype": "BYTES",
                        "data": [base64.b64encode(image).decode()]}]})
                else:
                    response = await client.put(f"/predict/{model}", content=image)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return statuses, time.perf_counter() - started


def test_thousands_of_requests_across_all_models_leave_memory_flat(served, photos):
    images = uploads(photos)
    server = served()
    models = [m["name"] for m in httpx.get(server.url + "/models").json()["models"]]
    pid = server.process.pid
    at_start = rss_bytes(pid)
    warmup = [(m, i, n % 5 == 0) for n, (m, i) in enumerate(
        itertools.product(models, images * (WARMUP_PER_MODEL // len(images) + 1)))]
    warm_statuses, _ = asyncio.run(run(server.url, warmup))
    time.sleep(SETTLE_SECONDS)
    warmed = rss_bytes(pid)
    cycle = itertools.cycle(itertools.product(models, images))
    soak = [(m, i, n % 5 == 0) for n, (m, i) in zip(range(SOAK_REQUESTS), cycle, strict=False)]
    part = len(soak) // CHECKPOINTS
    statuses, seconds, checkpoints = {}, 0.0, []
    for start in range(0, len(soak), part):
        part_statuses, part_seconds = asyncio.run(run(server.url, soak[start:start + part]))
        for status, count in part_statuses.items():
            statuses[status] = statuses.get(status, 0) + count
        seconds += part_seconds
        checkpoints.append(rss_bytes(pid))
    time.sleep(SETTLE_SECONDS)
    after = rss_bytes(pid)
    summary = httpx.get(server.url + "/metrics", params={"format": "json"}).json()

    growth = (after - warmed) / warmed
    print(f"\nRSS at ready {at_start / 2**20:.0f} MiB, after {len(warmup)} warm-up requests "
          f"{warmed / 2**20:.0f} MiB, then every {part} requests "
          f"{', '.join(f'{c / 2**20:.0f}' for c in checkpoints)} MiB, settled {after / 2**20:.0f} MiB: "
          f"{growth:+.1%} over {len(soak)} "
          f"requests; soak {len(soak) / seconds:.0f} requests/s over {len(models)} models, "
          f"statuses {statuses}")
    assert warm_statuses == {200: len(warmup)} and statuses == {200: len(soak)}
    assert sum(s["requests"] for s in summary["models"].values()) == len(warmup) + len(soak)
    assert growth < MAX_RSS_GROWTH
