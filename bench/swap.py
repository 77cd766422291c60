"""A version swap under load: latency before, during and after a repository load of a new version.

Starts `python -m service` in explicit model control mode on a copy of one model as version 1,
drives it with `--concurrency` clients uploading a photo to /predict, then copies the same files in
as version 2 and calls `POST /v2/repository/models/{model}/load` (load, warm-up, swap) while the
clients keep going. Each request is put in the phase in which it started: before the load call,
during it, or after it returned. Every answer must be 200: a swap drops nothing.

    python -m bench.swap --image tests/data/coffee.jpg --model-repository models --model mobilenetv3_small
"""
import argparse
import asyncio
import json
import shutil
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.load import HttpConnection, multipart_request, percentile
from bench.servers import running_service


@dataclass(frozen=True)
class SwapPhase:
    phase: str
    requests: int
    errors: int
    p50_ms: float | None
    p99_ms: float | None


@dataclass
class Timeline:
    """When the load call ran (perf_counter), and each request as (started, latency ms, ok)."""

    load_started: float = float("inf")
    load_finished: float = float("inf")
    requests: list[tuple[float, float, bool]] | None = None

    def phases(self) -> list[SwapPhase]:
        spans = {"before": (float("-inf"), self.load_started),
                 "during": (self.load_started, self.load_finished),
                 "after": (self.load_finished, float("inf"))}
        result = []
        for phase, (start, end) in spans.items():
            picked = [(ms, ok) for began, ms, ok in self.requests or [] if start <= began < end]
            latencies = [ms for ms, ok in picked if ok]
            result.append(SwapPhase(phase, len(picked), len(picked) - len(latencies),
                                    percentile(latencies, 50), percentile(latencies, 99)))
        return result


async def client(connection: HttpConnection, stop: asyncio.Event, timeline: Timeline) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        try:
            ok = (await connection.exchange()).ok
        except (OSError, EOFError, asyncio.IncompleteReadError):
            ok = False
            await connection.close()
        assert timeline.requests is not None
        timeline.requests.append((started, (time.perf_counter() - started) * 1000, ok))


def load_model(url: str, model: str) -> None:
    request = urllib.request.Request(f"{url}/v2/repository/models/{model}/load", method="POST")
    with urllib.request.urlopen(request, timeout=300) as answer:
        answer.read()


async def swap_under_load(url: str, request: bytes, host: str, port: int, concurrency: int,
                          model_folder: Path, source: Path, model: str, before_s: float,
                          after_s: float) -> Timeline:
    timeline, stop = Timeline(requests=[]), asyncio.Event()
    connections = [HttpConnection(host, port, request) for _ in range(concurrency)]
    clients = [asyncio.create_task(client(c, stop, timeline)) for c in connections]
    await asyncio.sleep(before_s)
    await asyncio.to_thread(shutil.copytree, source, model_folder / "2")  # before the load: not timed
    timeline.load_started = time.perf_counter()
    await asyncio.to_thread(load_model, url, model)
    timeline.load_finished = time.perf_counter()
    await asyncio.sleep(after_s)
    stop.set()
    await asyncio.gather(*clients)
    for connection in connections:
        await connection.close()
    return timeline


def measure(repository: Path, model: str, image: Path, concurrency: int, before_s: float,
            after_s: float, log: Path) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        model_folder = Path(folder) / model
        shutil.copytree(repository / model, model_folder / "1")
        with running_service(Path(folder), log, MODEL_CONTROL_MODE="explicit",
                             STARTUP_MODELS=model) as server:
            server.wait_ready()
            request = multipart_request(server.host, server.port, f"/predict/{model}",
                                        image.read_bytes(), image.name)
            timeline = asyncio.run(swap_under_load(
                server.url, request, server.host, server.port, concurrency, model_folder,
                repository / model, model, before_s, after_s))
    return {"model": model, "concurrency": concurrency,
            "swap_s": round(timeline.load_finished - timeline.load_started, 3),
            "phases": [asdict(p) for p in timeline.phases()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, required=True, help="a real photo to upload")
    parser.add_argument("--model-repository", type=Path, required=True,
                        help="an exported repository; the model's folder is copied, not changed")
    parser.add_argument("--model", default="mobilenetv3_small")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--before", type=float, default=8.0, help="seconds of load before the swap")
    parser.add_argument("--after", type=float, default=8.0, help="seconds of load after the swap")
    parser.add_argument("--log", type=Path, default=Path("bench-results/swap-service.log"),
                        help="the service's output (beside the bench's results, which git ignores)")
    args = parser.parse_args()
    args.log.parent.mkdir(parents=True, exist_ok=True)
    result = measure(args.model_repository, args.model, args.image, args.concurrency, args.before,
                     args.after, args.log)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
