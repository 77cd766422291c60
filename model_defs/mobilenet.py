"""MobileNetV1, V2 and V3, each as a table that mirrors its paper's architecture table.

V2 and V3 keep torchvision's module layout so that torchvision's ImageNet checkpoints load
with `strict=True`.
"""
from functools import partial
from typing import NamedTuple

import torch
from torch import nn

from model_defs.layers import ConvBNActivation, SqueezeExcitation, make_divisible

# --- MobileNetV1 (Howard et al. 2017, Table 1) ----------------------------------------------

class DepthwiseSeparableConf(NamedTuple):
    out_channels: int
    stride: int  # of the 3x3 depthwise conv


# After the 3x3/2 stem conv to 32 channels: one row per depthwise-separable block.
MOBILENET_V1_SETTING = [
    DepthwiseSeparableConf(64, 1),
    DepthwiseSeparableConf(128, 2),
    DepthwiseSeparableConf(128, 1),
    DepthwiseSeparableConf(256, 2),
    DepthwiseSeparableConf(256, 1),
    DepthwiseSeparableConf(512, 2),
    *[DepthwiseSeparableConf(512, 1)] * 5,
    DepthwiseSeparableConf(1024, 2),
    DepthwiseSeparableConf(1024, 1),  # the paper's "s2" here is a typo: the map stays 7x7
]


def depthwise_separable(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """3x3 depthwise conv + BN + ReLU, then 1x1 pointwise conv + BN + ReLU."""
    return nn.Sequential(
        ConvBNActivation(in_channels, in_channels, 3, stride, groups=in_channels),
        ConvBNActivation(in_channels, out_channels, 1),
    )


class MobileNetV1(nn.Module):
    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0) -> None:
        super().__init__()
        in_channels = int(32 * width_mult)
        layers: list[nn.Module] = [ConvBNActivation(3, in_channels, 3, stride=2)]
        for conf in MOBILENET_V1_SETTING:
            out_channels = int(conf.out_channels * width_mult)
            layers.append(depthwise_separable(in_channels, out_channels, conf.stride))
            in_channels = out_channels
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# --- MobileNetV2 (Sandler et al. 2018, Table 2) ---------------------------------------------

class BottleneckConf(NamedTuple):
    t: int  # expansion factor
    c: int  # output channels
    n: int  # repeats
    s: int  # stride of the first repeat


MOBILENET_V2_SETTING = [
    BottleneckConf(1, 16, 1, 1),
    BottleneckConf(6, 24, 2, 2),
    BottleneckConf(6, 32, 3, 2),
    BottleneckConf(6, 64, 4, 2),
    BottleneckConf(6, 96, 3, 1),
    BottleneckConf(6, 160, 3, 2),
    BottleneckConf(6, 320, 1, 1),
]


class InvertedResidualV2(nn.Module):
    """1x1 expand + ReLU6, 3x3 depthwise + ReLU6, 1x1 linear projection; residual when shapes match."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = round(in_channels * expand_ratio)
        self.use_residual = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNActivation(in_channels, hidden, 1, activation=nn.ReLU6))
        layers += [
            ConvBNActivation(hidden, hidden, 3, stride, groups=hidden, activation=nn.ReLU6),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2) -> None:
        super().__init__()
        in_channels = make_divisible(32 * width_mult)
        last_channels = make_divisible(1280 * max(1.0, width_mult))
        layers: list[nn.Module] = [ConvBNActivation(3, in_channels, 3, stride=2, activation=nn.ReLU6)]
        for t, c, n, s in MOBILENET_V2_SETTING:
            out_channels = make_divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidualV2(in_channels, out_channels, s if i == 0 else 1, t))
                in_channels = out_channels
        layers.append(ConvBNActivation(in_channels, last_channels, 1, activation=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last_channels, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


# --- MobileNetV3 (Howard et al. 2019, Tables 1 and 2) ---------------------------------------

class BneckConf(NamedTuple):
    in_channels: int
    kernel: int
    expanded_channels: int  # "exp size"
    out_channels: int  # "#out"
    use_se: bool  # "SE"
    activation: str  # "NL": "RE" (ReLU) or "HS" (h-swish)
    stride: int  # "s"


def bneck_conf(in_c: int, k: int, exp: int, out_c: int, se: bool, nl: str, s: int,
               width_mult: float = 1.0) -> BneckConf:
    """One row of the paper's table, in its column order; channels scaled by the width multiplier.

    The expansion keeps its ratio to the scaled input, as in the paper's reference code: that gives
    Table 3's MACs below width 1 (torchvision scales "exp size" on its own and counts 10 % fewer).
    """
    def adjust(channels: float) -> int:
        return make_divisible(channels * width_mult, 8)
    scaled_in = adjust(in_c)
    return BneckConf(scaled_in, k, make_divisible(scaled_in * exp / in_c, 8), adjust(out_c), se, nl, s)


def mobilenet_v3_setting(arch: str, width_mult: float = 1.0) -> tuple[list[BneckConf], int]:
    """The bneck rows and the penultimate width (after the pooled 1x1 conv) of the paper's tables.

    Below width 1 the penultimate layer keeps its 1280 / 1024 channels, as the paper's Table 3
    models do (torchvision's `width_mult` shrinks it too).
    """
    bneck = partial(bneck_conf, width_mult=width_mult)
    if arch == "large":  # Table 1
        rows = [
            bneck(16, 3, 16, 16, False, "RE", 1),
            bneck(16, 3, 64, 24, False, "RE", 2),  # C1
            bneck(24, 3, 72, 24, False, "RE", 1),
            bneck(24, 5, 72, 40, True, "RE", 2),  # C2
            bneck(40, 5, 120, 40, True, "RE", 1),
            bneck(40, 5, 120, 40, True, "RE", 1),
            bneck(40, 3, 240, 80, False, "HS", 2),  # C3
            bneck(80, 3, 200, 80, False, "HS", 1),
            bneck(80, 3, 184, 80, False, "HS", 1),
            bneck(80, 3, 184, 80, False, "HS", 1),
            bneck(80, 3, 480, 112, True, "HS", 1),
            bneck(112, 3, 672, 112, True, "HS", 1),
            bneck(112, 5, 672, 160, True, "HS", 2),  # C4
            bneck(160, 5, 960, 160, True, "HS", 1),
            bneck(160, 5, 960, 160, True, "HS", 1),
        ]
        return rows, make_divisible(1280 * max(1.0, width_mult))  # C5
    if arch == "small":  # Table 2
        rows = [
            bneck(16, 3, 16, 16, True, "RE", 2),  # C1
            bneck(16, 3, 72, 24, False, "RE", 2),  # C2
            bneck(24, 3, 88, 24, False, "RE", 1),
            bneck(24, 5, 96, 40, True, "HS", 2),  # C3
            bneck(40, 5, 240, 40, True, "HS", 1),
            bneck(40, 5, 240, 40, True, "HS", 1),
            bneck(40, 5, 120, 48, True, "HS", 1),
            bneck(48, 5, 144, 48, True, "HS", 1),
            bneck(48, 5, 288, 96, True, "HS", 2),  # C4
            bneck(96, 5, 576, 96, True, "HS", 1),
            bneck(96, 5, 576, 96, True, "HS", 1),
        ]
        return rows, make_divisible(1024 * max(1.0, width_mult))  # C5
    raise ValueError(f"unknown MobileNetV3 variant {arch!r} (expected 'large' or 'small')")


ACTIVATIONS = {"RE": nn.ReLU, "HS": nn.Hardswish}
BN_EPS_V3 = 1e-3


class InvertedResidualV3(nn.Module):
    """bneck: 1x1 expand, kxk depthwise, squeeze-excite (after the activation), 1x1 linear projection."""

    def __init__(self, conf: BneckConf) -> None:
        super().__init__()
        activation = ACTIVATIONS[conf.activation]
        conv = partial(ConvBNActivation, bn_eps=BN_EPS_V3, activation=activation)
        self.use_residual = conf.stride == 1 and conf.in_channels == conf.out_channels
        layers: list[nn.Module] = []
        if conf.expanded_channels != conf.in_channels:
            layers.append(conv(conf.in_channels, conf.expanded_channels, 1))
        layers.append(conv(conf.expanded_channels, conf.expanded_channels, conf.kernel, conf.stride,
                           groups=conf.expanded_channels))
        if conf.use_se:
            layers.append(SqueezeExcitation(conf.expanded_channels))
        layers.append(conv(conf.expanded_channels, conf.out_channels, 1, activation=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.use_residual else self.block(x)


class MobileNetV3(nn.Module):
    def __init__(self, arch: str = "large", num_classes: int = 1000, width_mult: float = 1.0,
                 dropout: float = 0.2) -> None:
        super().__init__()
        rows, last_channels = mobilenet_v3_setting(arch, width_mult)
        stem = rows[0].in_channels
        layers: list[nn.Module] = [ConvBNActivation(3, stem, 3, 2, activation=nn.Hardswish, bn_eps=BN_EPS_V3)]
        layers += [InvertedResidualV3(row) for row in rows]
        # The last 1x1 conv widens 6x: 160 -> 960 (Large), 96 -> 576 (Small).
        pre_pool = 6 * rows[-1].out_channels
        layers.append(ConvBNActivation(rows[-1].out_channels, pre_pool, 1, activation=nn.Hardswish, bn_eps=BN_EPS_V3))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        # The paper's 1x1 "conv2d NBN" layers on the pooled 1x1 map are these Linear layers.
        self.classifier = nn.Sequential(
            nn.Linear(pre_pool, last_channels),
            nn.Hardswish(),
            nn.Dropout(dropout),
            nn.Linear(last_channels, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))
