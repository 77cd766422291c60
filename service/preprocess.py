"""Image bytes in, float32 NCHW array out, exactly as the model repository contract says.

The steps are those the model's weights were trained with, as its metadata names them: by default
torchvision's `Resize(resize) + CenterCrop(crop) + ToTensor() + Normalize(mean, std)` on a PIL
image; also the longer side rounded, both sides squashed, resizing without antialiasing, BGR and
unnormalised 0-255 input. This module knows nothing of ONNX or HTTP; it raises the errors in `errors`.

Choices a caller should know:
- Transparency (RGBA, LA, PA, palette, RGB or 16-bit grey with a transparent colour) is
  composited on white, as a browser shows such an image, instead of keeping whatever colour hides
  under alpha = 0. Only the rows the resize and crop read are converted, a band at a time.
- 16-bit grayscale (I;16) and 32-bit integer (I) images are scaled to 8 bits (value / 257);
  Pillow's own convert() would clip everything above 255 to white.
- A JPEG (or an MPO, a phone's JPEG frames) is decoded with Pillow's draft mode: libjpeg scales by
  1/2, 1/4 or 1/8 while decoding, never below the resize target on the shorter side. Not for a
  model resized without antialiasing: its weights saw individual source pixels.
- Only the first frame of an animated image (GIF, WebP, APNG, MPO) or page of a TIFF is used.
- A 32-bit float image (mode F, from TIFF) is scaled by its real range: all values within 0..1 are
  multiplied by 255, values within 0..255 are kept, any other range is stretched min-to-max onto
  0..255 (a constant image outside 0..255 is clipped). NaN or infinity makes it undecodable.

Hostile input is refused before decoding, from the bytes and the header alone:
- Only JPEG, PNG, WebP, GIF, BMP and TIFF are opened (`ACCEPTED_FORMATS` in `errors`). A file
  whose signature names another format is `UnsupportedImageFormat`. ICO stays out (Pillow decodes
  the biggest icon while opening it), and so does a run-length-encoded BMP (decoded in Python).
- The pixel limit is checked on the size the header declares: opening these six formats parses
  headers only (GIF: up to the first frame's descriptor, TIFF: the first directory).
- `image_checks` walks a file's structure (JPEG scans, and scans x pixels; PNG chunks; GIF
  blocks) and computes its working memory from its header, which `reserve` is told and
  `max_working_bytes` bounds, before a pixel is decoded.
"""
import io
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import ExifTags, Image

from contract import Preprocessing
from service.errors import EmptyBody, ImageTooComplex, ImageTooLarge, UndecodableImage
from service.image_checks import (
    BAND_ROWS,
    MAX_JPEG_SCANS,
    WorkingMemory,
    check_structure,
    open_accepted,
    working_memory,
)

DRAFT_FORMATS = ("JPEG", "MPO")  # an MPO (many phones' photos) is JPEG frames: Pillow opens the first

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
    image: Image.Image  # upright, in the mode it was decoded in, possibly reduced by JPEG draft mode
    width: int          # size of the upright image as stored in the file, before any reduction
    height: int
    format: str


Reserve = Callable[[int], None]  # told an image's working memory before it is decoded; may raise


def decode(data: bytes, preprocessing: Preprocessing, max_pixels: int, *,
           max_scans: int = MAX_JPEG_SCANS, reserve: Reserve | None = None,
           max_working_bytes: int | None = None) -> DecodedImage:
    """Open an image of an accepted format, upright, reduced early if a big JPEG.

    Its working memory (`image_checks.working_memory`) is passed to `reserve`, once, before any
    pixel is decoded; more than `max_working_bytes` is `ImageTooComplex`.
    """
    if not data:
        raise EmptyBody()
    jpeg_scans = check_structure(data, max_scans)
    try:
        image = open_accepted(data)
        width, height = image.size  # as the header declares it: nothing is decoded yet
        if width * height > max_pixels:
            raise ImageTooLarge(max_pixels, width, height)
        image_format = image.format or "unknown"
        orientation = _orientation(image, data)
        if image_format in DRAFT_FORMATS and preprocessing.antialias:
            # Ask for at least resize x resize: libjpeg then keeps the shorter side >= resize.
            image.draft(image.mode, (preprocessing.resize, preprocessing.resize))
        memory = working_memory(image, (width, height), jpeg_scans, preprocessing,
                                orientation is None or orientation in UPRIGHT)
        _admit(memory, reserve, max_working_bytes)
        image.load()
        if orientation is None:
            orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
        if orientation in UPRIGHT:
            image = image.transpose(UPRIGHT[orientation])
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(max_pixels) from exc
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError) as exc:
        # Truncated or corrupt files surface as any of these from Pillow's decoders.
        raise UndecodableImage(f"{type(exc).__name__}: {exc}") from exc
    if orientation in TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    return DecodedImage(image, width, height, image_format)


def _orientation(image: Image.Image, data: bytes) -> int | None:
    """The EXIF orientation, or None where only decoding tells it: Pillow's PNG plugin decodes the
    pixels to look for an eXIf chunk after them."""
    if image.format == "PNG" and "exif" not in image.info:
        return None if b"eXIf" in data else 1
    return image.getexif().get(ExifTags.Base.Orientation, 1)


def _admit(memory: WorkingMemory, reserve: Reserve | None, max_working_bytes: int | None) -> None:
    if max_working_bytes is not None and memory.bytes > max_working_bytes:
        raise ImageTooComplex(f"{memory.cause} needs ~{memory.bytes / 2**20:.0f} MiB to decode and "
                              f"preprocess; the limit is {max_working_bytes / 2**20:.0f} MiB")
    if reserve is not None:
        reserve(memory.bytes)


@dataclass(frozen=True)
class Levels:
    """How a 16-bit, 32-bit integer or float image's values become 8-bit levels, decided once for
    the whole image (by the rule in the module docstring) and applied band by band."""
    scale: float
    offset: float
    transparent: int | None  # the value a PNG's tRNS chunk makes transparent, composited as white

    def to_rgb(self, band: Image.Image) -> Image.Image:
        values = np.asarray(band).astype(np.float32)
        levels = values * np.float32(self.scale) - np.float32(self.offset) if self.scale != 1 else values
        if self.transparent is not None:
            levels[values == self.transparent] = 255
        return _levels_to_rgb(levels)


def _levels(image: Image.Image) -> Levels | None:
    """The levels rule of a 16-bit, 32-bit integer or float image; None for 8-bit modes."""
    mode = image.mode
    transparent = image.info.get("transparency")
    transparent = transparent if isinstance(transparent, int) else None
    if mode.startswith("I;16"):
        return Levels(1 / 257.0, 0, transparent)
    if mode == "I":
        high = image.getextrema()[1]
        assert not isinstance(high, tuple)  # one band: (min, max) numbers, not a pair per band
        return Levels(1 / 257.0 if high > 255 else 1, 0, transparent)
    if mode == "F":
        return _float_levels(image)
    return None


def _float_levels(image: Image.Image) -> Levels:
    """A float image's levels rule, from its range, read band by band."""
    low, high = math.inf, -math.inf
    for top in range(0, image.height, BAND_ROWS):
        values = np.asarray(image.crop((0, top, image.width, min(top + BAND_ROWS, image.height))))
        if not np.isfinite(values).all():
            raise UndecodableImage("the float image has NaN or infinite values")
        low, high = min(low, float(values.min(initial=math.inf))), max(high, float(values.max(initial=-math.inf)))
    if low >= 0 and high <= 1:
        return Levels(255, 0, None)
    if (low >= 0 and high <= 255) or low == high:
        return Levels(1, 0, None)
    scale = 255 / (high - low)  # in float64: high - low may overflow float32
    return Levels(scale, low * scale, None)


def rgb_bands(image: Image.Image, box: tuple[int, int, int, int]) -> Iterator[Image.Image]:
    """The `box` of the image as 8-bit RGB, `BAND_ROWS` rows at a time: a whole-image conversion
    (alpha compositing makes four copies) would cost many times the rows the crop reads."""
    levels = _levels(image)
    left, top, right, bottom = box
    for band_top in range(top, bottom, BAND_ROWS):
        band = image.crop((left, band_top, right, min(band_top + BAND_ROWS, bottom)))
        yield levels.to_rgb(band) if levels else _to_rgb(band)


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image  # convert() would copy it
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def _levels_to_rgb(values: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L").convert("RGB")


def to_tensor(image: Image.Image, preprocessing: Preprocessing) -> np.ndarray:
    """Resize, centre-crop and normalise an RGB image into a (1, 3, crop, crop) float32 array."""
    p = preprocessing
    width, height = p.resized_size(*image.size)
    top = round((height - p.crop) / 2.0)
    left = round((width - p.crop) / 2.0)
    sx, sy = image.width / width, image.height / height
    if p.antialias:
        pixels = np.asarray(_filtered_crop(image, p, sx, sy, left, top))
    else:
        pixels = _unfiltered_crop(image, p.crop, sx, sy, left, top)
    table = _normalisation_table(p.scale, p.mean, p.std)
    x = np.empty((1, 3, p.crop, p.crop), dtype=np.float32)
    for channel, source in enumerate((2, 1, 0) if p.color == "BGR" else (0, 1, 2)):
        # One table lookup per pixel, straight into the NCHW output: no float copy of the image.
        np.take(table[channel], pixels[..., source], out=x[0, channel])
    return x


def to_picture(tensor: np.ndarray, preprocessing: Preprocessing) -> Image.Image:
    """The inverse of `to_tensor`'s normalisation: one (3, H, W) input as the RGB picture the model
    saw, resized and cropped, to show a person."""
    p = preprocessing
    levels = (tensor * np.asarray(p.std, np.float32)[:, None, None]
              + np.asarray(p.mean, np.float32)[:, None, None]) * p.scale
    if p.color == "BGR":
        levels = levels[::-1]
    return Image.fromarray(np.clip(np.rint(levels), 0, 255).astype(np.uint8).transpose(1, 2, 0))


def _filtered_crop(image: Image.Image, p: Preprocessing, sx: float, sy: float, left: int,
                   top: int) -> Image.Image:
    """The centre crop of Pillow's (antialiased) resize, resampling only what the crop keeps."""
    # Pillow's own order (horizontal pass, then vertical) and `box`, which keeps the full resize's
    # scale and filter support: the result is resize-then-crop's but for float rounding (one level
    # on under 0.05 % of values), at about half the cost for a photo, and a 1 x 100000 strip never
    # becomes a gigabyte image.
    reach = math.ceil(FILTER_SUPPORT[p.interpolation] * max(sy, 1.0)) + 1  # source rows per output row
    first = max(0, int(top * sy) - reach)
    last = min(image.height, math.ceil((top + p.crop) * sy) + reach)
    resample = INTERPOLATION[p.interpolation]
    # The horizontal pass treats each row alone: made band by band, it is the same pass.
    narrow = Image.new("RGB", (p.crop, last - first))
    # strict: rgb_bands yields one band per BAND_ROWS rows of the same span.
    for offset, band in zip(range(0, last - first, BAND_ROWS), rgb_bands(image, (0, first, image.width, last)),
                            strict=True):
        narrow.paste(band.resize((p.crop, band.height), resample,
                                 box=(left * sx, 0, (left + p.crop) * sx, band.height)), (0, offset))
    return narrow.resize((p.crop, p.crop), resample,
                         box=(0, top * sy - first, p.crop, (top + p.crop) * sy - first))


def _unfiltered_crop(image: Image.Image, crop: int, sx: float, sy: float, left: int,
                     top: int) -> np.ndarray:
    """(crop, crop, 3) uint8: the centre crop of a bilinear resize without antialiasing.

    OpenCV's INTER_LINEAR rule: output pixel i samples source position (i + 0.5) * scale - 0.5,
    clamped to the image, between its two neighbours on each axis. Computed in float32 and
    rounded; OpenCV's fixed-point arithmetic differs from it by at most one level.
    """
    y_low, y_high, y_weight = _bilinear_taps(top, crop, sy, image.height)
    x_low, x_high, x_weight = _bilinear_taps(left, crop, sx, image.width)
    box = (int(x_low[0]), int(y_low[0]), int(x_high[-1]) + 1, int(y_high[-1]) + 1)
    sampled = np.unique(np.concatenate([y_low, y_high]))  # only the source rows sampled
    window = np.concatenate([_rows_of(band, sampled, band_top)
                             for band_top, band in zip(range(box[1], box[3], BAND_ROWS), rgb_bands(image, box),
                                                       strict=True)])  # one band per BAND_ROWS rows
    window = window.astype(np.float32)
    y_low, y_high = np.searchsorted(sampled, y_low), np.searchsorted(sampled, y_high)
    x_low, x_high = x_low - box[0], x_high - box[0]
    rows = window[y_low] + (window[y_high] - window[y_low]) * y_weight[:, None, None]
    pixels = rows[:, x_low] + (rows[:, x_high] - rows[:, x_low]) * x_weight[None, :, None]
    return np.rint(pixels).astype(np.uint8)


def _rows_of(band: Image.Image, rows: np.ndarray, band_top: int) -> np.ndarray:
    """The band's pixels on the given image rows (those within it), as (rows, width, 3) uint8."""
    inside = rows[(rows >= band_top) & (rows < band_top + band.height)] - band_top
    return np.asarray(band)[inside]


def _bilinear_taps(start: int, count: int, scale: float, limit: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For outputs start..start+count-1: the lower and upper source index and the upper's weight."""
    position = np.clip((np.arange(start, start + count) + 0.5) * scale - 0.5, 0, limit - 1)
    low = np.floor(position).astype(np.intp)
    return low, np.minimum(low + 1, limit - 1), (position - low).astype(np.float32)


@lru_cache(maxsize=64)
def _normalisation_table(scale: float, mean: tuple[float, float, float],
                         std: tuple[float, float, float]) -> np.ndarray:
    """(3, 256): the normalised float32 value of every 8-bit level, computed as Normalize does."""
    levels = np.arange(256, dtype=np.float32)[np.newaxis, :] / np.float32(scale)
    return (levels - np.asarray(mean, np.float32)[:, np.newaxis]) / np.asarray(std, np.float32)[:, np.newaxis]


def warm_up() -> None:
    """Import Pillow's plugins and decode a tiny JPEG and PNG once, so no request pays for that."""
    Image.init()  # opening WebP or TIFF, or naming a refused format, needs every plugin imported
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
    started: float = 0.0  # perf_counter when its decoding began, for its trace spans


def prepare(data: bytes, preprocessing: Preprocessing, max_pixels: int, *,
            max_scans: int = MAX_JPEG_SCANS, reserve: Reserve | None = None,
            max_working_bytes: int | None = None) -> PreparedImage:
    """decode + to_tensor, timing the two stages apart, for the service's worker threads."""
    started = time.perf_counter()
    decoded = decode(data, preprocessing, max_pixels, max_scans=max_scans, reserve=reserve,
                     max_working_bytes=max_working_bytes)
    decoded_at = time.perf_counter()
    tensor = to_tensor(decoded.image, preprocessing)
    return PreparedImage(tensor, decoded.width, decoded.height, decoded.format,
                         (decoded_at - started) * 1000, (time.perf_counter() - decoded_at) * 1000, started)


def preprocess(data: bytes, preprocessing: Preprocessing, max_pixels: int, *,
               max_scans: int = MAX_JPEG_SCANS, reserve: Reserve | None = None,
               max_working_bytes: int | None = None) -> np.ndarray:
    """decode + to_tensor, for callers that do not time the two stages apart."""
    decoded = decode(data, preprocessing, max_pixels, max_scans=max_scans, reserve=reserve,
                     max_working_bytes=max_working_bytes)
    return to_tensor(decoded.image, preprocessing)
