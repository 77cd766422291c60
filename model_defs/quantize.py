"""INT8 models: static post-training quantization with onnxruntime's own tooling (QDQ, weights per
channel), calibrated on the shipped calibration photos; drift from FP32 measured on held-out ones.

A model named `<name>_int8` is `<name>` exported to FP32 as usual, then quantized.
"""
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from contract import CalibrationSet, Drift, Preprocessing, Quantization, Weights
from model_defs.photos import CALIBRATION_DIR, HELD_OUT_DIR, photo_tensor, photos_in
from model_defs.to_onnx import INPUT_NAME, ExportError

INT8_SUFFIX = "_int8"
CALIBRATION_METHOD = CalibrationMethod.MinMax
# uint8 activations with int8 weights (U8S8): the combination onnxruntime's x86 CPU kernels run fastest.
ACTIVATION_TYPE = QuantType.QUInt8
WEIGHT_TYPE = QuantType.QInt8
# Weights in 7 bits: without VNNI, x86 kernels add pairs of u8*s8 products in int16 (VPMADDUBSW), which
# saturates with full-range weights; onnxruntime's documented remedy, at no cost in speed.
REDUCE_RANGE = True
METHOD = "static post-training quantization, QDQ format (onnxruntime.quantization.quantize_static)"
TOP_K = 5
RANDOM_WEIGHTS_DRIFT_NOTE = ("Drift measured on random weights says little: a trained model's logits have a "
                             "structure that random ones lack, and INT8 may move them more or less.")


class PhotoReader(CalibrationDataReader):
    """The calibration photos, one a batch, as onnxruntime's calibrator asks for them."""

    def __init__(self, photos: list[Path], preprocessing: Preprocessing) -> None:
        self.batches = iter([{INPUT_NAME: photo_tensor(path, preprocessing)} for path in photos])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


def quantize_int8(name: str, fp32_path: Path, int8_path: Path, preprocessing: Preprocessing,
                  weights: Weights) -> Quantization:
    """Write the INT8 model of `fp32_path` to `int8_path`; return what was done and the drift."""
    calibration = photos_in(CALIBRATION_DIR)
    # The tooling's sessions warn about every initializer its optimiser drops: errors only.
    onnxruntime.set_default_logger_severity(3)
    with tempfile.TemporaryDirectory() as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        try:
            # Shape inference and graph optimisation first, as onnxruntime's tooling recommends.
            quant_pre_process(str(fp32_path), str(prepared))
            quantize_static(prepared, int8_path, PhotoReader(calibration, preprocessing),
                            quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=ACTIVATION_TYPE, weight_type=WEIGHT_TYPE, reduce_range=REDUCE_RANGE,
                            calibrate_method=CALIBRATION_METHOD)
        except Exception as error:  # the tooling raises many types; the model name is what matters
            raise ExportError(f"{name}: INT8 quantization failed: {' '.join(str(error).split())}") from None
    return Quantization(
        precision="int8", method=METHOD, per_channel=True, activations="uint8", weights="int8",
        fp32_size_bytes=fp32_path.stat().st_size,
        calibration=CalibrationSet(photos=[p.name for p in calibration], method=CALIBRATION_METHOD.name),
        drift=measure_drift(fp32_path, int8_path, preprocessing),
        note=RANDOM_WEIGHTS_DRIFT_NOTE if weights.kind == "random" else None,
    )


def held_out_logits(path: Path, preprocessing: Preprocessing) -> np.ndarray:
    """The model's logits for each held-out photo, one row a photo."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {INPUT_NAME: photo_tensor(photo, preprocessing)})[0]
                           for photo in photos_in(HELD_OUT_DIR)])


def measure_drift(fp32_path: Path, int8_path: Path, preprocessing: Preprocessing) -> Drift:
    reference = held_out_logits(fp32_path, preprocessing)
    quantized = held_out_logits(int8_path, preprocessing)
    return drift([p.name for p in photos_in(HELD_OUT_DIR)], reference, quantized)


def drift(photos: list[str], reference: np.ndarray, quantized: np.ndarray) -> Drift:
    """Top-1 agreement, top-5 overlap and logit cosine of `quantized` against `reference` (rows: photos)."""
    top = lambda logits: np.argsort(-logits, axis=1)[:, :TOP_K]  # noqa: E731
    overlap = [len(set(a) & set(b)) / TOP_K for a, b in zip(top(reference), top(quantized), strict=True)]
    cosine = (reference * quantized).sum(1) / (np.linalg.norm(reference, axis=1) * np.linalg.norm(quantized, axis=1))
    return Drift(photos=photos,
                 top1_agreement=float((reference.argmax(1) == quantized.argmax(1)).mean()),
                 top5_overlap=float(np.mean(overlap)),
                 logit_cosine_mean=float(cosine.mean()), logit_cosine_min=float(cosine.min()))
