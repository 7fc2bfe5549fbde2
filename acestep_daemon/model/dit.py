"""The diffusion transformer (`decoder.`): patchify, AdaLN DiT layers, unpatchify."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention, Band, Rope, additive_mask, rope
from .config import AceStepConfig
from .layers import MLP, RMSNorm, Transpose

TIMESTEP_SCALE = 1000.0
TIMESTEP_FEATURES = 256
MAX_PERIOD = 10_000
BAND_MIN_WINDOWS = 8
"""Banded attention starts above this many windows of patches (1024 patches, 82 s, for the
turbo window of 128): below it the dense mask costs little, and the results stay bit for bit
those of the official dense-mask attention."""
BAND_BLOCK_WINDOWS = 2
"""Queries per band block, in windows: each block reads its queries plus a window either side."""


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
        self_mask: torch.Tensor | Band | None,
        cos_sin: Rope,
        cross_keys_values: tuple[torch.Tensor, torch.Tensor],
        cross_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """x [B, P, D], modulation [B, 6, D], cross keys/values [B, H, Sc, head_dim] -> [B, P, D].

        Every condition token is attended, padding included (the official DiT drops the mask).
        """
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = (
            self.scale_shift_table + modulation
        ).chunk(6, dim=1)  # each [B, 1, D]
        h = self.self_attn_norm(x) * (1 + scale_a) + shift_a
        x = x + self.self_attn(h, self_mask, cos_sin) * gate_a
        x = x + self.cross_attn(self.cross_attn_norm(x), cross_mask, keys_values=cross_keys_values)
        h = self.mlp_norm(x) * (1 + scale_f) + shift_f
        return x + self.mlp(h) * gate_f


@dataclass
class StepConstants:
    """What every DiT call of one sampling run shares (`DiT.step_constants`): the sampler
    computes it once from the condition and passes it to each step."""

    cross_keys_values: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, [B, H, Sc, hd]
    patches: int
    cos_sin: Rope
    full_mask: torch.Tensor | None  # [1, 1, P, P] additive, None = attend to all
    sliding_mask: torch.Tensor | Band | None
    cross_mask: torch.Tensor | None  # [1, 1, P, Sc] zeros, or None


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
        self.reuse_step_constants = True
        """Fast path: the samplers compute `step_constants` once per sampling run and pass it
        to every step; off, each DiT call computes its own, as the official forward does."""
        self.mask_free_attention = True
        """Fast path: pass no mask where every key is attended (full layers, cross-attention,
        and sliding layers whose window covers the sequence) instead of an all-zero one."""
        self.banded_attention = True
        """Fast path: sliding layers attend block by block to the keys within their window
        (`Band`) once the sequence is longer than BAND_MIN_WINDOWS windows, instead of
        under a dense [P, P] mask."""

    def compile_layers(self) -> None:
        """Compile each layer's forward with `torch.compile` (opt-in fast path).

        The layers share one code object and dynamo treats their parameters as inputs, so
        one compilation serves every layer of a kind (full or sliding attention) and shape.
        """
        for layer in self.layers:
            layer.compile(dynamic=True)

    def step_constants(
        self, encoder_hidden: torch.Tensor, frames: int, dtype: torch.dtype
    ) -> StepConstants:
        """Condition embedding and cross-attention keys/values of encoder_hidden [B, S, D],
        RoPE tables and self-attention masks for latents of `frames` frames in `dtype`.

        Compute them with the weights (and any LoRA adapter) the steps will run with.
        """
        patches = -(-frames // self.config.patch_size)
        condition = self.condition_embedder(encoder_hidden)  # [B, S, D]
        cross = [layer.cross_attn.keys_values(condition) for layer in self.layers]
        device, window = encoder_hidden.device, self.config.sliding_window
        full = sliding = cross_mask = None
        if not self.mask_free_attention:  # the official dense masks
            full = additive_mask(patches, dtype, device)
            cross_mask = torch.zeros(1, 1, patches, condition.shape[1], dtype=dtype, device=device)
        if self.banded_attention and patches > BAND_MIN_WINDOWS * window:
            sliding = Band.build(patches, window, BAND_BLOCK_WINDOWS * window, dtype, device)
        elif not self.mask_free_attention or patches - 1 > window:
            sliding = additive_mask(patches, dtype, device, window)
        cos_sin = rope(patches, self.config, dtype, device)
        return StepConstants(cross, patches, cos_sin, full, sliding, cross_mask)

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        timestep_r: torch.Tensor,
        encoder_hidden: torch.Tensor,
        context: torch.Tensor,
        constants: StepConstants | None = None,
    ) -> torch.Tensor:
        """x [B, T, 64] noisy latents, timestep/timestep_r [B], encoder_hidden [B, S, De],
        context [B, T, 128] (source latents, chunk mask) -> velocity [B, T, 64].

        `constants`: `step_constants(encoder_hidden, T, dtype)`, computed once per sampling
        run (encoder_hidden is then not read); None computes them for this call.
        """
        temb_t, modulation_t = self.time_embed(timestep)
        temb_r, modulation_r = self.time_embed_r(timestep - timestep_r)
        temb = temb_t + temb_r  # [B, D]
        modulation = modulation_t + modulation_r  # [B, 6, D]

        h = torch.cat([context, x], dim=-1)  # [B, T, 192]: source, chunk mask, noisy latents
        frames = h.shape[1]
        if frames % self.config.patch_size:
            h = F.pad(h, (0, 0, 0, self.config.patch_size - frames % self.config.patch_size))
        h = self.proj_in(h)  # [B, P, D]
        if constants is None:
            constants = self.step_constants(encoder_hidden, frames, h.dtype)
        elif constants.patches != h.shape[1]:
            raise ValueError(f"step constants for {constants.patches} patches, not {h.shape[1]}")
        for index, layer in enumerate(self.layers):
            sliding = self.config.is_sliding(index)
            mask = constants.sliding_mask if sliding else constants.full_mask
            cross = constants.cross_keys_values[index]
            h = layer(h, modulation, mask, constants.cos_sin, cross, constants.cross_mask)

        shift, scale = (self.scale_shift_table + temb[:, None]).chunk(2, dim=1)  # [B, 1, D]
        h = self.norm_out(h) * (1 + scale) + shift
        return self.proj_out(h)[:, :frames]  # [B, T, 64]
