"""Write one model folder of the model repository (docs/model-repository.md, version 1)."""
import os
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import onnx
import onnxruntime
import torch
from torch import nn

from contract import (
    LABELS_FILE,
    MODEL_FILE,
    SCHEMA_VERSION,
    InputSpec,
    Labels,
    ModelMetadata,
    OnnxFile,
    OutputSpec,
    Quantization,
    Weights,
    sha256_of,
    write_metadata,
)
from model_defs.macs import count_macs, count_params
from model_defs.quantize import INT8_SUFFIX, quantize_int8
from model_defs.registry import ModelSpec
from model_defs.to_onnx import INPUT_NAME, OPSET, OUTPUT_NAME, ExportError, check_parity, export_onnx


@dataclass(frozen=True)
class ExportedModel:
    folder: Path
    metadata: ModelMetadata


def build_metadata(spec: ModelSpec, model: nn.Module, weights: Weights, onnx_path: Path,
                   labels: list[str], parity: dict, quantization: Quantization | None = None) -> ModelMetadata:
    return ModelMetadata(
        schema_version=SCHEMA_VERSION,
        name=spec.name + INT8_SUFFIX if quantization else spec.name,
        architecture=spec.architecture,
        layout=spec.layout,
        paper=spec.paper,
        model_file=MODEL_FILE,
        optimized_model_file=None,
        onnx=OnnxFile(opset=OPSET, size_bytes=onnx_path.stat().st_size, sha256=sha256_of(onnx_path)),
        input=InputSpec(name=INPUT_NAME, dtype="float32", layout="NCHW",
                        shape=[None, 3, spec.input_size, spec.input_size]),
        output=OutputSpec(name=OUTPUT_NAME, dtype="float32", shape=[None, len(labels)], kind="logits"),
        preprocessing=spec.preprocessing,
        labels=Labels(file=LABELS_FILE, set=spec.labels.name, count=len(labels)),
        params=count_params(model),
        macs=count_macs(model, spec.input_size),
        weights=weights,
        export={"torch": torch.__version__.split("+")[0], "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__,
                "created_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "parity": parity},
        quantization=quantization,
    )


def write_model_folder(repository: Path, spec: ModelSpec, model: nn.Module, weights: Weights,
                       seed: int = 0, int8: bool = False, version: int | None = None) -> ExportedModel:
    """Export `model` into `<repository>/<name>/` (or the version folder `<name>/<version>/`),
    replacing any earlier export of it; with `int8`, into `<name>_int8/`, quantized from the FP32
    export (which is checked against PyTorch first).

    The folder is assembled under a hidden name and renamed at the end, so a reader of the
    repository never sees a half-written model.
    """
    labels = spec.labels.read()
    name = spec.name + INT8_SUFFIX if int8 else spec.name
    staging = repository / (f".{name}.{version}.partial" if version else f".{name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with torch.no_grad():
            classes = model.eval()(torch.zeros(1, 3, spec.input_size, spec.input_size)).shape[1]
        if classes != len(labels):
            raise ExportError(f"{spec.name}: {len(labels)} labels in {spec.labels.file.name} but the model "
                              f"has {classes} outputs")
        onnx_path = staging / MODEL_FILE
        fp32_path = staging / "fp32.onnx" if int8 else onnx_path
        export_onnx(model, spec, fp32_path)
        parity = check_parity(model, spec, fp32_path, seed=seed + 1)
        quantization = None
        if int8:
            quantization = quantize_int8(name, fp32_path, onnx_path, spec.preprocessing, weights)
            fp32_path.unlink()
        metadata = build_metadata(spec, model, weights, onnx_path, labels, parity, quantization)
        shutil.copyfile(spec.labels.file, staging / LABELS_FILE)
        write_metadata(staging, metadata)
        folder = repository / name / str(version) if version else repository / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.parent.mkdir(exist_ok=True)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportedModel(folder, metadata)
