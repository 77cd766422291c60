"""Build the networks, give them weights and write the ONNX model repository (`cnn-export`).

    python -m model_defs.export --out DIR [--models a,b] [--weights random|imagenet|DIR]
                                [--allow-random-fallback] [--seed N] [--weights-sha256 NAME=HEX ...]

Beside the seven default names, --models takes the papers' variants and INT8 models
(model_defs/variants.py), e.g. mobilenetv1_0.5_160, shufflenetv2_0.5x, mobilenetv2_int8.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from contract import Quantization
from model_defs.registry import MODELS, ModelSpec
from model_defs.to_onnx import ExportError
from model_defs.variants import ModelChoice, UnknownModelName, choose
from model_defs.weights import CheckpointUnavailable, WeightsError, build_with_weights, weights_files
from model_defs.write_repository import ExportedModel, write_model_folder


class UsageError(Exception):
    """A command-line argument that cannot work; found before any model is built."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="cnn-export", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="model repository folder to write")
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated names (default: all of {', '.join(MODELS)}); also the papers' "
                             "variants, e.g. mobilenetv1_0.5_160, shufflenetv1_g3_1.0x, and <name>_int8 for INT8")
    parser.add_argument("--weights", default="random",
                        help="'random', 'imagenet' (torchvision's checkpoints via torch.hub; Keras's HDF5 "
                             "file for mobilenetv1) or a folder holding <name>.pth / <name>.safetensors "
                             "state_dicts, megvii ShuffleNetV1 checkpoints (.pth) or Keras MobileNetV1 "
                             "files (<name>.h5 or Keras's own file name) (default: random)")
    parser.add_argument("--allow-random-fallback", action="store_true",
                        help="with --weights imagenet: use random weights (and say so in metadata) for "
                             "models whose checkpoint does not exist or cannot be downloaded")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    parser.add_argument("--version", type=int, default=None,
                        help="write numbered version folders <out>/<name>/<VERSION>/ (default: the "
                             "model folder itself, version 1)")
    parser.add_argument("--weights-sha256", action="append", default=[], metavar="NAME=HEX",
                        help="the sha256 a model's weights file must have, checked before it is read "
                             "(repeat for several models); Keras publishes no hash for its files")
    return parser.parse_args(argv)


def parse_pins(pins: list[str], specs: list[ModelSpec]) -> dict[str, str]:
    """`--weights-sha256 NAME=HEX` values as {name: hex}, for models being exported."""
    pinned = {}
    for pin in pins:
        name, _, digest = pin.partition("=")
        if not digest or len(digest) != 64 or any(c not in "0123456789abcdefABCDEF" for c in digest):
            raise UsageError(f"--weights-sha256 {pin}: expected NAME=<64 hex digits>")
        if name not in {spec.name for spec in specs}:
            raise UsageError(f"--weights-sha256 {pin}: {name!r} is not among the models exported")
        pinned[name] = digest.lower()
    return pinned


def select_models(names: str) -> list[ModelChoice]:
    requested = [name.strip() for name in names.split(",") if name.strip()]
    if not requested:
        raise UsageError(f"unknown model (none given); valid names: {', '.join(MODELS)}")
    try:
        return [choose(name) for name in dict.fromkeys(requested)]
    except UnknownModelName as error:
        raise UsageError(str(error)) from None


def check_weights(weights: str, specs: list[ModelSpec]) -> None:
    if weights in ("random", "imagenet"):
        return
    directory = Path(weights)
    if not directory.is_dir():
        raise UsageError(f"--weights {weights}: not 'random', 'imagenet' or an existing folder")
    missing = [spec for spec in specs if not any(path.is_file() for path in weights_files(spec, directory))]
    if missing:
        expected = [path.name for path in weights_files(missing[0], directory)]
        raise UsageError(f"--weights {weights}: no checkpoint for {', '.join(spec.name for spec in missing)} "
                         f"(expected {', '.join(expected[:-1])} or {expected[-1]})")


def prepare_output(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as error:
        raise UsageError(f"--out {out}: cannot write there ({error.strerror or error})") from None


def summary_table(rows: list[tuple[ExportedModel, float]]) -> str:
    header = f"{'name':<28} {'params':>10} {'MACs':>8} {'ONNX MB':>8} {'weights':<9} {'parity':>9} {'seconds':>7}"
    lines = [header, "-" * len(header)]
    for exported, seconds in rows:
        m = exported.metadata
        lines.append(f"{m.name:<28} {m.params:>10,} {m.macs / 1e6:>7.1f}M "
                     f"{m.onnx.size_bytes / 1e6:>8.1f} {m.weights.kind:<9} "
                     f"{m.export['parity']['max_abs_diff']:>9.1e} {seconds:>7.1f}")
    return "\n".join(lines)


def int8_summary(quantization: Quantization) -> str:
    drift = quantization.drift
    return (f"INT8 from {quantization.fp32_size_bytes / 1e6:.1f} MB FP32; against FP32 on {len(drift.photos)} "
            f"held-out photos: top-1 agreement {drift.top1_agreement:.2f}, top-5 overlap "
            f"{drift.top5_overlap:.2f}, logit cosine {drift.logit_cosine_mean:.3f} (min {drift.logit_cosine_min:.3f})")


def run(args: argparse.Namespace) -> list[tuple[ExportedModel, float]]:
    choices = select_models(args.models)
    specs = list({choice.spec.name: choice.spec for choice in choices}.values())
    check_weights(args.weights, specs)
    pinned = parse_pins(args.weights_sha256, specs)
    prepare_output(args.out)
    rows = []
    for index, choice in enumerate(choices, 1):
        spec = choice.spec
        started = time.perf_counter()
        built = build_with_weights(spec, args.weights, args.seed, args.allow_random_fallback, pinned.get(spec.name))
        weights = built.weights
        exported = write_model_folder(args.out, built.spec, built.model, weights, seed=args.seed, int8=choice.int8,
                                      version=args.version)
        seconds = time.perf_counter() - started
        parity = exported.metadata.export["parity"]["max_abs_diff"]
        print(f"[{index}/{len(choices)}] {choice.name}: {weights.kind} weights, "
              f"{exported.metadata.onnx.size_bytes / 1e6:.1f} MB, parity {parity:.1e}, {seconds:.1f} s",
              flush=True)
        if exported.metadata.quantization:
            print(f"    {int8_summary(exported.metadata.quantization)}", flush=True)
        if weights.note and args.weights != "random":
            print(f"    note: {weights.note}", flush=True)
        rows.append((exported, seconds))
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    try:
        rows = run(args)
    except (UsageError, WeightsError, ExportError) as error:
        hint = ""
        if isinstance(error, CheckpointUnavailable):
            hint = " (--allow-random-fallback exports it with random weights)"
        print(f"cnn-export: error: {error}{hint}", file=sys.stderr)
        return 2 if isinstance(error, UsageError) else 1
    print()
    print(summary_table(rows))
    print(f"\n{len(rows)} model(s) written to {os.fspath(args.out)} in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
