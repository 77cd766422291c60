"""A reader checks each network against its paper: parameter counts, MACs, shapes, checkpoint layout."""
import json
from pathlib import Path

import pytest
import torch

from model_defs.macs import count_macs, count_params
from model_defs.mobilenet import MobileNetV2, MobileNetV3
from model_defs.registry import MODELS
from model_defs.shufflenet import ShuffleNetV1, ShuffleNetV2

TORCHVISION = json.loads((Path(__file__).parent / "data" / "torchvision_state_dicts.json").read_text())
# Our name -> torchvision's builder name, for the four networks whose checkpoints we can load.
TORCHVISION_NAMES = {
    "mobilenetv2": "mobilenet_v2",
    "mobilenetv3_large": "mobilenet_v3_large",
    "mobilenetv3_small": "mobilenet_v3_small",
    "shufflenetv2": "shufflenet_v2_x1_0",
}
# The parameter and MAC columns of the architecture table (papers / torchvision / megvii).
EXACT_PARAMS = {
    "mobilenetv1": 4_231_976,
    "mobilenetv2": 3_504_872,
    "mobilenetv3_large": 5_483_032,
    "mobilenetv3_small": 2_542_856,
    "shufflenetv1": 2_434_768,
    "shufflenetv2": 2_278_604,
}
PAPER_MACS = {
    "mobilenetv1": 569e6,
    "mobilenetv2": 300e6,
    "mobilenetv3_large": 218e6,
    "mobilenetv3_small": 56.5e6,
    "shufflenetv1": 138e6,
    "shufflenetv2": 146e6,
    "effnet": 4.1e6,
}


@pytest.mark.parametrize("name", EXACT_PARAMS)
def test_parameter_count_is_the_published_one(name):
    assert count_params(MODELS[name].builder()) == EXACT_PARAMS[name]


def test_torchvision_counts_agree_with_ours_for_the_four_shared_networks():
    for ours, theirs in TORCHVISION_NAMES.items():
        assert EXACT_PARAMS[ours] == TORCHVISION["param_counts"][theirs]


def test_effnet_has_about_0_11_million_parameters():
    assert 0.10e6 < count_params(MODELS["effnet"].builder()) < 0.12e6


@pytest.mark.parametrize("width, tv_name", [(0.5, "shufflenet_v2_x0_5"), (1.5, "shufflenet_v2_x1_5"),
                                            (2.0, "shufflenet_v2_x2_0")])
def test_other_shufflenetv2_widths_match_torchvision(width, tv_name):
    assert count_params(ShuffleNetV2(width)) == TORCHVISION["param_counts"][tv_name]


@pytest.mark.parametrize("groups", [1, 2, 3, 4, 8])
def test_shufflenetv1_builds_for_every_group_count_of_table_1(groups):
    model = ShuffleNetV1(groups=groups).eval()
    assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 1000)


@pytest.mark.parametrize("name", PAPER_MACS)
def test_macs_within_two_percent_of_the_paper(name):
    spec = MODELS[name]
    macs = count_macs(spec.builder(), spec.input_size)
    assert abs(macs - PAPER_MACS[name]) / PAPER_MACS[name] < 0.02, f"{name}: {macs / 1e6:.1f} M MACs"


@pytest.mark.parametrize("name", MODELS)
def test_output_is_one_logit_per_label(name):
    spec = MODELS[name]
    model = spec.builder().eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, spec.input_size, spec.input_size))
    assert out.shape == (2, len(spec.labels.read()))


def test_effnet_takes_32x32_cifar_images_and_reduces_them_to_4x4():
    model = MODELS["effnet"].builder().eval()
    assert MODELS["effnet"].input_size == 32
    with torch.no_grad():
        x = torch.randn(3, 3, 32, 32)
        assert model.features(x).shape == (3, 256, 4, 4)
        assert model(x).shape == (3, 10)


@pytest.mark.parametrize("name", TORCHVISION_NAMES)
def test_state_dict_layout_equals_torchvision(name):
    """Same keys, order, shapes and dtypes: torchvision's ImageNet checkpoints load with strict=True."""
    expected = TORCHVISION["models"][TORCHVISION_NAMES[name]]["state_dict"]
    ours = [[key, list(value.shape), str(value.dtype).removeprefix("torch.")]
            for key, value in MODELS[name].builder().state_dict().items()]
    assert ours == expected


def test_width_multipliers_scale_the_mobilenets():
    assert count_params(MobileNetV2(width_mult=0.5)) < count_params(MobileNetV2())
    assert count_params(MobileNetV3("small", width_mult=0.75)) < count_params(MobileNetV3("small"))


def test_channel_shuffle_interleaves_the_groups():
    from model_defs.layers import channel_shuffle
    x = torch.arange(6.0).view(1, 6, 1, 1).expand(2, 6, 2, 3)
    shuffled = channel_shuffle(x, groups=2)
    assert shuffled[0, :, 0, 0].tolist() == [0, 3, 1, 4, 2, 5]
    assert torch.equal(shuffled[1], shuffled[0])
