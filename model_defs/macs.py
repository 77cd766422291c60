"""Multiply-accumulate count of convolutions and linear layers, measured by running the model."""
import torch
from torch import nn


def count_macs(model: nn.Module, input_size: int) -> int:
    """MACs of every Conv2d and Linear for one image of `input_size` x `input_size` (batch 1)."""
    total = 0

    def conv_hook(module: nn.Conv2d, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        kernel_h, kernel_w = module.kernel_size
        total += output.numel() * (module.in_channels // module.groups) * kernel_h * kernel_w

    def linear_hook(module: nn.Linear, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        total += output.numel() * module.in_features

    handles = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, input_size, input_size))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return total


def count_params(model: nn.Module) -> int:
    """Learnable parameters; BatchNorm running statistics are buffers and do not count."""
    return sum(p.numel() for p in model.parameters())
