"""Deterministic, photo-like synthetic images: for BatchNorm calibration and export parity checks.

Real photos have most of their energy at low spatial frequencies, some colour cast and hard
edges; these images have all three, so statistics measured on them carry over to real inputs.
"""
import torch
import torch.nn.functional as F

from model_defs.registry import Preprocessing

OCTAVE_AMPLITUDE = 0.12


def synthetic_images(count: int, preprocessing: Preprocessing, seed: int) -> torch.Tensor:
    """`count` normalised NCHW float32 images at the model's crop size, the same for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    size = preprocessing.crop
    pixels = torch.rand(count, 3, 1, 1, generator=generator).expand(count, 3, size, size).clone()
    # Noise octaves from coarse to fine with equal amplitude: the 1/f amplitude spectrum of
    # natural images puts the same energy in every octave.
    side = 2
    while side <= size:
        noise = torch.randn(count, 3, side, side, generator=generator)
        pixels += OCTAVE_AMPLITUDE * F.interpolate(noise, size=(size, size), mode="bilinear", align_corners=False)
        side *= 2
    # A few flat-coloured rectangles give hard edges.
    for image in pixels:
        for _ in range(3):
            top, left = torch.randint(0, size - 2, (2,), generator=generator).tolist()
            height, width = torch.randint(2, max(3, size // 2), (2,), generator=generator).tolist()
            image[:, top:top + height, left:left + width] = torch.rand(3, 1, 1, generator=generator)
    pixels = pixels.clamp(0.0, 1.0) * (255.0 / preprocessing.scale)  # the 8-bit range, over `scale`
    mean = torch.tensor(preprocessing.mean).view(1, 3, 1, 1)
    std = torch.tensor(preprocessing.std).view(1, 3, 1, 1)
    return ((pixels - mean) / std).float()
