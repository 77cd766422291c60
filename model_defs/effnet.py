"""EffNet (Freeman et al. 2018): spatially separable depthwise convs with a 1-D pooling between.

The CIFAR-10 design (32x32 input, three blocks, 10 classes) of the reference tutorial.
"""
from functools import partial
from typing import NamedTuple

import torch
from torch import nn

from model_defs.layers import ConvBNActivation

# The reference design uses Keras's LeakyReLU, whose default negative slope is 0.3.
LeakyReLU = partial(nn.LeakyReLU, negative_slope=0.3)


class EffBlockConf(NamedTuple):
    in_channels: int
    mid_channels: int  # width of the 1x1 conv and of the two depthwise convs
    out_channels: int


EFFNET_SETTING = [
    EffBlockConf(3, 32, 64),  # 32x32 -> 16x16
    EffBlockConf(64, 64, 128),  # 16x16 -> 8x8
    EffBlockConf(128, 128, 256),  # 8x8 -> 4x4
]


def eff_block(conf: EffBlockConf) -> nn.Sequential:
    """1x1 conv; depthwise 1x3; max-pool 1x2 (halves the width); depthwise 3x1;
    1x1 conv with stride 2 along the height. Each conv is followed by BN + LeakyReLU."""
    conv = partial(ConvBNActivation, activation=LeakyReLU)
    mid = conf.mid_channels
    return nn.Sequential(
        conv(conf.in_channels, mid, 1),
        conv(mid, mid, (1, 3), groups=mid),
        nn.MaxPool2d((1, 2), stride=(1, 2)),
        conv(mid, mid, (3, 1), groups=mid),
        conv(mid, conf.out_channels, 1, stride=(2, 1)),
    )


class EffNet(nn.Module):
    def __init__(self, num_classes: int = 10, input_size: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(*[eff_block(conf) for conf in EFFNET_SETTING])
        side = input_size // 2 ** len(EFFNET_SETTING)
        self.classifier = nn.Linear(EFFNET_SETTING[-1].out_channels * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))
