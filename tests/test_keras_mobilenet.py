"""MobileNetV1 with Keras's ImageNet weights: a Keras HDF5 file, converted by the exporter, gives
the logits of Keras's own `MobileNet`, and the service answers as Keras's pipeline does.

No weights can be downloaded here, so Keras's MobileNet gets random weights that still tell photos
apart, written in the legacy HDF5 layout of the published `mobilenet_<alpha>_<rows>_tf.h5` files,
and Keras itself reads that file back as the reference.
"""
import hashlib
import json
import os
from pathlib import Path

os.environ["KERAS_BACKEND"] = "torch"  # before Keras is imported: it runs on PyTorch here

import h5py
import keras
import numpy as np
import pytest
import torch
from PIL import Image

from model_defs.keras_mobilenet import ALPHA_TEXT, keras_variant
from model_defs.variants import choose
from model_defs.weights import build_with_weights
from tests.onnx_parity import assert_same_logits, onnx_session

# Keras's own conversions to numpy, on every weight and output: not this project's concern.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")
FILE_NAME = "mobilenet_1_0_224_tf.h5"  # what Keras downloads for MobileNet(alpha=1.0) at 224
URL = "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet/" + FILE_NAME


def keras_pipeline(path: Path) -> np.ndarray:
    """(224, 224, 3) in [-1, 1]: TensorFlow-slim's evaluation crop (the central 87.5 %, resized to
    224 x 224 without antialiasing) with Keras's ops, then Keras's `preprocess_input`."""
    image = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    resized = keras.ops.convert_to_numpy(
        keras.ops.image.resize(image, (256, 256), interpolation="bilinear", antialias=False))
    return keras.applications.mobilenet.preprocess_input(resized[16:240, 16:240])


def calibration_batch(paths: list[Path], crops: int = 8, seed: int = 5) -> np.ndarray:
    """Random 224 crops (some mirrored) of each photo squashed to 288 x 288, preprocessed as Keras does."""
    rng = np.random.default_rng(seed)
    batch = []
    for path in paths:
        image = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
        large = keras.ops.convert_to_numpy(keras.ops.image.resize(image, (288, 288), antialias=False))
        for _ in range(crops):
            top, left = rng.integers(0, 288 - 224, 2)
            crop = large[top:top + 224, left:left + 224]
            crop = crop[:, ::-1] if rng.random() < 0.5 else crop
            batch.append(keras.applications.mobilenet.preprocess_input(crop.copy()))  # it works in place
    return np.stack(batch)


def random_keras_mobilenet(alpha: float, calibration: np.ndarray, seed: int = 0) -> keras.Model:
    """Keras's MobileNet at the calibration images' size with random weights that give logits of
    order 1, different per photo.

    Random depthwise kernels of either sign make this deep network chaotic: half a grey level
    of difference in the input moved its logits more than changing the photo did. Positive ones
    (smoothing, as trained early layers mostly are) keep it stable. BatchNorm gets random scales
    and shifts, then the statistics of `calibration` (momentum 0, one training-mode pass); the
    classifier is standardised over the same images, so no shared offset gives every photo one
    answer (and its bias is not zero).
    """
    keras.utils.set_random_seed(seed)  # Keras's initialisers draw from its global generator
    model = keras.applications.MobileNet(alpha=alpha, weights=None, classifier_activation=None,
                                         input_shape=calibration.shape[1:])
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, variance = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape).astype(np.float32),
                               rng.normal(0, 0.2, beta.shape).astype(np.float32), mean, variance])
            layer.momentum = 0.0
        elif isinstance(layer, keras.layers.DepthwiseConv2D):
            layer.set_weights([np.abs(weight) for weight in layer.get_weights()])
    model(calibration, training=True)
    logits = keras.ops.convert_to_numpy(model(calibration, training=False))
    centre, spread = logits.mean(0), (logits - logits.mean(0)).std()
    classifier = model.get_layer("conv_preds")
    kernel, bias = classifier.get_weights()
    classifier.set_weights([kernel / spread, (bias - centre) / spread])
    return model


def save_legacy_h5(model: keras.Model, path: Path) -> None:
    """The model's weights in the layout of Keras's published MobileNet files (Keras 2's
    `save_weights`): root attribute `layer_names`; per layer a group whose `weight_names`
    attribute lists datasets named `<layer>/<weight>:0`; depthwise kernels `depthwise_kernel`."""
    with h5py.File(path, "w") as file:
        file.attrs["layer_names"] = [layer.name.encode() for layer in model.layers]
        file.attrs["backend"] = b"tensorflow"
        file.attrs["keras_version"] = keras.__version__.encode()
        for layer in model.layers:
            group = file.create_group(layer.name)
            names = []
            for weight in layer.weights:
                depthwise = isinstance(layer, keras.layers.DepthwiseConv2D)
                short = "depthwise_kernel" if depthwise else weight.name
                names.append(f"{layer.name}/{short}:0".encode())
                group.create_dataset(names[-1].decode(), data=keras.ops.convert_to_numpy(weight))
            group.attrs["weight_names"] = names


def logits_of(model: keras.Model, x: np.ndarray) -> np.ndarray:
    return keras.ops.convert_to_numpy(model(x, training=False))


@pytest.fixture(scope="module")
def inputs(photos) -> np.ndarray:
    return np.stack([keras_pipeline(photos[name]) for name in PHOTOS])


@pytest.fixture(scope="module")
def calibration(photos) -> np.ndarray:
    return calibration_batch(list(photos.values()))


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory, calibration) -> Path:
    directory = tmp_path_factory.mktemp("keras_weights")
    save_legacy_h5(random_keras_mobilenet(1.0, calibration), directory / FILE_NAME)
    return directory


@pytest.fixture(scope="module")
def reference(weights_dir) -> keras.Model:
    """Keras's MobileNet reading the file with Keras's own legacy-HDF5 loader."""
    return keras.applications.MobileNet(weights=str(weights_dir / FILE_NAME), classifier_activation=None)


@pytest.fixture(scope="module")
def repository(tmp_path_factory, weights_dir, run_export) -> Path:
    out = tmp_path_factory.mktemp("keras_repository")
    result = run_export("--out", str(out), "--models", "mobilenetv1", "--weights", str(weights_dir))
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def served_repository(repository) -> Path:
    return repository


def test_the_converted_file_gives_keras_logits_on_real_photos(repository, reference, inputs, capsys):
    expected = logits_of(reference, inputs)
    top1 = expected.argmax(1)
    assert len(set(top1.tolist())) >= 3, f"the photos must get different answers, got top-1 {top1}"
    assert ((expected.std(1) > 0.3) & (expected.std(1) < 10)).all(), expected.std(1)
    (got,) = onnx_session(repository / "mobilenetv1" / "model.onnx").run(
        None, {"input": inputs.transpose(0, 3, 1, 2).copy()})
    with capsys.disabled():
        for name, want, have in zip(PHOTOS, expected, got, strict=True):
            print(f"\nmobilenetv1 (Keras) {name}: max |logit| {np.abs(want).max():.3f}, "
                  f"max abs diff {np.abs(have - want).max():.2e}, top-1 {want.argmax()} / {have.argmax()}", end="")
    assert_same_logits(got, expected, scale=np.abs(expected).max(1, keepdims=True))


def test_the_metadata_records_keras_layout_preprocessing_and_file(repository, weights_dir):
    metadata = json.loads((repository / "mobilenetv1" / "metadata.json").read_text())
    assert metadata["layout"] == "keras"
    assert metadata["params"] == 4_231_976  # as the paper-layout network: same layers, other padding
    assert metadata["preprocessing"] == {
        "resize": 256, "resize_rule": "squash", "interpolation": "bilinear", "antialias": False, "crop": 224,
        "color": "RGB", "scale": 127.5, "mean": [1.0, 1.0, 1.0], "std": [1.0, 1.0, 1.0]}
    assert metadata["weights"] == {
        "kind": "custom", "source": FILE_NAME, "sha256_verified": False, "note": None,
        "sha256": hashlib.sha256((weights_dir / FILE_NAME).read_bytes()).hexdigest()}


@pytest.fixture(scope="module")
def server(served):
    return served(["mobilenetv1"])


def test_predict_gives_the_top1_of_keras_pipeline(client, reference, photos, capsys):
    expected = logits_of(reference, np.stack([keras_pipeline(photos[name]) for name in PHOTOS])).argmax(1)
    answers = [client.post("/predict/mobilenetv1", content=photos[name].read_bytes(),
                           headers={"Content-Type": "image/jpeg"}).json() for name in PHOTOS]
    listed = client.get("/models/mobilenetv1").json()
    top1 = [answer["predictions"][0]["class_id"] for answer in answers]
    with capsys.disabled():
        print(f"\nmobilenetv1 (Keras) top-1 through /predict {top1}, Keras pipeline {expected.tolist()}", end="")
    agree = sum(int(a == b) for a, b in zip(top1, expected, strict=True))
    assert agree >= 3, f"service {top1}, Keras {expected.tolist()}"
    assert answers[0]["weights"]["source"] == FILE_NAME
    assert listed["weights_source"] == FILE_NAME
    assert "squashed to 256x256" in listed["preprocessing"] and "without antialiasing" in listed["preprocessing"]
    assert "values -1 to 1" in listed["preprocessing"]


def test_imagenet_weights_come_from_keras_file_with_its_sha256_recorded_unverified(run_export, tmp_path, weights_dir):
    """The download is already in the cache (as after an earlier export), so nothing is fetched."""
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / FILE_NAME).write_bytes((weights_dir / FILE_NAME).read_bytes())
    digest = hashlib.sha256((weights_dir / FILE_NAME).read_bytes()).hexdigest()
    env = {"TORCH_HOME": str(tmp_path / "torch_home")}

    unpinned = run_export("--out", str(tmp_path / "a"), "--models", "mobilenetv1", "--weights", "imagenet", env=env)
    pinned = run_export("--out", str(tmp_path / "b"), "--models", "mobilenetv1", "--weights", "imagenet",
                        "--weights-sha256", f"mobilenetv1={digest}", env=env)

    assert unpinned.returncode == 0 and pinned.returncode == 0, unpinned.stderr + pinned.stderr
    weights = json.loads((tmp_path / "a" / "mobilenetv1" / "metadata.json").read_text())["weights"]
    assert weights["kind"] == "imagenet" and weights["source"] == URL and weights["sha256"] == digest
    assert weights["sha256_verified"] is False and "not verified" in weights["note"]
    assert "not verified" in unpinned.stdout, "the export says so as it runs, too"
    weights = json.loads((tmp_path / "b" / "mobilenetv1" / "metadata.json").read_text())["weights"]
    assert weights["sha256_verified"] is True and weights["note"] is None


def truncated(source: Path, target: Path) -> None:
    target.write_bytes(source.read_bytes()[:source.stat().st_size // 2])


def other_width(source: Path, target: Path) -> None:
    """Keras's file for alpha 0.5, under the name of alpha 1.0's."""
    save_legacy_h5(keras.applications.MobileNet(alpha=0.5, weights=None), target)


def without_classifier(source: Path, target: Path) -> None:
    target.write_bytes(source.read_bytes())
    with h5py.File(target, "a") as file:
        del file["conv_preds"]
        names = [n.encode() if isinstance(n, str) else bytes(n) for n in file.attrs["layer_names"]]
        file.attrs["layer_names"] = [n for n in names if n != b"conv_preds"]


@pytest.mark.parametrize("damage, pin, fragments", [
    (truncated, None, ["truncated"]),
    (other_width, None, ["alpha 0.5", "alpha 1.0", "another variant"]),
    (without_classifier, None, ["conv_preds", "_no_top"]),
    (None, "0" * 64, ["sha256", "pinned"]),
], ids=["truncated", "wrong-variant", "no-top", "hash-mismatch"])
def test_a_bad_keras_file_is_refused_naming_the_model_and_the_cause(run_export, tmp_path, weights_dir, damage, pin,
                                                                   fragments):
    folder = tmp_path / "weights"
    folder.mkdir()
    if damage is None:
        (folder / FILE_NAME).write_bytes((weights_dir / FILE_NAME).read_bytes())
    else:
        damage(weights_dir / FILE_NAME, folder / FILE_NAME)
    result = run_export("--out", str(tmp_path / "repo"), "--models", "mobilenetv1", "--weights", str(folder),
                        *(["--weights-sha256", f"mobilenetv1={pin}"] if pin else []))
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    line = result.stderr.strip()
    assert line.startswith("cnn-export: error: mobilenetv1: ") and len(line.splitlines()) == 1, line
    for fragment in fragments:
        assert fragment in line
    assert not (tmp_path / "repo" / "mobilenetv1").exists()


KERAS_FILES = [  # the sixteen files of keras.applications.MobileNet(alpha, rows), as Keras names them
    "mobilenet_1_0_224_tf.h5", "mobilenet_1_0_192_tf.h5", "mobilenet_1_0_160_tf.h5", "mobilenet_1_0_128_tf.h5",
    "mobilenet_7_5_224_tf.h5", "mobilenet_7_5_192_tf.h5", "mobilenet_7_5_160_tf.h5", "mobilenet_7_5_128_tf.h5",
    "mobilenet_5_0_224_tf.h5", "mobilenet_5_0_192_tf.h5", "mobilenet_5_0_160_tf.h5", "mobilenet_5_0_128_tf.h5",
    "mobilenet_2_5_224_tf.h5", "mobilenet_2_5_192_tf.h5", "mobilenet_2_5_160_tf.h5", "mobilenet_2_5_128_tf.h5",
]


def test_each_of_the_sixteen_variant_names_maps_to_its_keras_file():
    names = [f"mobilenetv1_{alpha}_{rows}" for alpha in ("1.0", "0.75", "0.5", "0.25") for rows in (224, 192, 160, 128)]
    assert [keras_variant(name).file_name for name in names] == KERAS_FILES
    assert keras_variant("mobilenetv1").file_name == "mobilenet_1_0_224_tf.h5"
    assert keras_variant("mobilenetv1_1.4_224") is None and keras_variant("mobilenetv1_1.0_96") is None
    assert [keras_variant(f"mobilenetv1_1.0_{rows}").preprocessing.resize for rows in (224, 192, 160, 128)] == [
        256, 219, 183, 146]  # rows / 0.875, TensorFlow's evaluation crop


@pytest.mark.parametrize("alpha", [0.75, 0.5, 0.25])
def test_the_narrower_keras_files_convert_to_keras_logits_too(alpha, tmp_path, calibration):
    """Weights do not depend on the resolution: each width at 128 pixels stands for its four files."""
    name, file_name = f"mobilenetv1_{alpha}_128", f"mobilenet_{ALPHA_TEXT[alpha]}_128_tf.h5"
    x = calibration[::8, 48:176, 48:176]  # five 128 x 128 crops
    keras_model = random_keras_mobilenet(alpha, calibration[:, 48:176, 48:176], seed=1)
    save_legacy_h5(keras_model, tmp_path / file_name)
    built = build_with_weights(choose(name).spec, str(tmp_path))  # the variant `--models` names

    assert built.spec.layout == "keras" and built.spec.input_size == 128
    expected = logits_of(keras_model, x)
    with torch.no_grad():
        got = built.model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    assert expected.std() > 0.3 and len(set(expected.argmax(1).tolist())) >= 3
    assert_same_logits(got, expected, scale=np.abs(expected).max(), top5=False)


def test_a_variant_named_on_the_command_line_exports_from_its_keras_file(run_export, tmp_path, calibration):
    name, file_name = "mobilenetv1_0.5_160", "mobilenet_5_0_160_tf.h5"
    x = calibration[::8, 32:192, 32:192]  # five 160 x 160 crops
    keras_model = random_keras_mobilenet(0.5, calibration[:, 32:192, 32:192], seed=2)
    save_legacy_h5(keras_model, tmp_path / file_name)
    out = tmp_path / "repository"

    result = run_export("--out", str(out), "--models", name, "--weights", str(tmp_path))

    assert result.returncode == 0, result.stderr
    metadata = json.loads((out / name / "metadata.json").read_text())
    assert metadata["layout"] == "keras" and metadata["input"]["shape"] == [None, 3, 160, 160]
    assert metadata["preprocessing"]["resize_rule"] == "squash" and metadata["preprocessing"]["crop"] == 160
    (got,) = onnx_session(out / name / "model.onnx").run(None, {"input": x.transpose(0, 3, 1, 2).copy()})
    expected = logits_of(keras_model, x)
    assert_same_logits(got, expected, scale=np.abs(expected).max(), top5=False)
