"""Parameter-light building blocks shared by every stack: RMSNorm, SwiGLU MLP, Transpose."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Qwen3 RMSNorm: normalise in float32, cast back, then scale by the weight."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class MLP(nn.Module):
    """down(SiLU(gate(x)) * up(x)), no biases."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Transpose(nn.Module):
    """Swap time and channels ([B, T, C] <-> [B, C, T]) inside an `nn.Sequential`.

    Exists so the DiT's patch convolutions keep their checkpoint names `proj_in.1`/`proj_out.1`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)
