"""Multi-head attention of every ACE-Step stack: GQA, q/k RMSNorm, RoPE, banded masks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import AceStepConfig
from .layers import Linear, RMSNorm

Rope = tuple[torch.Tensor, torch.Tensor]
"""(cos, sin), each [1, S, head_dim] in the activation dtype."""


def rope_inv_freq(head_dim: int, theta: float, round_to: torch.dtype | None) -> torch.Tensor:
    """Rotary frequencies 1 / theta^(2j / head_dim) -> [head_dim / 2] float32 on the CPU.

    Computed on the CPU as the official buffer is; `round_to` rounds them through that dtype
    (the official model's `inv_freq` buffer is cast with the module by `.to(dtype)`).
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    return inv_freq if round_to is None else inv_freq.to(round_to).float()


def rope(length: int, config: AceStepConfig, dtype: torch.dtype, device: torch.device) -> Rope:
    """cos/sin tables for positions 0..length-1, angles in float32, cast to `dtype`."""
    round_to = dtype if config.rope_inv_freq_in_model_dtype else None
    inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, round_to).to(device)
    positions = torch.arange(length, device=device, dtype=torch.float32)
    angles = positions[:, None] * inv_freq[None, :]  # [S, head_dim / 2]
    angles = torch.cat([angles, angles], dim=-1)[None]  # [1, S, head_dim]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rope(x: torch.Tensor, cos_sin: Rope) -> torch.Tensor:
    """Rotate-half RoPE on [B, H, S, head_dim]."""
    cos, sin = (t.unsqueeze(1) for t in cos_sin)  # [1, 1, S, head_dim]
    return x * cos + _rotate_half(x) * sin


def additive_mask(
    length: int,
    dtype: torch.dtype,
    device: torch.device,
    window: int | None = None,
    key_padding: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bidirectional additive mask: 0 where attended, finfo(dtype).min elsewhere.

    window: keep only |i - j| <= window. key_padding: [B, S], 0 marks keys to ignore.
    Returns [1 or B, 1, S, S].
    """
    index = torch.arange(length, device=device)
    keep = torch.ones(length, length, dtype=torch.bool, device=device)
    if window is not None:
        keep = (index[:, None] - index[None, :]).abs() <= window
    keep = keep[None, None]  # [1, 1, S, S]
    if key_padding is not None:
        keep = keep & key_padding.to(torch.bool)[:, None, None, :]  # [B, 1, S, S]
    mask = torch.full(keep.shape, torch.finfo(dtype).min, dtype=dtype, device=device)
    return mask.masked_fill(keep, 0.0)


@dataclass(frozen=True)
class Band:
    """Sliding-window attention (|i - j| <= window) computed block by block.

    Each block of queries attends only to the keys within `window` of it, under a small
    additive mask; a dense [S, S] mask costs O(S^2) memory and compute where only
    O(S · window) entries matter. Keys outside the window get exactly zero weight either
    way, so the result equals the dense one up to the order of the softmax sums.
    """

    blocks: tuple[tuple[int, int, int, int, torch.Tensor], ...]
    """(query start, query end, key start, key end, mask [1, 1, Bq, Bk]) per block."""

    @classmethod
    def build(
        cls, length: int, window: int, block: int, dtype: torch.dtype, device: torch.device
    ) -> Band:
        blocks = []
        for start in range(0, length, block):
            end = min(start + block, length)
            low, high = max(0, start - window), min(length, end + window)
            queries = torch.arange(start, end, device=device)
            keys = torch.arange(low, high, device=device)
            keep = (queries[:, None] - keys[None, :]).abs() <= window  # [Bq, Bk]
            mask = torch.zeros(keep.shape, dtype=dtype, device=device)
            mask = mask.masked_fill(~keep, torch.finfo(dtype).min)[None, None]
            blocks.append((start, end, low, high, mask))
        return cls(tuple(blocks))

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """q, k, v [B, H, S, head_dim] -> [B, H, S, head_dim]."""
        parts = [
            F.scaled_dot_product_attention(
                q[:, :, start:end], k[:, :, low:high], v[:, :, low:high], mask, scale=scale
            )
            for start, end, low, high, mask in self.blocks
        ]
        return torch.cat(parts, dim=2)


def self_attention_masks(
    config: AceStepConfig,
    length: int,
    dtype: torch.dtype,
    device: torch.device,
    key_padding: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(full, sliding) masks for one stack; layer i uses the one `config.is_sliding(i)` picks."""
    full = additive_mask(length, dtype, device, key_padding=key_padding)
    sliding = additive_mask(length, dtype, device, config.sliding_window, key_padding)
    return full, sliding


class Attention(nn.Module):
    """Self- or cross-attention with RMS-normed queries and keys (per head) and GQA.

    Self-attention rotates q and k with RoPE; cross-attention reads keys and values from the
    condition sequence and has no RoPE.
    """

    def __init__(self, config: AceStepConfig) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.kv_repeats = config.num_attention_heads // config.num_key_value_heads
        q_width = config.num_attention_heads * config.head_dim
        kv_width = config.num_key_value_heads * config.head_dim
        bias = config.attention_bias
        self.q_proj = Linear(config.hidden_size, q_width, bias=bias)
        self.k_proj = Linear(config.hidden_size, kv_width, bias=bias)
        self.v_proj = Linear(config.hidden_size, kv_width, bias=bias)
        self.o_proj = Linear(q_width, config.hidden_size, bias=bias)
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, -1, self.head_dim).transpose(1, 2)  # [B, H, S, head_dim]

    def keys_values(
        self, source: torch.Tensor, cos_sin: Rope | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """source [B, Sk, D] -> (keys, values), each [B, H, Sk, head_dim] (GQA heads repeated).

        Keys are RMS-normed per head and, for self-attention, rotated.
        """
        k = self.k_norm(self.k_proj(source).view(*source.shape[:2], -1, self.head_dim))
        k = k.transpose(1, 2)  # [B, Hkv, Sk, head_dim]
        v = self._heads(self.v_proj(source))
        if cos_sin is not None:
            k = apply_rope(k, cos_sin)
        return k.repeat_interleave(self.kv_repeats, dim=1), v.repeat_interleave(
            self.kv_repeats, dim=1
        )

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | Band | None,
        cos_sin: Rope | None = None,
        context: torch.Tensor | None = None,
        keys_values: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x [B, S, D] -> [B, S, D]; mask: additive [1 or B, 1, S, Sk], a `Band`, or None
        (attend to all).

        Keys/values come from `keys_values` (see the method of that name) when given, else
        from `context` [B, Sc, D] (cross-attention), else from x. `cos_sin` rotates queries
        and keys (self-attention only).
        """
        batch, length, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(batch, length, -1, self.head_dim)).transpose(1, 2)
        if keys_values is None:
            keys_values = self.keys_values(x if context is None else context, cos_sin)
        if cos_sin is not None:
            q = apply_rope(q, cos_sin)
        k, v = keys_values
        scale = self.head_dim**-0.5
        if isinstance(mask, Band):
            y = mask.attend(q, k, v, scale)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return self.o_proj(y.transpose(1, 2).reshape(batch, length, -1))  # [B, S, D]
