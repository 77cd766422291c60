"""Turn a PyTorch model into one self-contained ONNX file and prove onnxruntime computes the same."""
import warnings
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from torch import nn

from model_defs.registry import ModelSpec
from model_defs.synthetic import synthetic_images

OPSET = 18  # converting down to 17 fails inside onnx's version converter
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
PARITY_BATCH_SIZES = (1, 4)
# float32 rounding (the exporter also folds BatchNorm into the conv weights) moves the logits by
# 1e-6..3.1e-5 of their largest magnitude for these seven networks; a wrong op moves them by their
# own size. 1e-4 of the logit scale leaves 3x headroom above the first and still catches a 0.01
# shift of every logit.
PARITY_RELATIVE_TOLERANCE = 1e-4


class ExportError(Exception):
    """A model could not be exported, or its ONNX file does not compute what the model does."""


def export_onnx(model: nn.Module, spec: ModelSpec, path: Path) -> None:
    """One self-contained ONNX file (weights inside), batch axis dynamic.

    The TorchScript exporter (`dynamo=False`): for these networks its graphs have the same nodes
    as the torch.export-based exporter's and run as fast, and it exports in about a tenth of the
    time (0.5 s against 5 s of CPU per model), which every `cnn-export` run and test session pays.
    """
    example = torch.zeros(2, 3, spec.input_size, spec.input_size)
    with warnings.catch_warnings():
        # Its deprecation notice, and tracer warnings about the shapes channel_shuffle fixes on purpose.
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model.eval(), (example,), str(path), dynamo=False, opset_version=OPSET,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
        except Exception as error:  # the exporter raises many types; the model name is what matters
            raise ExportError(f"{spec.name}: ONNX export failed: {error}") from None


@torch.no_grad()
def check_parity(model: nn.Module, spec: ModelSpec, path: Path, seed: int) -> dict:
    """Compare onnxruntime with PyTorch (eval) at batch 1 and 4 on photo-like inputs.

    Returns `{"batch_sizes", "max_abs_diff", "top5_equal"}`; raises ExportError on a mismatch.
    """
    images = synthetic_images(max(PARITY_BATCH_SIZES), spec.preprocessing, seed)
    max_abs_diff = 0.0
    scale = 0.0
    top5_equal = True
    session = None
    for batch_size in PARITY_BATCH_SIZES:
        x = images[:batch_size]
        expected = model.eval()(x).numpy()
        try:
            session = session or onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})
        except Exception as error:  # onnxruntime's error types share no base class but Exception
            raise ExportError(f"{spec.name}: onnxruntime cannot run the exported file at batch {batch_size}: "
                              f"{' '.join(str(error).split())}") from None
        if got.shape != expected.shape:
            raise ExportError(f"{spec.name}: ONNX output shape {got.shape} != PyTorch {expected.shape}")
        max_abs_diff = max(max_abs_diff, float(np.abs(got - expected).max()))
        scale = max(scale, float(np.abs(expected).max()))
        top5 = lambda logits: np.argsort(-logits, axis=1)[:, :5]  # noqa: E731
        top5_equal = top5_equal and bool((top5(got) == top5(expected)).all())
    tolerance = PARITY_RELATIVE_TOLERANCE * max(1.0, scale)
    if max_abs_diff > tolerance or not top5_equal:
        raise ExportError(f"{spec.name}: onnxruntime disagrees with PyTorch: max abs diff {max_abs_diff:.3g} "
                          f"(tolerance {tolerance:.3g}), top-5 equal: {top5_equal}")
    return {"batch_sizes": list(PARITY_BATCH_SIZES), "max_abs_diff": max_abs_diff, "top5_equal": top5_equal}
