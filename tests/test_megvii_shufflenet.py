"""ShuffleNetV1 with megvii's checkpoints: one in their key layout is recognised, loads into their
network (shuffle after the depthwise conv, in their order; no classifier bias) and, exported, gives
the logits of that network as their code defines it, here written out independently as plain
tensor operations; the service answers with megvii's preprocessing (BGR, 0-255, OpenCV resize).
"""
import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from model_defs.layers import channel_shuffle
from model_defs.megvii_shufflenet import megvii_channel_shuffle
from model_defs.registry import MODELS
from model_defs.variants import choose
from model_defs.weights import build_with_weights
from tests.onnx_parity import assert_same_logits, onnx_session

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")
# megvii's published sizes used here: (stem, stage 2-4 output channels).
G8_1X = (8, 24, (384, 768, 1536))
G3_1X = (3, 24, (240, 480, 960))
UNITS = (4, 8, 4)
BN_EPS = 1e-5


# --- the shuffle, by hand ------------------------------------------------------------------

def megvii_order(channels: int, groups: int) -> list[int]:
    """Input channel of each output channel in megvii's shuffle (checked by hand below)."""
    return [j * groups + i for i in range(groups) for j in range(channels // groups)]


def test_megvii_shuffle_order_is_the_transpose_of_a_channels_by_groups_view():
    six = torch.arange(6.0).view(1, 6, 1, 1)
    # megvii: 6 channels viewed as (6 / 3, 3) = [[0, 1, 2], [3, 4, 5]], transposed.
    assert megvii_channel_shuffle(six, 3).flatten().tolist() == [0, 3, 1, 4, 2, 5]
    # The paper's reading: viewed as (3, 6 / 3) = [[0, 1], [2, 3], [4, 5]], transposed.
    assert channel_shuffle(six, 3).flatten().tolist() == [0, 2, 4, 1, 3, 5]
    twelve = torch.arange(12.0).view(1, 12, 1, 1).expand(2, 12, 3, 2)  # batch 2, 3 x 2 maps
    # (3, 4) = [[0..3], [4..7], [8..11]], transposed.
    expected = [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]
    assert (megvii_channel_shuffle(twelve, 4)[:, :, 1, 0] == torch.tensor([expected] * 2)).all()
    assert megvii_order(12, 4) == expected and megvii_order(6, 3) == [0, 3, 1, 4, 2, 5]


# --- megvii's network as plain tensor operations, on their state_dict keys ------------------

def megvii_logits(state: dict, groups: int, x: torch.Tensor, calibrate: bool = False) -> torch.Tensor:
    """Their ShuffleNetV1 forward on a state_dict with their keys (no `module.`).

    `calibrate`: BatchNorm uses the batch's statistics and stores them as its running ones.
    """
    def bn(y: torch.Tensor, prefix: str) -> torch.Tensor:
        return F.batch_norm(y, state[f"{prefix}.running_mean"], state[f"{prefix}.running_var"],
                            state[f"{prefix}.weight"], state[f"{prefix}.bias"], calibrate, 1.0, BN_EPS)

    x = F.max_pool2d(F.relu(bn(F.conv2d(x, state["first_conv.0.weight"], stride=2, padding=1), "first_conv.1")),
                     3, 2, 1)
    firsts = {0, UNITS[0], UNITS[0] + UNITS[1]}
    for unit in range(sum(UNITS)):
        p = f"features.{unit}"
        stride = 2 if unit in firsts else 1
        pointwise = state[f"{p}.branch_main_1.0.weight"]
        y = F.relu(bn(F.conv2d(x, pointwise, groups=x.shape[1] // pointwise.shape[1]), f"{p}.branch_main_1.1"))
        depthwise = state[f"{p}.branch_main_1.3.weight"]
        y = bn(F.conv2d(y, depthwise, stride=stride, padding=1, groups=depthwise.shape[0]), f"{p}.branch_main_1.4")
        y = y[:, megvii_order(y.shape[1], groups)]  # after the depthwise conv
        y = bn(F.conv2d(y, state[f"{p}.branch_main_2.0.weight"], groups=groups), f"{p}.branch_main_2.1")
        x = torch.cat([F.avg_pool2d(x, 3, 2, 1), F.relu(y)], 1) if stride == 2 else F.relu(x + y)
    return F.linear(x.mean([2, 3]), state["classifier.0.weight"])


def megvii_state_dict(variant: tuple, calibration: torch.Tensor | None = None, seed: int = 0) -> dict:
    """Random tensors under megvii's keys and shapes for (groups, stem, stage channels).

    With `calibration`: BatchNorm statistics measured on it, positive depthwise kernels (random
    signed ones make the deep network chaotic: it then amplifies a grey level of input noise
    beyond the difference between photos) and a classifier without the direction all photos share.
    """
    groups, stem, stages = variant
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}

    def conv(key: str, *shape: int) -> None:
        fan_in = shape[1] * shape[2] * shape[3]
        state[key] = torch.randn(*shape, generator=generator) * (2 / fan_in) ** 0.5

    def bn(prefix: str, channels: int) -> None:
        state[f"{prefix}.weight"] = 0.5 + torch.rand(channels, generator=generator)
        state[f"{prefix}.bias"] = 0.2 * torch.randn(channels, generator=generator)
        state[f"{prefix}.running_mean"] = torch.zeros(channels)
        state[f"{prefix}.running_var"] = torch.ones(channels)
        state[f"{prefix}.num_batches_tracked"] = torch.tensor(0)

    conv("first_conv.0.weight", stem, 3, 3, 3)
    bn("first_conv.1", stem)
    in_channels, unit = stem, 0
    for repeats, out_channels in zip(UNITS, stages, strict=True):
        for i in range(repeats):
            p, mid = f"features.{unit}", out_channels // 4
            conv(f"{p}.branch_main_1.0.weight", mid, in_channels // (1 if unit == 0 else groups), 1, 1)
            bn(f"{p}.branch_main_1.1", mid)
            conv(f"{p}.branch_main_1.3.weight", mid, 1, 3, 3)
            bn(f"{p}.branch_main_1.4", mid)
            branch = out_channels - in_channels if i == 0 else out_channels
            conv(f"{p}.branch_main_2.0.weight", branch, mid // groups, 1, 1)
            bn(f"{p}.branch_main_2.1", branch)
            in_channels, unit = out_channels, unit + 1
    state["classifier.0.weight"] = torch.randn(1000, in_channels, generator=generator) * in_channels ** -0.5
    if calibration is not None:
        for key in state:
            if key.endswith("branch_main_1.3.weight"):
                state[key] = state[key].abs()
        with torch.no_grad():
            megvii_logits(state, groups, calibration, calibrate=True)
            features = megvii_logits({**state, "classifier.0.weight": torch.eye(in_channels)}, groups, calibration)
            shared = features.mean(0) / features.mean(0).norm()
            weight = state["classifier.0.weight"]
            weight = weight - torch.outer(weight @ shared, shared)
            state["classifier.0.weight"] = weight / (features @ weight.T).std()
    return state


def as_saved_by_megvii(state: dict) -> dict:
    """As their training script saves it: under `state_dict`, keys of an `nn.DataParallel` model."""
    return {"state_dict": {f"module.{key}": value for key, value in state.items()}}


# --- megvii's evaluation preprocessing -------------------------------------------------------

def megvii_pipeline(path: Path, size: int = 256, crop: int = 224) -> np.ndarray:
    """(3, crop, crop) float32, BGR 0-255: OpenCV's bilinear resize of the shorter side to `size`
    (longer side rounded), centre crop, no normalisation."""
    rgb = np.asarray(Image.open(path).convert("RGB"))
    height, width = rgb.shape[:2]
    target = (int(size / height * width + 0.5), size) if height < width else (size, int(size / width * height + 0.5))
    resized = cv2.resize(rgb, target, interpolation=cv2.INTER_LINEAR)  # target is (width, height)
    top, left = round((resized.shape[0] - crop) / 2), round((resized.shape[1] - crop) / 2)
    return np.ascontiguousarray(resized[top:top + crop, left:left + crop, ::-1].transpose(2, 0, 1), np.float32)


def calibration_batch(paths: list[Path], crops: int = 8, seed: int = 5) -> torch.Tensor:
    """Random 224 crops (some mirrored) of each photo, resized as megvii's evaluation does to 288."""
    rng = np.random.default_rng(seed)
    batch = []
    for path in paths:
        large = megvii_pipeline(path, 288, 288)
        for _ in range(crops):
            top, left = rng.integers(0, 288 - 224, 2)
            crop = large[:, top:top + 224, left:left + 224]
            batch.append(crop[:, :, ::-1] if rng.random() < 0.5 else crop)
    return torch.from_numpy(np.stack(batch).copy())


@pytest.fixture(scope="module")
def checkpoint(photos) -> dict:
    """A g=8 1.0x checkpoint (the `shufflenetv1` model's size), keys as megvii's."""
    return megvii_state_dict(G8_1X, calibration_batch(list(photos.values())))


@pytest.fixture(scope="module")
def inputs(photos) -> torch.Tensor:
    return torch.from_numpy(np.stack([megvii_pipeline(photos[name]) for name in PHOTOS]))


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory, checkpoint) -> Path:
    directory = tmp_path_factory.mktemp("megvii_weights")
    torch.save(as_saved_by_megvii(checkpoint), directory / "shufflenetv1.pth")
    return directory


@pytest.fixture(scope="module")
def repository(tmp_path_factory, weights_dir, run_export) -> Path:
    out = tmp_path_factory.mktemp("megvii_repository")
    result = run_export("--out", str(out), "--models", "shufflenetv1", "--weights", str(weights_dir))
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def served_repository(repository) -> Path:
    return repository


@pytest.fixture(scope="module")
def server(served):
    return served(["shufflenetv1"])


def test_the_exported_checkpoint_gives_megvii_logits_on_real_photos(repository, checkpoint, inputs, capsys):
    with torch.no_grad():
        expected = megvii_logits(checkpoint, 8, inputs).numpy()
    top1 = expected.argmax(1)
    assert len(set(top1.tolist())) >= 3, f"the photos must get different answers, got top-1 {top1}"
    assert ((expected.std(1) > 0.3) & (expected.std(1) < 10)).all(), expected.std(1)
    (got,) = onnx_session(repository / "shufflenetv1" / "model.onnx").run(None, {"input": inputs.numpy()})
    with capsys.disabled():
        for name, want, have in zip(PHOTOS, expected, got, strict=True):
            print(f"\nshufflenetv1 (megvii) {name}: max |logit| {np.abs(want).max():.3f}, "
                  f"max abs diff {np.abs(have - want).max():.2e}, top-1 {want.argmax()} / {have.argmax()}", end="")
    assert_same_logits(got, expected, scale=np.abs(expected).max(1, keepdims=True))


def test_the_metadata_records_megvii_layout_and_preprocessing(repository, weights_dir):
    metadata = json.loads((repository / "shufflenetv1" / "metadata.json").read_text())
    assert metadata["layout"] == "megvii"
    assert metadata["params"] == 2_434_768 - 1000  # the paper layout's count less the classifier bias
    assert metadata["preprocessing"] == {
        "resize": 256, "resize_rule": "shorter_side_rounded", "interpolation": "bilinear", "antialias": False,
        "crop": 224, "color": "BGR", "scale": 1.0, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}
    assert metadata["weights"]["kind"] == "custom" and metadata["weights"]["source"] == "shufflenetv1.pth"
    assert metadata["weights"]["sha256"] == hashlib.sha256((weights_dir / "shufflenetv1.pth").read_bytes()).hexdigest()


def test_predict_gives_the_top1_of_megvii_pipeline(client, checkpoint, inputs, photos, capsys):
    with torch.no_grad():
        expected = megvii_logits(checkpoint, 8, inputs).argmax(1).tolist()
    answers = [client.post("/predict/shufflenetv1", content=photos[name].read_bytes(),
                           headers={"Content-Type": "image/jpeg"}).json() for name in PHOTOS]
    listed = client.get("/models/shufflenetv1").json()
    top1 = [answer["predictions"][0]["class_id"] for answer in answers]
    with capsys.disabled():
        print(f"\nshufflenetv1 (megvii) top-1 through /predict {top1}, reference pipeline {expected}", end="")
    assert sum(int(a == b) for a, b in zip(top1, expected, strict=True)) >= 3, f"service {top1}, megvii {expected}"
    assert listed["weights_source"] == "shufflenetv1.pth"
    assert listed["preprocessing"].startswith("BGR, values 0 to 255;")
    assert "without antialiasing" in listed["preprocessing"]
    assert listed["metadata"]["layout"] == "megvii"


@pytest.mark.parametrize("wrap", [as_saved_by_megvii, dict], ids=["state_dict-module-prefix", "bare"])
def test_a_megvii_checkpoint_is_recognised_by_its_keys_in_either_form(tmp_path, checkpoint, inputs, wrap):
    torch.save(wrap(checkpoint), tmp_path / "shufflenetv1.pth")
    built = build_with_weights(MODELS["shufflenetv1"], str(tmp_path))
    assert built.spec.layout == "megvii" and built.spec.preprocessing.color == "BGR"
    with torch.no_grad():
        assert torch.allclose(built.model(inputs[:1]), megvii_logits(checkpoint, 8, inputs[:1]), atol=1e-4)


def test_a_state_dict_of_the_paper_layout_keeps_the_paper_layout(tmp_path):
    trained = build_with_weights(MODELS["shufflenetv1"], "random", seed=3).model
    torch.save(trained.state_dict(), tmp_path / "shufflenetv1.pth")
    built = build_with_weights(MODELS["shufflenetv1"], str(tmp_path))
    assert built.spec.layout == "paper" and built.spec.preprocessing == MODELS["shufflenetv1"].preprocessing


def truncated(path: Path) -> None:
    torch.save(as_saved_by_megvii(megvii_state_dict(G8_1X)), path)
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def other_variant(path: Path) -> None:
    torch.save(as_saved_by_megvii(megvii_state_dict(G3_1X)), path)


def missing_tensor(path: Path) -> None:
    state = megvii_state_dict(G8_1X)
    del state["features.5.branch_main_1.4.running_var"]
    torch.save(as_saved_by_megvii(state), path)


@pytest.mark.parametrize("make, pin, fragments", [
    (truncated, None, ["cannot read", "shufflenetv1.pth"]),
    (other_variant, None, ["g=3 1.0x", "g=8 1.0x", "another variant"]),
    (missing_tensor, None, ["missing keys: features.5.branch_main_1.4.running_var"]),
    (other_variant, "0" * 64, ["sha256", "pinned"]),
], ids=["truncated", "wrong-variant", "missing-tensor", "hash-mismatch"])
def test_a_bad_megvii_checkpoint_is_refused_naming_the_model_and_the_cause(run_export, tmp_path, make, pin, fragments):
    folder = tmp_path / "weights"
    folder.mkdir()
    make(folder / "shufflenetv1.pth")
    result = run_export("--out", str(tmp_path / "repo"), "--models", "shufflenetv1", "--weights", str(folder),
                        *(["--weights-sha256", f"shufflenetv1={pin}"] if pin else []))
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    line = result.stderr.strip()
    assert line.startswith("cnn-export: error: shufflenetv1: ") and len(line.splitlines()) == 1, line
    for fragment in fragments:
        assert fragment in line
    assert not (tmp_path / "repo" / "shufflenetv1").exists()


# The eight published checkpoints: (groups, width) -> stem, stage 2-4 channels, and the parameter
# count of megvii's results table (millions, rounded as there).
PUBLISHED = {
    (3, 0.5): (12, (120, 240, 480), 0.7), (3, 1.0): (24, (240, 480, 960), 1.9),
    (3, 1.5): (24, (360, 720, 1440), 3.4), (3, 2.0): (48, (480, 960, 1920), 5.4),
    (8, 0.5): (16, (192, 384, 768), 1.0), (8, 1.0): (24, (384, 768, 1536), 2.4),
    (8, 1.5): (24, (576, 1152, 2304), 4.3), (8, 2.0): (48, (768, 1536, 3072), 6.5),
}


@pytest.mark.parametrize("groups, width", PUBLISHED)
def test_every_published_checkpoint_size_loads_strictly_for_its_variant(groups, width, tmp_path):
    stem, stages, millions = PUBLISHED[groups, width]
    name = f"shufflenetv1_g{groups}_{width}x"  # the variant `--models` names
    state = megvii_state_dict((groups, stem, stages), seed=2)
    torch.save(as_saved_by_megvii(state), tmp_path / f"{name}.pth")

    built = build_with_weights(choose(name).spec, str(tmp_path))

    assert built.spec.layout == "megvii"
    assert round(sum(p.numel() for p in built.model.parameters()) / 1e6, 1) == millions
    x = 255 * torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, expected = built.model(x).numpy(), megvii_logits(state, groups, x).numpy()
    assert_same_logits(got, expected, scale=np.abs(expected).max(), top5=False)


def test_a_variant_named_on_the_command_line_exports_from_its_megvii_checkpoint(run_export, tmp_path):
    name, (stem, stages, _) = "shufflenetv1_g3_0.5x", PUBLISHED[3, 0.5]
    state = megvii_state_dict((3, stem, stages), seed=3)
    torch.save(as_saved_by_megvii(state), tmp_path / f"{name}.pth")
    out = tmp_path / "repository"

    result = run_export("--out", str(out), "--models", name, "--weights", str(tmp_path))

    assert result.returncode == 0, result.stderr
    metadata = json.loads((out / name / "metadata.json").read_text())
    assert metadata["layout"] == "megvii" and metadata["preprocessing"]["color"] == "BGR"
    x = 255 * torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    (got,) = onnx_session(out / name / "model.onnx").run(None, {"input": x.numpy()})
    with torch.no_grad():
        expected = megvii_logits(state, 3, x).numpy()
    assert_same_logits(got, expected, scale=np.abs(expected).max(), top5=False)
