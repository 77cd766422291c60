"""Files made to cost far more to decode than their size says are refused, cheaply, before decoding.

Every hostile file is built here from scratch: a progressive JPEG with a thousand scans, headers
padded with a hundred thousand empty markers, chunks or blocks, a run-length-encoded BMP, an icon
holding a giant PNG, formats the service does not list, float TIFFs that Pillow's own conversion
turns black, canvases of 40 megapixels in a few bytes, a TIFF tile far larger than its image.
Each image's working memory is known before it is decoded, and checked here against the peak a
fresh process really reaches.
"""
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from bench.servers import cpu_seconds
from contract import Preprocessing
from service.errors import ImageTooComplex, ImageTooLarge, UndecodableImage, UnsupportedImageFormat
from service.preprocess import decode, preprocess
from tests.image_bombs import (
    animated_webp_canvas,
    gif_screen_around_one_pixel,
    icon_holding,
    lossless_webp_canvas,
    png,
    png_chunk,
    sixteen_bit_grey_png,
    tiff_with_one_tile,
    transparent_png,
    with_last_scan_repeated,
)
from tests.service_fixtures import IMAGENET, ONE_GRAY_LEVEL, ROOT, encode, ready_server, reference_tensor, rss_bytes

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


# --- working memory known before decoding (issue 20, rows 3, 4, 7) -----------------------------

PEAK = """
import sys, time
from contract import Preprocessing
from service.preprocess import prepare, warm_up
from tests.service_fixtures import IMAGENET

def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))

warm_up()
data, estimates = open(sys.argv[1], "rb").read(), []
with open("/proc/self/clear_refs", "w") as peak:
    peak.write("5")  # the high-water mark starts again from the resident memory now
before, cpu = status("VmRSS"), time.process_time()
prepare(data, Preprocessing(**IMAGENET), 40_000_000, reserve=estimates.append)
print(estimates[0], status("VmHWM") - before, time.process_time() - cpu)
"""


@dataclass(frozen=True)
class Peak:
    estimate: int  # what `reserve` was told before decoding
    growth: int    # the resident memory's high-water mark over what it was just before
    cpu: float


def decoded_alone(data: bytes, folder: Path) -> Peak:
    """Prepare one image in a fresh process: the estimate, the real peak, the CPU seconds."""
    path = folder / "image"
    path.write_bytes(data)
    out = subprocess.run([sys.executable, "-c", PEAK, str(path)], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.split()
    return Peak(int(out[0]), int(out[1]), float(out[2]))


BOMBS = {"38-byte lossless WebP": lossless_webp_canvas, "43-byte GIF": gif_screen_around_one_pixel,
         "92-byte animated WebP": animated_webp_canvas, "160 KB transparent PNG": transparent_png}


@pytest.mark.parametrize("name", BOMBS)
def test_a_bombs_working_memory_is_known_before_decoding_and_bounds_its_real_peak(name, tmp_path):
    peak = decoded_alone(BOMBS[name](), tmp_path)
    print(f"\n{name}: estimate {peak.estimate / 2**20:.0f} MiB, peak growth "
          f"{peak.growth / 2**20:.0f} MiB, {peak.cpu:.2f} CPU-s")
    assert peak.growth <= peak.estimate


@pytest.fixture(scope="module")
def twelve_megapixels(chelsea) -> Image.Image:
    return chelsea.resize((4000, 3000), Image.Resampling.BICUBIC)


def exif_rotated(image: Image.Image) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(image.transpose(Image.Transpose.ROTATE_90), "PNG", exif=exif)


def with_alpha(image: Image.Image) -> Image.Image:
    rgba = image.copy()
    rgba.putalpha(128)
    return rgba


PHOTOS = {
    "12 MP JPEG": lambda photo: encode(photo, "JPEG", quality=90),
    "12 MP progressive JPEG": lambda photo: encode(photo, "JPEG", quality=90, progressive=True),
    "12 MP MPO": lambda photo: encode(photo, "MPO", quality=90, save_all=True, append_images=[photo]),
    "12 MP PNG": lambda photo: encode(photo, "PNG", compress_level=1),
    "12 MP half-transparent PNG": lambda photo: encode(with_alpha(photo), "PNG", compress_level=1),
    "12 MP TIFF": lambda photo: encode(photo, "TIFF"),
    "12 MP BMP": lambda photo: encode(photo, "BMP"),
    "3 MP WebP": lambda photo: encode(photo.reduce(2), "WEBP", quality=80),
    "3 MP GIF": lambda photo: encode(photo.reduce(2).quantize(64), "GIF"),
    "3 MP 16-bit PNG": lambda photo: sixteen_bit_grey_png(
        np.asarray(photo.reduce(2).convert("L")).astype(np.uint16) * 257, transparent=0),
    "3 MP PNG turned upright by EXIF": lambda photo: exif_rotated(photo.reduce(2)),
}


@pytest.mark.parametrize("name", PHOTOS)
def test_a_photos_working_memory_bounds_its_real_peak_and_is_not_far_above_it(
        name, twelve_megapixels, tmp_path):
    peak = decoded_alone(PHOTOS[name](twelve_megapixels), tmp_path)
    print(f"\n{name}: estimate {peak.estimate / 2**20:.1f} MiB, peak growth "
          f"{peak.growth / 2**20:.1f} MiB, {peak.cpu:.2f} CPU-s")
    assert peak.growth <= peak.estimate <= 4 * peak.growth + 16 * 2**20


def test_past_max_working_bytes_an_image_is_refused_naming_the_cause_before_decoding():
    message = refused_in(FAST, ImageTooComplex, lossless_webp_canvas(), max_working_bytes=256 * 2**20)
    assert "canvas of 6324x6324" in message and "MiB" in message
    estimates = []
    served(encode(Image.new("RGB", (640, 480)), "PNG"), reserve=estimates.append,
           max_working_bytes=256 * 2**20)
    assert len(estimates) == 1 and 0 < estimates[0] < 256 * 2**20


def test_a_reservation_that_fails_stops_the_image_before_decoding():
    class BudgetFull(Exception):
        pass

    def full(nbytes: int) -> None:
        raise BudgetFull(nbytes)

    bomb = transparent_png()  # decoding it takes a second and 160 MB
    with pytest.raises(BudgetFull):
        started = time.perf_counter()
        served(bomb, reserve=full)
    assert time.perf_counter() - started < FAST


def test_a_tiff_whose_one_tile_is_far_larger_than_its_image_is_refused_before_libtiff_allocates_it():
    assert "tile of 16384x16384" in refused_in(FAST, ImageTooComplex, tiff_with_one_tile(16, 16, 16384, 1))
    # libtiff's own default, a 256x256 tile around a small image, is an ordinary file.
    assert served(tiff_with_one_tile(16, 16, 256)).shape == (1, 3, 224, 224)


def test_a_jpeg_is_refused_when_its_scans_times_pixels_would_cost_seconds(chelsea):
    flat = encode(Image.new("RGB", (4000, 4000), 128), "JPEG", progressive=True)  # 10 scans
    assert served(flat).shape == (1, 3, 224, 224)
    bomb = with_last_scan_repeated(flat, 91)  # 100 scans, allowed by MAX_JPEG_SCANS alone
    assert "megapixel-scans" in refused_in(FAST, ImageTooComplex, bomb)


def cpu_of(data: bytes) -> float:
    started = time.process_time()
    served(data)
    return time.process_time() - started


def test_the_costliest_jpeg_the_scan_budget_admits_costs_a_few_ordinary_progressive_photos(twelve_megapixels):
    photo = encode(twelve_megapixels, "JPEG", quality=90, progressive=True)
    # 2000 x 2000 with 100 scans: 400 megapixel-scans, just under the 500 allowed.
    costliest = with_last_scan_repeated(encode(Image.new("RGB", (2000, 2000), 128), "JPEG",
                                               progressive=True), 91)
    ordinary, worst = min(cpu_of(photo) for _ in range(3)), min(cpu_of(costliest) for _ in range(3))
    print(f"\n12 MP progressive photo {ordinary:.3f} CPU-s; 100 scans of 4 MP {worst:.3f} CPU-s")
    assert worst < 10 * ordinary


# --- the same bombs against a real server -------------------------------------------------------

MODEL = "mobilenetv3_small"


@pytest.fixture(scope="module")
def server(model_repository, tmp_path_factory):
    with ready_server(model_repository, tmp_path_factory.mktemp("image_bombs"), MODEL) as server:
        yield server


@dataclass(frozen=True)
class Sent:
    response: httpx.Response
    growth: int  # the server's resident memory at its highest during the request, over before
    cpu: float   # the server's CPU seconds during the request


def sent(server, data: bytes) -> Sent:
    """PUT one image to /predict, watching the server's RSS every few milliseconds meanwhile."""
    before, cpu, peak, done = rss_bytes(server.pid), cpu_seconds(server.pid), [0], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes(server.pid) or 0)
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        response = httpx.put(f"{server.url}/predict/{MODEL}", content=data, timeout=60)
    finally:
        done.set()
        watcher.join()
    return Sent(response, max(peak[0], rss_bytes(server.pid)) - before, cpu_seconds(server.pid) - cpu)


def test_a_43_byte_gif_of_a_40_megapixel_screen_is_served_in_under_150_mb(server):
    answer = sent(server, gif_screen_around_one_pixel())
    print(f"\n43-byte GIF: server RSS +{answer.growth / 2**20:.0f} MiB, {answer.cpu:.2f} CPU-s")
    assert answer.response.status_code == 200 and answer.growth < 150 * 2**20


def test_a_transparent_40_megapixel_png_is_served_without_four_copies_of_it(server):
    answer = sent(server, transparent_png())  # Pillow's decoded image alone is 160 MB
    print(f"\n160 KB RGBA PNG: server RSS +{answer.growth / 2**20:.0f} MiB, {answer.cpu:.2f} CPU-s")
    assert answer.response.status_code == 200 and answer.growth < 300 * 2**20


def test_a_tiff_of_16x16_pixels_in_a_16384x16384_tile_is_refused_by_the_server(server):
    answer = sent(server, tiff_with_one_tile(16, 16, 16384))
    print(f"\nTIFF tile: server RSS +{answer.growth / 2**20:.0f} MiB, {answer.cpu:.2f} CPU-s")
    assert answer.response.status_code == 422
    assert answer.response.json()["code"] == "image_too_complex" and "tile" in answer.response.json()["error"]
    assert answer.growth < 50 * 2**20


def test_a_jpeg_of_100_scans_over_16_megapixels_is_refused_by_the_server_within_a_tenth_of_a_cpu_second(server):
    flat = encode(Image.new("RGB", (4000, 4000), 128), "JPEG", progressive=True)
    answer = sent(server, with_last_scan_repeated(flat, 91))
    print(f"\n100-scan JPEG: server RSS +{answer.growth / 2**20:.0f} MiB, {answer.cpu:.2f} CPU-s")
    assert answer.response.status_code == 422 and answer.response.json()["code"] == "image_too_complex"
    assert answer.cpu < 0.1


def top_1(answer: Sent) -> int:
    assert answer.response.status_code == 200, answer.response.text
    return answer.response.json()["predictions"][0]["class_id"]


def test_a_16_bit_png_with_a_transparent_level_gets_its_8_bit_twins_top_1(server, chelsea):
    levels = np.maximum(np.asarray(chelsea.convert("L")), 1)
    levels[:, :150] = 0  # transparent: white, as its twin shows it
    sixteen = sent(server, sixteen_bit_grey_png(levels.astype(np.uint16) * 257, transparent=0))
    twin = sent(server, encode(Image.fromarray(levels), "PNG", transparency=0))
    assert top_1(sixteen) == top_1(twin)
    assert sixteen.response.json()["predictions"][0]["probability"] == pytest.approx(
        twin.response.json()["predictions"][0]["probability"], abs=0.01)


def test_an_mpo_photo_costs_and_answers_what_its_jpeg_twin_does(server, twelve_megapixels):
    jpeg = sent(server, encode(twelve_megapixels, "JPEG", quality=90))
    mpo = sent(server, encode(twelve_megapixels, "MPO", quality=90, save_all=True,
                              append_images=[twelve_megapixels.rotate(180)]))
    print(f"\nMPO: server RSS +{mpo.growth / 2**20:.0f} MiB, {mpo.cpu:.2f} CPU-s; its JPEG twin "
          f"+{jpeg.growth / 2**20:.0f} MiB, {jpeg.cpu:.2f} CPU-s")
    assert mpo.response.json()["predictions"] == jpeg.response.json()["predictions"]
    assert mpo.growth < 30 * 2**20
