"""The papers' variants and INT8 models, as a user asks for them: `cnn-export --models` with names
in the papers' notation, a real server that serves what it wrote, and the numbers the papers print."""
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from model_defs.macs import count_macs, count_params
from model_defs.photos import CALIBRATION_DIR, HELD_OUT_DIR, photo_tensor, photos_in
from model_defs.variants import UnknownModelName, choose
from model_defs.weights import build_with_weights
from service.preprocess import preprocess
from tests.onnx_parity import assert_same_logits, onnx_session

# Parameters and MACs from the papers' tables (rounded there: "2.6M" is checked to its one decimal,
# with 1,000 parameters to spare for the classifier bias megvii's reference omits) or, where the
# architecture table of the project counts them exactly with torchvision's builder, as integers.
# MACs within 2 %, as for the defaults: the papers count with their own conventions.
PAPER_TABLES = {
    "mobilenetv1_0.75_224": ("2.6M", 325e6),  # MobileNetV1 Table 6
    "mobilenetv1_0.5_224": ("1.3M", 149e6),
    "mobilenetv1_0.25_224": ("0.5M", 41e6),
    "mobilenetv1_1.0_192": ("4.2M", 418e6),  # Table 7
    "mobilenetv1_1.0_160": ("4.2M", 290e6),
    "mobilenetv1_1.0_128": ("4.2M", 186e6),
    "mobilenetv1_0.5_160": ("1.3M", 76e6),  # Table 9 (its 1.32M leaves out BatchNorm's scale and offset)
    "mobilenetv2_0.75_160": (2_636_424, 107e6),  # torchvision's width_mult
    "mobilenetv2_1.4_224": (6_108_776, 582e6),
    "mobilenetv3_large_0.75": ("4.0M", 155e6),  # MobileNetV3 Table 3
    "mobilenetv3_small_0.75": ("2.0M", 44e6),
    "shufflenetv1_g3_0.5x": ("0.7M", 38e6),  # megvii ShuffleNet-Series
    "shufflenetv1_g3_1.0x": ("1.9M", 138e6),
    "shufflenetv1_g3_1.5x": ("3.4M", 292e6),
    "shufflenetv1_g3_2.0x": ("5.4M", 524e6),
    "shufflenetv1_g8_0.5x": ("1.0M", 40e6),
    "shufflenetv1_g8_1.0x": ("2.4M", 138e6),
    "shufflenetv1_g8_1.5x": ("4.3M", 290e6),
    "shufflenetv1_g8_2.0x": ("6.5M", 522e6),
    "shufflenetv2_0.5x": (1_366_792, 41e6),  # torchvision shufflenet_v2_x0_5; the paper's MACs
    "shufflenetv2_1.5x": (3_503_624, 299e6),
    "shufflenetv2_2.0x": (7_393_996, 591e6),
}
# Exported by the tests: one small variant per family, each resolution rule, and an INT8 model.
EXPORTED = ["mobilenetv1_0.25_128", "mobilenetv2_0.35_96", "mobilenetv3_small_0.75", "shufflenetv1_g3_0.5x",
            "shufflenetv2_0.5x"]
INT8 = "mobilenetv3_small_0.75_int8"


@pytest.mark.parametrize("name", PAPER_TABLES)
def test_parameters_and_macs_are_the_papers(name):
    spec = choose(name).spec
    model = spec.builder()
    params, macs = count_params(model), count_macs(model, spec.input_size)
    expected_params, expected_macs = PAPER_TABLES[name]
    if isinstance(expected_params, int):
        assert params == expected_params
    else:
        assert abs(params / 1e6 - float(expected_params[:-1])) <= 0.05 + 0.001, f"{name}: {params:,} parameters"
    assert abs(macs - expected_macs) / expected_macs < 0.02, f"{name}: {macs / 1e6:.1f} M MACs"


def test_the_default_names_still_mean_the_seven_defaults():
    assert choose("mobilenetv3_large").spec.architecture == "MobileNetV3-Large 1.0"
    assert choose("mobilenetv2_int8").spec.name == "mobilenetv2" and choose("mobilenetv2_int8").int8
    # A variant that spells out a default's knobs is that network, under its own name.
    spelled_out, default = choose("mobilenetv1_1.0_224"), choose("mobilenetv1")
    assert count_params(spelled_out.spec.builder()) == count_params(default.spec.builder())


@pytest.mark.parametrize("name, fragments", [
    ("resnet50", ["unknown model resnet50", "mobilenetv1_<alpha>_<resolution>", "shufflenetv1_g<groups>_<scale>x",
                  "_int8", "128|160|192|224", "mobilenetv3_small"]),
    ("mobilenetv1_0.3_160", ["mobilenetv1_0.3_160", "alpha 0.3", "0.25, 0.5, 0.75, 1.0"]),
    ("mobilenetv2_1.0_100", ["resolution 100", "96, 128, 160, 192, 224"]),
    ("mobilenetv3_large_0.5", ["alpha 0.5", "0.75, 1.0"]),
    ("shufflenetv1_g5_1.0x", ["groups 5", "1, 2, 3, 4, 8"]),
    ("shufflenetv2_3.0x", ["scale 3.0", "0.5, 1.0, 1.5, 2.0"]),
    ("mobilenetv3_medium_1.0", ["unknown model mobilenetv3_medium_1.0", "mobilenetv3_small_<alpha>"]),
    ("mobilenetv2_int8_int8", ["unknown model mobilenetv2_int8_int8", "mobilenetv2_<alpha>_<resolution>"]),
])
def test_a_name_outside_the_grammar_is_refused_showing_the_valid_values(name, fragments):
    with pytest.raises(UnknownModelName) as refused:
        choose(name)
    for fragment in fragments:
        assert fragment in str(refused.value)


def test_the_cli_refuses_a_bad_name_in_one_line_with_a_non_zero_exit_and_writes_nothing(run_export, tmp_path):
    result = run_export("--out", str(tmp_path / "repo"), "--models", "effnet,mobilenetv1_0.3_160")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert "mobilenetv1_0.3_160" in line and "alpha 0.3 is not one of 0.25, 0.5, 0.75, 1.0" in line
    assert not (tmp_path / "repo").exists() or list((tmp_path / "repo").iterdir()) == []


@pytest.fixture(scope="module")
def variant_repository(tmp_path_factory, run_export) -> Path:
    out = tmp_path_factory.mktemp("variants")
    result = run_export("--weights", "random", "--out", str(out), "--models", ",".join([*EXPORTED, INT8]))
    assert result.returncode == 0, result.stderr
    assert f"{INT8}: random weights" in result.stdout and "held-out photos: top-1 agreement" in result.stdout
    return out


def metadata(repository: Path, name: str) -> dict:
    return json.loads((repository / name / "metadata.json").read_text())


def session(repository: Path, name: str) -> onnxruntime.InferenceSession:
    return onnx_session(repository / name / "model.onnx")


@pytest.mark.parametrize("name", EXPORTED)
def test_the_exported_input_follows_the_resolution(variant_repository, name):
    meta = metadata(variant_repository, name)
    resolution = {"mobilenetv1_0.25_128": 128, "mobilenetv2_0.35_96": 96}.get(name, 224)
    # torchvision's evaluation ratio: the shorter side to resolution * 256 / 224, then the centre crop.
    assert (meta["preprocessing"]["resize"], meta["preprocessing"]["crop"]) == (resolution * 256 // 224, resolution)
    assert meta["input"]["shape"] == [None, 3, resolution, resolution]
    [graph_input] = session(variant_repository, name).get_inputs()
    assert graph_input.shape[1:] == [3, resolution, resolution]
    assert meta["quantization"] is None and meta["weights"]["kind"] == "random"
    assert meta["params"] == count_params(choose(name).spec.builder())


@pytest.mark.parametrize("name", EXPORTED)
def test_the_onnx_file_computes_what_pytorch_computes_on_real_photos(variant_repository, photos, name):
    """Against the same network rebuilt with the same seed, at batch 1 and 5."""
    spec = choose(name).spec
    model = build_with_weights(spec, "random", seed=0).model
    batch = np.concatenate([photo_tensor(path, spec.preprocessing) for path in photos.values()])
    with torch.no_grad():
        expected = model(torch.from_numpy(batch)).numpy()
    assert expected.std() > 0.1, "logits of order 1, so that the comparison means something"
    assert len(set(expected.argmax(1).tolist())) >= 3, "different photos, different answers"
    runtime = session(variant_repository, name)
    for x, reference in ((batch[:1], expected[:1]), (batch, expected)):
        (got,) = runtime.run(None, {"input": x})
        assert_same_logits(got, reference, scale=max(1.0, np.abs(reference).max()))


def test_the_int8_model_records_its_calibration_and_a_drift_one_can_recompute(variant_repository):
    meta = metadata(variant_repository, INT8)
    quantization = meta["quantization"]
    assert quantization["precision"] == "int8" and quantization["per_channel"] is True
    assert "QDQ" in quantization["method"]
    calibration, held_out = quantization["calibration"]["photos"], quantization["drift"]["photos"]
    assert calibration == [p.name for p in photos_in(CALIBRATION_DIR)] and len(calibration) >= 5
    assert held_out == [p.name for p in photos_in(HELD_OUT_DIR)] and len(held_out) >= 5
    assert not set(calibration) & set(held_out)
    assert "random weights says little" in quantization["note"]
    # Smaller than its FP32 file, and really quantized: int8 weights feeding DequantizeLinear.
    assert meta["onnx"]["size_bytes"] < 0.4 * quantization["fp32_size_bytes"]
    graph = onnx.load(str(variant_repository / INT8 / "model.onnx")).graph
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= {node.op_type for node in graph.node}
    assert sum(t.data_type == onnx.TensorProto.INT8 for t in graph.initializer) >= 20

    # The drift again, from the FP32 network (rebuilt with the same seed) and the INT8 file.
    spec = choose(INT8).spec
    model = build_with_weights(spec, "random", seed=0).model
    x = np.concatenate([photo_tensor(HELD_OUT_DIR / name, spec.preprocessing) for name in held_out])
    with torch.no_grad():
        fp32 = model(torch.from_numpy(x)).numpy()
    (int8,) = session(variant_repository, INT8).run(None, {"input": x})
    drift = quantization["drift"]
    top5 = lambda logits: [set(row) for row in np.argsort(-logits, axis=1)[:, :5]]  # noqa: E731
    assert drift["top1_agreement"] == pytest.approx(float((fp32.argmax(1) == int8.argmax(1)).mean()))
    overlaps = [len(a & b) / 5 for a, b in zip(top5(fp32), top5(int8), strict=True)]
    assert drift["top5_overlap"] == pytest.approx(np.mean(overlaps))
    cosine = (fp32 * int8).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(int8, axis=1)
    assert drift["logit_cosine_mean"] == pytest.approx(cosine.mean(), abs=1e-3)
    assert drift["logit_cosine_min"] == pytest.approx(cosine.min(), abs=1e-3)
    assert drift["logit_cosine_min"] <= drift["logit_cosine_mean"] <= 1.0


@pytest.fixture(scope="module")
def served_repository(variant_repository) -> Path:
    return variant_repository


@pytest.fixture(scope="module")
def server(served):
    return served()  # every variant written above


def served_tensor(photo: Path, name: str) -> np.ndarray:
    """The photo as the service preprocesses it for `name`."""
    return preprocess(photo.read_bytes(), choose(name).spec.preprocessing, 10**9)


def top1(client, name: str, photo: Path) -> int:
    reply = client.post(f"/predict/{name}", files={"file": (photo.name, photo.read_bytes(), "image/jpeg")})
    assert reply.status_code == 200, reply.text
    return reply.json()["predictions"][0]["class_id"]


@pytest.mark.parametrize("name", [*EXPORTED, INT8])
def test_the_service_serves_each_variant_as_onnxruntime_answers(client, variant_repository, photos, name):
    listed = client.get(f"/models/{name}").json()
    assert listed["status"] == "ready"
    assert listed["metadata"]["input"]["shape"] == metadata(variant_repository, name)["input"]["shape"]
    runtime = session(variant_repository, name)
    for photo in (photos["chelsea"], photos["coffee"]):
        (logits,) = runtime.run(None, {"input": served_tensor(photo, name)})
        # The service's class must hold the largest logit; an INT8 model can tie two classes
        # exactly, and then either is its top-1.
        assert logits[0, top1(client, name, photo)] == logits.max()


def test_an_int8_model_keeps_the_fp32_answer_where_fp32_is_sure(client, photos):
    """On the test photo where the FP32 network's top-1 leads by the most, the served INT8 model
    gives the same top-1 (random weights: most margins are a small fraction of a logit)."""
    spec = choose(INT8).spec
    model = build_with_weights(spec, "random", seed=0).model
    margins = {}
    for stem, path in photos.items():
        with torch.no_grad():
            logits = model(torch.from_numpy(served_tensor(path, INT8)))[0]
        first, second = logits.topk(2).values.tolist()
        margins[stem] = (first - second, int(logits.argmax()))
    stem = max(margins, key=lambda s: margins[s][0])
    margin, fp32_top1 = margins[stem]
    assert margin > 1.0, f"no photo with a large margin: {margins}"
    assert top1(client, INT8, photos[stem]) == fp32_top1
    listed = client.get(f"/models/{INT8}").json()["metadata"]["quantization"]
    assert listed["drift"]["top1_agreement"] >= 0 and "says little" in listed["note"]
