"""Model outputs to the top-k classes a client reads."""
from typing import Literal

import numpy as np


def top_k(scores: np.ndarray, kind: Literal["logits", "probabilities"] | None,
          k: int) -> list[tuple[int, float]]:
    """The k most probable (class_id, probability) pairs of one output row, most probable first."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if kind != "probabilities":  # logits: softmax, shifted by the max for numerical safety
        exp = np.exp(scores - scores.max())
        scores = exp / exp.sum()
    k = min(k, scores.size)
    best = np.argpartition(-scores, k - 1)[:k]
    best = best[np.argsort(-scores[best], kind="stable")]
    return [(int(i), float(scores[i])) for i in best]
