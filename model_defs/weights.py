"""Give a freshly built model its weights: random (calibrated), ImageNet (torchvision's checkpoints,
Keras's MobileNetV1 files), or the user's own files (state_dicts, Keras HDF5, megvii checkpoints).

Weights decide more than the parameters: Keras's and megvii's were trained on networks and inputs
that differ from this project's reading of the papers, so loading them also gives the model the
layout and the preprocessing they need (`BuiltModel.spec`). Random and custom state_dicts keep the
paper layout: a state_dict trained on it would silently compute something else on another.
"""
import dataclasses
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from urllib.error import URLError
from urllib.parse import urlparse

import torch
from safetensors.torch import load_file
from torch import nn

from contract import RANDOM_WEIGHTS_NOTE, Weights, sha256_of
from model_defs.keras_mobilenet import (
    KerasMobileNetV1,
    KerasVariant,
    KerasWeightsError,
    keras_state_dict,
    keras_variant,
    read_keras_weights,
)
from model_defs.megvii_shufflenet import (
    MEGVII_PREPROCESSING,
    MegviiShuffleNetV1,
    checkpoint_variant,
    megvii_state_dict,
    paper_variant,
)
from model_defs.registry import ModelSpec
from model_defs.synthetic import synthetic_images

CALIBRATION_IMAGES = 16
BAD_KEYS_SHOWN = 5


class WeightsError(Exception):
    """Weights could not be given to a model; the message names the model and the cause."""


class CheckpointUnavailable(WeightsError):
    """An ImageNet checkpoint does not exist for the model or could not be fetched."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.reason = reason


@dataclass(frozen=True)
class BuiltModel:
    spec: ModelSpec  # as built: its builder, preprocessing and layout are those the weights need
    model: nn.Module  # in eval mode
    weights: Weights


# --- random ---------------------------------------------------------------------------------

def initialise(model: nn.Module, seed: int) -> None:
    """torchvision's initialisation, except the classifier: 1/sqrt(fan_in) gives logits of order 1."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", generator=generator)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, module.in_features ** -0.5, generator=generator)
            nn.init.zeros_(module.bias)


@torch.no_grad()
def calibrate(model: nn.Module, images: torch.Tensor) -> None:
    """Measure BatchNorm statistics on `images`, then standardise the logits over them.

    Random running statistics either blow activations up or wash the input out (every image
    then gets the same answer). One train-mode pass with `momentum=None` stores the batch's
    exact statistics. The last Linear layer is then shifted so each class logit has mean 0 over
    the batch (a shared offset would otherwise give every photo the same top-1) and scaled so
    the logits have std 1.
    """
    batch_norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in batch_norms:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    model(images)
    model.eval()
    for bn in batch_norms:
        bn.momentum = 0.1

    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    logits = model(images)
    mean = logits.mean(0)
    # One scale for all classes: per-class spreads measured on a few images are too noisy.
    scale = (logits - mean).std().clamp_min(1e-6)
    classifier.weight.div_(scale)
    classifier.bias.sub_(mean).div_(scale)


def random_weights(spec: ModelSpec, model: nn.Module, seed: int, note: str = RANDOM_WEIGHTS_NOTE) -> Weights:
    initialise(model, seed)
    calibrate(model, synthetic_images(CALIBRATION_IMAGES, spec.preprocessing, seed))
    source = (f"random init with seed {seed}; BatchNorm statistics and logit scale calibrated on "
              f"{CALIBRATION_IMAGES} synthetic images")
    return Weights(kind="random", source=source, note=note)


# --- loading a state_dict -------------------------------------------------------------------

def load_strict(name: str, model: nn.Module, state_dict: object, origin: str) -> None:
    """`load_state_dict(strict=True)`, with an error that names the model and the first bad keys."""
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise WeightsError(f"{name}: {origin} does not hold a state_dict (a mapping of names to tensors)")
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError:
        expected = model.state_dict()
        # Older checkpoints lack BatchNorm's num_batches_tracked; load_state_dict accepts that.
        missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
        unexpected = [k for k in state_dict if k not in expected]
        wrong_shape = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
                       for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
        problems = [f"{label}: {', '.join(keys[:BAD_KEYS_SHOWN])}{' ...' if len(keys) > BAD_KEYS_SHOWN else ''}"
                    for label, keys in [("missing keys", missing), ("unexpected keys", unexpected),
                                        ("wrong shapes (file vs model)", wrong_shape)] if keys]
        raise WeightsError(f"{name}: {origin} does not match the model; {'; '.join(problems)}") from None


# --- imagenet ---------------------------------------------------------------------------------

MEGVII_HINT = ("megvii publishes its ShuffleNetV1 ImageNet checkpoints behind a download page, not a URL "
               "to fetch: save one as <name>.pth in a folder and pass --weights FOLDER")


def imagenet_weights(spec: ModelSpec, pinned_sha256: str | None = None) -> BuiltModel:
    """torchvision's checkpoint for the model, or Keras's file for a MobileNetV1 variant."""
    variant = keras_variant(spec.name) if spec.checkpoint_url is None else None
    if variant is not None:
        return keras_imagenet_weights(spec, variant, pinned_sha256)
    if spec.checkpoint_url is None:
        reason = MEGVII_HINT if spec.name.startswith("shufflenetv1") else "no ImageNet checkpoint exists for this model"
        raise CheckpointUnavailable(spec.name, reason)
    return torchvision_weights(spec, pinned_sha256)


def torchvision_weights(spec: ModelSpec, pinned_sha256: str | None) -> BuiltModel:
    """torchvision's checkpoint through torch.hub: cached under $TORCH_HOME, sha256 prefix checked."""
    url = spec.checkpoint_url
    model = spec.builder()
    try:
        state_dict = torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False,
                                                        check_hash=True, weights_only=True)
    except RuntimeError as error:
        if "invalid hash value" in str(error):
            raise WeightsError(f"{spec.name}: checkpoint {url} failed its hash check: {error}") from None
        raise WeightsError(f"{spec.name}: cannot read checkpoint {url}: {error}") from None
    except (URLError, OSError) as error:
        raise CheckpointUnavailable(spec.name, f"cannot download {url} ({error})") from None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
    digest = checked_sha256(spec.name, cached, pinned_sha256)
    load_strict(spec.name, model, state_dict, f"checkpoint {url}")
    return BuiltModel(spec, model, Weights(kind="imagenet", source=url, sha256=digest, sha256_verified=True))


def keras_imagenet_weights(spec: ModelSpec, variant: KerasVariant, pinned_sha256: str | None) -> BuiltModel:
    """Keras's HDF5 file for the variant, downloaded once into $TORCH_HOME's hub cache, converted."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / variant.file_name
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        try:  # writes a temporary file and renames it when complete
            torch.hub.download_url_to_file(variant.url, str(cached), progress=False)
        except (URLError, OSError) as error:
            raise CheckpointUnavailable(spec.name, f"cannot download {variant.url} ({error})") from None
    built = keras_file_weights(spec, variant, cached, pinned_sha256, kind="imagenet", source=variant.url)
    if pinned_sha256 is None:
        note = (f"sha256 not verified: Keras publishes no hash for {variant.file_name}; pin the one you "
                f"trust with --weights-sha256 {spec.name}=<sha256>.")
        built = dataclasses.replace(built, weights=built.weights.model_copy(update={"note": note}))
    return built


def keras_file_weights(spec: ModelSpec, variant: KerasVariant, path: Path, pinned_sha256: str | None,
                       kind: str, source: str) -> BuiltModel:
    """A Keras MobileNetV1 HDF5 file, converted into the network Keras builds (TensorFlow's layout)."""
    digest = checked_sha256(spec.name, path, pinned_sha256)
    try:
        state_dict = keras_state_dict(read_keras_weights(path), variant.alpha)
    except KerasWeightsError as error:
        raise WeightsError(f"{spec.name}: {path.name}: {error}") from None
    model = KerasMobileNetV1(variant.alpha)
    load_strict(spec.name, model, state_dict, path.name)
    keras_spec = dataclasses.replace(spec, builder=partial(KerasMobileNetV1, variant.alpha),
                                     preprocessing=variant.preprocessing, layout="keras")
    return BuiltModel(keras_spec, model, Weights(kind=kind, source=source, sha256=digest,
                                                 sha256_verified=pinned_sha256 is not None))


def checked_sha256(name: str, path: Path, pinned_sha256: str | None) -> str:
    """The file's sha256, which must equal the pinned one when there is one."""
    digest = sha256_of(path)
    if pinned_sha256 is not None and digest != pinned_sha256.lower():
        raise WeightsError(f"{name}: {path.name} has sha256 {digest}, not the pinned {pinned_sha256.lower()} "
                           "(--weights-sha256): a different or damaged file")
    return digest


# --- custom ---------------------------------------------------------------------------------

def weights_files(spec: ModelSpec, directory: Path) -> list[Path]:
    """Where in `directory` the model's own weights may be, in order of preference."""
    names = [f"{spec.name}.pth", f"{spec.name}.safetensors"]
    variant = keras_variant(spec.name)
    if variant is not None:
        names += [f"{spec.name}.h5", variant.file_name]
    return [directory / name for name in names]


def custom_weights(spec: ModelSpec, directory: Path, pinned_sha256: str | None = None) -> BuiltModel:
    """The one weights file for the model in `directory` (see `weights_files`), loaded strictly.

    A Keras HDF5 file is converted; a .pth in megvii's ShuffleNetV1 layout is recognised by its keys.
    """
    candidates = weights_files(spec, directory)
    found = [path for path in candidates if path.is_file()]
    if not found:
        raise WeightsError(f"{spec.name}: no weights file in {directory} "
                           f"(expected {', '.join(path.name for path in candidates[:-1])} or {candidates[-1].name})")
    if len(found) > 1:
        raise WeightsError(f"{spec.name}: {' and '.join(path.name for path in found)} exist in {directory}; keep one")
    path = found[0]
    if path.suffix == ".h5":
        return keras_file_weights(spec, keras_variant(spec.name), path, pinned_sha256, kind="custom",
                                  source=path.name)
    digest = checked_sha256(spec.name, path, pinned_sha256)
    try:
        if path.suffix == ".pth":
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        else:
            state_dict = load_file(path)
    except Exception as error:  # a corrupt or foreign file: report which one, whatever the reader raised
        raise WeightsError(f"{spec.name}: cannot read {path}: {error}") from None
    record = Weights(kind="custom", source=path.name, sha256=digest, sha256_verified=pinned_sha256 is not None)
    megvii = megvii_state_dict(state_dict)
    if megvii is not None:
        return megvii_weights(spec, megvii, path.name, record)
    model = spec.builder()
    load_strict(spec.name, model, state_dict, path.name)
    return BuiltModel(spec, model, record)


def megvii_weights(spec: ModelSpec, state_dict: dict, origin: str, record: Weights) -> BuiltModel:
    """A megvii ShuffleNetV1 checkpoint of the model's variant, into megvii's layout."""
    paper = paper_variant(spec.builder())
    if paper is None:
        raise WeightsError(f"{spec.name}: {origin} is a megvii ShuffleNetV1 checkpoint, but {spec.name} "
                           "is not a ShuffleNetV1")
    try:
        held = checkpoint_variant(state_dict)
    except ValueError as error:
        raise WeightsError(f"{spec.name}: {origin}: {error}") from None
    if held != paper:
        raise WeightsError(f"{spec.name}: {origin} is megvii's ShuffleNetV1 {held}, the model is {paper}: "
                           "the checkpoint of another variant")
    if held.width is None:
        raise WeightsError(f"{spec.name}: {origin} is a ShuffleNetV1 {held}, a size megvii does not publish")
    model = MegviiShuffleNetV1(held.groups, held.width)
    load_strict(spec.name, model, state_dict, origin)
    megvii_spec = dataclasses.replace(spec, builder=partial(MegviiShuffleNetV1, held.groups, held.width),
                                      preprocessing=MEGVII_PREPROCESSING, layout="megvii")
    return BuiltModel(megvii_spec, model, record)


# --- the choice the CLI offers --------------------------------------------------------------

def build_with_weights(spec: ModelSpec, weights: str, seed: int = 0, allow_random_fallback: bool = False,
                       pinned_sha256: str | None = None) -> BuiltModel:
    """Build `spec`'s model in eval mode with `weights`: "random", "imagenet" or a directory path.

    `pinned_sha256`: the hash the weights file must have (checked before it is read).
    """
    if weights == "random":
        if pinned_sha256 is not None:
            raise WeightsError(f"{spec.name}: a sha256 is pinned, but random weights come from no file")
        built = random_model(spec, seed)
    elif weights == "imagenet":
        try:
            built = imagenet_weights(spec, pinned_sha256)
        except CheckpointUnavailable as error:
            if not allow_random_fallback or pinned_sha256 is not None:  # a pinned file is wanted, not another
                raise
            built = random_model(spec, seed, f"ImageNet weights were requested: {error.reason}. {RANDOM_WEIGHTS_NOTE}")
    else:
        built = custom_weights(spec, Path(weights), pinned_sha256)
    built.model.eval()
    return built


def random_model(spec: ModelSpec, seed: int, note: str = RANDOM_WEIGHTS_NOTE) -> BuiltModel:
    """The paper layout with calibrated random weights."""
    model = spec.builder()
    return BuiltModel(spec, model, random_weights(spec, model, seed, note))
