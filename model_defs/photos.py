"""The real photos shipped with the exporter: one set calibrates INT8 models, the other, held out
from calibration, measures how far their answers drift from FP32 (data/photos/README.md)."""
from pathlib import Path

import numpy as np
from PIL import Image

from contract import Preprocessing

PHOTOS_DIR = Path(__file__).parent / "data" / "photos"
CALIBRATION_DIR = PHOTOS_DIR / "calibration"
HELD_OUT_DIR = PHOTOS_DIR / "held_out"


def photos_in(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.jpg"))


def photo_tensor(path: Path, preprocessing: Preprocessing) -> np.ndarray:
    """One photo as the model's NCHW float32 input (batch 1), by docs/model-repository.md's
    "Preprocessing, exactly": resize by its rule, centre crop, colour order, scale, normalise."""
    with Image.open(path) as opened:
        image = opened.convert("RGB")
    # Pillow's resize filters as it shrinks: for weights trained without antialiasing the input is
    # a little smoother than theirs, which matters little for calibration ranges and not at all
    # for the drift, where FP32 and INT8 see the same tensors.
    image = image.resize(preprocessing.resized_size(*image.size),
                         Image.Resampling[preprocessing.interpolation.upper()])
    crop = preprocessing.crop
    top = round((image.height - crop) / 2)
    left = round((image.width - crop) / 2)
    pixels = np.asarray(image.crop((left, top, left + crop, top + crop)), dtype=np.float32)
    if preprocessing.color == "BGR":
        pixels = pixels[:, :, ::-1]
    x = (pixels / preprocessing.scale - np.array(preprocessing.mean, np.float32)) \
        / np.array(preprocessing.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32)
