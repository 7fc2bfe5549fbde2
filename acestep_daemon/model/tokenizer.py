"""Cover-mode audio tokenizer (25 Hz latents -> 5 Hz FSQ codes) and detokenizer (codes -> hints).

The quantizer reproduces `vector_quantize_pytorch.ResidualFSQ` (>= 1.26: symmetric levels,
soft clamp then hard clamp); its constants are computed per call, so the module has no buffers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import AceStepConfig
from .encoders import EncoderStack

QUANTIZE_DTYPES = (torch.float32, torch.float64)


def _basis(levels: torch.Tensor) -> torch.Tensor:
    """Mixed-radix place values of the code digits: [1, L0, L0·L1, ...]."""
    return torch.cumprod(torch.cat([levels.new_ones(1), levels[:-1]]), dim=0)


def fsq(z: torch.Tensor, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric finite scalar quantization of z [..., C] with `levels` [C] (int32).

    Level k of L maps to 2k/(L-1) - 1 (the grid includes ±1); computed in float32.
    Returns (codes [..., C] in z's dtype, index [...] int32).
    """
    dtype = z.dtype
    if dtype not in QUANTIZE_DTYPES:
        z = z.float()
    steps = levels - 1
    step = 2.0 / steps
    level = torch.floor(steps * (z.clamp(-1.0, 1.0) + 1) / 2.0 + 0.5)
    codes = step * level - 1.0
    index = ((codes + 1.0) / step * _basis(levels)).sum(dim=-1).round().to(torch.int32)
    return codes.to(dtype), index


def fsq_codes(indices: torch.Tensor, levels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Codebook entries of `indices` [...] -> [..., C], computed in `dtype`.

    The official codebook buffer is built while the model's dtype is the default dtype, so
    under bf16 its grid is formed in bf16 arithmetic (e.g. 0.140625 instead of 1/7).
    """
    digits = (indices.long()[..., None] // _basis(levels)) % levels  # [..., C]
    return digits.to(dtype) * (2.0 / (levels - 1)).to(dtype) - 1.0


class ResidualFSQ(nn.Module):
    """project_in -> soft clamp -> FSQ per quantizer on the scaled residual -> project_out.

    With `float32` (XL) the whole forward, projections included, runs in float32 and the
    result is cast back to the input dtype, as the official XL tokenizer does.
    """

    def __init__(
        self, dim: int, levels: tuple[int, ...], num_quantizers: int, float32: bool = False
    ) -> None:
        super().__init__()
        self.levels = levels
        self.num_quantizers = num_quantizers
        self.float32 = float32
        self.project_in = nn.Linear(dim, len(levels))
        self.project_out = nn.Linear(len(levels), dim)

    def _constants(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
        levels = torch.tensor(self.levels, dtype=torch.int32, device=device)
        clamp = (1 + 1 / (levels - 1)).to(dtype)  # c = 1 + 1/(L-1), bf16: 1.140625 and 1.25
        scales = [(levels.float() ** -q).to(dtype) for q in range(self.num_quantizers)]
        return levels, clamp, torch.stack(scales)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, T, D] -> (quantized [N, T, D], indices [N, T, num_quantizers] int32)."""
        if self.float32 and x.dtype != torch.float32:
            quantized, indices = self._quantize(x.float(), torch.float32)
            return quantized.to(x.dtype), indices
        return self._quantize(x, None)

    def _quantize(
        self, x: torch.Tensor, weight_dtype: torch.dtype | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The quantizer with the projection weights cast to `weight_dtype` (None: as stored)."""

        def linear(layer: nn.Linear, h: torch.Tensor) -> torch.Tensor:
            if weight_dtype is None:
                return layer(h)
            return F.linear(h, layer.weight.to(weight_dtype), layer.bias.to(weight_dtype))

        z = linear(self.project_in, x)  # [N, T, C]
        levels, clamp, scales = self._constants(z.dtype, z.device)
        residual = (z / clamp).tanh() * clamp
        quantized: torch.Tensor | float = 0.0
        indices = []
        for scale in scales:
            codes, index = fsq(residual / scale, levels)
            codes = codes * scale
            residual = residual - codes
            quantized = quantized + codes
            indices.append(index)
        return linear(self.project_out, quantized), torch.stack(indices, dim=-1)

    def dequantize(self, indices: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """indices [N, T, num_quantizers] -> quantized [N, T, D] (official
        `get_output_from_indices`)."""
        levels, _, scales = self._constants(dtype, indices.device)
        codes = fsq_codes(indices, levels, dtype) * scales  # [N, T, Q, C]
        return self.project_out(codes.sum(dim=-2))


class AttentionPooler(EncoderStack):
    """Pools each window of frames into the output at a prepended special token."""

    def __init__(self, config: AceStepConfig) -> None:
        super().__init__(config, config.hidden_size, config.num_attention_pooler_hidden_layers)
        self.special_token = nn.Parameter(torch.randn(1, 1, config.hidden_size) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, T5, W, D] -> [N, T5, D]."""
        n, windows, width, dim = x.shape
        x = self.embed_tokens(x)
        x = torch.cat([self.special_token.expand(n, windows, 1, dim), x], dim=2)
        pooled = self.run_layers(x.reshape(n * windows, width + 1, dim))[:, 0]  # [N·T5, D]
        return pooled.reshape(n, windows, dim)


class AudioTokenizer(nn.Module):
    """Official `AceStepAudioTokenizer`: latents [N, T5, W, 64] -> 5 Hz quantized states."""

    def __init__(self, config: AceStepConfig) -> None:
        super().__init__()
        self.audio_acoustic_proj = nn.Linear(config.audio_acoustic_hidden_dim, config.hidden_size)
        self.attention_pooler = AttentionPooler(config)
        self.quantizer = ResidualFSQ(
            config.fsq_dim,
            config.fsq_input_levels,
            config.fsq_input_num_quantizers,
            float32=config.is_xl,
        )

    def forward(self, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """windows [N, T5, W, 64] -> (quantized [N, T5, D], indices [N, T5, Q] int32)."""
        return self.quantizer(self.attention_pooler(self.audio_acoustic_proj(windows)))


class Detokenizer(EncoderStack):
    """Official `AudioTokenDetokenizer`: each 5 Hz state -> W frames of 25 Hz latents."""

    def __init__(self, config: AceStepConfig) -> None:
        super().__init__(config, config.hidden_size, config.num_attention_pooler_hidden_layers)
        width = config.pool_window_size
        self.special_tokens = nn.Parameter(torch.randn(1, width, config.hidden_size) * 0.02)
        self.proj_out = nn.Linear(config.hidden_size, config.audio_acoustic_hidden_dim)

    def forward(self, quantized: torch.Tensor) -> torch.Tensor:
        """quantized [N, T5, D] -> hints [N, T5·W, 64]."""
        n, tokens, dim = quantized.shape
        width = self.special_tokens.shape[1]
        x = self.embed_tokens(quantized)[:, :, None].repeat(1, 1, width, 1)  # [N, T5, W, D]
        x = (x + self.special_tokens.expand(n, tokens, -1, -1)).reshape(n * tokens, width, dim)
        hints = self.proj_out(self.run_layers(x))  # [N·T5, W, 64]
        return hints.reshape(n, tokens * width, -1)
