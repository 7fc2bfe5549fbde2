"""`AceStepModel`: a whole DiT checkpoint (decoder, encoder, tokenizer, detokenizer)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .config import AceStepConfig
from .dit import DiT
from .encoders import ConditionEncoder
from .tokenizer import AudioTokenizer, Detokenizer


class AceStepModel(nn.Module):
    """Any ACE-Step v1.5 DiT: 2 B or XL, turbo, sft or base (official
    `AceStepConditionGenerationModel`; the variants share one module tree and key names).

    Attribute names are the checkpoint's key prefixes, and the module owns no buffers, so
    `with torch.device("meta"): AceStepModel.from_config(cfg)` followed by
    `load_state_dict(sd, strict=True, assign=True)` yields a ready model.

    Official stages: `encode_condition` = `AceStepConditionEncoder.forward`; `build_context`
    = the context part of `prepare_condition`; `decoder(...)` = one `AceStepDiTModel.forward`;
    `tokenize`/`detokenize` = the model's `tokenize`/`detokenize`; full generation
    (`generate_audio`) is `sampler.sample_turbo`.
    """

    def __init__(self, config: AceStepConfig) -> None:
        super().__init__()
        self.config = config
        self.decoder = DiT(config)
        encoder_config = config.for_encoder()
        self.encoder = ConditionEncoder(encoder_config)
        self.tokenizer = AudioTokenizer(encoder_config)
        self.detokenizer = Detokenizer(encoder_config)
        # Learned unconditional condition: the null half of the guided (sft/base) batch.
        self.null_condition_emb = nn.Parameter(torch.randn(1, 1, config.encoder_width))

    @classmethod
    def from_config(cls, config: dict[str, Any] | AceStepConfig) -> AceStepModel:
        """Build from a parsed `config.json` (or an `AceStepConfig`)."""
        if not isinstance(config, AceStepConfig):
            config = AceStepConfig.from_dict(config)
        return cls(config)

    def encode_condition(
        self,
        text_hidden: torch.Tensor,
        text_mask: torch.Tensor,
        lyric_hidden: torch.Tensor,
        lyric_mask: torch.Tensor,
        refer_latents: torch.Tensor,
        refer_order: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Condition sequence for the DiT's cross-attention.

        text_hidden [B, Lt, Dt] (Qwen3 last hidden states), lyric_hidden [B, Ll, Dt] (Qwen3
        embedding rows), masks [B, L]; refer_latents [N, Tr, 64] with refer_order [N] long
        (batch item of each reference) -> (hidden [B, S, D], mask [B, S] bool).
        """
        return self.encoder(
            text_hidden, text_mask, lyric_hidden, lyric_mask, refer_latents, refer_order
        )

    def build_context(
        self,
        src_latents: torch.Tensor,
        chunk_mask: torch.Tensor,
        cover_hints: torch.Tensor | None = None,
        is_cover: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """DiT context [B, T, 128] = [source latents or cover hints, chunk mask].

        src_latents [B, T, 64]; chunk_mask [B, T] (1 = generate, 0 = keep the source);
        cover_hints [B, >=T, 64] replace the source of the items where is_cover [B] is true
        (of every item when is_cover is None).
        """
        frames = src_latents.shape[1]
        if cover_hints is not None:
            cover = torch.ones_like(chunk_mask[:, 0], dtype=torch.bool)
            if is_cover is not None:
                cover = is_cover.to(torch.bool)
            src_latents = torch.where(cover[:, None, None], cover_hints[:, :frames], src_latents)
        mask = chunk_mask[..., None].expand(-1, -1, src_latents.shape[-1]).to(src_latents.dtype)
        return torch.cat([src_latents, mask], dim=-1)

    def tokenize(
        self, latents: torch.Tensor, silence_latent: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """latents [N, T, 64] -> (quantized [N, T5, D], indices [N, T5, Q] int32), T5 = ceil(T/W).

        A partial last window is completed with the first frames of silence_latent [1, Ts, 64].
        """
        width = self.config.pool_window_size
        n, frames, channels = latents.shape
        if frames % width:
            pad = silence_latent[:1, : width - frames % width].repeat(n, 1, 1)
            latents = torch.cat([latents, pad], dim=1)
        return self.tokenizer(latents.reshape(n, -1, width, channels))

    def detokenize(self, quantized: torch.Tensor) -> torch.Tensor:
        """quantized [N, T5, D] -> cover hints [N, T5·W, 64] at 25 Hz."""
        return self.detokenizer(quantized)

    def dequantize(self, indices: torch.Tensor) -> torch.Tensor:
        """FSQ code indices [N, T5, Q] -> quantized [N, T5, D] (audio codes -> detokenize)."""
        return self.tokenizer.quantizer.dequantize(indices, self.null_condition_emb.dtype)
