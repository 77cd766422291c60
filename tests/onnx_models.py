"""Small ONNX classifiers written with the `onnx` package's helper API, no torch: a model repository
that follows the contract (docs/model-repository.md) in a fraction of a second, for the in-process
tests whose meaning does not depend on the real architectures (the batcher, the lifecycle).

Each graph is a strided 3x3 convolution, ReLU, global average pooling and a fully connected layer:
enough for different photos to get different logits, small enough to run in well under a
millisecond.
"""
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from contract import LABELS_FILE, MODEL_FILE, RANDOM_WEIGHTS_NOTE, SCHEMA_VERSION, ModelMetadata, write_metadata

OPSET = 18
FEATURES = 8  # channels of the convolution, the length of the pooled feature vector
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


@dataclass(frozen=True)
class SmallModel:
    """A model folder's name, its classes and the preprocessing of the real model it stands in for."""

    name: str
    classes: int
    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    label_set: str


# An ImageNet-sized model (the crop of the six ImageNet networks) and a CIFAR-sized one (EffNet's).
SMALL_IMAGENET = SmallModel("small_imagenet", 1000, 256, 224, IMAGENET_MEAN, IMAGENET_STD, "imagenet-1k")
SMALL_CIFAR = SmallModel("small_cifar", 10, 32, 32, CIFAR_MEAN, CIFAR_STD, "cifar-10")
SMALL_MODELS = (SMALL_IMAGENET, SMALL_CIFAR)


def classifier_graph(model: SmallModel, seed: int = 0) -> onnx.ModelProto:
    """input (N, 3, crop, crop) -> Conv 3x3 stride 2 -> Relu -> GlobalAveragePool -> Flatten -> Gemm
    -> logits (N, classes), with weights drawn from `seed`."""
    rng = np.random.default_rng(seed)
    weights = {
        "conv.weight": rng.normal(0, (2 / 27) ** 0.5, (FEATURES, 3, 3, 3)),
        "conv.bias": rng.normal(0, 0.1, FEATURES),
        "fc.weight": rng.normal(0, 1.0, (model.classes, FEATURES)),
        "fc.bias": rng.normal(0, 0.1, model.classes),
    }
    nodes = [
        helper.make_node("Conv", ["input", "conv.weight", "conv.bias"], ["conv"], kernel_shape=[3, 3],
                         strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["features"], axis=1),
        helper.make_node("Gemm", ["features", "fc.weight", "fc.bias"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, model.name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, model.crop, model.crop])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", model.classes])],
        [numpy_helper.from_array(value.astype(np.float32), name) for name, value in weights.items()])
    built = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="tests.onnx_models")
    onnx.checker.check_model(built, full_check=True)
    return built


def metadata_for(model: SmallModel, onnx_bytes: bytes) -> ModelMetadata:
    return ModelMetadata.model_validate({
        "schema_version": SCHEMA_VERSION, "name": model.name, "architecture": "Small test classifier",
        "model_file": MODEL_FILE,
        "onnx": {"opset": OPSET, "size_bytes": len(onnx_bytes), "sha256": hashlib.sha256(onnx_bytes).hexdigest()},
        "input": {"name": "input", "dtype": "float32", "layout": "NCHW", "shape": [None, 3, model.crop, model.crop]},
        "output": {"name": "logits", "dtype": "float32", "shape": [None, model.classes], "kind": "logits"},
        "preprocessing": {"resize": model.resize, "crop": model.crop, "mean": model.mean, "std": model.std},
        "labels": {"file": LABELS_FILE, "set": model.label_set, "count": model.classes},
        "weights": {"kind": "random", "source": "numpy normal draws with seed 0", "note": RANDOM_WEIGHTS_NOTE},
    })


def write_model_folder(repository: Path, model: SmallModel, seed: int = 0,
                       version: int | None = None) -> Path:
    """One model folder (or version folder `<name>/<version>`): model.onnx with weights drawn from
    `seed`, labels.txt and a metadata.json with the file's size and sha256."""
    folder = repository / model.name / (str(version) if version is not None else "")
    folder.mkdir(parents=True)
    onnx_bytes = classifier_graph(model, seed).SerializeToString()
    (folder / MODEL_FILE).write_bytes(onnx_bytes)
    labels = [f"{model.label_set} class {i}" for i in range(model.classes)]
    (folder / LABELS_FILE).write_text("\n".join(labels) + "\n", encoding="utf-8")
    write_metadata(folder, metadata_for(model, onnx_bytes))
    return folder


def write_small_repository(repository: Path, models: tuple[SmallModel, ...] = SMALL_MODELS) -> Path:
    """A model repository holding the given small models."""
    for model in models:
        write_model_folder(repository, model)
    return repository
