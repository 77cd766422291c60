"""The one comparison of an ONNX file's logits with a reference implementation's (PyTorch, Keras's
MobileNet, megvii's ShuffleNet): equal to 1e-4 of the logits' scale, and ranked alike."""
from pathlib import Path

import numpy as np
import onnxruntime

RELATIVE_TOLERANCE = 1e-4


def onnx_session(path: Path) -> onnxruntime.InferenceSession:
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def assert_same_logits(got: np.ndarray, expected: np.ndarray, scale: float | np.ndarray,
                       top5: bool = True) -> None:
    """`got` differs from `expected` by at most 1e-4 of `scale` (the largest logit's magnitude: of
    the batch, or per image with keepdims) and, with `top5`, ranks the same five classes first."""
    difference = np.abs(got - expected)
    assert (difference <= RELATIVE_TOLERANCE * scale).all(), difference.max(-1)
    if top5:
        assert (np.argsort(-got)[:, :5] == np.argsort(-expected)[:, :5]).all()
