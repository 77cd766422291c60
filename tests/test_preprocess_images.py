"""Any image a user uploads becomes the tensor the contract describes, whatever its format or mode."""
import io

import numpy as np
import pytest
from PIL import Image

from contract import Preprocessing
from service.errors import EmptyBody, ImageTooLarge, UndecodableImage
from service.preprocess import decode, preprocess, to_tensor
from tests.image_bombs import sixteen_bit_grey_png
from tests.service_fixtures import IMAGENET, ONE_GRAY_LEVEL, assert_matches_reference, encode, reference_tensor

PREPROCESSING = Preprocessing(**IMAGENET)
NO_LIMIT = 10**9


def served(data: bytes) -> np.ndarray:
    return preprocess(data, PREPROCESSING, NO_LIMIT)


@pytest.fixture(scope="module")
def chelsea(photos) -> Image.Image:
    return Image.open(photos["chelsea"]).convert("RGB")


def test_a_png_gives_exactly_the_contracts_resize_crop_and_normalise(chelsea):
    tensor = served(encode(chelsea, "PNG"))
    assert tensor.shape == (1, 3, 224, 224) and tensor.dtype == np.float32
    assert_matches_reference(tensor, chelsea)


@pytest.mark.parametrize("size", [(451, 300), (300, 451), (256, 256), (259, 256), (640, 480),
                                  (480, 640), (1024, 768), (768, 1024)])
def test_portrait_landscape_and_square_images_are_cropped_at_the_centre(chelsea, size):
    image = chelsea.resize(size)
    assert_matches_reference(served(encode(image, "PNG")), image)


def test_a_side_scaled_by_almost_one_may_round_more_values_differently_but_by_one_level(chelsea):
    # Here Pillow's whole-image resize takes its vertical pass first, the service its horizontal
    # pass, so intermediate rounding differs on more values: measured 7-15 %, each one level.
    image = chelsea.resize((257, 1000))
    assert_matches_reference(served(encode(image, "PNG")), image, differing=0.2)


def test_a_long_strip_is_preprocessed_without_resizing_it_whole(chelsea):
    strip = chelsea.resize((4000, 40))  # resized whole it would be 25600 x 256
    difference = np.abs(served(encode(strip, "PNG")) - reference_tensor(strip))
    assert difference.max() <= ONE_GRAY_LEVEL * 1.01 and (difference > 1e-5).mean() < 0.01
    thread = Image.new("RGB", (200_000, 1), (200, 100, 50))  # 51 200 000 x 256 resized whole
    assert served(encode(thread, "PNG")).shape == (1, 3, 224, 224)


def test_the_cifar_sized_models_get_their_own_32_pixel_tensor(chelsea):
    cifar = {**IMAGENET, "resize": 32, "crop": 32, "mean": (0.4914, 0.4822, 0.4465),
             "std": (0.2470, 0.2435, 0.2616)}
    tensor = preprocess(encode(chelsea, "PNG"), Preprocessing(**cifar), NO_LIMIT)
    assert tensor.shape == (1, 3, 32, 32)
    assert_matches_reference(tensor, chelsea, cifar)


@pytest.mark.parametrize("fmt, options", [("PNG", {}), ("WEBP", {"lossless": True}), ("BMP", {}),
                                          ("TIFF", {})])
def test_lossless_formats_of_the_same_photo_give_the_same_tensor(chelsea, fmt, options):
    assert_matches_reference(served(encode(chelsea, fmt, **options)), chelsea)


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_lossy_formats_stay_within_a_few_gray_levels_of_the_original(chelsea, fmt):
    difference = np.abs(served(encode(chelsea, fmt, quality=95)) - reference_tensor(chelsea))
    assert difference.mean() < 2 * ONE_GRAY_LEVEL


def test_a_cmyk_jpeg_gives_what_its_rgb_twin_gives(chelsea):
    rgb = served(encode(chelsea, "JPEG", quality=95))
    cmyk = served(encode(chelsea.convert("CMYK"), "JPEG", quality=95))
    difference = np.abs(cmyk - rgb)
    # CMYK JPEGs are not chroma-subsampled like RGB ones, so only compression noise may differ.
    assert difference.mean() < 2 * ONE_GRAY_LEVEL and np.percentile(difference, 99) < 10 * ONE_GRAY_LEVEL


def test_a_grayscale_photo_becomes_three_equal_channels(chelsea):
    gray = chelsea.convert("L")
    tensor = served(encode(gray, "PNG"))
    assert_matches_reference(tensor, gray.convert("RGB"))
    pixels = tensor[0] * np.array(IMAGENET["std"])[:, None, None] + np.array(IMAGENET["mean"])[:, None, None]
    np.testing.assert_allclose(pixels[0], pixels[1], atol=1e-5)
    np.testing.assert_allclose(pixels[1], pixels[2], atol=1e-5)


def test_a_16_bit_grayscale_png_is_scaled_not_clipped_to_white(chelsea):
    gray = chelsea.convert("L")
    sixteen = Image.fromarray(np.asarray(gray).astype(np.uint16) * 257)  # full 0..65535 range
    assert sixteen.mode.startswith("I")
    data = encode(sixteen, "PNG")
    assert Image.open(io.BytesIO(data)).mode in ("I;16", "I")  # really a 16-bit file
    assert_matches_reference(served(data), gray.convert("RGB"))


def test_an_opaque_rgba_png_equals_the_rgb_png(chelsea):
    rgba = chelsea.copy()
    rgba.putalpha(255)
    assert_matches_reference(served(encode(rgba, "PNG")), chelsea)


def test_transparent_pixels_are_composited_on_white(chelsea):
    rgba = chelsea.copy()
    alpha = np.zeros(chelsea.size[::-1], np.uint8)
    alpha[:, : chelsea.width // 2] = 255  # left half opaque, right half fully transparent
    rgba.putalpha(Image.fromarray(alpha))
    expected = np.asarray(chelsea).copy()
    expected[:, chelsea.width // 2:] = 255
    assert_matches_reference(served(encode(rgba, "PNG")), Image.fromarray(expected))


def test_a_palette_gif_uses_its_first_frame_only(chelsea):
    first = chelsea.quantize(256)
    second = Image.new("RGB", chelsea.size, (0, 0, 255)).quantize(256)
    data = encode(first, "GIF", save_all=True, append_images=[second], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    assert_matches_reference(served(data), first.convert("RGB"))


@pytest.mark.parametrize("orientation, stored_as", [
    (3, Image.Transpose.ROTATE_180), (6, Image.Transpose.ROTATE_90), (8, Image.Transpose.ROTATE_270)])
def test_a_photo_stored_sideways_with_an_exif_orientation_is_turned_upright(chelsea, orientation,
                                                                            stored_as):
    stored = chelsea.transpose(stored_as)  # what a phone camera writes, plus the tag to undo it
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(stored, "PNG", exif=exif)
    decoded = decode(data, PREPROCESSING, NO_LIMIT)
    assert (decoded.width, decoded.height) == chelsea.size
    assert_matches_reference(to_tensor(decoded.image, PREPROCESSING), chelsea)
    assert not np.allclose(served(encode(stored, "PNG")), reference_tensor(chelsea), atol=0.1)


@pytest.mark.parametrize("mode, fmt", [("L", "PNG"), ("CMYK", "JPEG"), ("P", "PNG")])
def test_exif_orientation_survives_the_conversion_of_other_modes(chelsea, mode, fmt):
    upright = chelsea.convert(mode)
    exif = Image.Exif()
    exif[0x0112] = 8
    data = encode(upright.transpose(Image.Transpose.ROTATE_270), fmt, exif=exif, quality=95)
    decoded = decode(data, PREPROCESSING, NO_LIMIT)
    assert (decoded.width, decoded.height) == chelsea.size
    expected = served(encode(upright, fmt, quality=95))
    assert np.abs(to_tensor(decoded.image, PREPROCESSING) - expected).mean() < 2 * ONE_GRAY_LEVEL


def test_an_exif_rotated_jpeg_matches_the_upright_jpeg(chelsea):
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = served(encode(chelsea.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif))
    upright = served(encode(chelsea, "JPEG", quality=95))
    assert np.abs(rotated - upright).mean() < 2 * ONE_GRAY_LEVEL


def test_a_12_megapixel_jpeg_is_decoded_reduced_and_stays_close_to_the_full_decode(chelsea):
    data = encode(chelsea.resize((4000, 3000), Image.Resampling.BICUBIC), "JPEG", quality=90)
    decoded = decode(data, PREPROCESSING, NO_LIMIT)
    assert (decoded.width, decoded.height) == (4000, 3000)  # reported as uploaded
    assert 256 <= min(decoded.image.size) < 3000 / 4  # libjpeg scaled it by 1/8 while decoding
    full = Image.open(io.BytesIO(data)).convert("RGB")
    difference = np.abs(to_tensor(decoded.image, PREPROCESSING) - reference_tensor(full))
    # Measured on this photo: mean 0.007, 99th percentile 0.035 (one gray level is 0.017).
    assert difference.mean() < ONE_GRAY_LEVEL and np.percentile(difference, 99) < 5 * ONE_GRAY_LEVEL


def test_more_pixels_than_the_limit_is_refused_before_decoding(chelsea):
    with pytest.raises(ImageTooLarge, match=r"451x300 = 135300 pixels.*limit is 100000 pixels"):
        decode(encode(chelsea, "PNG"), PREPROCESSING, 100_000)


def test_pillows_decompression_bomb_guard_stays_on(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    bomb = encode(Image.new("L", (100, 100)), "PNG")  # 10 000 pixels > 2 x 1000: Pillow refuses
    with pytest.raises(ImageTooLarge, match="decompression bomb"):
        decode(bomb, PREPROCESSING, NO_LIMIT)


@pytest.mark.parametrize("data, error, message", [
    (b"", EmptyBody, "empty body"),
    (b"this is not an image", UndecodableImage, "not an image format"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 20, UndecodableImage, "could not decode image"),
])
def test_bytes_that_are_no_image_say_what_was_wrong(data, error, message):
    with pytest.raises(error, match=message):
        served(data)


def test_a_truncated_jpeg_is_reported_as_truncated(photos):
    data = photos["rocket"].read_bytes()
    with pytest.raises(UndecodableImage, match="truncated"):
        served(data[: len(data) // 3])


# --- preprocessing that comes with the weights (docs/model-repository.md, version 2) ----------

MEGVII = Preprocessing(resize=256, crop=224, resize_rule="shorter_side_rounded", antialias=False, color="BGR",
                       scale=1.0, mean=(0, 0, 0), std=(1, 1, 1))


def opencv_reference(image: Image.Image, size: int = 256, crop: int = 224) -> np.ndarray:
    """(1, 3, crop, crop) BGR 0-255: OpenCV's bilinear resize of the shorter side, longer side rounded."""
    import cv2  # a test tool only: the service does not depend on OpenCV

    rgb = np.asarray(image)
    height, width = rgb.shape[:2]
    target = (int(size / height * width + 0.5), size) if height < width else (size, int(size / width * height + 0.5))
    resized = cv2.resize(rgb, target, interpolation=cv2.INTER_LINEAR)
    top, left = round((resized.shape[0] - crop) / 2), round((resized.shape[1] - crop) / 2)
    return resized[top:top + crop, left:left + crop, ::-1].transpose(2, 0, 1)[None].astype(np.float32)


@pytest.mark.parametrize("size", [(451, 300), (300, 451), (255, 400), (1000, 257), (120, 90), (640, 480)])
def test_bgr_0_255_with_opencv_resize_is_within_one_level_of_opencv(chelsea, size):
    """Shrinking and enlarging, rounding the longer side up (255 x 400 -> 256 x 402) or down."""
    image = chelsea.resize(size)
    difference = np.abs(preprocess(encode(image, "PNG"), MEGVII, NO_LIMIT) - opencv_reference(image))
    # OpenCV interpolates in fixed point; measured on the test photos: 6-13 % of values one level off.
    assert difference.max() <= 1 and (difference > 0).mean() < 0.2


def test_bgr_reverses_the_channels_and_scale_1_keeps_the_8_bit_levels():
    colour = (200, 100, 7)
    tensor = preprocess(encode(Image.new("RGB", (300, 260), colour), "PNG"), MEGVII, NO_LIMIT)
    assert [np.unique(tensor[0, c]).tolist() for c in range(3)] == [[7.0], [100.0], [200.0]]


def test_a_large_jpeg_is_decoded_whole_when_the_resize_has_no_antialiasing(chelsea):
    """Weights trained without antialiasing saw single source pixels, not libjpeg's reduced ones."""
    data = encode(chelsea.resize((2000, 1500), Image.Resampling.BICUBIC), "JPEG", quality=90)
    assert decode(data, MEGVII, NO_LIMIT).image.size == (2000, 1500)
    assert max(decode(data, PREPROCESSING, NO_LIMIT).image.size) < 2000


def test_squash_resizes_both_sides_then_crops_the_centre(chelsea):
    """TensorFlow's evaluation crop: the aspect ratio is not kept."""
    squash = Preprocessing(resize=256, crop=224, resize_rule="squash", scale=127.5, mean=(1, 1, 1), std=(1, 1, 1))
    expected = chelsea.resize((256, 256), Image.Resampling.BILINEAR).crop((16, 16, 240, 240))
    expected = (np.asarray(expected, np.float32) / 127.5 - 1).transpose(2, 0, 1)[None]
    difference = np.abs(preprocess(encode(chelsea, "PNG"), squash, NO_LIMIT) - expected)
    assert difference.max() <= 1.01 / 127.5 and (difference > 1e-5).mean() < 0.01
    assert expected.min() >= -1 and expected.max() <= 1


def grey_with_a_transparent_block(chelsea) -> np.ndarray:
    """Chelsea's grey levels 1..255, with a block at level 0 that a tRNS chunk will make transparent."""
    levels = np.maximum(np.asarray(chelsea.convert("L")), 1)
    levels[100:200, 150:300] = 0
    return levels


def test_a_16_bit_grey_png_with_a_transparent_level_gives_its_8_bit_twins_tensor(chelsea):
    levels = grey_with_a_transparent_block(chelsea)
    sixteen = sixteen_bit_grey_png(levels.astype(np.uint16) * 257, transparent=0)
    assert Image.open(io.BytesIO(sixteen)).mode == "I;16"
    twin = served(encode(Image.fromarray(levels), "PNG", transparency=0))
    difference = np.abs(served(sixteen) - twin)
    assert difference.max() <= ONE_GRAY_LEVEL * 1.01
    expected = levels.copy()
    expected[levels == 0] = 255  # the transparent block composited on white, the rest as shown
    assert_matches_reference(served(sixteen), Image.fromarray(expected).convert("RGB"))


def test_an_mpo_photo_is_decoded_from_its_first_frame_reduced_like_its_jpeg_twin(chelsea):
    photo = chelsea.resize((4000, 3000), Image.Resampling.BICUBIC)
    mpo = encode(photo, "MPO", quality=90, save_all=True, append_images=[photo.rotate(180)])
    decoded = decode(mpo, PREPROCESSING, NO_LIMIT)
    assert decoded.format == "MPO" and (decoded.width, decoded.height) == (4000, 3000)
    assert max(decoded.image.size) < 4000 / 4  # libjpeg scaled it while decoding
    np.testing.assert_array_equal(served(mpo), served(encode(photo, "JPEG", quality=90)))


def test_a_png_whose_exif_chunk_follows_its_pixels_is_still_turned_upright(chelsea):
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(chelsea.transpose(Image.Transpose.ROTATE_90), "PNG", exif=exif)
    start = data.index(b"eXIf") - 4
    end = start + 12 + int.from_bytes(data[start:start + 4], "big")
    late = data[:start] + data[end:-12] + data[start:end] + data[-12:]  # moved before IEND
    assert late.index(b"eXIf") > late.index(b"IDAT")
    decoded = decode(late, PREPROCESSING, NO_LIMIT)
    assert (decoded.width, decoded.height) == chelsea.size
    assert_matches_reference(to_tensor(decoded.image, PREPROCESSING), chelsea)
