"""Building blocks shared by the seven networks, written once."""
from collections.abc import Callable

import torch
from torch import nn

Activation = Callable[[], nn.Module]


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of `divisor`, never more than 10% below `value`.

    The rule of the MobileNet reference code; MobileNetV2/V3 channel counts depend on it.
    """
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class ConvBNActivation(nn.Sequential):
    """Conv2d (no bias: BatchNorm follows) + BatchNorm2d + optional activation.

    A Sequential so the state_dict keys are `<i>.0.weight` (conv) and `<i>.1.*` (BatchNorm),
    the layout torchvision's checkpoints use.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int] = 3,
        stride: int | tuple[int, int] = 1,
        groups: int = 1,
        activation: Activation | None = nn.ReLU,
        bn_eps: float = 1e-5,
    ) -> None:
        kernel = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        padding = ((kernel[0] - 1) // 2, (kernel[1] - 1) // 2)
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, kernel, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels, eps=bn_eps),
        ]
        if activation is not None:
            layers.append(activation())
        super().__init__(*layers)
        self.out_channels = out_channels


class SqueezeExcitation(nn.Module):
    """Squeeze-and-excitation (Hu et al.) as MobileNetV3 uses it: 1x1 convs with bias, ReLU, hard-sigmoid."""

    def __init__(self, channels: int, squeeze_channels: int | None = None) -> None:
        super().__init__()
        squeeze_channels = squeeze_channels or make_divisible(channels / 4, 8)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return x * scale


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of `groups` groups (ShuffleNet), so group convs see every group."""
    # Plain ints (not traced sizes) give the exported graph constant reshape targets instead of a
    # shape-computing subgraph per shuffle; -1 keeps the batch axis dynamic. Only the batch axis
    # of an exported model varies, so the constants hold for every valid input.
    channels, height, width = (int(size) for size in x.shape[1:])
    x = x.reshape(-1, groups, channels // groups, height, width)
    return x.transpose(1, 2).reshape(-1, channels, height, width)
