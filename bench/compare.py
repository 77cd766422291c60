"""Server CPU per photo: one `/compare` of every model against one `/predict` per model.

    python -m bench.compare --image photo.jpg --model-repository DIR [--rounds 40]

Starts `python -m service` on a free loopback port and sends the photo, one request at a time on one kept-alive
connection, in three ways per round: a multipart upload to `/predict/{model}` for each model (what
the comparison page sent before `/compare`), one `/compare`, and one `/compare?sequential=true`
(what the page sends). The server's CPU (user + system, from /proc) is read around each, and the
ways take turns within a round, so drift in the machine's load touches all three alike.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.load import multipart_request, read_response
from bench.servers import LOOPBACK, ServerFailed, cpu_seconds, running_service

WARMUP_ROUNDS = 3


@dataclass
class Way:
    """One way of classifying the photo with every model: its requests, and what each round cost."""

    name: str
    paths: list[str]
    cpu_ms: list[float] = field(default_factory=list)
    wall_ms: list[float] = field(default_factory=list)

    def summary(self, reference: Way) -> dict:
        cpu, wall = _mean(self.cpu_ms), _mean(self.wall_ms)
        return {"way": self.name, "requests": len(self.paths), "server_cpu_ms_per_photo": round(cpu, 2),
                "wall_ms_per_photo": round(wall, 2), "cpu_ratio": round(cpu / _mean(reference.cpu_ms), 3)}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def ways(models: list[str]) -> list[Way]:
    return [Way(f"{len(models)} x /predict", [f"/predict/{m}?input_image=true" for m in models]),
            Way("/compare", [f"/compare?models={','.join(models)}&input_image=true"]),
            Way("/compare?sequential=true", [f"/compare?models={','.join(models)}&input_image=true&sequential=true"])]


async def measure(host: str, port: int, pid: int, image: bytes, filename: str, models: list[str],
                  rounds: int) -> list[Way]:
    reader, writer = await asyncio.open_connection(host, port)
    measured = ways(models)
    requests = {way.name: [multipart_request(host, port, p, image, filename) for p in way.paths]
                for way in measured}
    try:
        for round_ in range(WARMUP_ROUNDS + rounds):
            for way in measured:
                cpu, started = cpu_seconds(pid), time.perf_counter()
                for request in requests[way.name]:
                    writer.write(request)
                    response = await read_response(reader)
                    if response.status != 200:
                        raise ServerFailed(f"{way.name}: HTTP {response.status}")
                if round_ >= WARMUP_ROUNDS:
                    way.wall_ms.append((time.perf_counter() - started) * 1000)
                    way.cpu_ms.append(((cpu_seconds(pid) or 0) - (cpu or 0)) * 1000)
    finally:
        writer.close()
    return measured


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n")[0])
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--model-repository", type=Path, required=True,
                        help="the repository to serve; every model in it is compared")
    parser.add_argument("--rounds", type=int, default=40, help="measured rounds (after 3 warm-up ones)")
    parser.add_argument("--out", type=Path, help="also write the results here as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    models = sorted(p.parent.name for p in args.model_repository.glob("*/metadata.json"))
    if not models:
        print(f"bench.compare: no models in {args.model_repository}", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as stack:
        log = stack.enter_context(_log_file(args.out))
        try:
            server = stack.enter_context(running_service(args.model_repository, log))
            server.wait_ready()
            measured = asyncio.run(measure(LOOPBACK, server.port, server.pid, args.image.read_bytes(),
                                           args.image.name, models, args.rounds))
        except ServerFailed as error:
            print(f"bench.compare: {error}", file=sys.stderr)
            return 2
    results = [way.summary(measured[0]) for way in measured]
    print(f"{len(models)} models, {args.rounds} rounds, photo {args.image.name}: server CPU per photo")
    for row in results:
        print(f"  {row['way']:<28}{row['requests']:>3} requests  {row['server_cpu_ms_per_photo']:>8.1f} ms CPU"
              f"  {row['wall_ms_per_photo']:>8.1f} ms wall  {row['cpu_ratio']:>6.2f}x")
    if args.out:
        args.out.write_text(json.dumps({"models": models, "rounds": args.rounds, "ways": results,
                                        "rounds_ms": [asdict(w) for w in measured]}, indent=2))
    return 0


@contextlib.contextmanager
def _log_file(out: Path | None):
    """The service's log beside --out, or in a temporary folder."""
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        yield out.with_suffix(".service.log")
        return
    with tempfile.TemporaryDirectory() as folder:
        yield Path(folder) / "service.log"


if __name__ == "__main__":
    sys.exit(main())
