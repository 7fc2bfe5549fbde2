"""Random weights with sensible scales for the tiny checkpoint, drawn from a state dict's shapes."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import save_file


def random_tensor(name: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """A random float32 value for one parameter, chosen by its key name and shape.

    Norm weights near 1; weight-norm magnitudes near 1; Snake log-scales near 0;
    matrices and kernels ~ N(0, 1/fan_in); everything else (biases, AdaLN tables,
    special tokens) small but non-zero, so bias and gate mistakes show.
    """
    noise = torch.randn(shape, generator=generator)
    leaf = name.split(".")[-2] if "." in name else name
    if name.endswith(".weight") and "norm" in leaf:
        return 1.0 + 0.1 * noise
    if name.endswith(".weight_g"):
        return 1.0 + 0.1 * noise.abs()
    if name.endswith((".alpha", ".beta")):
        return 0.1 * noise
    if name.endswith((".weight", ".weight_v")) and len(shape) >= 2:
        return noise / math.sqrt(math.prod(shape[1:]))
    return 0.1 * noise


def random_weights(
    shapes: dict[str, torch.Tensor], generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Draw every tensor of a (meta) state dict, in sorted key order."""
    return {name: random_tensor(name, shapes[name].shape, generator) for name in sorted(shapes)}


def save_weights(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A safetensors file with the `format: pt` metadata transformers expects."""
    save_file(tensors, str(path), metadata={"format": "pt"})
