"""Building blocks shared by every stack: a row-folding Linear, RMSNorm, SwiGLU MLP, Transpose."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Linear):
    """`nn.Linear` that always multiplies one matrix: [..., in] -> rows [N, in] -> [..., out].

    The DiT's residual stream is a transposed view (the official `proj_in` ends with a
    transpose and nothing makes it contiguous). For a 3-D input that is not contiguous,
    torch folds the leading dimensions into one 2-D product only when the weight requires
    grad, as the official weights do; with gradients switched off it takes a batched product
    over the transposed rows instead, which rounds differently in fp32 and is several times
    slower in bf16 on the CPU. Folding explicitly (a copy into rows, then one product) gives
    the official kernel, and so its rounding, whatever `requires_grad` says.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])  # [N, in]: a view when x is contiguous, else a copy
        return F.linear(rows, self.weight, self.bias).view(*x.shape[:-1], -1)


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
        self.gate_proj = Linear(dim, hidden, bias=False)
        self.up_proj = Linear(dim, hidden, bias=False)
        self.down_proj = Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def float32_output(self, x: torch.Tensor) -> torch.Tensor:
        """The same MLP with the output projection in float32 (its weight upcast on the fly),
        for an output that would overflow x's dtype: [..., dim] -> [..., dim] float32."""
        hidden = F.silu(self.gate_proj(x)) * self.up_proj(x)  # [..., hidden]
        return F.linear(hidden.float(), self.down_proj.weight.float())


class Transpose(nn.Module):
    """Swap time and channels ([B, T, C] <-> [B, C, T]) inside an `nn.Sequential`.

    Exists so the DiT's patch convolutions keep their checkpoint names `proj_in.1`/`proj_out.1`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)
