"""MobileNetV1 with Keras's ImageNet weights: the network as Keras builds it, and the HDF5 converter.

Keras publishes the official ImageNet weights of all sixteen MobileNetV1 variants (width
alpha 1.0/0.75/0.5/0.25 x resolution 224/192/160/128) as HDF5 files named
`mobilenet_<alpha>_<rows>_tf.h5`. They were trained (in TensorFlow) with conventions the network
must follow for its logits to equal Keras's:
- TensorFlow's SAME padding: a 3x3 convolution of stride 2 on an even-sized map pads one row and
  one column at the bottom and right only (Keras: `ZeroPadding2D(((0, 1), (0, 1)))` then a valid
  convolution); PyTorch's `padding=1` pads all four sides.
- BatchNorm epsilon 1e-3, ReLU6, and a 1x1 convolution with bias as the classifier.
- inputs scaled to [-1, 1] (`x / 127.5 - 1`), RGB.

The files are in Keras's legacy HDF5 weight layout: the root's `layer_names` attribute lists the
layers; each layer's group has a `weight_names` attribute naming its datasets (`conv1/kernel:0`).
"""
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from contract import Preprocessing
from model_defs.mobilenet import MOBILENET_V1_SETTING

KERAS_WEIGHTS_BASE = "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet/"
# Keras's spelling of each width in the file names.
ALPHA_TEXT = {1.0: "1_0", 0.75: "7_5", 0.5: "5_0", 0.25: "2_5"}
RESOLUTIONS = (128, 160, 192, 224)
BN_EPS_TF = 1e-3
STEM_CHANNELS = 32
# TensorFlow-slim's evaluation (which trained these weights) keeps the central 87.5 % of each side
# and resizes that to rows x rows: squashing to rows / 0.875 and centre-cropping rows is the same.
CENTRAL_FRACTION = 0.875
# `mobilenetv1`, `mobilenetv1_0.5`, `mobilenetv1_0.5_160`: width and resolution by name.
VARIANT_NAME = re.compile(r"mobilenetv1(?:_(?P<alpha>\d\.\d+))?(?:_(?P<rows>\d+))?")


class KerasWeightsError(Exception):
    """A Keras HDF5 file that cannot be converted; the message says why (the caller names the model)."""


@dataclass(frozen=True)
class KerasVariant:
    alpha: float
    rows: int

    @property
    def file_name(self) -> str:
        return f"mobilenet_{ALPHA_TEXT[self.alpha]}_{self.rows}_tf.h5"

    @property
    def url(self) -> str:
        return KERAS_WEIGHTS_BASE + self.file_name

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing(resize=round(self.rows / CENTRAL_FRACTION), crop=self.rows, resize_rule="squash",
                             interpolation="bilinear", antialias=False, color="RGB",
                             scale=127.5, mean=(1.0, 1.0, 1.0), std=(1.0, 1.0, 1.0))


def keras_variant(model_name: str) -> KerasVariant | None:
    """The Keras file a model's name maps to (width 1.0 and 224 unless named), or None if Keras has none."""
    match = VARIANT_NAME.fullmatch(model_name)
    if match is None:
        return None
    alpha = float(match["alpha"] or 1.0)
    rows = int(match["rows"] or 224)
    return KerasVariant(alpha, rows) if alpha in ALPHA_TEXT and rows in RESOLUTIONS else None


# --- the network as Keras builds it ---------------------------------------------------------

def tf_conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int, groups: int = 1) -> nn.Sequential:
    """Conv (TensorFlow SAME padding) + BatchNorm (eps 1e-3) + ReLU6, as Keras's MobileNet blocks.

    At stride 2 the input sizes here are even (224..128 halved down to 7..4), where SAME pads one
    row and column at the bottom and right only.
    """
    pad: list[nn.Module] = [nn.ZeroPad2d((0, 1, 0, 1))] if stride == 2 else []
    padding = 0 if stride == 2 else kernel // 2
    return nn.Sequential(*pad, nn.Conv2d(in_channels, out_channels, kernel, stride, padding, groups=groups, bias=False),
                         nn.BatchNorm2d(out_channels, eps=BN_EPS_TF), nn.ReLU6())


class KerasMobileNetV1(nn.Module):
    """Keras's `MobileNet(alpha)`: Table 1 of the paper (MOBILENET_V1_SETTING) with TensorFlow's conventions."""

    def __init__(self, alpha: float = 1.0, num_classes: int = 1000) -> None:
        super().__init__()
        in_channels = int(STEM_CHANNELS * alpha)
        blocks: list[nn.Module] = [tf_conv_bn(3, in_channels, 3, 2)]
        for conf in MOBILENET_V1_SETTING:
            out_channels = int(conf.out_channels * alpha)
            blocks.append(nn.Sequential(tf_conv_bn(in_channels, in_channels, 3, conf.stride, groups=in_channels),
                                        tf_conv_bn(in_channels, out_channels, 1, 1)))
            in_channels = out_channels
        self.features = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Conv2d(in_channels, num_classes, 1)  # Keras's `conv_preds`, with bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.classifier(self.avgpool(self.features(x))), 1)


# --- reading the HDF5 file ------------------------------------------------------------------

def read_keras_weights(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """Layer name -> {weight name without scope and ':0' -> array}, for every layer that has weights."""
    import h5py  # only the Keras conversion needs it

    try:
        with h5py.File(path, "r") as file:
            group = file["model_weights"] if "layer_names" not in file.attrs and "model_weights" in file else file
            layer_names = _attribute(group, "layer_names")
            if not layer_names:
                raise KerasWeightsError("not a Keras weights file (no layer_names attribute)")
            layers = {}
            for layer in layer_names:
                names = _attribute(group[layer], "weight_names")
                if names:
                    layers[layer] = {name.split("/")[-1].split(":")[0]: np.asarray(group[layer][name])
                                     for name in names}
            return layers
    except OSError as error:  # h5py's word for a truncated or foreign file
        raise KerasWeightsError(f"not a readable HDF5 file, truncated or of another format ({error})") from None
    except KeyError as error:
        raise KerasWeightsError(f"a weight the file lists is missing from it ({error})") from None


def _attribute(group, name: str) -> list[str]:
    """A list-of-names attribute; Keras splits one over 64 KiB into `name0`, `name1`, ..."""
    if name in group.attrs:
        values = list(group.attrs[name])
    else:
        values = []
        chunk = 0
        while f"{name}{chunk}" in group.attrs:
            values += list(group.attrs[f"{name}{chunk}"])
            chunk += 1
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]


def keras_state_dict(layers: dict[str, dict[str, np.ndarray]], alpha: float) -> dict[str, torch.Tensor]:
    """The state_dict of `KerasMobileNetV1(alpha)` from Keras's layers; checks the width first."""
    if "conv1" not in layers:
        raise KerasWeightsError("no layer 'conv1': not Keras's MobileNet")
    stem = layers["conv1"]["kernel"].shape[-1]
    if stem != int(STEM_CHANNELS * alpha):
        widths = {int(STEM_CHANNELS * a): a for a in ALPHA_TEXT}
        held = f"alpha {widths[stem]}" if stem in widths else f"a stem of {stem} filters"
        raise KerasWeightsError(f"the file holds MobileNetV1 {held} weights, the model is alpha {alpha} "
                                f"({int(STEM_CHANNELS * alpha)} stem filters): the file of another variant")
    if "conv_preds" not in layers:
        raise KerasWeightsError("no classifier layer 'conv_preds' (a '_no_top' file has none)")
    remaining = dict(layers)
    state: dict[str, torch.Tensor] = {}

    def take(layer: str, prefix: str) -> None:
        if layer not in remaining:
            raise KerasWeightsError(f"layer {layer!r} is missing")
        weights = remaining.pop(layer)
        for keras_name, torch_name in KERAS_TO_TORCH.items():
            if keras_name in weights:
                value = weights.pop(keras_name)
                state[f"{prefix}.{torch_name}"] = _to_torch(value, depthwise=layer.startswith("conv_dw_"))
        if weights:
            raise KerasWeightsError(f"layer {layer!r} has unexpected weights {sorted(weights)}")

    # A stride-2 tf_conv_bn starts with its ZeroPad2d: the stem, and some depthwise convs.
    take("conv1", "features.0.1")
    take("conv1_bn", "features.0.2")
    for block in range(1, len(MOBILENET_V1_SETTING) + 1):
        conv = 1 if MOBILENET_V1_SETTING[block - 1].stride == 2 else 0
        take(f"conv_dw_{block}", f"features.{block}.0.{conv}")
        take(f"conv_dw_{block}_bn", f"features.{block}.0.{conv + 1}")
        take(f"conv_pw_{block}", f"features.{block}.1.0")
        take(f"conv_pw_{block}_bn", f"features.{block}.1.1")
    take("conv_preds", "classifier")
    if remaining:
        raise KerasWeightsError(f"layers the network does not have: {', '.join(sorted(remaining))}")
    return state


# Keras weight name -> PyTorch parameter or buffer name. A depthwise kernel is `depthwise_kernel`
# in the published files (Keras 2), `kernel` in Keras 3's.
KERAS_TO_TORCH = {"kernel": "weight", "depthwise_kernel": "weight", "bias": "bias", "gamma": "weight",
                  "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}


def _to_torch(value: np.ndarray, depthwise: bool) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    if tensor.ndim == 4 and depthwise:  # (kh, kw, channels, 1) -> (channels, 1, kh, kw)
        tensor = tensor.permute(2, 3, 0, 1)
    elif tensor.ndim == 4:  # (kh, kw, in, out) -> (out, in, kh, kw)
        tensor = tensor.permute(3, 2, 0, 1)
    return tensor.contiguous()
