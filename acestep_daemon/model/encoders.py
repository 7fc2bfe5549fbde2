"""Bidirectional encoder stacks and the condition encoder (text, lyrics, timbre -> one sequence)."""

from __future__ import annotations

import torch
from torch import nn

from .attention import Attention, Rope, rope, self_attention_masks
from .config import AceStepConfig
from .layers import MLP, RMSNorm


class EncoderLayer(nn.Module):
    """Pre-norm transformer layer: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: AceStepConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, cos_sin: Rope, float32_output: bool = False
    ) -> torch.Tensor:
        """x [B, S, D] -> [B, S, D]; with `float32_output` the MLP's output projection and the
        last residual sum are float32 (and so is the result)."""
        x = x + self.self_attn(self.input_layernorm(x), mask, cos_sin)
        if float32_output:
            return x.float() + self.mlp.float32_output(self.post_attention_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class EncoderStack(nn.Module):
    """`embed_tokens` (a Linear), `layers`, final `norm`: the shape shared by the lyric and
    timbre encoders, the tokenizer's attention pooler and the detokenizer."""

    def __init__(self, config: AceStepConfig, in_dim: int, num_layers: int) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Linear(in_dim, config.hidden_size)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def run_layers(
        self,
        x: torch.Tensor,
        key_padding: torch.Tensor | None = None,
        float32_last_projection: bool = False,
    ) -> torch.Tensor:
        """Layers + final norm over x [B, S, D] (RoPE positions 0..S-1) -> [B, S, D].

        key_padding [B, S] (0 = ignore as key) is combined with every layer's mask. With
        `float32_last_projection` the last layer's MLP output projection, the stream after it
        and the final norm are float32, and so is the result.
        """
        cos_sin = rope(x.shape[1], self.config, x.dtype, x.device)
        full, sliding = self_attention_masks(
            self.config, x.shape[1], x.dtype, x.device, key_padding
        )
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            mask = sliding if self.config.is_sliding(index) else full
            x = layer(x, mask, cos_sin, float32_output=float32_last_projection and index == last)
        return self.norm(x)


class LyricEncoder(EncoderStack):
    """Lyric token embeddings (Qwen3 embedding rows) -> contextual lyric states.

    In float16 the last layer's MLP output projection runs in float32: on the real checkpoints
    its output reaches about 5e5 while every activation before it stays near 1e4, and float16
    ends at 65504, so the stream became inf and the final norm NaN (songs with lyrics failed
    on GPUs without bf16, upstream ACE-Step-1.5 issues #1243 and #1055). The final norm brings
    the float32 stream back into range; the output is float16 again.
    """

    def __init__(self, config: AceStepConfig) -> None:
        super().__init__(config, config.text_hidden_dim, config.num_lyric_encoder_hidden_layers)

    def forward(self, lyric_hidden: torch.Tensor, lyric_mask: torch.Tensor) -> torch.Tensor:
        """lyric_hidden [B, L, Dt], lyric_mask [B, L] -> [B, L, D]; padded keys are masked."""
        x = self.embed_tokens(lyric_hidden)  # [B, L, D]
        half = x.dtype == torch.float16
        return self.run_layers(x, lyric_mask, float32_last_projection=half).to(x.dtype)


class TimbreEncoder(EncoderStack):
    """Reference latents -> one timbre vector per reference, unpacked per batch item.

    XL prepends `special_token` as a CLS token and reads the output there; the 2 B models keep
    the parameter in the checkpoint but read the output at the first reference frame.
    """

    def __init__(self, config: AceStepConfig) -> None:
        super().__init__(config, config.timbre_hidden_dim, config.num_timbre_encoder_hidden_layers)
        self.special_token = nn.Parameter(torch.randn(1, 1, config.hidden_size))
        self.prepend_cls = config.is_xl

    def forward(
        self, refer_latents: torch.Tensor, refer_order: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """refer_latents [N, Tr, 64], refer_order [N] (batch item of each reference) ->
        (timbre [B, M, D], mask [B, M] long), M = most references of one item."""
        x = self.embed_tokens(refer_latents)  # [N, Tr, D]
        if self.prepend_cls:
            x = torch.cat([self.special_token.expand(x.shape[0], 1, -1), x], dim=1)
        pooled = self.run_layers(x)[:, 0]  # CLS (XL) or frame 0 (2 B): [N, D]
        return unpack_references(pooled, refer_order)


def unpack_references(
    pooled: torch.Tensor, order: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Place reference n at (order[n], rank of n among its item's references); zeros elsewhere."""
    count = order.shape[0]
    batch = int(order.max()) + 1
    earlier = torch.arange(count, device=order.device)
    same_item = order[:, None] == order[None, :]  # [N, N]
    rank = (same_item & (earlier[None, :] < earlier[:, None])).sum(dim=1)  # [N]
    slots = int(rank.max()) + 1
    out = pooled.new_zeros(batch, slots, pooled.shape[-1])
    out[order, rank] = pooled
    mask = torch.zeros(batch, slots, dtype=torch.long, device=pooled.device)
    mask[order, rank] = 1
    return out, mask


def pack_sequences(
    first: torch.Tensor, second: torch.Tensor, first_mask: torch.Tensor, second_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate [B, L1, D] and [B, L2, D], then move valid tokens to the front.

    The sort is stable, so valid tokens keep their order (first's, then second's), followed by
    the padding in its original order. Returns (packed [B, L1+L2, D], mask [B, L1+L2] bool).
    """
    hidden = torch.cat([first, second], dim=1)
    mask = torch.cat([first_mask.long(), second_mask.long()], dim=1)  # [B, L]
    order = mask.argsort(dim=1, descending=True, stable=True)
    packed = hidden.gather(1, order[..., None].expand_as(hidden))
    positions = torch.arange(mask.shape[1], device=mask.device)
    return packed, positions[None, :] < mask.sum(dim=1, keepdim=True)


class ConditionEncoder(nn.Module):
    """Official `AceStepConditionEncoder`: text projector, lyric encoder, timbre encoder."""

    def __init__(self, config: AceStepConfig) -> None:
        super().__init__()
        self.text_projector = nn.Linear(config.text_hidden_dim, config.hidden_size, bias=False)
        self.lyric_encoder = LyricEncoder(config)
        self.timbre_encoder = TimbreEncoder(config)

    def forward(
        self,
        text_hidden: torch.Tensor,
        text_mask: torch.Tensor,
        lyric_hidden: torch.Tensor,
        lyric_mask: torch.Tensor,
        refer_latents: torch.Tensor,
        refer_order: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (condition [B, S, D], mask [B, S]); order per item: lyrics, timbre, text, pads."""
        text = self.text_projector(text_hidden)  # [B, Lt, D]
        lyrics = self.lyric_encoder(lyric_hidden, lyric_mask)  # [B, Ll, D]
        timbre, timbre_mask = self.timbre_encoder(refer_latents, refer_order)  # [B, M, D]
        hidden, mask = pack_sequences(lyrics, timbre, lyric_mask, timbre_mask)
        return pack_sequences(hidden, text, mask, text_mask)
