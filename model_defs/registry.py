"""One declared record per servable model: what it is, how to feed it, where its weights live."""
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from torch import nn

from contract import Layout, Paper, Preprocessing
from model_defs.effnet import EffNet
from model_defs.mobilenet import MobileNetV1, MobileNetV2, MobileNetV3
from model_defs.shufflenet import ShuffleNetV1, ShuffleNetV2

LABELS_DIR = Path(__file__).parent / "data"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The usual CIFAR-10 training-set channel statistics.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CHECKPOINT_BASE = "https://download.pytorch.org/models/"


@dataclass(frozen=True)
class LabelSet:
    name: str  # e.g. "imagenet-1k"
    file: Path

    def read(self) -> list[str]:
        return self.file.read_text(encoding="utf-8").splitlines()


IMAGENET_1K = LabelSet("imagenet-1k", LABELS_DIR / "imagenet1k_labels.txt")
CIFAR_10 = LabelSet("cifar-10", LABELS_DIR / "cifar10_labels.txt")
IMAGENET_PREPROCESSING = Preprocessing(resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)


@dataclass(frozen=True)
class ModelSpec:
    name: str  # URL name and folder name in the model repository
    architecture: str
    paper: Paper
    builder: Callable[[], nn.Module]
    preprocessing: Preprocessing
    labels: LabelSet
    # torchvision's ImageNet checkpoint; its file name ends in "-<sha256 prefix>.pth".
    checkpoint_url: str | None = None
    # Whose reading of the architecture `builder` follows; weights that need another change it
    # (model_defs.weights.BuiltModel).
    layout: Layout = "paper"

    @property
    def input_size(self) -> int:
        return self.preprocessing.crop


MOBILENET_V3_PAPER = Paper(title="Searching for MobileNetV3", authors="Howard et al.", year=2019, url="https://arxiv.org/abs/1905.02244")

MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in [
    ModelSpec(
        name="mobilenetv1",
        architecture="MobileNetV1 1.0-224",
        paper=Paper(title="MobileNets: Efficient Convolutional Neural Networks for Mobile Vision Applications",
                    authors="Howard et al.", year=2017, url="https://arxiv.org/abs/1704.04861"),
        builder=MobileNetV1,
        preprocessing=IMAGENET_PREPROCESSING,
        labels=IMAGENET_1K,
    ),
    ModelSpec(
        name="mobilenetv2",
        architecture="MobileNetV2 1.0",
        paper=Paper(title="MobileNetV2: Inverted Residuals and Linear Bottlenecks", authors="Sandler et al.", year=2018,
                    url="https://arxiv.org/abs/1801.04381"),
        builder=MobileNetV2,
        preprocessing=IMAGENET_PREPROCESSING,
        labels=IMAGENET_1K,
        checkpoint_url=CHECKPOINT_BASE + "mobilenet_v2-b0353104.pth",
    ),
    ModelSpec(
        name="mobilenetv3_large",
        architecture="MobileNetV3-Large 1.0",
        paper=MOBILENET_V3_PAPER,
        builder=partial(MobileNetV3, "large"),
        preprocessing=IMAGENET_PREPROCESSING,
        labels=IMAGENET_1K,
        checkpoint_url=CHECKPOINT_BASE + "mobilenet_v3_large-8738ca79.pth",
    ),
    ModelSpec(
        name="mobilenetv3_small",
        architecture="MobileNetV3-Small 1.0",
        paper=MOBILENET_V3_PAPER,
        builder=partial(MobileNetV3, "small"),
        preprocessing=IMAGENET_PREPROCESSING,
        labels=IMAGENET_1K,
        checkpoint_url=CHECKPOINT_BASE + "mobilenet_v3_small-047dcff4.pth",
    ),
    ModelSpec(
        name="shufflenetv1",
        architecture="ShuffleNet 1x (g=8)",
        paper=Paper(title="ShuffleNet: An Extremely Efficient Convolutional Neural Network for Mobile Devices",
                    authors="Zhang et al.", year=2017, url="https://arxiv.org/abs/1707.01083"),
        builder=partial(ShuffleNetV1, groups=8),
        preprocessing=IMAGENET_PREPROCESSING,
        labels=IMAGENET_1K,
    ),
    ModelSpec(
        name="shufflenetv2",
        architecture="ShuffleNetV2 1.0x",
        paper=Paper(title="ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture Design",
                    authors="Ma et al.", year=2018, url="https://arxiv.org/abs/1807.11164"),
        builder=partial(ShuffleNetV2, 1.0),
        preprocessing=IMAGENET_PREPROCESSING,
        labels=IMAGENET_1K,
        checkpoint_url=CHECKPOINT_BASE + "shufflenetv2_x1-5666bf0f80.pth",
    ),
    ModelSpec(
        name="effnet",
        architecture="EffNet (CIFAR-10)",
        paper=Paper(title="EffNet: An Efficient Structure for Convolutional Neural Networks", authors="Freeman et al.",
                    year=2018, url="https://arxiv.org/abs/1801.06434"),
        builder=EffNet,
        preprocessing=Preprocessing(resize=32, crop=32, mean=CIFAR10_MEAN, std=CIFAR10_STD),
        labels=CIFAR_10,
    ),
]}
