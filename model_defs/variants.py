"""Model names beyond the seven defaults: the papers' width, resolution, group and scale knobs in
their own (and TF-slim's) notation, and `_int8` after any name for an INT8 model.

    mobilenetv1_<alpha>_<resolution>     mobilenetv1_0.5_160
    mobilenetv2_<alpha>_<resolution>     mobilenetv2_1.4_224
    mobilenetv3_large_<alpha>            mobilenetv3_small_0.75
    mobilenetv3_small_<alpha>
    shufflenetv1_g<groups>_<scale>x      shufflenetv1_g3_1.0x
    shufflenetv2_<scale>x                shufflenetv2_0.5x
    <any of these or a default>_int8     mobilenetv2_int8

A variant's input follows its resolution: the shorter side is resized to resolution * 256 / 224
(rounded down: torchvision's 256/224 evaluation ratio), then centre-cropped to the resolution.
"""
import re
from dataclasses import dataclass
from functools import partial

from contract import Preprocessing
from model_defs.mobilenet import MobileNetV1, MobileNetV2, MobileNetV3
from model_defs.quantize import INT8_SUFFIX
from model_defs.registry import CHECKPOINT_BASE, MODELS, ModelSpec
from model_defs.shufflenet import ShuffleNetV1, ShuffleNetV2

MOBILENET_V1_ALPHAS = ("0.25", "0.5", "0.75", "1.0")  # Table 6
MOBILENET_V1_RESOLUTIONS = (128, 160, 192, 224)  # Table 7
MOBILENET_V2_ALPHAS = ("0.35", "0.5", "0.75", "1.0", "1.3", "1.4")  # the paper's Figure 5 and TF-slim
MOBILENET_V2_RESOLUTIONS = (96, 128, 160, 192, 224)
MOBILENET_V3_ALPHAS = ("0.75", "1.0")  # Table 3
SHUFFLENET_V1_GROUPS = (1, 2, 3, 4, 8)  # Table 1
SHUFFLENET_SCALES = ("0.5", "1.0", "1.5", "2.0")
# torchvision's published ImageNet checkpoints beyond the defaults'. Those of 1.5x and 2.0x were
# trained with a later recipe whose evaluation resizes the shorter side to 232, not 256.
SHUFFLENET_V2_CHECKPOINTS = {
    "0.5": (CHECKPOINT_BASE + "shufflenetv2_x0.5-f707e7126e.pth", 256),
    "1.0": (MODELS["shufflenetv2"].checkpoint_url, 256),
    "1.5": (CHECKPOINT_BASE + "shufflenetv2_x1_5-3c479a10.pth", 232),
    "2.0": (CHECKPOINT_BASE + "shufflenetv2_x2_0-8be3c8ee.pth", 232),
}


def values(options: tuple) -> str:
    return "|".join(map(str, options))


GRAMMAR = (
    f"mobilenetv1_<alpha>_<resolution> (alpha {values(MOBILENET_V1_ALPHAS)}, "
    f"resolution {values(MOBILENET_V1_RESOLUTIONS)}), "
    f"mobilenetv2_<alpha>_<resolution> (alpha {values(MOBILENET_V2_ALPHAS)}, "
    f"resolution {values(MOBILENET_V2_RESOLUTIONS)}), "
    f"mobilenetv3_large_<alpha> and mobilenetv3_small_<alpha> (alpha {values(MOBILENET_V3_ALPHAS)}), "
    f"shufflenetv1_g<groups>_<scale>x (groups {values(SHUFFLENET_V1_GROUPS)}, scale {values(SHUFFLENET_SCALES)}), "
    f"shufflenetv2_<scale>x (scale {values(SHUFFLENET_SCALES)}); "
    f"and {INT8_SUFFIX} after any name for INT8"
)


class UnknownModelName(ValueError):
    """A name that is neither a default model nor a variant of the grammar; the message shows both."""


@dataclass(frozen=True)
class ModelChoice:
    """One name given to `--models`: the network to build, and whether it is served in INT8."""

    name: str  # the folder and URL name
    spec: ModelSpec  # the FP32 network; its name lacks the `_int8` suffix
    int8: bool


def choose(name: str) -> ModelChoice:
    """The model a name stands for; UnknownModelName, showing the grammar, for any other name."""
    int8 = name.endswith(INT8_SUFFIX)
    base = name.removesuffix(INT8_SUFFIX)
    spec = MODELS.get(base) or variant(base)
    if spec is None:
        raise UnknownModelName(f"unknown model {name}; valid names: {', '.join(MODELS)}, or a variant: {GRAMMAR}")
    return ModelChoice(name=name, spec=spec, int8=int8)


def variant(name: str) -> ModelSpec | None:
    """The variant `name` stands for, None if it follows no rule of the grammar; UnknownModelName
    when it follows one with a value outside its list."""
    for pattern, build in PATTERNS:
        match = re.fullmatch(pattern, name)
        if match:
            return build(name, *match.groups())
    return None


def check(name: str, knob: str, value: str | int, valid: tuple) -> None:
    if value not in valid:
        raise UnknownModelName(f"unknown model {name}: {knob} {value} is not one of {', '.join(map(str, valid))}")


def preprocessing_at(base: Preprocessing, resolution: int, resize: int | None = None) -> Preprocessing:
    """The default model's preprocessing, at another resolution (the 256/224 ratio unless `resize`)."""
    return Preprocessing(**{**base.model_dump(), "resize": resize or resolution * 256 // 224, "crop": resolution})


def mobilenet_v1(name: str, alpha: str, resolution: str) -> ModelSpec:
    check(name, "alpha", alpha, MOBILENET_V1_ALPHAS)
    check(name, "resolution", int(resolution), MOBILENET_V1_RESOLUTIONS)
    default = MODELS["mobilenetv1"]
    return ModelSpec(name=name, architecture=f"MobileNetV1 {alpha}-{resolution}", paper=default.paper,
                     builder=partial(MobileNetV1, width_mult=float(alpha)),
                     preprocessing=preprocessing_at(default.preprocessing, int(resolution)), labels=default.labels)


def mobilenet_v2(name: str, alpha: str, resolution: str) -> ModelSpec:
    check(name, "alpha", alpha, MOBILENET_V2_ALPHAS)
    check(name, "resolution", int(resolution), MOBILENET_V2_RESOLUTIONS)
    default = MODELS["mobilenetv2"]
    # torchvision's checkpoint was trained and evaluated at 224: other resolutions get random weights.
    checkpoint = default.checkpoint_url if (alpha, resolution) == ("1.0", "224") else None
    return ModelSpec(name=name, architecture=f"MobileNetV2 {alpha}-{resolution}", paper=default.paper,
                     builder=partial(MobileNetV2, width_mult=float(alpha)),
                     preprocessing=preprocessing_at(default.preprocessing, int(resolution)), labels=default.labels,
                     checkpoint_url=checkpoint)


def mobilenet_v3(name: str, arch: str, alpha: str) -> ModelSpec:
    check(name, "alpha", alpha, MOBILENET_V3_ALPHAS)
    default = MODELS[f"mobilenetv3_{arch}"]
    return ModelSpec(name=name, architecture=f"MobileNetV3-{arch.capitalize()} {alpha}", paper=default.paper,
                     builder=partial(MobileNetV3, arch, width_mult=float(alpha)),
                     preprocessing=default.preprocessing, labels=default.labels,
                     checkpoint_url=default.checkpoint_url if alpha == "1.0" else None)


def shufflenet_v1(name: str, groups: str, scale: str) -> ModelSpec:
    check(name, "groups", int(groups), SHUFFLENET_V1_GROUPS)
    check(name, "scale", scale, SHUFFLENET_SCALES)
    default = MODELS["shufflenetv1"]
    return ModelSpec(name=name, architecture=f"ShuffleNet {scale}x (g={groups})", paper=default.paper,
                     builder=partial(ShuffleNetV1, groups=int(groups), width_mult=float(scale)),
                     preprocessing=default.preprocessing, labels=default.labels)


def shufflenet_v2(name: str, scale: str) -> ModelSpec:
    check(name, "scale", scale, SHUFFLENET_SCALES)
    default = MODELS["shufflenetv2"]
    checkpoint, resize = SHUFFLENET_V2_CHECKPOINTS[scale]
    return ModelSpec(name=name, architecture=f"ShuffleNetV2 {scale}x", paper=default.paper,
                     builder=partial(ShuffleNetV2, float(scale)),
                     preprocessing=preprocessing_at(default.preprocessing, default.input_size, resize),
                     labels=default.labels, checkpoint_url=checkpoint)


NUMBER = r"(\d+(?:\.\d+)?)"
PATTERNS = [
    (rf"mobilenetv1_{NUMBER}_(\d+)", mobilenet_v1),
    (rf"mobilenetv2_{NUMBER}_(\d+)", mobilenet_v2),
    (rf"mobilenetv3_(large|small)_{NUMBER}", mobilenet_v3),
    (rf"shufflenetv1_g(\d+)_{NUMBER}x", shufflenet_v1),
    (rf"shufflenetv2_{NUMBER}x", shufflenet_v2),
]
