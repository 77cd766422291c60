"""Benchmark the model server: requests/s and latency per model and concurrency level.

    python -m bench --image photo.jpg --model-repository DIR [--baseline]
    python -m bench --image photo.jpg --url http://127.0.0.1:8000 --model-repository DIR
    python -m bench --image photo.jpg --model-repository DIR --protocol rest,grpc

Without `--url` it starts `python -m service` on a free loopback port and stops it at the end.
Each model gets, per concurrency level, a short warm-up and then `--requests` multipart uploads of
the photo (stopped early at `--time-limit` seconds), from one keep-alive connection per client.
Beside each model it times bare onnxruntime `session.run` on the same model file with the same
threads, so the server's overhead reads as a ratio. `--baseline` also starts the plain FastAPI app
of `bench.baseline` on the same repository and measures it in the same run.
`--protocol` says how the photo is sent (several, comma-separated, take turns in one run): `predict`
uploads it to /predict; `rest` and `grpc` send it as a BYTES input of the Open Inference Protocol's
infer, over REST and over gRPC; with both, a table puts gRPC beside REST per model and client count.
Results go to `--out` as bench.json and bench.png, and tradeoff.png: each served model's latency
against its MACs and parameters (the papers' trade-off plot), also printed as a table.
"""
from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from urllib.parse import urlsplit

from bench.measure import PROTOCOLS, SETTLE_S, BenchError, measure, targets
from bench.report import Results, text, write_chart
from bench.servers import ServerFailed
from bench.tradeoff import write_tradeoff_chart


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--image", type=Path, required=True, help="a real photo to upload, e.g. a 600x400 JPEG")
    parser.add_argument("--url", help="a running server; default: start `python -m service` here")
    parser.add_argument("--model-repository", type=Path, default=os.environ.get("MODEL_REPOSITORY"),
                        help="the repository the server serves (default: $MODEL_REPOSITORY)")
    parser.add_argument("--models", help="comma-separated model names (default: all in the repository)")
    parser.add_argument("--concurrency", default="1,16", help="comma-separated client counts")
    parser.add_argument("--requests", type=int, default=400, help="measured requests per cell")
    parser.add_argument("--warmup", type=int, help="warm-up requests per cell (default: 2 per client, at least 10)")
    parser.add_argument("--time-limit", type=float, default=30.0, help="seconds per cell, warm-up included")
    parser.add_argument("--bare-runs", type=int, default=200, help="bare session.run calls per model")
    parser.add_argument("--intra-op-threads", type=int,
                        help="given to a started server and the bare run "
                             "(default: what the server reports, else the core count)")
    parser.add_argument("--baseline", action="store_true", help="also start and measure bench.baseline")
    parser.add_argument("--allow-remote", action="store_true", help="allow a --url that is not loopback")
    parser.add_argument("--protocol", default="predict",
                        help=f"comma-separated, of {', '.join(PROTOCOLS)}: a multipart upload to /predict, "
                             "or the photo as a BYTES input of the Open Inference Protocol over REST or gRPC")
    parser.add_argument("--grpc-port", type=int, default=8001,
                        help="the gRPC port of the --url server (a started one gets a free port)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    if min(args.concurrency) < 1 or args.requests < 1:
        parser.error("--concurrency and --requests must be positive")
    args.protocol = list(dict.fromkeys(args.protocol.split(",")))
    if unknown := [p for p in args.protocol if p not in PROTOCOLS]:
        parser.error(f"unknown --protocol {', '.join(unknown)}; choose from {', '.join(PROTOCOLS)}")
    return args


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def checked_url(url: str, allow_remote: bool) -> tuple[str, int]:
    """Host and port of --url; a remote one only when asked for, since the bench floods it."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise BenchError(f"--url must be http://host:port, not {url!r}")
    if not is_loopback(parts.hostname) and not allow_remote:
        raise BenchError(f"refusing non-loopback URL {url!r}: pass --allow-remote to load a remote server")
    return parts.hostname, parts.port or 80


def model_names(args: argparse.Namespace) -> list[str]:
    if args.models:
        return args.models.split(",")
    if args.model_repository is None:
        raise BenchError("name the models with --models or the repository with --model-repository")
    names = sorted(p.parent.name for p in args.model_repository.glob("*/metadata.json"))
    if not names:
        raise BenchError(f"no models (folders with metadata.json) in {args.model_repository}")
    return names


def run(args: argparse.Namespace) -> Results:
    """Every check that needs no server comes before a server is touched."""
    address = checked_url(args.url, args.allow_remote) if args.url else None
    try:
        image = args.image.read_bytes()
    except OSError as error:
        raise BenchError(f"cannot read --image: {error}") from error
    models = model_names(args)
    if address is None and args.model_repository is None:
        raise BenchError("to start a server, give --model-repository (or MODEL_REPOSITORY)")
    if args.baseline and args.model_repository is None:
        raise BenchError("--baseline needs --model-repository")
    if args.baseline and "predict" not in args.protocol:
        raise BenchError("--baseline serves /predict only: add predict to --protocol")
    args.out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        return measure(args, image, models, targets(args, address, models, stack))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import matplotlib  # noqa: F401  (checked now, not after minutes of measuring)
    except ImportError:
        print("bench: the chart needs matplotlib: pip install 'cnn-serve[bench]'", file=sys.stderr)
        return 2
    try:
        results = run(args)
    except (BenchError, ServerFailed) as error:
        print(f"bench: {error}", file=sys.stderr)
        return 2
    (args.out / "bench.json").write_text(json.dumps(asdict(results), indent=2), encoding="utf-8")
    write_chart(results.cells, args.out / "bench.png")
    write_tradeoff_chart(results.tradeoff, args.out / "tradeoff.png")
    print(text(results, SETTLE_S))
    print(f"\nwrote {args.out / 'bench.json'}, {args.out / 'bench.png'} and {args.out / 'tradeoff.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
