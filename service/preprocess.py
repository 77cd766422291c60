"""Image bytes in, float32 NCHW array out, exactly as the model repository contract says.

The steps are torchvision's `Resize(resize) + CenterCrop(crop) + ToTensor() + Normalize(mean, std)`
on a PIL image. This module knows nothing of ONNX or HTTP; it raises the errors in `errors`.

Choices a caller should know:
- Transparency (RGBA, LA, PA, palette or RGB with a transparent colour) is composited on white,
  as a browser shows such an image, instead of keeping whatever colour hides under alpha = 0.
- 16-bit grayscale (I;16) and 32-bit integer (I) images are scaled to 8 bits (value / 257);
  Pillow's own convert() would clip everything above 255 to white.
- A JPEG is decoded with Pillow's draft mode: libjpeg scales by 1/2, 1/4 or 1/8 while decoding,
  never below the resize target on the shorter side, so a 12 MP photo is not decoded at full size.
- Only the first frame of an animated image (GIF, WebP, APNG) is used.
"""
import io
import math
import time
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from contract import Preprocessing
from service.errors import EmptyBody, ImageTooLarge, UndecodableImage

INTERPOLATION = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                 "bicubic": Image.Resampling.BICUBIC}
FILTER_SUPPORT = {"nearest": 0.5, "bilinear": 1.0, "bicubic": 2.0}  # Pillow's, in source pixels at scale 1
# EXIF orientation tag value -> the transposition that turns the stored pixels upright.
UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
           4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
           6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}
TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}  # these swap width and height


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image  # 8-bit RGB, upright, possibly reduced by JPEG draft mode
    width: int          # size of the upright image as stored in the file, before any reduction
    height: int
    format: str


def decode(data: bytes, preprocessing: Preprocessing, max_pixels: int) -> DecodedImage:
    """Open any image Pillow knows, upright and as 8-bit RGB, reduced early when it is a big JPEG."""
    if not data:
        raise EmptyBody()
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > max_pixels:
            raise ImageTooLarge(max_pixels, width, height)
        image_format = image.format or "unknown"
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
        if image_format == "JPEG":
            # Ask for at least resize x resize: libjpeg then keeps the shorter side >= resize.
            image.draft(image.mode, (preprocessing.resize, preprocessing.resize))
        image.load()
        image = _to_rgb(image)
        if orientation in UPRIGHT:
            image = image.transpose(UPRIGHT[orientation])
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(max_pixels) from exc
    except UnidentifiedImageError as exc:
        raise UndecodableImage("not an image format Pillow recognises") from exc
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError) as exc:
        # Truncated or corrupt files surface as any of these from Pillow's decoders.
        raise UndecodableImage(f"{type(exc).__name__}: {exc}") from exc
    if orientation in TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    return DecodedImage(image, width, height, image_format)


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image  # convert() would copy it, which costs real time on a big photo
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(image).astype(np.float32)
        if mode.startswith("I;16") or values.max(initial=0) > 255:
            values = values / 257.0
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        return Image.fromarray(np.clip(np.rint(np.asarray(image)), 0, 255).astype(np.uint8), "L").convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def resized_size(width: int, height: int, resize: int) -> tuple[int, int]:
    """Shorter side to `resize`, longer side truncated, as torchvision's Resize(int) computes it."""
    if width <= height:
        return resize, int(resize * height / width)
    return int(resize * width / height), resize


def to_tensor(image: Image.Image, preprocessing: Preprocessing) -> np.ndarray:
    """Resize, centre-crop and normalise an RGB image into a (1, 3, crop, crop) float32 array."""
    p = preprocessing
    width, height = resized_size(*image.size, p.resize)
    top = int(round((height - p.crop) / 2.0))
    left = int(round((width - p.crop) / 2.0))
    # Resample only what the centre crop keeps, in Pillow's own order (horizontal pass, then
    # vertical) and with `box`, which keeps the full resize's scale and filter support: the result
    # is resize-then-crop's but for float rounding (one level on under 0.05 % of values), at about
    # half the cost for a photo, and a 1 x 100000 strip never becomes a gigabyte image.
    sx, sy = image.width / width, image.height / height
    reach = math.ceil(FILTER_SUPPORT[p.interpolation] * max(sy, 1.0)) + 1  # source rows per output row
    first = max(0, int(top * sy) - reach)
    last = min(image.height, math.ceil((top + p.crop) * sy) + reach)
    rows = image.crop((0, first, image.width, last))
    resample = INTERPOLATION[p.interpolation]
    rows = rows.resize((p.crop, rows.height), resample, box=(left * sx, 0, (left + p.crop) * sx, rows.height))
    image = rows.resize((p.crop, p.crop), resample,
                        box=(0, top * sy - first, p.crop, (top + p.crop) * sy - first))
    pixels = np.asarray(image)
    table = _normalisation_table(p.scale, p.mean, p.std)
    x = np.empty((1, 3, p.crop, p.crop), dtype=np.float32)
    for channel, source in enumerate((2, 1, 0) if p.color == "BGR" else (0, 1, 2)):
        # One table lookup per pixel, straight into the NCHW output: no float copy of the image.
        np.take(table[channel], pixels[..., source], out=x[0, channel])
    return x


@lru_cache(maxsize=64)
def _normalisation_table(scale: float, mean: tuple[float, float, float],
                         std: tuple[float, float, float]) -> np.ndarray:
    """(3, 256): the normalised float32 value of every 8-bit level, computed as Normalize does."""
    levels = np.arange(256, dtype=np.float32)[np.newaxis, :] / np.float32(scale)
    return (levels - np.asarray(mean, np.float32)[:, np.newaxis]) / np.asarray(std, np.float32)[:, np.newaxis]


def warm_up() -> None:
    """Decode a tiny JPEG and PNG once, so the first request does not pay for plugin imports."""
    spec = Preprocessing(resize=8, crop=8, mean=(0, 0, 0), std=(1, 1, 1))
    for image_format in ("JPEG", "PNG"):
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16)).save(buffer, image_format)
        preprocess(buffer.getvalue(), spec, 256)


@dataclass(frozen=True)
class PreparedImage:
    tensor: np.ndarray  # (1, 3, crop, crop) float32
    width: int          # of the upright image as uploaded
    height: int
    format: str
    decode_ms: float
    preprocess_ms: float


def prepare(data: bytes, preprocessing: Preprocessing, max_pixels: int) -> PreparedImage:
    """decode + to_tensor, timing the two stages apart, for the service's worker threads."""
    started = time.perf_counter()
    decoded = decode(data, preprocessing, max_pixels)
    decoded_at = time.perf_counter()
    tensor = to_tensor(decoded.image, preprocessing)
    return PreparedImage(tensor, decoded.width, decoded.height, decoded.format,
                         (decoded_at - started) * 1000, (time.perf_counter() - decoded_at) * 1000)


def preprocess(data: bytes, preprocessing: Preprocessing, max_pixels: int) -> np.ndarray:
    """decode + to_tensor, for callers that do not time the two stages apart."""
    return to_tensor(decode(data, preprocessing, max_pixels).image, preprocessing)
