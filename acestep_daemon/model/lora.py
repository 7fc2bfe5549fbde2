"""LoRA: low-rank updates added to the outputs of the decoder's linear projections.

An adapter maps module paths (`decoder.layers.3.self_attn.q_proj`) to a pair down [r, in],
up [out, r] and a scaling (alpha / r). While applied, the projection returns
W·x + b + (up · down · x)·scaling·scale, the forward of an unmerged PEFT LoRA layer; nothing
is merged into the weights, so removing it restores the base model exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LoraUpdate:
    """One projection's low-rank update: down [r, in], up [out, r], scaling alpha / r."""

    down: torch.Tensor
    up: torch.Tensor
    scaling: float

    def to(self, device: torch.device | str, dtype: torch.dtype) -> LoraUpdate:
        return LoraUpdate(self.down.to(device, dtype), self.up.to(device, dtype), self.scaling)


LoraAdapter = dict[str, LoraUpdate]
"""Module path in `AceStepModel` -> its update."""


def adapter_mismatch(model: nn.Module, adapter: LoraAdapter) -> str | None:
    """Why `adapter` does not fit `model` (a missing module, a wrong shape), or None."""
    modules = dict(model.named_modules())
    for name, update in adapter.items():
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            return f"the model has no linear projection {name}"
        rank = update.down.shape[0]
        expected_down, expected_up = (rank, module.in_features), (module.out_features, rank)
        if tuple(update.down.shape) != expected_down or tuple(update.up.shape) != expected_up:
            return (
                f"{name}: adapter shapes {tuple(update.down.shape)}, {tuple(update.up.shape)} "
                f"do not fit the projection {module.in_features} -> {module.out_features}"
            )
    return None


@contextmanager
def lora_applied(model: nn.Module, adapter: LoraAdapter, scale: float) -> Iterator[None]:
    """Add `adapter` at `scale` to the model's projections for the duration of the block.

    Scale 0 adds nothing at all. The adapter must fit (`adapter_mismatch`) and live on the
    model's device in its dtype (`LoraUpdate.to`).
    """
    modules = dict(model.named_modules())
    handles = []
    if scale != 0.0:
        for name, update in adapter.items():
            handles.append(modules[name].register_forward_hook(_hook(update, scale)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


Hook = Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], torch.Tensor]


def _hook(update: LoraUpdate, scale: float) -> Hook:
    """A forward hook adding the update, [..., in] -> [..., out], to the projection's output."""
    factor = update.scaling * scale

    def add_update(
        _: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
    ) -> torch.Tensor:
        low = F.linear(inputs[0], update.down)  # [..., r]
        return output + F.linear(low, update.up) * factor

    return add_update
