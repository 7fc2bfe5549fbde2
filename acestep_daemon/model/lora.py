"""Adapters: updates added to the outputs of the decoder's linear projections.

An adapter maps module paths (`decoder.layers.3.self_attn.q_proj`) to an update:
- `LoraUpdate`: down [r, in], up [out, r] and a scaling (alpha / r); the projection returns
  W·x + b + (up · down · x)·scaling·scale, the forward of an unmerged PEFT LoRA layer.
  With a magnitude m [out] (DoRA, arXiv:2402.09353, PEFT's `use_dora`), s = scaling·scale and
  g = m / ‖W + s·up·down‖ (each output row's L2 norm), the projection returns
  g ⊙ (W·x + s·up·down·x) + b, the forward of an unmerged PEFT DoRA layer
  (`peft/tuners/lora/dora.py`, `DoraLinearLayer.forward`). Like PEFT's, it rescales what the
  projection returned before it, so an adapter applied earlier on the same projection is
  rescaled too.
- `LokrUpdate`: LyCORIS's Kronecker factors w1 [a, b], w2 [c, d] with a·c = out, b·d = in;
  the projection returns W·x + b + (kron(w1, w2) · x)·scaling·scale, the forward of LyCORIS's
  LoKr module (`LokrModule._rebuild_forward`) at multiplier `scale`. With a magnitude
  (LyCORIS's weight decomposition, `dora_scale` m [out, 1]) the projection's weight becomes
  W' = (W + Δ) ⊙ (scale·(m / ‖W + Δ‖ − 1) + 1), Δ = kron(w1, w2)·scaling, the norm per
  output row (per input column for m [1, in]) plus float32's eps: at scale 1 the adapted
  rows take the magnitudes, and the scale blends the rescaling, not Δ (LyCORIS's
  `weight_decompose`).
Nothing is merged into the weights, so removing the adapters restores the base model exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LoraUpdate:
    """One projection's low-rank update: down [r, in], up [out, r], scaling alpha / r, and
    with weight decomposition (DoRA) its magnitudes [out]."""

    down: torch.Tensor
    up: torch.Tensor
    scaling: float
    magnitude: torch.Tensor | None = None

    def to(self, device: torch.device | str, dtype: torch.dtype) -> LoraUpdate:
        down, up = self.down.to(device, dtype), self.up.to(device, dtype)
        return LoraUpdate(down, up, self.scaling, _moved(self.magnitude, device, dtype))


@dataclass(frozen=True)
class LokrUpdate:
    """One projection's Kronecker update: w1 [a, b], w2 [c, d], scaling alpha / dim, and with
    weight decomposition its magnitudes [out, 1] (or [1, in])."""

    w1: torch.Tensor
    w2: torch.Tensor
    scaling: float
    magnitude: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """The [out, in] shape of kron(w1, w2)."""
        return (self.w1.shape[0] * self.w2.shape[0], self.w1.shape[1] * self.w2.shape[1])

    def to(self, device: torch.device | str, dtype: torch.dtype) -> LokrUpdate:
        w1, w2 = self.w1.to(device, dtype), self.w2.to(device, dtype)
        return LokrUpdate(w1, w2, self.scaling, _moved(self.magnitude, device, dtype))


def _moved(
    tensor: torch.Tensor | None, device: torch.device | str, dtype: torch.dtype
) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device, dtype)


Update = LoraUpdate | LokrUpdate

LoraAdapter = dict[str, Update]
"""Module path in `AceStepModel` -> its update."""


def adapter_kind(adapter: LoraAdapter) -> str:
    """ "lokr", "dora" or "lora", as the adapter's updates are."""
    updates = adapter.values()
    if any(isinstance(u, LokrUpdate) for u in updates):
        return "lokr"
    return "dora" if any(u.magnitude is not None for u in updates) else "lora"


def adapter_mismatch(model: nn.Module, adapter: LoraAdapter) -> str | None:
    """Why `adapter` does not fit `model` (a missing module, a wrong shape), or None."""
    modules = dict(model.named_modules())
    for name, update in adapter.items():
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            return f"the model has no linear projection {name}"
        if isinstance(update, LokrUpdate):
            fits = update.shape == (module.out_features, module.in_features)
            shapes = f"{tuple(update.w1.shape)} ⊗ {tuple(update.w2.shape)}"
            if update.magnitude is not None:
                sides = {(module.out_features, 1), (1, module.in_features)}
                fits = fits and tuple(update.magnitude.shape) in sides
                shapes += f", magnitude {tuple(update.magnitude.shape)}"
        else:
            rank = update.down.shape[0]
            fits = tuple(update.down.shape) == (rank, module.in_features) and tuple(
                update.up.shape
            ) == (module.out_features, rank)
            shapes = f"{tuple(update.down.shape)}, {tuple(update.up.shape)}"
            if update.magnitude is not None:
                fits = fits and tuple(update.magnitude.shape) == (module.out_features,)
                shapes += f", magnitude {tuple(update.magnitude.shape)}"
        if not fits:
            return (
                f"{name}: adapter shapes {shapes} "
                f"do not fit the projection {module.in_features} -> {module.out_features}"
            )
    return None


@contextmanager
def adapters_applied(
    model: nn.Module, adapters: Sequence[tuple[LoraAdapter, float]]
) -> Iterator[None]:
    """Add each adapter at its scale to the model's projections for the duration of the block.

    The updates of several adapters on one projection add up, in order (a DoRA update also
    rescales the ones before it). Scale 0 adds nothing at all (a DoRA adapter is off, as
    upstream's LoRA switch leaves it).
    Each adapter must fit (`adapter_mismatch`) and live on the model's device in its dtype.
    """
    modules = dict(model.named_modules())
    handles = []
    for adapter, scale in adapters:
        if scale == 0.0:
            continue
        for name, update in adapter.items():
            module = modules[name]
            handles.append(module.register_forward_hook(_hook(update, scale, module)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


Hook = Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], torch.Tensor]


def _hook(update: Update, scale: float, module: nn.Linear) -> Hook:
    """A forward hook adding the update, [..., in] -> [..., out], to the projection's output."""
    if isinstance(update, LokrUpdate):
        if update.magnitude is None:
            delta = torch.kron(update.w1, update.w2) * update.scaling * scale  # [out, in]
        else:
            delta = _decomposed_lokr_delta(update, update.magnitude, scale, module)

        def add_kron(
            _: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
        ) -> torch.Tensor:
            return output + F.linear(inputs[0], delta)

        return add_kron
    if update.magnitude is not None:
        return _dora_hook(update, update.magnitude, scale, module)
    factor = update.scaling * scale

    def add_update(
        _: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
    ) -> torch.Tensor:
        low = F.linear(inputs[0], update.down)  # [..., r]
        return output + F.linear(low, update.up) * factor

    return add_update


def _base_weight(module: nn.Linear) -> torch.Tensor:
    """The projection's weight [out, in] in float32 (torchao's 8-bit weights dequantized)."""
    return module.weight.dequantize().float()


def _decomposed_lokr_delta(
    update: LokrUpdate, magnitude: torch.Tensor, scale: float, module: nn.Linear
) -> torch.Tensor:
    """W' − W [out, in] for a weight-decomposed LoKr update, in float32 in LyCORIS's order of
    operations (so fp32 results equal LyCORIS's), returned in the update's dtype."""
    weight = _base_weight(module)
    merged = weight + torch.kron(update.w1.float(), update.w2.float()) * update.scaling
    per_row = magnitude.shape[1] == 1
    norm = merged.norm(dim=1 if per_row else 0, keepdim=True) + torch.finfo(torch.float32).eps
    gain = magnitude.float() / norm  # [out, 1] or [1, in]
    if scale != 1:
        gain = scale * (gain - 1) + 1
    return (merged * gain - weight).to(update.w1.dtype)


def _dora_hook(
    update: LoraUpdate, magnitude: torch.Tensor, scale: float, module: nn.Linear
) -> Hook:
    """The DoRA forward: the projection's output without its bias, W·x, becomes g ⊙ W·x and
    g ⊙ s·up·down·x is added, g = m / ‖W + s·up·down‖ per output row (computed once here, in
    float32 whatever the dtype; PEFT's order of operations, so fp32 results equal PEFT's)."""
    factor = update.scaling * scale
    weight = _base_weight(module)
    down, up = update.down.float(), update.up.float()
    eye = torch.eye(down.shape[1], device=down.device)
    low_rank = F.linear(F.linear(eye, down), up).T  # [out, in]
    row_norm = torch.linalg.norm(weight + factor * low_rank, dim=1)  # [out]
    gain = (magnitude.float() / row_norm).to(update.down.dtype)  # [out]

    def add_dora(
        _: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
    ) -> torch.Tensor:
        unbiased = output if module.bias is None else output - module.bias  # [..., out]
        low = F.linear(F.linear(inputs[0], update.down), update.up)  # [..., out]
        return output + ((gain - 1) * unbiased + gain * low * factor)

    return add_dora
