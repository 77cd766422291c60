"""What an image is and what it will cost, known from its bytes and header before a pixel is decoded.

Only the accepted formats' Pillow plugins open it (`open_accepted`); then two kinds of check,
both before Pillow's decoders run:
- the container's structure, from the bytes alone (`check_structure`): JPEG markers and scans,
  PNG chunks, GIF blocks, each of which Pillow or libjpeg walks at a cost its size does not show;
- the working memory of the decode, conversion and preprocessing (`working_memory`), from what
  the opened header declares: the canvas (a GIF screen or WebP canvas, not the first frame), a
  TIFF tile or strip (not the image), a progressive JPEG's coefficients at full size (draft mode
  reduces only the output), the mode's bytes per pixel as Pillow stores it, a transposition.
"""
import io
import math
import re
import struct
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError
from PIL.TiffImagePlugin import TiffImageFile

from contract import Preprocessing
from service.errors import ImageTooComplex, UndecodableImage, UnsupportedImageFormat

# errors.ACCEPTED_FORMATS as Pillow names them, and the only plugins that ever see the bytes.
PILLOW_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
BMP_RLE = {1, 2}  # BI_RLE8, BI_RLE4: Pillow decodes these in Python, pixel by pixel for RLE4
MAX_JPEG_SCANS = 100  # libjpeg writes 10 scans for a progressive colour JPEG
# libjpeg entropy-decodes every scan over the whole image at full size, draft mode or not, so a
# JPEG's decode time follows scans x pixels. This admits a photo at the default pixel limit with
# a dozen scans, a few times an ordinary 12 MP progressive photo's 10 x 12 MP.
MAX_JPEG_SCAN_PIXELS = 500_000_000
# JPEG markers, PNG chunks, GIF blocks: Pillow's parsers walk these one by one in Python, and so
# do stray bytes between them. A photo has tens of them; a PNG of 20 MB in 8 KiB IDATs, 2 600.
MAX_CONTAINER_ELEMENTS = 10_000
JPEG_SIGNATURE = b"\xff\xd8\xff"  # SOI and the first marker: what Pillow's JPEG plugin accepts
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GIF_SIGNATURES = (b"GIF87a", b"GIF89a")
# A marker libjpeg stops at: 0xFF, then neither 0x00 (a stuffed 0xFF data byte), nor 0xFF (fill),
# nor RST0-7 (restart markers, which stand inside a scan's entropy-coded data).
JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
JPEG_LENGTHLESS = {0x01, 0xD8}  # TEM and SOI: no length follows
JPEG_EOI = 0xD9
JPEG_SOS = 0xDA
JPEG_FRAMES = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # SOF0-15, less DHT, JPG and DAC

# Rows of the image converted to RGB at a time while preprocessing (see preprocess.rgb_bands).
BAND_ROWS = 32
# Bytes per pixel of a band while it is converted: its crop, RGBA, the white it is composited
# on, the composite, the RGB result; a 16-bit or float band's float32 working arrays fit too.
BAND_BYTES_PER_PIXEL = 24
# libwebp's decoder holds the canvas twice (the frame being built and the one before it) and
# its own row caches, and Pillow copies the canvas out: bytes per canvas pixel, measured.
WEBP_BYTES_PER_PIXEL = 14
# A TIFF tile or strip may overhang a small image (libtiff writes 256x256 tiles by default), but
# one far larger than the image only makes libtiff allocate it.
TIFF_UNIT_SLACK = 4
MAX_SMALL_TIFF_UNIT = 4 * 2**20
LIBRARY_SLACK = 4 * 2**20  # the decoders' tables, zlib windows, Python objects


@dataclass(frozen=True)
class WorkingMemory:
    bytes: int
    cause: str  # the largest part, as a person reads it: "a TIFF tile of 16384x16384"


def open_accepted(data: bytes) -> Image.Image:
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


def check_structure(data: bytes, max_scans: int) -> int:
    """Refuse, from the bytes alone, a file whose structure would cost far more than its size;
    the number of scans of a JPEG (0 for other formats), which sets what its decode holds."""
    if data.startswith(JPEG_SIGNATURE):
        return _check_jpeg_markers(data, max_scans)
    if data.startswith(PNG_SIGNATURE):
        _check_png_chunks(data)
    elif data.startswith(GIF_SIGNATURES):
        _check_gif_blocks(data)
    return 0


def _check_jpeg_markers(data: bytes, max_scans: int) -> int:
    """Refuse a JPEG with more than `max_scans` scans, more scans x pixels than
    `MAX_JPEG_SCAN_PIXELS`, or too many markers, before its EOI; its scans.

    Markers are found as libjpeg finds them, and a segment's payload is skipped by its declared
    length, so an EXIF thumbnail's scans are not counted. Stray bytes before the first scan count
    as markers: Pillow's header parser steps through them one at a time.
    """
    scans = markers = pixels = 0
    position = 2  # after SOI
    while marker := JPEG_MARKER.search(data, position):
        markers += 1 + (marker.start() - position if scans == 0 else 0)
        if markers > MAX_CONTAINER_ELEMENTS:
            raise ImageTooComplex(f"a JPEG with more than {MAX_CONTAINER_ELEMENTS} markers and "
                                  "stray bytes")
        code = data[marker.start() + 1]
        position = marker.end()
        if code == JPEG_EOI:
            break
        if code in JPEG_LENGTHLESS:
            continue
        if code in JPEG_FRAMES and not pixels:  # length, precision, height, width
            pixels = int.from_bytes(data[position + 3:position + 5], "big") * int.from_bytes(
                data[position + 5:position + 7], "big")
        if code == JPEG_SOS:
            scans += 1
            _check_scans(scans, pixels, max_scans)
        position += max(int.from_bytes(data[position:position + 2], "big"), 2)  # as libjpeg skips
    return scans


def _check_scans(scans: int, pixels: int, max_scans: int) -> None:
    if scans > max_scans:
        raise ImageTooComplex(f"a JPEG with more than {max_scans} scans; the limit is "
                              f"{max_scans} (MAX_JPEG_SCANS)")
    if scans * pixels > MAX_JPEG_SCAN_PIXELS:
        raise ImageTooComplex(
            f"a JPEG of {pixels / 1e6:.1f} megapixels with {scans} or more scans: libjpeg decodes "
            f"each scan over the whole image, and at most {MAX_JPEG_SCAN_PIXELS / 1e6:.0f} "
            "megapixel-scans are decoded")


def _check_png_chunks(data: bytes) -> None:
    """Refuse a PNG with too many chunks before its IEND, or the next frame where it is animated."""
    position = len(PNG_SIGNATURE)
    pixels_seen = False
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
            position += 1 + size
            in_extension = size > 0
            continue
        introducer = data[position:position + 1]
        if introducer in (b"", b";", b","):  # end, trailer or the first image: Pillow stops here
            return
        in_extension = introducer == b"!"
        position += 2 if in_extension else 1  # an extension's introducer and label, or a stray byte
    raise ImageTooComplex(f"a GIF with more than {MAX_CONTAINER_ELEMENTS} blocks and stray bytes "
                          "before its first image")


def pixel_bytes(mode: str) -> int:
    """Bytes per pixel as Pillow stores `mode`: every mode of two or more bands takes four."""
    return 1 if mode in ("1", "L", "P") else 2 if mode.startswith("I;16") else 4


def working_memory(image: Image.Image, full_size: tuple[int, int], jpeg_scans: int,
                   preprocessing: Preprocessing, transposed: bool) -> WorkingMemory:
    """The most bytes decoding `image` (opened, draft already set) and preprocessing it will hold.

    `full_size` is the size the header declares, before any draft reduction. A TIFF whose tile or
    strip is far larger than the image is `ImageTooComplex`.
    """
    width, height = image.size
    decoded = width * height * pixel_bytes(image.mode)
    parts = {f"a {image.format} image of {width}x{height} in mode {image.mode}": decoded,
             **_decoder_memory(image, full_size, jpeg_scans),
             "its transposition": decoded if transposed else 0,
             "the rows preprocessing converts": _preprocessing_memory(width, height, preprocessing)}
    cause = max(parts, key=lambda part: parts[part])
    return WorkingMemory(sum(parts.values()) + LIBRARY_SLACK, cause)


def _decoder_memory(image: Image.Image, full_size: tuple[int, int], jpeg_scans: int) -> dict[str, int]:
    """What a format's decoder holds beside the image it fills, by its cause."""
    full_width, full_height = full_size
    if image.format in ("JPEG", "MPO"):
        # Several scans: libjpeg keeps every component's DCT coefficients, 2 bytes each, at full size.
        if jpeg_scans > 1 or image.info.get("progressive"):
            return {f"the DCT coefficients of a {full_width}x{full_height} JPEG with "
                    f"{jpeg_scans} scans": math.ceil(full_width * full_height * 2 * _jpeg_samples(image))}
        return {"libjpeg's rows": full_width * 16 * 2 * 4 * len(image.getbands())}
    if isinstance(image, TiffImageFile):  # format TIFF: only PILLOW_FORMATS' plugins open images
        return _tiff_memory(image)
    if image.format == "WEBP":
        return {f"libwebp's canvas of {full_width}x{full_height}":
                full_width * full_height * WEBP_BYTES_PER_PIXEL}
    return {"the decoder's rows": 4 * full_width * 8}  # PNG, GIF, BMP decode row by row


def _jpeg_samples(image: Image.Image) -> float:
    """Samples per pixel over all components, from their sampling factors (4:2:0 colour: 1.5)."""
    layers = getattr(image, "layer", None) or [(0, 1, 1, 0)] * len(image.getbands())
    most = max(h for _, h, _, _ in layers) * max(v for _, _, v, _ in layers)
    return sum(h * v for _, h, v, _ in layers) / most + 0.05  # blocks pad each side to 8 pixels


def _tiff_memory(image: TiffImageFile) -> dict[str, int]:
    """libtiff's buffer for one tile or strip, the unit it decodes: as the directory declares it,
    which a hostile file makes far larger than the image."""
    tags = image.tag_v2
    samples = tags.get(277, 1)
    bits = tags.get(258, (8,))
    sample_bytes = math.ceil((bits[0] if isinstance(bits, tuple) else bits) / 8)
    width, height = image.size
    if 322 in tags and 323 in tags:
        tile_width, tile_height = tags[322], tags[323]
        name = f"a TIFF tile of {tile_width}x{tile_height}"
    else:
        tile_width, tile_height = width, min(tags.get(278, height), height)
        name = f"a TIFF strip of {tile_width}x{tile_height}"
    unit = tile_width * tile_height * max(samples * sample_bytes, 4)
    if unit > max(TIFF_UNIT_SLACK * width * height * 4, MAX_SMALL_TIFF_UNIT):
        raise ImageTooComplex(f"{name} for an image of {width}x{height}: libtiff would allocate "
                              f"{unit / 2**20:.0f} MiB to decode it")
    return {name: 2 * unit}  # libtiff's buffer and Pillow's, or RGBA rows for a JPEG-compressed one


def _preprocessing_memory(width: int, height: int, p: Preprocessing) -> int:
    """A band converted to RGB; with antialiasing the crop's columns of every row read, twice (the
    horizontal pass, then the vertical), without it the sampled rows in float32; the tensor."""
    rows = 2 * p.crop * height * 4 if p.antialias else 2 * p.crop * width * 4 * 4
    return BAND_ROWS * width * BAND_BYTES_PER_PIXEL + rows + 3 * p.crop * p.crop * 4 * 4
