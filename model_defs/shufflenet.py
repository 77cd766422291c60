"""ShuffleNet (V1) and ShuffleNetV2, each driven by its paper's stage table.

V1 follows the paper's Table 1 and, where the paper is silent, the megvii reference code.
V2 keeps torchvision's module layout so its ImageNet checkpoints load with `strict=True`.
"""
import torch
from torch import nn

from model_defs.layers import ConvBNActivation, channel_shuffle

# --- ShuffleNet V1 (Zhang et al. 2017, Table 1) ---------------------------------------------

STEM_CHANNELS = 24
# The stem's width by scale factor, as in megvii's reference models (its 1.5x keeps 24).
STEM_CHANNELS_BY_SCALE = {0.5: 12, 1.0: STEM_CHANNELS, 1.5: STEM_CHANNELS, 2.0: 48}
STAGE_REPEATS_V1 = [4, 8, 4]  # stages 2, 3, 4; the first unit of each has stride 2
# Output channels of stages 2-4 at 1x, by number of groups g.
STAGE_OUT_CHANNELS_V1 = {
    1: [144, 288, 576],
    2: [200, 400, 800],
    3: [240, 480, 960],
    4: [272, 544, 1088],
    8: [384, 768, 1536],
}


class ShuffleUnit(nn.Module):
    """1x1 group conv + BN + ReLU, channel shuffle, 3x3 depthwise + BN, 1x1 group conv + BN.

    Stride 1: add the input, then ReLU. Stride 2: the branch makes `out - in` channels and is
    concatenated with a 3x3/2 average pool of the input, then ReLU.
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int, stride: int,
                 group_first_conv: bool = True) -> None:
        super().__init__()
        self.stride = stride
        self.groups = groups
        mid = out_channels // 4
        branch_out = out_channels - in_channels if stride == 2 else out_channels
        self.compress = ConvBNActivation(in_channels, mid, 1, groups=groups if group_first_conv else 1)
        self.depthwise = ConvBNActivation(mid, mid, 3, stride, groups=mid, activation=None)
        self.expand = ConvBNActivation(mid, branch_out, 1, groups=groups, activation=None)
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.compress(x)
        if self.groups > 1:
            branch = channel_shuffle(branch, self.groups)
        branch = self.expand(self.depthwise(branch))
        if self.stride == 2:
            return self.relu(torch.cat([self.shortcut(x), branch], dim=1))
        return self.relu(x + branch)


class ShuffleNetV1(nn.Module):
    def __init__(self, groups: int = 8, width_mult: float = 1.0, num_classes: int = 1000) -> None:
        super().__init__()
        if groups not in STAGE_OUT_CHANNELS_V1:
            raise ValueError(f"ShuffleNetV1 groups must be one of {sorted(STAGE_OUT_CHANNELS_V1)}, got {groups}")
        # Scaled widths stay multiples of 4 * groups so every group conv divides evenly.
        step = 4 * groups
        stage_channels = [max(step, int(c * width_mult) // step * step) for c in STAGE_OUT_CHANNELS_V1[groups]]
        in_channels = stem_channels(groups, width_mult)
        self.conv1 = ConvBNActivation(3, in_channels, 3, stride=2)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        stages = []
        for stage_index, (repeats, out_channels) in enumerate(zip(STAGE_REPEATS_V1, stage_channels, strict=True)):
            units = []
            for i in range(repeats):
                # Stage 2's first 1x1 conv is not grouped: its input has only 24 channels.
                first_of_net = stage_index == 0 and i == 0
                units.append(ShuffleUnit(in_channels, out_channels, groups, 2 if i == 0 else 1,
                                         group_first_conv=not first_of_net))
                in_channels = out_channels
            stages.append(nn.Sequential(*units))
        self.stage2, self.stage3, self.stage4 = stages
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        x = self.stage4(self.stage3(self.stage2(x)))
        return self.fc(x.mean([2, 3]))


def stem_channels(groups: int, width_mult: float) -> int:
    """megvii's stem width for the scale, raised to a multiple of `groups`: the first unit's
    grouped 1x1 conv makes `stage2 - stem` channels (g=8 at 0.5x: 16, as megvii has it)."""
    if width_mult not in STEM_CHANNELS_BY_SCALE:
        raise ValueError(f"ShuffleNetV1 scale must be one of {sorted(STEM_CHANNELS_BY_SCALE)}, got {width_mult}")
    return -(-STEM_CHANNELS_BY_SCALE[width_mult] // groups) * groups


# --- ShuffleNetV2 (Ma et al. 2018, Table 5) -------------------------------------------------

STAGE_REPEATS_V2 = [4, 8, 4]
# conv1, stage2, stage3, stage4, conv5 output channels, by width.
STAGE_OUT_CHANNELS_V2 = {
    0.5: [24, 48, 96, 192, 1024],
    1.0: [24, 116, 232, 464, 1024],
    1.5: [24, 176, 352, 704, 1024],
    2.0: [24, 244, 488, 976, 2048],
}


def depthwise_conv(channels: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, 3, stride, 1, groups=channels, bias=False)


class ShuffleV2Unit(nn.Module):
    """Channel split; right branch 1x1 + BN + ReLU, 3x3 depthwise + BN, 1x1 + BN + ReLU;
    concat; shuffle with 2 groups. Stride 2: no split, the left branch is 3x3 depthwise + BN,
    1x1 + BN + ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        branch_channels = out_channels // 2
        if stride == 1 and in_channels != out_channels:
            raise ValueError(f"a stride-1 unit keeps its width ({in_channels} != {out_channels})")
        if stride > 1:
            self.branch1 = nn.Sequential(
                depthwise_conv(in_channels, stride),
                nn.BatchNorm2d(in_channels),
                nn.Conv2d(in_channels, branch_channels, 1, bias=False),
                nn.BatchNorm2d(branch_channels),
                nn.ReLU(),
            )
        else:
            self.branch1 = nn.Sequential()
        self.branch2 = nn.Sequential(
            nn.Conv2d(in_channels if stride > 1 else branch_channels, branch_channels, 1, bias=False),
            nn.BatchNorm2d(branch_channels),
            nn.ReLU(),
            depthwise_conv(branch_channels, stride),
            nn.BatchNorm2d(branch_channels),
            nn.Conv2d(branch_channels, branch_channels, 1, bias=False),
            nn.BatchNorm2d(branch_channels),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            left, right = x.chunk(2, dim=1)
            out = torch.cat([left, self.branch2(right)], dim=1)
        else:
            out = torch.cat([self.branch1(x), self.branch2(x)], dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, width: float = 1.0, num_classes: int = 1000) -> None:
        super().__init__()
        if width not in STAGE_OUT_CHANNELS_V2:
            raise ValueError(f"ShuffleNetV2 width must be one of {sorted(STAGE_OUT_CHANNELS_V2)}, got {width}")
        channels = STAGE_OUT_CHANNELS_V2[width]
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, channels[0], 3, 2, 1, bias=False), nn.BatchNorm2d(channels[0]), nn.ReLU())
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_channels = channels[0]
        stages = []
        for repeats, out_channels in zip(STAGE_REPEATS_V2, channels[1:4], strict=True):
            units = [ShuffleV2Unit(in_channels, out_channels, 2)]
            units += [ShuffleV2Unit(out_channels, out_channels, 1) for _ in range(repeats - 1)]
            stages.append(nn.Sequential(*units))
            in_channels = out_channels
        self.stage2, self.stage3, self.stage4 = stages
        self.conv5 = nn.Sequential(
            nn.Conv2d(in_channels, channels[4], 1, bias=False), nn.BatchNorm2d(channels[4]), nn.ReLU())
        self.fc = nn.Linear(channels[4], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        x = self.conv5(self.stage4(self.stage3(self.stage2(x))))
        return self.fc(x.mean([2, 3]))
