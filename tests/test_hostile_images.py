"""Files made to cost far more to decode than their size says are refused, cheaply, before decoding.

Every hostile file is built here from scratch: a progressive JPEG with a thousand scans, headers
padded with a hundred thousand empty markers, chunks or blocks, a run-length-encoded BMP, an icon
holding a giant PNG, formats the service does not list, float TIFFs that Pillow's own conversion
turns black.
"""
import struct
import time

import numpy as np
import pytest
from PIL import Image

from contract import Preprocessing
from service.errors import ImageTooComplex, ImageTooLarge, UndecodableImage, UnsupportedImageFormat
from service.preprocess import decode, preprocess
from tests.image_bombs import icon_holding, png, png_chunk, with_last_scan_repeated
from tests.service_fixtures import IMAGENET, ONE_GRAY_LEVEL, encode, reference_tensor

PREPROCESSING = Preprocessing(**IMAGENET)
MAX_PIXELS = 40_000_000  # the service's default MAX_IMAGE_PIXELS
FAST = 0.1  # seconds: a refusal reads bytes, it does not decode


def served(data: bytes, **options) -> np.ndarray:
    return preprocess(data, PREPROCESSING, MAX_PIXELS, **options)


def refused_in(seconds: float, error: type[Exception], data: bytes, **options) -> str:
    """Refused with `error` within `seconds`; the message, to check that it names the cause."""
    started = time.perf_counter()
    with pytest.raises(error) as refusal:
        served(data, **options)
    assert time.perf_counter() - started < seconds
    return str(refusal.value)


@pytest.fixture(scope="module")
def chelsea(photos) -> Image.Image:
    return Image.open(photos["chelsea"]).convert("RGB")


def test_a_progressive_jpeg_with_a_thousand_scans_is_refused_before_decoding():
    flat = encode(Image.new("L", (1000, 1000), 128), "JPEG", progressive=True)
    bomb = with_last_scan_repeated(flat, 1000)
    assert len(bomb) < 100_000  # decoding it takes seconds; refusing it reads 100 KB once
    assert "scans" in refused_in(FAST, ImageTooComplex, bomb)


def test_scans_are_counted_through_stuffed_bytes_and_restart_markers():
    # Noise makes 0xFF bytes (written 0xFF00) in the entropy-coded data; restart markers cut it.
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), np.uint8))
    jpeg = encode(noise, "JPEG", progressive=True, restart_marker_blocks=1)
    assert b"\xff\x00" in jpeg and b"\xff\xd0" in jpeg
    assert served(jpeg).shape == (1, 3, 224, 224)
    refused_in(FAST, ImageTooComplex, with_last_scan_repeated(jpeg, 200))


def test_a_normal_progressive_jpeg_and_one_whose_comment_holds_scan_markers_still_decode(chelsea):
    for jpeg in (encode(chelsea, "JPEG", progressive=True, quality=95),
                 encode(chelsea, "JPEG", progressive=True, quality=95, comment=b"\xff\xda" * 1000)):
        difference = np.abs(served(jpeg) - reference_tensor(chelsea))
        assert difference.mean() < 2 * ONE_GRAY_LEVEL


def test_the_scan_limit_is_a_keyword_of_the_decoder():
    jpeg = encode(Image.new("RGB", (64, 64)), "JPEG", progressive=True)  # libjpeg writes 10 scans
    assert served(jpeg, max_scans=10).shape == (1, 3, 224, 224)
    assert "more than 9 scans" in refused_in(FAST, ImageTooComplex, jpeg, max_scans=9)


def padded(fmt: str, elements: int) -> bytes:
    """A small image whose header carries `elements` empty markers, chunks or sub-blocks."""
    image = encode(Image.new("RGB", (64, 64)), fmt)
    if fmt == "JPEG":  # empty comment segments after APP0
        at, padding = 4 + int.from_bytes(image[4:6], "big"), b"\xff\xfe\x00\x02" * elements
    elif fmt == "PNG":  # empty private chunks after IHDR
        at, padding = 8 + 25, png_chunk(b"prVt", b"") * elements
    else:  # a GIF comment extension of one-byte sub-blocks, after the header and colour table
        at, padding = 13 + (3 << (image[10] & 7) + 1), b"\x21\xfe" + b"\x01x" * elements + b"\x00"
    return image[:at] + padding + image[at:]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF"])
def test_a_header_padded_with_a_hundred_thousand_empty_elements_is_refused_before_parsing(fmt):
    # Pillow's parsers step through each of these in Python: a 20 MB body of them costs seconds.
    assert len(padded(fmt, 0)) < 10_000 and served(padded(fmt, 0)).shape == (1, 3, 224, 224)
    refused_in(FAST, ImageTooComplex, padded(fmt, 100_000))


def test_stray_bytes_in_a_jpeg_header_count_as_markers():
    jpeg = encode(Image.new("RGB", (64, 64)), "JPEG")
    app0_end = 4 + int.from_bytes(jpeg[4:6], "big")
    stray = jpeg[:app0_end] + b"\x00" * 1_000_000 + jpeg[app0_end:]
    assert "markers" in refused_in(FAST, ImageTooComplex, stray)


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "WEBP"])
def test_an_animation_of_thousands_of_frames_is_decoded_from_its_first_frame_only(fmt):
    frames = [Image.new("RGB", (8, 8), (0, 0, 255 - i % 200)) for i in range(6000)]
    first = Image.new("RGB", (8, 8), (250, 0, 0))
    animation = encode(first, fmt, save_all=True, append_images=frames, lossless=True)
    pixels = served(animation)[0, :, 0, 0] * np.array(IMAGENET["std"]) + np.array(IMAGENET["mean"])
    np.testing.assert_allclose(pixels, np.array((250, 0, 0)) / 255, atol=ONE_GRAY_LEVEL)


def rle_bmp(width: int, height: int) -> bytes:
    """A 4-bit run-length-encoded BMP: two bytes paint 255 pixels, which Pillow paints one by one."""
    row = b"".join(bytes([min(255, width - x), 0x12]) for x in range(0, width, 255)) + b"\x00\x00"
    pixels, palette = row * height + b"\x00\x01", bytes(4 * 16)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 4, 2, len(pixels), 2835, 2835, 16, 0)
    offset = 14 + len(info) + len(palette)
    return b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + info + palette + pixels


def test_a_run_length_encoded_bmp_is_refused_before_decoding():
    bomb = rle_bmp(6000, 6600)  # 40 megapixels in 330 KB
    assert "RLE" in refused_in(FAST, UnsupportedImageFormat, bomb)


def test_an_icon_that_declares_16x16_but_holds_a_64_megapixel_png_is_refused_before_decoding():
    assert "ICO" in refused_in(FAST, UnsupportedImageFormat, icon_holding(png(8000, 8000)))


@pytest.mark.parametrize("fmt", ["JPEG2000", "ICO", "AVIF", "PCX", "PPM", "QOI", "DDS", "EPS"])
def test_formats_outside_the_accepted_list_are_refused_by_name(fmt):
    data = encode(Image.new("RGB", (64, 64), (200, 30, 30)), fmt)
    message = refused_in(FAST, UnsupportedImageFormat, data)
    assert fmt in message and "JPEG, PNG, WebP" in message


def test_a_format_without_a_signature_is_refused_too():
    tga = encode(Image.new("RGB", (64, 64)), "TGA")
    with pytest.raises((UndecodableImage, UnsupportedImageFormat)):
        served(tga)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "BMP", "TIFF"])
def test_the_pixel_limit_is_checked_on_the_header_before_any_pixel_is_decoded(fmt):
    # Cut to its first tenth, the file holds the header and too few pixels to decode: a check made
    # after decoding would answer "truncated", one made on the header answers "too large".
    noise = np.random.default_rng(0).integers(0, 256, (1500, 1000), np.uint8)  # barely compresses
    data = encode(Image.fromarray(noise), fmt)
    with pytest.raises(ImageTooLarge, match="1000x1500"):
        decode(data[: len(data) // 10], PREPROCESSING, 1_000_000)


def float_tiff(values: np.ndarray) -> bytes:
    image = Image.fromarray(values.astype(np.float32))
    assert image.mode == "F"
    return encode(image, "TIFF")


@pytest.mark.parametrize("to_float", [lambda v: v / 255, lambda v: v, lambda v: v * 8 - 1000],
                         ids=["0..1", "0..255", "-1000..1040"])
def test_a_float_tiff_gives_what_its_8_bit_twin_gives_whatever_its_range(chelsea, to_float):
    levels = np.asarray(chelsea.convert("L")).astype(np.float32)
    levels = np.rint((levels - levels.min()) * 255 / (levels.max() - levels.min()))  # spans 0..255
    twin = served(encode(Image.fromarray(levels.astype(np.uint8)), "PNG"))
    difference = np.abs(served(float_tiff(to_float(levels))) - twin)
    assert difference.max() <= ONE_GRAY_LEVEL * 1.01


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_float_tiff_with_nan_or_infinity_is_refused(bad):
    values = np.full((64, 64), 0.5)
    values[10, 10] = bad
    with pytest.raises(UndecodableImage, match="NaN or infinite"):
        served(float_tiff(values))
