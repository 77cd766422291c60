"""Give a freshly built model its weights: random (calibrated), torchvision's ImageNet, or custom files."""
import os
from pathlib import Path
from urllib.error import URLError
from urllib.parse import urlparse

import torch
from safetensors.torch import load_file
from torch import nn

from contract import RANDOM_WEIGHTS_NOTE, Weights, sha256_of
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


# --- imagenet -------------------------------------------------------------------------------

def imagenet_weights(spec: ModelSpec, model: nn.Module) -> Weights:
    """torchvision's checkpoint through torch.hub: cached under $TORCH_HOME, sha256 prefix checked."""
    if spec.checkpoint_url is None:
        raise CheckpointUnavailable(spec.name, "no ImageNet checkpoint exists for this model")
    url = spec.checkpoint_url
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
    load_strict(spec.name, model, state_dict, f"checkpoint {url}")
    return Weights(kind="imagenet", source=url, sha256=sha256_of(cached))


# --- custom ---------------------------------------------------------------------------------

def custom_weights(spec: ModelSpec, model: nn.Module, directory: Path) -> Weights:
    """`<directory>/<name>.pth` (a state_dict) or `<directory>/<name>.safetensors`, loaded strictly."""
    candidates = [directory / f"{spec.name}{suffix}" for suffix in (".pth", ".safetensors")]
    found = [path for path in candidates if path.is_file()]
    if not found:
        raise WeightsError(f"{spec.name}: no weights file in {directory} "
                           f"(expected {candidates[0].name} or {candidates[1].name})")
    if len(found) > 1:
        raise WeightsError(f"{spec.name}: both {found[0].name} and {found[1].name} exist in {directory}; keep one")
    path = found[0]
    try:
        if path.suffix == ".pth":
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        else:
            state_dict = load_file(path)
    except Exception as error:  # a corrupt or foreign file: report which one, whatever the reader raised
        raise WeightsError(f"{spec.name}: cannot read {path}: {error}") from None
    load_strict(spec.name, model, state_dict, path.name)
    return Weights(kind="custom", source=path.name, sha256=sha256_of(path))


# --- the choice the CLI offers --------------------------------------------------------------

def build_with_weights(spec: ModelSpec, weights: str, seed: int = 0,
                       allow_random_fallback: bool = False) -> tuple[nn.Module, Weights]:
    """Build `spec`'s model in eval mode with `weights`: "random", "imagenet" or a directory path."""
    model = spec.builder()
    if weights == "random":
        record = random_weights(spec, model, seed)
    elif weights == "imagenet":
        try:
            record = imagenet_weights(spec, model)
        except CheckpointUnavailable as error:
            if not allow_random_fallback:
                raise
            model = spec.builder()
            record = random_weights(spec, model, seed,
                                    note=f"ImageNet weights were requested: {error.reason}. {RANDOM_WEIGHTS_NOTE}")
    else:
        record = custom_weights(spec, model, Path(weights))
    return model.eval(), record
