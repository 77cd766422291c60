"""ShuffleNetV1 as megvii's reference code builds it, and recognising and reading its checkpoints.

The paper's authors publish PyTorch checkpoints (megvii ShuffleNet-Series) for groups 3 and 8 at
0.5x, 1.0x, 1.5x and 2.0x. Their network differs from this project's reading of the paper
(`model_defs.shufflenet.ShuffleNetV1`) where the weights depend on it:
- the channel shuffle comes after the depthwise convolution (and its BatchNorm), not before it;
- it views the channels as (channels / groups, groups) and transposes, the inverse permutation of
  the paper's (groups, channels / groups) view;
- the classifier has no bias, and the stem's width follows the width multiplier (see the table);
- the checkpoints were trained on BGR images with values 0-255, no mean or std, evaluated after
  OpenCV's bilinear resize of the shorter side to 256 (longer side rounded) and a 224 centre crop.

A checkpoint is recognised by its key layout (`first_conv.*`, `features.<i>.branch_main_1.*`,
`classifier.0.weight`), as their training script saves it: `{"state_dict": ...}` with the
`module.` prefix of `nn.DataParallel`, or a bare state_dict.
"""
from dataclasses import dataclass

import torch
from torch import nn

from contract import Preprocessing
from model_defs.layers import channel_shuffle
from model_defs.shufflenet import STAGE_REPEATS_V1

# (groups, width) -> (stem channels, output channels of stages 2-4): the sizes of the eight
# published checkpoints. The 1.5x stem stays at 24.
MEGVII_CHANNELS = {
    (3, 0.5): (12, (120, 240, 480)),
    (3, 1.0): (24, (240, 480, 960)),
    (3, 1.5): (24, (360, 720, 1440)),
    (3, 2.0): (48, (480, 960, 1920)),
    (8, 0.5): (16, (192, 384, 768)),
    (8, 1.0): (24, (384, 768, 1536)),
    (8, 1.5): (24, (576, 1152, 2304)),
    (8, 2.0): (48, (768, 1536, 3072)),
}
MEGVII_PREPROCESSING = Preprocessing(resize=256, crop=224, resize_rule="shorter_side_rounded",
                                     interpolation="bilinear", antialias=False, color="BGR",
                                     scale=1.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
DATA_PARALLEL_PREFIX = "module."


@dataclass(frozen=True)
class ShuffleNetV1Variant:
    groups: int
    stage_channels: tuple[int, ...]

    @property
    def width(self) -> float | None:
        """The published checkpoint's width multiplier with these sizes, None if there is none."""
        return next((width for (groups, width), (_, channels) in MEGVII_CHANNELS.items()
                     if (groups, channels) == (self.groups, self.stage_channels)), None)

    def __str__(self) -> str:
        width = f"{self.width}x" if self.width else f"stages {list(self.stage_channels)}"
        return f"g={self.groups} {width}"


def megvii_channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """megvii's shuffle: channels viewed as (channels / groups, groups), then transposed.

    That is the paper's shuffle with the two factors swapped: `channel_shuffle` viewed as
    (channels / groups, groups) groups.
    """
    return channel_shuffle(x, int(x.shape[1]) // groups)


class MegviiShuffleUnit(nn.Module):
    """1x1 group conv + BN + ReLU, 3x3 depthwise + BN, shuffle, 1x1 group conv + BN; add or concat, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, stride: int, group_first_conv: bool) -> None:
        super().__init__()
        self.stride = stride
        self.groups = groups
        mid = out_channels // 4
        branch_out = out_channels - in_channels if stride == 2 else out_channels
        # Flat Sequentials, so the state_dict keys are the checkpoints' (branch_main_1.3.weight, ...).
        self.branch_main_1 = nn.Sequential(
            nn.Conv2d(in_channels, mid, 1, groups=groups if group_first_conv else 1, bias=False),
            nn.BatchNorm2d(mid), nn.ReLU(),
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid))
        self.branch_main_2 = nn.Sequential(
            nn.Conv2d(mid, branch_out, 1, groups=groups, bias=False), nn.BatchNorm2d(branch_out))
        self.branch_proj = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.branch_main_1(x)
        if self.groups > 1:
            branch = megvii_channel_shuffle(branch, self.groups)
        branch = self.branch_main_2(branch)
        if self.stride == 2:  # the pooled input comes out of a ReLU: only the branch needs one
            return torch.cat([self.branch_proj(x), torch.relu(branch)], dim=1)
        return torch.relu(x + branch)


class MegviiShuffleNetV1(nn.Module):
    def __init__(self, groups: int = 8, width: float = 1.0, num_classes: int = 1000) -> None:
        super().__init__()
        if (groups, width) not in MEGVII_CHANNELS:
            raise ValueError(f"megvii publishes ShuffleNetV1 for {sorted(MEGVII_CHANNELS)} (groups, width), "
                             f"not ({groups}, {width})")
        stem, stage_channels = MEGVII_CHANNELS[groups, width]
        self.first_conv = nn.Sequential(nn.Conv2d(3, stem, 3, 2, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU())
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        units = []
        in_channels = stem
        for stage, (repeats, out_channels) in enumerate(zip(STAGE_REPEATS_V1, stage_channels, strict=True)):
            for i in range(repeats):
                units.append(MegviiShuffleUnit(in_channels, out_channels, groups, 2 if i == 0 else 1,
                                               group_first_conv=not (stage == 0 and i == 0)))
                in_channels = out_channels
        self.features = nn.Sequential(*units)
        self.classifier = nn.Sequential(nn.Linear(in_channels, num_classes, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.maxpool(self.first_conv(x))).mean([2, 3]))


# --- recognising a checkpoint ---------------------------------------------------------------

def megvii_state_dict(checkpoint: object) -> dict[str, torch.Tensor] | None:
    """The state_dict of a checkpoint in megvii's key layout, `module.` prefixes removed; else None."""
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(key, str) for key in state):
        return None
    state = {key.removeprefix(DATA_PARALLEL_PREFIX): value for key, value in state.items()}
    layout = ("first_conv.0.weight", "features.0.branch_main_1.0.weight", "classifier.0.weight")
    return state if all(key in state for key in layout) else None


def checkpoint_variant(state: dict[str, torch.Tensor]) -> ShuffleNetV1Variant:
    """Groups and stage widths, read from the shapes of a megvii state_dict's last unit of each stage."""
    last_units = [sum(STAGE_REPEATS_V1[:stage + 1]) - 1 for stage in range(len(STAGE_REPEATS_V1))]
    try:
        expand = state[f"features.{last_units[0]}.branch_main_2.0.weight"]  # (out, mid / groups, 1, 1)
        mid = state[f"features.{last_units[0]}.branch_main_1.0.weight"].shape[0]
        channels = tuple(int(state[f"features.{unit}.branch_main_2.0.weight"].shape[0]) for unit in last_units)
    except KeyError as error:
        raise ValueError(f"key {error} is missing: not a whole ShuffleNetV1 checkpoint") from None
    return ShuffleNetV1Variant(int(mid // expand.shape[1]), channels)


def paper_variant(model: nn.Module) -> ShuffleNetV1Variant | None:
    """Groups and stage widths of a `model_defs.shufflenet.ShuffleNetV1`, None for another network."""
    stages = [getattr(model, name, None) for name in ("stage2", "stage3", "stage4")]
    if not all(isinstance(stage, nn.Sequential) and hasattr(stage[-1], "groups") for stage in stages):
        return None
    return ShuffleNetV1Variant(stages[0][-1].groups,
                               tuple(stage[-1].expand[0].out_channels for stage in stages))
