"""Hostile image files built in place, for the image tests and the real-server attack tests."""
import struct
import zlib


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
