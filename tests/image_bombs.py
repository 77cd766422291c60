"""Hostile image files built in place, for the image tests and the real-server attack tests."""
import struct
import zlib

import numpy as np


def with_last_scan_repeated(jpeg: bytes, times: int) -> bytes:
    """The JPEG with its last scan (and the Huffman tables just before it) written `times` times.

    libjpeg decodes each repeat over the whole image: a refinement scan of a flat image is a few
    bytes, so a thousand of them cost a thousand passes for almost nothing in the file.
    """
    sos = jpeg.rindex(b"\xff\xda")
    dht = jpeg.rindex(b"\xff\xc4", 0, sos)
    start = dht if dht + 2 + int.from_bytes(jpeg[dht + 2:dht + 4], "big") == sos else sos
    assert jpeg.endswith(b"\xff\xd9")
    return jpeg[:start] + jpeg[start:-2] * times + jpeg[-2:]


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png(width: int, height: int) -> bytes:
    """An all-black 8-bit grayscale PNG, compressed row by row without building the image."""
    compressor, row = zlib.compressobj(1), bytes(width + 1)  # filter byte, then the pixels
    pixels = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", pixels)
            + png_chunk(b"IEND", b""))


def icon_holding(image: bytes) -> bytes:
    """An ICO whose directory declares one 16x16 icon, stored as `image` (a PNG of any size)."""
    entry = struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(image), 6 + 16)
    return struct.pack("<HHH", 0, 1, 1) + entry + image


# --- images whose working memory is far beyond their size (issue 20, rows 3, 4, 12) -------------

CANVAS = 6324  # 6324 x 6324 = 39 992 976 pixels: just under the service's default pixel limit


def deflated(row: bytes, rows: int, level: int = 9) -> bytes:
    """`rows` copies of `row`, deflated without ever holding them all."""
    compressor = zlib.compressobj(level)
    return b"".join(compressor.compress(row) for _ in range(rows)) + compressor.flush()


def transparent_png(width: int = CANVAS, height: int = CANVAS) -> bytes:
    """A fully transparent 8-bit RGBA PNG: 160 MB of pixels in about 160 KB."""
    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
            + png_chunk(b"IDAT", deflated(bytes(width * 4 + 1), height)) + png_chunk(b"IEND", b""))


def sixteen_bit_grey_png(levels: np.ndarray, transparent: int) -> bytes:
    """A 16-bit greyscale PNG of `levels` (uint16) whose tRNS chunk makes one level transparent."""
    height, width = levels.shape
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in levels)
    header = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
            + png_chunk(b"tRNS", struct.pack(">H", transparent))
            + png_chunk(b"IDAT", zlib.compress(rows)) + png_chunk(b"IEND", b""))


def gif_screen_around_one_pixel(width: int = CANVAS, height: int = CANVAS) -> bytes:
    """A 43-byte GIF: a huge logical screen and one transparent 1x1 frame in its corner."""
    screen = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    transparency = b"\x21\xf9\x04\x01\x00\x00\x00\x00"  # graphic control: colour 0 is transparent
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"  # LZW: one pixel
    return screen + transparency + frame + b"\x3b"


def riff_chunk(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("<I", len(body)) + body + b"\x00" * (len(body) % 2)


def webp_lossless_pixel() -> bytes:
    """The VP8L bitstream of a 1x1 transparent pixel, as libwebp writes it."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGBA", (1, 1), (0, 0, 0, 0)).save(buffer, "WEBP", lossless=True)
    data = buffer.getvalue()
    start = data.index(b"VP8L") + 8
    return data[start:start + int.from_bytes(data[start - 4:start], "little")]


def lossless_webp_canvas(width: int = CANVAS, height: int = CANVAS) -> bytes:
    """A lossless WebP of a 1x1 pixel's bitstream with its header's size rewritten: tens of bytes
    for a whole transparent canvas (one colour, no entropy: every pixel costs no bits)."""
    stream = bytearray(webp_lossless_pixel())
    size = (width - 1) | (height - 1) << 14 | 1 << 28  # 14-bit sizes, alpha-is-used flag
    stream[1:5] = (size | (int.from_bytes(stream[1:5], "little") & ~((1 << 29) - 1))).to_bytes(4, "little")
    body = b"WEBP" + riff_chunk(b"VP8L", bytes(stream))
    return b"RIFF" + struct.pack("<I", len(body)) + body


def animated_webp_canvas(width: int = CANVAS, height: int = CANVAS) -> bytes:
    """An animated WebP: a huge canvas and one 1x1 frame in it."""
    canvas = struct.pack("<I", 0x12)[:4] + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    frame = (bytes(6) + (0).to_bytes(3, "little") * 2 + (100).to_bytes(3, "little") + b"\x00"
             + riff_chunk(b"VP8L", webp_lossless_pixel()))
    body = (b"WEBP" + riff_chunk(b"VP8X", canvas) + riff_chunk(b"ANIM", bytes(4) + b"\x00\x00")
            + riff_chunk(b"ANMF", frame))
    return b"RIFF" + struct.pack("<I", len(body)) + body


def tiff_with_one_tile(width: int, height: int, tile: int, samples: int = 3) -> bytes:
    """A deflated 8-bit TIFF of width x height pixels stored as a single tile x tile tile."""
    pixels = deflated(bytes(tile * samples), tile)
    entries = [(256, 3, 1, width), (257, 3, 1, height), (258, 3, 1, 8), (259, 3, 1, 8),
               (262, 3, 1, 2 if samples == 3 else 1), (277, 3, 1, samples), (284, 3, 1, 1),
               (322, 4, 1, tile), (323, 4, 1, tile), (324, 4, 1, 0), (325, 4, 1, len(pixels))]
    if samples == 3:
        entries[2] = (258, 3, 1, 0)  # three BitsPerSample values do not fit: placed below
    directory_at = 8
    directory = struct.pack("<H", len(entries))
    extra_at = directory_at + 2 + 12 * len(entries) + 4
    extra = struct.pack("<HHH", 8, 8, 8) if samples == 3 else b""
    pixels_at = extra_at + len(extra)
    for tag, kind, count, value in entries:
        if tag == 258 and samples == 3:
            tag, count, value = 258, 3, extra_at
        if tag == 324:
            value = pixels_at
        packed = struct.pack("<HHI", tag, kind, count)
        directory += packed + (struct.pack("<HH", value, 0) if kind == 3 and count == 1 else struct.pack("<I", value))
    return b"II*\x00" + struct.pack("<I", directory_at) + directory + bytes(4) + extra + pixels
