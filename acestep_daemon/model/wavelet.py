"""One-level orthonormal Haar wavelet transform along the time axis of [B, T, C] latents."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

HAAR = 1.0 / math.sqrt(2.0)


def haar_split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, T, C] -> (low, high), each [B, ceil(T/2), C].

    Frames pair up as (0, 1), (2, 3), ...; an odd T gets one zero frame at the end (the
    "zero" boundary mode of the usual wavelet packages).
    """
    if x.shape[1] % 2:
        x = F.pad(x, (0, 0, 0, 1))
    even, odd = x[:, 0::2], x[:, 1::2]
    return (even + odd) * HAAR, (even - odd) * HAAR


def haar_merge(low: torch.Tensor, high: torch.Tensor, frames: int) -> torch.Tensor:
    """Inverse of `haar_split`: (low, high) [B, T2, C] -> [B, frames, C]."""
    even, odd = (low + high) * HAAR, (low - high) * HAAR
    return torch.stack([even, odd], dim=2).flatten(1, 2)[:, :frames]  # [B, 2·T2, C] -> T
