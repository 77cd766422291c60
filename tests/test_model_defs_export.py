"""Export: the ONNX files compute what the PyTorch models compute, and the CLI writes a repository
that follows docs/model-repository.md."""
import hashlib
import json
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from safetensors.torch import save_file

from model_defs.registry import MODELS
from model_defs.to_onnx import ExportError, check_parity, export_onnx
from model_defs.weights import build_with_weights
from tests.onnx_parity import assert_same_logits, onnx_session
from tests.test_model_defs_weights import preprocess

METADATA_KEYS = {"schema_version", "name", "architecture", "layout", "paper", "model_file", "optimized_model_file",
                 "onnx",
                 "input", "output", "preprocessing", "labels", "params", "macs", "weights", "export",
                 "quantization"}


def session(folder: Path) -> onnxruntime.InferenceSession:
    return onnx_session(folder / json.loads((folder / "metadata.json").read_text())["model_file"])


def assert_model_folder_is_consistent(folder: Path) -> dict:
    metadata = json.loads((folder / "metadata.json").read_text())
    assert set(metadata) == METADATA_KEYS
    assert metadata["schema_version"] == 2 and metadata["name"] == folder.name
    onnx_bytes = (folder / metadata["model_file"]).read_bytes()
    assert metadata["onnx"] == {"opset": 18, "size_bytes": len(onnx_bytes),
                                "sha256": hashlib.sha256(onnx_bytes).hexdigest()}
    assert sorted(p.name for p in folder.iterdir()) == ["labels.txt", "metadata.json", "model.onnx"]
    labels = (folder / metadata["labels"]["file"]).read_text(encoding="utf-8").splitlines()
    size = metadata["preprocessing"]["crop"]
    assert metadata["input"] == {"name": "input", "dtype": "float32", "layout": "NCHW", "shape": [None, 3, size, size]}
    assert metadata["output"] == {"name": "logits", "dtype": "float32", "shape": [None, len(labels)],
                                  "kind": "logits"}
    assert metadata["labels"]["count"] == len(labels)
    assert set(metadata["preprocessing"]) == {"resize", "resize_rule", "interpolation", "antialias", "crop", "color",
                                              "scale", "mean", "std"}
    assert set(metadata["weights"]) == {"kind", "source", "sha256", "sha256_verified", "note"}
    assert set(metadata["export"]) == {"torch", "onnx", "onnxruntime", "created_utc", "parity"}
    assert metadata["export"]["parity"]["batch_sizes"] == [1, 4]
    assert metadata["export"]["parity"]["top5_equal"] is True
    assert metadata["quantization"] is None  # FP32

    runtime = session(folder)
    [graph_input], [graph_output] = runtime.get_inputs(), runtime.get_outputs()
    assert (graph_input.name, graph_output.name) == ("input", "logits")
    assert graph_input.shape[1:] == [3, size, size] and not isinstance(graph_input.shape[0], int)
    for batch in (1, 3):
        (out,) = runtime.run(None, {"input": np.zeros((batch, 3, size, size), np.float32)})
        assert out.shape == (batch, len(labels))
    return metadata


def test_every_model_folder_in_the_exported_repository_follows_the_contract(model_repository):
    folders = sorted(p.name for p in model_repository.iterdir())
    assert folders == sorted(MODELS)
    for name in folders:
        metadata = assert_model_folder_is_consistent(model_repository / name)
        spec = MODELS[name]
        assert metadata["architecture"] == spec.architecture
        assert metadata["paper"]["url"] == spec.paper.url
        assert metadata["weights"]["kind"] == "random"
        expected_preprocessing = (
            {"resize": 32, "crop": 32, "mean": [0.4914, 0.4822, 0.4465], "std": [0.2470, 0.2435, 0.2616]}
            if name == "effnet" else  # torchvision's ImageNet evaluation transform
            {"resize": 256, "crop": 224, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]})
        assert metadata["preprocessing"] == {**expected_preprocessing, "interpolation": "bilinear",
                                             "resize_rule": "shorter_side", "antialias": True,
                                             "color": "RGB", "scale": 255.0}
        assert metadata["layout"] == "paper", "random weights keep the paper layout"
        assert metadata["labels"]["set"] == ("cifar-10" if name == "effnet" else "imagenet-1k")
        assert metadata["params"] == sum(p.numel() for p in spec.builder().parameters())


@pytest.mark.parametrize("name", MODELS)
def test_onnx_file_matches_pytorch_on_real_photos_at_batch_1_and_4(name, model_repository, photos):
    """The repository's file against a freshly built model: same seed, so the same random weights."""
    spec = MODELS[name]
    model = build_with_weights(spec, "random", seed=0).model
    runtime = session(model_repository / name)
    batch = torch.stack([preprocess(path, spec.preprocessing) for path in photos.values()][:4])
    for x in (batch[:1], batch):
        with torch.no_grad():
            expected = model(x).numpy()
        (got,) = runtime.run(None, {"input": x.numpy()})
        assert expected.std() > 0.1, "logits of order 1, so that the comparison means something"
        assert_same_logits(got, expected, scale=max(1.0, np.abs(expected).max()))


@pytest.mark.export  # the torch export, in process
def test_export_refuses_an_onnx_file_that_computes_something_else(tmp_path):
    spec = MODELS["effnet"]
    model = build_with_weights(spec, "random").model
    export_onnx(model, spec, tmp_path / "model.onnx")
    check_parity(model, spec, tmp_path / "model.onnx", seed=1)
    with torch.no_grad():
        model.classifier.bias.add_(0.01)  # every logit moves by 0.01: same ranking, wrong values
    with pytest.raises(ExportError, match=r"^effnet: onnxruntime disagrees with PyTorch.*top-5 equal: True"):
        check_parity(model, spec, tmp_path / "model.onnx", seed=1)
    with torch.no_grad():
        model.classifier.bias.sub_(0.01)
        model.classifier.weight[3].mul_(1.5)  # one class's logits change: a different ranking
    with pytest.raises(ExportError, match=r"^effnet: onnxruntime disagrees with PyTorch.*top-5 equal: False"):
        check_parity(model, spec, tmp_path / "model.onnx", seed=1)


def test_cli_exports_the_chosen_models_and_prints_a_summary(run_export, tmp_path):
    out = tmp_path / "repo" / "nested"
    result = run_export("--out", str(out), "--models", "effnet,mobilenetv3_small", "--seed", "5")
    assert result.returncode == 0, result.stderr
    assert "[1/2] effnet: random weights" in result.stdout
    assert "[2/2] mobilenetv3_small: random weights" in result.stdout
    table = result.stdout.split("\n\n")[1]
    assert table.splitlines()[0].split() == ["name", "params", "MACs", "ONNX", "MB", "weights", "parity", "seconds"]
    assert "mobilenetv3_small" in table and "2,542,856" in table
    assert sorted(p.name for p in out.iterdir()) == ["effnet", "mobilenetv3_small"]
    for folder in out.iterdir():
        metadata = assert_model_folder_is_consistent(folder)
        assert metadata["weights"]["source"].startswith("random init with seed 5;")


def test_cli_exports_custom_weights_and_records_their_file(run_export, tmp_path):
    spec = MODELS["effnet"]
    trained = build_with_weights(spec, "random", seed=11).model
    weights_dir = tmp_path / "weights"
    weights_dir.mkdir()
    save_file(trained.state_dict(), str(weights_dir / "effnet.safetensors"))

    result = run_export("--out", str(tmp_path / "repo"), "--models", "effnet", "--weights", str(weights_dir))

    assert result.returncode == 0, result.stderr
    metadata = assert_model_folder_is_consistent(tmp_path / "repo" / "effnet")
    assert metadata["weights"] == {
        "kind": "custom", "source": "effnet.safetensors", "note": None, "sha256_verified": False,
        "sha256": hashlib.sha256((weights_dir / "effnet.safetensors").read_bytes()).hexdigest()}
    x = torch.randn(2, 3, 32, 32)
    (got,) = session(tmp_path / "repo" / "effnet").run(None, {"input": x.numpy()})
    with torch.no_grad():
        assert np.abs(got - trained(x).numpy()).max() < 1e-4


def test_cli_imagenet_with_fallback_exports_random_weights_and_says_so(run_export, tmp_path):
    result = run_export("--out", str(tmp_path), "--models", "effnet", "--weights", "imagenet",
                        "--allow-random-fallback")
    assert result.returncode == 0, result.stderr
    weights = json.loads((tmp_path / "effnet" / "metadata.json").read_text())["weights"]
    assert weights["kind"] == "random"
    assert "ImageNet weights were requested" in weights["note"]


def assert_fails_with_one_line(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_cli_rejects_an_unknown_model_listing_the_valid_names(run_export, tmp_path):
    result = run_export("--out", str(tmp_path), "--models", "effnet,resnet50")
    assert_fails_with_one_line(result, "unknown model resnet50", ", ".join(MODELS))
    assert list(tmp_path.iterdir()) == []


def test_cli_rejects_a_weights_path_that_does_not_exist(run_export, tmp_path):
    result = run_export("--out", str(tmp_path / "repo"), "--weights", str(tmp_path / "no-such-dir"))
    assert_fails_with_one_line(result, "--weights", "no-such-dir")


def test_cli_rejects_an_output_folder_it_cannot_write(run_export, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = run_export("--out", str(blocker / "repo"), "--models", "effnet")
    assert_fails_with_one_line(result, "--out", "cannot write")


def test_cli_names_the_model_whose_checkpoint_is_missing_from_the_weights_folder(run_export, tmp_path):
    (tmp_path / "weights").mkdir()
    torch.save({}, tmp_path / "weights" / "effnet.pth")
    result = run_export("--out", str(tmp_path / "repo"), "--models", "effnet,shufflenetv1",
                        "--weights", str(tmp_path / "weights"))
    assert_fails_with_one_line(result, "no checkpoint for shufflenetv1", "shufflenetv1.pth")


def test_cli_refuses_imagenet_for_a_model_without_a_downloadable_checkpoint(run_export, tmp_path):
    result = run_export("--out", str(tmp_path), "--models", "shufflenetv1", "--weights", "imagenet")
    assert_fails_with_one_line(result, "shufflenetv1: megvii publishes", "--weights FOLDER", "--allow-random-fallback")
