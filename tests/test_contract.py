"""The model repository contract on tiny hand-made folders: no torch, no real ONNX graph."""
import hashlib
import json
from pathlib import Path

import pytest

from contract import (
    IncompleteModel,
    ModelFolder,
    ModelLoadError,
    ModelMetadata,
    discover,
    read_metadata,
    verify,
    write_metadata,
)

MODEL_BYTES = b"stands in for an ONNX graph"
LABELS = ["cat", "dog"]


def metadata_for(name: str, model_bytes: bytes = MODEL_BYTES) -> ModelMetadata:
    return ModelMetadata.model_validate({
        "schema_version": 2, "name": name, "architecture": "Tiny", "model_file": "model.onnx",
        "onnx": {"opset": 18, "size_bytes": len(model_bytes), "sha256": hashlib.sha256(model_bytes).hexdigest()},
        "input": {"name": "input", "dtype": "float32", "layout": "NCHW", "shape": [None, 3, 8, 8]},
        "output": {"name": "logits", "dtype": "float32", "shape": [None, len(LABELS)], "kind": "logits"},
        "preprocessing": {"resize": 8, "crop": 8, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
        "labels": {"file": "labels.txt", "set": "pets", "count": len(LABELS)},
        "weights": {"kind": "random", "note": "Random weights: predictions are meaningless."},
        "export": {"parity": {"max_abs_diff": 2.1e-06, "top5_equal": True}},
    })


def model_folder(repository: Path, name: str, metadata: ModelMetadata | None = None) -> Path:
    folder = repository / name
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(MODEL_BYTES)
    (folder / "labels.txt").write_text("\n".join(LABELS) + "\n", encoding="utf-8")
    write_metadata(folder, metadata or metadata_for(name))
    return folder


def test_metadata_written_by_the_exporter_reads_back_equal(tmp_path):
    folder = model_folder(tmp_path, "tiny")
    assert read_metadata(folder) == metadata_for("tiny")
    written = json.loads((folder / "metadata.json").read_text(encoding="utf-8"))
    assert written["optimized_model_file"] is None and written["weights"]["sha256"] is None


def test_a_folder_whose_files_match_its_metadata_verifies_and_gives_its_labels(tmp_path):
    model_folder(tmp_path, "tiny")
    [folder] = discover(tmp_path)
    assert verify(folder) == LABELS


@pytest.mark.parametrize("recorded, cause", [(MODEL_BYTES + b"!", "bytes"), (MODEL_BYTES.upper(), "sha256")],
                         ids=["size", "sha256"])
def test_a_model_file_that_differs_from_its_metadata_fails_naming_the_file(tmp_path, recorded, cause):
    """The metadata describes other bytes: first a longer file (size), then same-length bytes (hash)."""
    path = model_folder(tmp_path, "tiny", metadata_for("tiny", recorded))
    folder = ModelFolder("tiny", path, read_metadata(path))
    with pytest.raises(ModelLoadError, match=rf"model\.onnx.*{cause}"):
        verify(folder)


def test_a_folder_with_bad_metadata_is_reported_beside_the_good_ones(tmp_path):
    model_folder(tmp_path, "good")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metadata.json").write_text('{"schema_version": 1, "name": "broken"}', encoding="utf-8")
    good, bad = sorted(discover(tmp_path), key=lambda f: f.name != "good")
    assert good.metadata is not None and good.error is None
    assert bad.metadata is None and "model_file" in bad.error
    with pytest.raises(ModelLoadError, match="model_file"):
        verify(bad)


def test_a_folder_named_differently_from_its_model_fails(tmp_path):
    model_folder(tmp_path, "renamed", metadata_for("tiny"))
    [folder] = discover(tmp_path)
    assert folder.metadata is None and "'tiny'" in folder.error and "'renamed'" in folder.error


def test_a_version_1_file_reads_with_the_preprocessing_and_layout_it_always_meant(tmp_path):
    """Version 2 added the resize rule, antialiasing, the layout and sha256_verified, defaulting to v1's."""
    folder = model_folder(tmp_path, "tiny")
    written = json.loads((folder / "metadata.json").read_text(encoding="utf-8"))
    for key in ("resize_rule", "antialias"):
        del written["preprocessing"][key]
    del written["layout"], written["weights"]["sha256_verified"]
    (folder / "metadata.json").write_text(json.dumps({**written, "schema_version": 1}), encoding="utf-8")
    metadata = read_metadata(folder)
    assert metadata.schema_version == 1 and metadata.layout == "paper"
    p = metadata.preprocessing
    assert (p.resize_rule, p.antialias, p.interpolation, p.color, p.scale) == \
        ("shorter_side", True, "bilinear", "RGB", 255.0)


@pytest.mark.parametrize("change, cause", [
    ({"schema_version": 3}, "schema_version"),
    ({"preprocessing": {"resize": 8, "crop": 8, "mean": [0, 0, 0], "std": [1, 1, 1], "resize_rule": "fit"}},
     "resize_rule"),
    ({"preprocessing": {"resize": 8, "crop": 8, "mean": [0, 0, 0], "std": [1, 1, 1], "antialias": False,
                        "interpolation": "bicubic"}}, "antialias false is defined for bilinear"),
    ({"layout": "caffe"}, "layout"),
], ids=["version", "resize-rule", "unfiltered-bicubic", "layout"])
def test_metadata_the_service_could_not_follow_fails_the_model_naming_the_field(tmp_path, change, cause):
    folder = model_folder(tmp_path, "tiny")
    written = json.loads((folder / "metadata.json").read_text(encoding="utf-8"))
    (folder / "metadata.json").write_text(json.dumps({**written, **change}), encoding="utf-8")
    with pytest.raises(ModelLoadError, match=cause):
        read_metadata(folder)


def test_numbered_version_folders_and_a_plain_folder_are_read_in_one_repository(tmp_path):
    """`<name>/<N>/` holds version N of `name`, named so in its metadata; a plain folder is version 1."""
    model_folder(tmp_path, "plain")
    for version in ("2", "10", "1"):
        model_folder(tmp_path / "versioned", version, metadata_for("versioned"))
    model_folder(tmp_path / "versioned", "latest", metadata_for("versioned"))
    model_folder(tmp_path / "versioned", "3", metadata_for("other"))
    model_folder(tmp_path, ".plain.partial")  # an export being written: not a model yet
    found = [(f.name, f.version, f.error is None) for f in discover(tmp_path)]
    assert found == [("plain", "1", True), ("versioned", "latest", False), ("versioned", "1", True),
                     ("versioned", "2", True), ("versioned", "3", False), ("versioned", "10", True)]
    errors = {f.version: f.error for f in discover(tmp_path) if f.error}
    assert "version folder check" in errors["latest"] and "name check" in errors["3"]


def test_a_model_file_shorter_than_its_metadata_says_is_incomplete_not_broken(tmp_path):
    """A copy still under way is told apart from a file that will never verify."""
    path = model_folder(tmp_path, "tiny", metadata_for("tiny", MODEL_BYTES + b"rest of the file"))
    with pytest.raises(IncompleteModel, match="size check"):
        verify(ModelFolder("tiny", path, read_metadata(path)))
    (path / "model.onnx").unlink()
    with pytest.raises(IncompleteModel, match="file check"):
        verify(ModelFolder("tiny", path, read_metadata(path)))
