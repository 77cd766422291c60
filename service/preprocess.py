"""Image bytes in, float32 NCHW array out, exactly as the model repository contract says.

The steps are those the model's weights were trained with, as its metadata names them: by default
torchvision's `Resize(resize) + CenterCrop(crop) + ToTensor() + Normalize(mean, std)` on a PIL
image; also the longer side rounded, both sides squashed, resizing without antialiasing, BGR and
unnormalised 0-255 input. This module knows nothing of ONNX or HTTP; it raises the errors in `errors`.

Choices a caller should know:
- Transparency (RGBA, LA, PA, palette or RGB with a transparent colour) is composited on white,
  as a browser shows such an image, instead of keeping whatever colour hides under alpha = 0.
- 16-bit grayscale (I;16) and 32-bit integer (I) images are scaled to 8 bits (value / 257);
  Pillow's own convert() would clip everything above 255 to white.
- A JPEG is decoded with Pillow's draft mode: libjpeg scales by 1/2, 1/4 or 1/8 while decoding,
  never below the resize target on the shorter side, so a 12 MP photo is not decoded at full size.
  Not for a model resized without antialiasing: its weights saw individual source pixels, and a
  reduced decode would average them first.
- Only the first frame of an animated image (GIF, WebP, APNG) or page of a TIFF is used; nothing
  counts or visits the other frames.
- A 32-bit float image (mode F, from TIFF) is scaled by its real range: all values within 0..1 are
  multiplied by 255, values within 0..255 are kept, any other range is stretched min-to-max onto
  0..255 (a constant image outside 0..255 is clipped). NaN or infinity makes it undecodable.

Hostile input is refused before decoding, from the bytes and the header alone:
- Only JPEG, PNG, WebP, GIF, BMP and TIFF are opened (`ACCEPTED_FORMATS` in `errors`): no other
  Pillow plugin parses the bytes. A file whose signature names another format (ICO, JPEG 2000,
  AVIF, PPM, ...) is `UnsupportedImageFormat`. ICO stays out: Pillow decodes the biggest icon
  while opening it, whatever size the icon directory declares. So does a run-length-encoded BMP:
  Pillow decodes RLE in Python, an RLE4 one pixel by pixel.
- The pixel limit is checked on the size the header declares: opening these six formats parses
  headers only (GIF: up to the first frame's descriptor, TIFF: the first directory).
- A JPEG's markers are walked before Pillow opens it, as libjpeg reads them (stuffed 0xFF00 and
  restart markers inside entropy-coded data, segment payloads skipped by their length). More than
  `max_scans` scans is `ImageTooComplex`: libjpeg decodes every scan over the whole image, draft
  mode or not. (libtiff refuses a JPEG-compressed TIFF strip past 100 scans on its own.)
- Pillow's parsers step through JPEG markers, PNG chunks and GIF blocks, and any stray bytes
  between them, one at a time in Python: more than `MAX_CONTAINER_ELEMENTS` of them is
  `ImageTooComplex` too, counted before Pillow opens the file.
"""
import io
import math
import re
import struct
import time
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from contract import Preprocessing
from service.errors import (EmptyBody, ImageTooComplex, ImageTooLarge, UndecodableImage,
                            UnsupportedImageFormat)

# errors.ACCEPTED_FORMATS as Pillow names them, and the only plugins that ever see the bytes.
PILLOW_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
MAX_JPEG_SCANS = 100  # libjpeg writes 10 scans for a progressive colour JPEG
# JPEG markers, PNG chunks, GIF blocks: Pillow's parsers walk these one by one in Python, and so
# do stray bytes between them. A photo has tens of them; a PNG of 20 MB in 8 KiB IDATs, 2 600.
MAX_CONTAINER_ELEMENTS = 10_000
JPEG_SIGNATURE = b"\xff\xd8\xff"  # SOI and the first marker: what Pillow's JPEG plugin accepts
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GIF_SIGNATURES = (b"GIF87a", b"GIF89a")
BMP_RLE = {1, 2}  # BI_RLE8, BI_RLE4: Pillow decodes these in Python, pixel by pixel for RLE4
# A marker libjpeg stops at: 0xFF, then neither 0x00 (a stuffed 0xFF data byte), nor 0xFF (fill),
# nor RST0-7 (restart markers, which stand inside a scan's entropy-coded data).
JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
JPEG_LENGTHLESS = {0x01, 0xD8}  # TEM and SOI: no length follows
JPEG_EOI, JPEG_SOS = 0xD9, 0xDA

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


def decode(data: bytes, preprocessing: Preprocessing, max_pixels: int, *,
           max_scans: int = MAX_JPEG_SCANS) -> DecodedImage:
    """Open an image of an accepted format, upright and as 8-bit RGB, reduced early if a big JPEG."""
    if not data:
        raise EmptyBody()
    _check_structure(data, max_scans)
    try:
        image = _open(data)
        width, height = image.size  # as the header declares it: nothing is decoded yet
        if width * height > max_pixels:
            raise ImageTooLarge(max_pixels, width, height)
        image_format = image.format or "unknown"
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
        if image_format == "JPEG" and preprocessing.antialias:
            # Ask for at least resize x resize: libjpeg then keeps the shorter side >= resize.
            image.draft(image.mode, (preprocessing.resize, preprocessing.resize))
        image.load()
        image = _to_rgb(image)
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


def _check_structure(data: bytes, max_scans: int) -> None:
    """Refuse, from the bytes alone, a file whose structure would cost far more than its size."""
    if data.startswith(JPEG_SIGNATURE):
        _check_jpeg_markers(data, max_scans)
    elif data.startswith(PNG_SIGNATURE):
        _check_png_chunks(data)
    elif data.startswith(GIF_SIGNATURES):
        _check_gif_blocks(data)


def _check_jpeg_markers(data: bytes, max_scans: int) -> None:
    """Refuse a JPEG with more than `max_scans` scans, or too many markers, before its EOI.

    Markers are found as libjpeg finds them, and a segment's payload is skipped by its declared
    length, so an EXIF thumbnail's scans are not counted. Stray bytes before the first scan count
    as markers: Pillow's header parser steps through them one at a time.
    """
    scans = markers = 0
    position = 2  # after SOI
    while marker := JPEG_MARKER.search(data, position):
        markers += 1 + (marker.start() - position if scans == 0 else 0)
        if markers > MAX_CONTAINER_ELEMENTS:
            raise ImageTooComplex(f"a JPEG with more than {MAX_CONTAINER_ELEMENTS} markers and "
                                  "stray bytes")
        code, position = data[marker.start() + 1], marker.end()
        if code == JPEG_EOI:
            return
        if code in JPEG_LENGTHLESS:
            continue
        if code == JPEG_SOS:
            scans += 1
            if scans > max_scans:
                raise ImageTooComplex(f"a JPEG with more than {max_scans} scans; the limit is "
                                      f"{max_scans} (MAX_JPEG_SCANS)")
        position += max(int.from_bytes(data[position:position + 2], "big"), 2)  # as libjpeg skips


def _check_png_chunks(data: bytes) -> None:
    """Refuse a PNG with too many chunks before its IEND, or the next frame where it is animated."""
    position, pixels_seen = len(PNG_SIGNATURE), False
    for _ in range(MAX_CONTAINER_ELEMENTS):
        kind = data[position + 4:position + 8]
        if len(kind) < 4 or kind == b"IEND" or (kind == b"fcTL" and pixels_seen):
            return  # where Pillow stops reading
        pixels_seen = pixels_seen or kind in (b"IDAT", b"fdAT")
        position += 12 + int.from_bytes(data[position:position + 4], "big")  # length, type, data, CRC
    raise ImageTooComplex(f"a PNG with more than {MAX_CONTAINER_ELEMENTS} chunks")


def _check_gif_blocks(data: bytes) -> None:
    """Refuse a GIF with too many extension sub-blocks and stray bytes before its first image."""
    flags = data[10] if len(data) > 10 else 0
    position = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # header, global colour table
    in_extension = False
    for _ in range(MAX_CONTAINER_ELEMENTS):
        if in_extension:  # a sub-block: its size, then its bytes; size 0 ends the extension
            size = data[position] if position < len(data) else 0
            position, in_extension = position + 1 + size, size > 0
            continue
        introducer = data[position:position + 1]
        if introducer in (b"", b";", b","):  # end, trailer or the first image: Pillow stops here
            return
        in_extension = introducer == b"!"
        position += 2 if in_extension else 1  # an extension's introducer and label, or a stray byte
    raise ImageTooComplex(f"a GIF with more than {MAX_CONTAINER_ELEMENTS} blocks and stray bytes "
                          "before its first image")


def _open(data: bytes) -> Image.Image:
    """Pillow's lazy open by the accepted formats' plugins only; another format named if it can be."""
    try:
        image = Image.open(io.BytesIO(data), formats=PILLOW_FORMATS)
    except UnidentifiedImageError as exc:
        signature = _format_by_signature(data)
        if signature is None or signature in PILLOW_FORMATS:  # unknown, or corrupt past its signature
            raise UndecodableImage("not an image format Pillow recognises") from exc
        raise UnsupportedImageFormat(signature) from exc
    if image.format == "BMP" and image.info.get("compression") in BMP_RLE:
        raise UnsupportedImageFormat("BMP with RLE compression")
    return image


def _format_by_signature(data: bytes) -> str | None:
    """The first format whose signature test (its Pillow plugin's `accept`) passes; nothing is parsed."""
    Image.init()
    prefix = data[:16]  # what Image.open shows each plugin's test
    for name in (*PILLOW_FORMATS, *Image.ID):
        accept = Image.OPEN[name][1]
        try:
            if accept is not None and accept(prefix):
                return name
        except (IndexError, TypeError, SyntaxError, struct.error):  # as Image.open tolerates them
            continue
    return None


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
        return _levels_to_rgb(values)
    if mode == "F":
        return _levels_to_rgb(_float_levels(np.asarray(image)))
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def _float_levels(values: np.ndarray) -> np.ndarray:
    """A float image's values as 0..255 levels, by the rule in the module docstring."""
    if not np.isfinite(values).all():
        raise UndecodableImage("the float image has NaN or infinite values")
    low, high = float(values.min()), float(values.max())
    if low >= 0 and high <= 1:
        return values * np.float32(255)
    if (low >= 0 and high <= 255) or low == high:
        return values
    scale = 255 / (high - low)  # in float64: high - low may overflow float32
    return values * np.float32(scale) - np.float32(low * scale)


def _levels_to_rgb(values: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L").convert("RGB")


def to_tensor(image: Image.Image, preprocessing: Preprocessing) -> np.ndarray:
    """Resize, centre-crop and normalise an RGB image into a (1, 3, crop, crop) float32 array."""
    p = preprocessing
    width, height = p.resized_size(*image.size)
    top = int(round((height - p.crop) / 2.0))
    left = int(round((width - p.crop) / 2.0))
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
    rows = image.crop((0, first, image.width, last))
    resample = INTERPOLATION[p.interpolation]
    rows = rows.resize((p.crop, rows.height), resample, box=(left * sx, 0, (left + p.crop) * sx, rows.height))
    return rows.resize((p.crop, p.crop), resample,
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
    window = np.asarray(image.crop(box), dtype=np.float32)  # only the source pixels sampled
    y_low, y_high, x_low, x_high = y_low - box[1], y_high - box[1], x_low - box[0], x_high - box[0]
    rows = window[y_low] + (window[y_high] - window[y_low]) * y_weight[:, None, None]
    pixels = rows[:, x_low] + (rows[:, x_high] - rows[:, x_low]) * x_weight[None, :, None]
    return np.rint(pixels).astype(np.uint8)


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


def prepare(data: bytes, preprocessing: Preprocessing, max_pixels: int, *,
            max_scans: int = MAX_JPEG_SCANS) -> PreparedImage:
    """decode + to_tensor, timing the two stages apart, for the service's worker threads."""
    started = time.perf_counter()
    decoded = decode(data, preprocessing, max_pixels, max_scans=max_scans)
    decoded_at = time.perf_counter()
    tensor = to_tensor(decoded.image, preprocessing)
    return PreparedImage(tensor, decoded.width, decoded.height, decoded.format,
                         (decoded_at - started) * 1000, (time.perf_counter() - decoded_at) * 1000)


def preprocess(data: bytes, preprocessing: Preprocessing, max_pixels: int, *,
               max_scans: int = MAX_JPEG_SCANS) -> np.ndarray:
    """decode + to_tensor, for callers that do not time the two stages apart."""
    return to_tensor(decode(data, preprocessing, max_pixels, max_scans=max_scans).image, preprocessing)
