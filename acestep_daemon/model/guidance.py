"""Classifier-free guidance rules for the sft/base sampler: APG (default), plain CFG, ADG.

Each combines the conditional and unconditional velocity predictions [B, T, C] of one step
into the guided velocity (upstream `acestep/models/common/apg_guidance.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

APG_MOMENTUM = -0.75
APG_NORM_THRESHOLD = 2.5
ADG_ANGLE_CLIP = 3.14 / 6
"""Upstream's clip of the ADG angle (its literal 3.14, not π)."""


class Momentum:
    """APG's running average of the guidance difference over the guided steps of one run."""

    def __init__(self, momentum: float = APG_MOMENTUM) -> None:
        self.momentum = momentum
        self.average: torch.Tensor | float = 0.0

    def update(self, value: torch.Tensor) -> torch.Tensor:
        self.average = value + self.momentum * self.average
        return self.average


def apg(cond: torch.Tensor, uncond: torch.Tensor, scale: float, momentum: Momentum) -> torch.Tensor:
    """Adaptive projected guidance: the momentum-smoothed difference, its norm over time capped
    at 2.5 per channel, keeps only its part orthogonal to `cond` (projection in float64)."""
    diff = momentum.update(cond - uncond)  # [B, T, C]
    norm = diff.norm(p=2, dim=1, keepdim=True)  # over time, per channel: [B, 1, C]
    diff = diff * torch.minimum(torch.ones_like(diff), APG_NORM_THRESHOLD / norm)
    direction = F.normalize(cond.double(), dim=1)
    diff64 = diff.double()
    parallel = (diff64 * direction).sum(dim=1, keepdim=True) * direction
    orthogonal = (diff64 - parallel).to(cond.dtype)
    return cond + (scale - 1) * orthogonal


def cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain classifier-free guidance: uncond + scale·(cond - uncond)."""
    return uncond + scale * (cond - uncond)


def adg(
    x: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, t: torch.Tensor, scale: float
) -> torch.Tensor:
    """Angle-based dynamic guidance at timestep t (0-d tensor): rotates the conditional clean
    estimate x - t·v away from the unconditional one by (scale - 1) times their angle per
    frame, clipped to about π/6, and returns the velocity that reaches it."""
    batch, frames, channels = cond.shape
    weight = scale - 1
    weight = weight * (weight > 0) + 1e-3
    sigma = t.view(1, 1, 1).expand(batch, 1, 1)
    clean_cond = x - sigma * cond  # [B, T, C]
    clean_uncond = x - sigma * uncond
    flat_cond = clean_cond.view(-1, channels).double()
    flat_uncond = clean_uncond.reshape(-1, channels).double()
    cos = (
        (flat_cond / torch.linalg.norm(flat_cond, dim=1, keepdim=True))
        * (flat_uncond / torch.linalg.norm(flat_uncond, dim=1, keepdim=True))
    ).sum(dim=1, keepdim=True)
    theta = torch.acos(cos.clamp(-1.0 + 1e-6, 1.0 - 1e-6)).view(batch, frames, 1)  # float64
    theta_new = torch.clip(weight * theta, -ADG_ANGLE_CLIP, ADG_ANGLE_CLIP)
    diff = (clean_cond - clean_uncond).view(-1, channels).float()
    base = clean_uncond.view(-1, channels).float()
    along = (diff * base).sum(dim=1, keepdim=True) / ((base * base).sum(dim=1, keepdim=True) + 1e-8)
    perpendicular = (diff - along * base).reshape(batch, frames, channels)
    sin = torch.sin(theta)
    rotated = torch.cos(theta_new) * clean_cond
    rotated = rotated + (
        perpendicular * torch.sin(theta_new) / sin * (sin > 1e-3)
        + perpendicular * weight * (sin <= 1e-3)
    )
    return ((x - rotated) / sigma).reshape(batch, frames, channels).to(x.dtype)
