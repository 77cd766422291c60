"""Weights: random ones that still tell photos apart, torchvision checkpoints, and the user's own files."""
import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from model_defs.registry import MODELS, Preprocessing
from model_defs.weights import CheckpointUnavailable, WeightsError, build_with_weights


def preprocess(path: Path, pre: Preprocessing) -> torch.Tensor:
    """torchvision's Resize + CenterCrop + ToTensor + Normalize, as docs/model-repository.md spells it."""
    image = Image.open(path).convert("RGB")
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(pre.resize * long / short)
    size = (pre.resize, new_long) if width <= height else (new_long, pre.resize)
    image = image.resize(size, Image.BILINEAR)
    top = round((image.height - pre.crop) / 2)
    left = round((image.width - pre.crop) / 2)
    image = image.crop((left, top, left + pre.crop, top + pre.crop))
    x = (np.asarray(image, dtype=np.float32) / 255.0 - pre.mean) / pre.std
    return torch.from_numpy(x.transpose(2, 0, 1).astype(np.float32))


def logits_for(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("name", MODELS)
def test_random_weights_give_different_photos_different_answers(name, photos):
    spec = MODELS[name]
    built = build_with_weights(spec, "random", seed=0)
    model, record = built.model, built.weights
    assert record.kind == "random" and "meaningless" in record.note
    batch = torch.stack([preprocess(path, spec.preprocessing) for path in photos.values()])
    logits = logits_for(model, batch)
    top1 = logits.argmax(1).tolist()
    # Five photos with independent answers among 1000 classes almost never share one; among 10, often.
    assert len(set(top1)) >= (3 if name == "effnet" else 4), f"{name}: top-1 per photo {top1}"
    spread = logits.std(1)
    assert ((spread > 0.1) & (spread < 10)).all(), f"{name}: logits std per photo {spread.tolist()}"


def test_random_weights_are_the_same_for_the_same_seed_and_differ_for_another():
    spec = MODELS["mobilenetv3_small"]
    x = torch.randn(2, 3, 224, 224)
    first = logits_for(build_with_weights(spec, "random", seed=0).model, x)
    again = logits_for(build_with_weights(spec, "random", seed=0).model, x)
    other = logits_for(build_with_weights(spec, "random", seed=1).model, x)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def save_checkpoint(state_dict: dict, path: Path) -> None:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    else:
        torch.save(state_dict, path)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_custom_checkpoint_round_trip_gives_identical_outputs(tmp_path, suffix):
    spec = MODELS["shufflenetv2"]
    trained = build_with_weights(spec, "random", seed=7).model
    save_checkpoint(trained.state_dict(), tmp_path / f"shufflenetv2{suffix}")

    built = build_with_weights(spec, str(tmp_path))
    loaded, record = built.model, built.weights

    x = torch.randn(2, 3, 224, 224)
    assert torch.equal(logits_for(loaded, x), logits_for(trained, x))
    file = tmp_path / f"shufflenetv2{suffix}"
    assert record.kind == "custom"
    assert record.source == file.name
    assert record.sha256 == hashlib.sha256(file.read_bytes()).hexdigest()


def test_a_checkpoint_of_another_network_is_refused_naming_the_model_and_keys(tmp_path):
    other = build_with_weights(MODELS["mobilenetv3_small"], "random").model
    torch.save(other.state_dict(), tmp_path / "mobilenetv3_large.pth")
    with pytest.raises(WeightsError) as error:
        build_with_weights(MODELS["mobilenetv3_large"], str(tmp_path))
    message = str(error.value)
    assert message.startswith("mobilenetv3_large:")
    assert "features.0.0.weight" not in message  # the same shape in both: not a bad key
    assert "unexpected keys" in message or "wrong shapes" in message
    assert "features.1.block" in message


def test_a_checkpoint_missing_one_tensor_is_refused_naming_it(tmp_path):
    model = build_with_weights(MODELS["effnet"], "random").model
    state_dict = model.state_dict()
    del state_dict["features.2.4.1.running_var"]
    save_file(state_dict, str(tmp_path / "effnet.safetensors"))
    with pytest.raises(WeightsError, match=r"effnet: effnet.safetensors does not match the model; "
                                           r"missing keys: features.2.4.1.running_var$"):
        build_with_weights(MODELS["effnet"], str(tmp_path))


def test_a_missing_custom_file_is_reported(tmp_path):
    with pytest.raises(WeightsError, match=r"effnet: no weights file .*effnet.pth or effnet.safetensors"):
        build_with_weights(MODELS["effnet"], str(tmp_path))


def fake_torchvision_checkpoint(directory: Path, stem: str, state_dict: dict, hash_prefix: str | None = None) -> str:
    """Save a state_dict under torchvision's naming, `<stem>-<sha256 prefix>.pth`; return its file:// URL."""
    scratch = directory / "scratch.pth"
    torch.save(state_dict, scratch)
    prefix = hash_prefix or hashlib.sha256(scratch.read_bytes()).hexdigest()[:8]
    path = directory / f"{stem}-{prefix}.pth"
    scratch.rename(path)
    return path.as_uri()


def test_imagenet_weights_load_through_torch_hub_with_the_hash_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    published = build_with_weights(MODELS["mobilenetv3_small"], "random", seed=3).model
    url = fake_torchvision_checkpoint(tmp_path, "mobilenet_v3_small", published.state_dict())
    spec = dataclasses.replace(MODELS["mobilenetv3_small"], checkpoint_url=url)

    built = build_with_weights(spec, "imagenet")
    model, record = built.model, built.weights

    x = torch.randn(1, 3, 224, 224)
    assert torch.equal(logits_for(model, x), logits_for(published, x))
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / url.rsplit("/", 1)[1]
    assert cached.is_file(), "downloaded into $TORCH_HOME's hub cache, as torchvision does"
    assert record.kind == "imagenet" and record.source == url
    assert record.sha256 == hashlib.sha256(cached.read_bytes()).hexdigest()


def test_imagenet_checkpoint_with_a_wrong_hash_is_rejected(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    published = build_with_weights(MODELS["mobilenetv3_small"], "random").model
    url = fake_torchvision_checkpoint(tmp_path, "mobilenet_v3_small", published.state_dict(), "deadbeef")
    spec = dataclasses.replace(MODELS["mobilenetv3_small"], checkpoint_url=url)
    with pytest.raises(WeightsError, match=r"mobilenetv3_small: .*hash"):
        build_with_weights(spec, "imagenet", allow_random_fallback=True)


def test_imagenet_for_a_network_without_a_checkpoint_is_an_error_naming_it():
    with pytest.raises(CheckpointUnavailable, match="effnet: no ImageNet checkpoint"):
        build_with_weights(MODELS["effnet"], "imagenet")


def test_random_fallback_is_recorded_when_imagenet_weights_do_not_exist():
    built = build_with_weights(MODELS["effnet"], "imagenet", allow_random_fallback=True)
    model, record = built.model, built.weights
    assert record.kind == "random"
    assert "ImageNet weights were requested" in record.note
    expected = build_with_weights(MODELS["effnet"], "random").model
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(logits_for(model, x), logits_for(expected, x))
