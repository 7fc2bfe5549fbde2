"""The diffusion transformer (`decoder.`): patchify, AdaLN DiT layers, unpatchify."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention, Rope, rope, self_attention_masks
from .config import AceStepConfig
from .layers import MLP, RMSNorm, Transpose

TIMESTEP_SCALE = 1000.0
TIMESTEP_FEATURES = 256
MAX_PERIOD = 10_000


def timestep_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of t [B] -> [B, dim] float32, cosines first.

    t·1000 is rounded in t's dtype (bf16: 0.953125 -> 952); the frequencies are float32,
    computed on the CPU like the official code so that every device sees the same values.
    """
    scaled = t * TIMESTEP_SCALE
    half = dim // 2
    freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, dtype=torch.float32) / half)
    args = scaled[:, None].float() * freqs.to(t.device)[None]  # [B, half]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedding(nn.Module):
    """t -> (temb [B, D], AdaLN projection [B, 6, D])."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)
        self.time_proj = nn.Linear(dim, dim * 6)

    def forward(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = timestep_features(t, self.linear_1.in_features).to(t.dtype)
        temb = self.linear_2(F.silu(self.linear_1(features)))  # [B, D], before any activation
        return temb, self.time_proj(F.silu(temb)).unflatten(1, (6, -1))  # [B, 6, D]


class DiTLayer(nn.Module):
    """AdaLN-modulated self-attention, plain cross-attention, AdaLN-modulated MLP.

    Modulation rows, in order: shift, scale, gate (self-attention), shift, scale, gate (MLP).
    """

    def __init__(self, config: AceStepConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.self_attn_norm = RMSNorm(dim, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.cross_attn_norm = RMSNorm(dim, config.rms_norm_eps)
        self.cross_attn = Attention(config)
        self.mlp_norm = RMSNorm(dim, config.rms_norm_eps)
        self.mlp = MLP(dim, config.intermediate_size)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self,
        x: torch.Tensor,
        modulation: torch.Tensor,
        self_mask: torch.Tensor,
        cos_sin: Rope,
        condition: torch.Tensor,
        cross_mask: torch.Tensor,
    ) -> torch.Tensor:
        """x [B, P, D], modulation [B, 6, D], condition [B, Sc, D] -> [B, P, D]."""
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = (
            self.scale_shift_table + modulation
        ).chunk(6, dim=1)  # each [B, 1, D]
        h = self.self_attn_norm(x) * (1 + scale_a) + shift_a
        x = x + self.self_attn(h, self_mask, cos_sin) * gate_a
        x = x + self.cross_attn(self.cross_attn_norm(x), cross_mask, context=condition)
        h = self.mlp_norm(x) * (1 + scale_f) + shift_f
        return x + self.mlp(h) * gate_f


class DiT(nn.Module):
    """Official `AceStepDiTModel`: predicts the flow velocity v = noise - data.

    Calling it is one DiT forward (`AceStepDiTModel.forward` with both padding masks unset, as
    the official forward forces them).
    """

    def __init__(self, config: AceStepConfig) -> None:
        super().__init__()
        self.config = config
        dim, patch = config.hidden_size, config.patch_size
        self.layers = nn.ModuleList(DiTLayer(config) for _ in range(config.num_hidden_layers))
        self.proj_in = nn.Sequential(
            Transpose(), nn.Conv1d(config.in_channels, dim, patch, stride=patch), Transpose()
        )
        self.time_embed = TimestepEmbedding(TIMESTEP_FEATURES, dim)
        self.time_embed_r = TimestepEmbedding(TIMESTEP_FEATURES, dim)
        self.condition_embedder = nn.Linear(config.encoder_width, dim)
        self.norm_out = RMSNorm(dim, config.rms_norm_eps)
        self.proj_out = nn.Sequential(
            Transpose(),
            nn.ConvTranspose1d(dim, config.audio_acoustic_hidden_dim, patch, stride=patch),
            Transpose(),
        )
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        timestep_r: torch.Tensor,
        encoder_hidden: torch.Tensor,
        context: torch.Tensor,
    ) -> torch.Tensor:
        """x [B, T, 64] noisy latents, timestep/timestep_r [B], encoder_hidden [B, S, De],
        context [B, T, 128] (source latents, chunk mask) -> velocity [B, T, 64]."""
        temb_t, modulation_t = self.time_embed(timestep)
        temb_r, modulation_r = self.time_embed_r(timestep - timestep_r)
        temb = temb_t + temb_r  # [B, D]
        modulation = modulation_t + modulation_r  # [B, 6, D]

        h = torch.cat([context, x], dim=-1)  # [B, T, 192]: source, chunk mask, noisy latents
        frames = h.shape[1]
        if frames % self.config.patch_size:
            h = F.pad(h, (0, 0, 0, self.config.patch_size - frames % self.config.patch_size))
        h = self.proj_in(h)  # [B, P, D]
        condition = self.condition_embedder(encoder_hidden)  # [B, S, D]

        patches, dtype, device = h.shape[1], h.dtype, h.device
        cos_sin = rope(patches, self.config, dtype, device)
        full, sliding = self_attention_masks(self.config, patches, dtype, device)
        # Every condition token is attended, padding included (the official DiT drops the mask).
        cross_mask = torch.zeros(1, 1, patches, condition.shape[1], dtype=dtype, device=device)
        for index, layer in enumerate(self.layers):
            mask = sliding if self.config.is_sliding(index) else full
            h = layer(h, modulation, mask, cos_sin, condition, cross_mask)

        shift, scale = (self.scale_shift_table + temb[:, None]).chunk(2, dim=1)  # [B, 1, D]
        h = self.norm_out(h) * (1 + scale) + shift
        return self.proj_out(h)[:, :frames]  # [B, T, 64]
