"""The ACE-Step v1.5 audio VAE: an Oobleck autoencoder (48 kHz stereo <-> 64 x 25 Hz latents).

Our own port of diffusers' ``AutoencoderOobleck`` as ACE-Step v1.5 configures it
(``vae/config.json``). Attribute names are the checkpoint's key names, so
``vae/diffusion_pytorch_model.safetensors`` loads with ``strict=True`` and no renaming:

- every convolution is weight-normalised and keeps the stored ``weight_g`` / ``weight_v``
  tensors as plain parameters; the fused weight w = g · v / ‖v‖ (norm over every dim but
  dim 0, i.e. per output channel of a Conv1d and per *input* channel of a ConvTranspose1d)
  is computed by the same kernel as ``torch.nn.utils.weight_norm``, once and then reused while
  g and v stay unchanged (``OobleckVAE.fold_weight_norm``, on by default; off recomputes it
  in each forward as the reference does);
- Snake1d keeps ``alpha`` / ``beta`` in log space.

The module has no buffers, so it can be built under ``torch.device("meta")`` and filled with
``load_state_dict(sd, strict=True, assign=True)``. Checkpoints saved with the newer
parametrization API (``….parametrizations.weight.original0`` = g, ``original1`` = v) load
too: a load-state-dict pre-hook on each convolution renames those two keys.

Official stages: :meth:`OobleckVAE.encode` is the upstream ``vae.encode`` (we return the
posterior's mean and std; upstream *samples* mean + std · ε for source and reference audio,
our service uses the mean so that it is deterministic); :meth:`OobleckVAE.decode` is
``vae.decode``; :meth:`OobleckVAE.tiled_decode` and :meth:`OobleckVAE.tiled_encode` are the
handler's ``tiled_decode`` / ``tiled_encode`` (overlap-discard tiling, equal to one call).

Pure tensor code: no files, no device choice.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ChunkCallback = Callable[[int, int], None]
"""on_chunk(index, total), called before each chunk; it may raise to cancel."""

_PARAMETRIZED_G = "parametrizations.weight.original0"
_PARAMETRIZED_V = "parametrizations.weight.original1"


DECODE_CHUNK_FRAMES = 512
"""Latent frames per VAE decode tile when memory is plentiful (upstream's default)."""

DECODE_OVERLAP_FRAMES = 64
"""Context frames on each side of a decode tile (upstream's default)."""


@dataclass
class OobleckConfig:
    """The fields of ``vae/config.json`` (values shown are ACE-Step v1.5's)."""

    encoder_hidden_size: int = 128
    downsampling_ratios: list[int] = field(default_factory=lambda: [2, 4, 4, 6, 10])
    channel_multiples: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    decoder_channels: int = 128
    decoder_input_channels: int = 64
    audio_channels: int = 2
    sampling_rate: int = 48_000

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> OobleckConfig:
        """Build from a parsed ``config.json``; unknown keys (``_class_name`` …) are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in known})

    @property
    def hop_length(self) -> int:
        """Audio samples per latent frame (1920 for ACE-Step)."""
        return math.prod(self.downsampling_ratios)


class _WeightNormed(nn.Module):
    """Shared part of the weight-normalised convolutions: g, v, optional bias, the fusion."""

    def __init__(self, weight_shape: tuple[int, int, int], bias_size: int | None) -> None:
        super().__init__()
        self.weight_g = nn.Parameter(torch.empty(weight_shape[0], 1, 1))
        self.weight_v = nn.Parameter(torch.empty(weight_shape))
        self.bias = nn.Parameter(torch.zeros(bias_size)) if bias_size is not None else None
        # A random start (w = v, ‖w‖ ≈ 1 per slice) for tiny test checkpoints; loads overwrite it.
        nn.init.normal_(self.weight_v, std=1.0 / math.sqrt(weight_shape[1] * weight_shape[2]))
        with torch.no_grad():
            self.weight_g.copy_(torch.norm_except_dim(self.weight_v, 2, 0))
        self.register_load_state_dict_pre_hook(_rename_parametrized_keys)
        self.reuse_weight = True
        self._folded: tuple[tuple, torch.Tensor] | None = None

    def weight(self) -> torch.Tensor:
        # w = g · v / ‖v‖ per dim-0 slice; the same kernel as torch.nn.utils.weight_norm
        # (fp32 accumulation for half dtypes), as the reference computes it.
        return torch._weight_norm(self.weight_v, self.weight_g, 0)

    def folded_weight(self) -> torch.Tensor:
        """`weight()`, kept while g and v are the same tensors with the same contents.

        Not a parameter or buffer: the state dict still holds only g and v.
        """
        if not self.reuse_weight or torch.is_grad_enabled():
            return self.weight()
        g, v = self.weight_g, self.weight_v
        token = (g.data_ptr(), g._version, v.data_ptr(), v._version, v.dtype, v.device)
        if self._folded is None or self._folded[0] != token:
            self._folded = (token, self.weight())
        return self._folded[1]


def _rename_parametrized_keys(
    module: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str, *_: Any
) -> None:
    """Accept ``parametrizations.weight.original0/1`` as ``weight_g`` / ``weight_v``."""
    for old, new in ((_PARAMETRIZED_G, "weight_g"), (_PARAMETRIZED_V, "weight_v")):
        if prefix + old in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)


class WNConv1d(_WeightNormed):
    """Weight-normalised Conv1d; v is [out, in, k], g is [out, 1, 1]."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__((out_channels, in_channels, kernel_size), out_channels if bias else None)
        self.stride, self.padding, self.dilation = stride, padding, dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [B, in, L] -> [B, out, L']
        w = self.folded_weight()
        return F.conv1d(x, w, self.bias, self.stride, self.padding, self.dilation)


class WNConvTranspose1d(_WeightNormed):
    """Weight-normalised ConvTranspose1d; v is [in, out, k], g is [in, 1, 1] (norm per input)."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int, padding: int
    ) -> None:
        super().__init__((in_channels, out_channels, kernel_size), out_channels)
        self.stride, self.padding = stride, padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [B, in, L] -> [B, out, L · stride] (kernel 2·stride, padding ceil(stride/2))
        return F.conv_transpose1d(x, self.folded_weight(), self.bias, self.stride, self.padding)


class Snake1d(nn.Module):
    """Snake activation x + sin²(αx)/β with per-channel α, β stored as logarithms."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(1, channels, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [B, C, L]; the 1e-9 keeps the reciprocal finite (same op order as the reference)
        alpha, beta = self.alpha.exp(), self.beta.exp()
        if torch.is_grad_enabled():
            return x + (beta + 1e-9).reciprocal() * torch.sin(alpha * x).pow(2)
        # The same operations in one buffer (same values, fewer passes over fresh memory).
        y = alpha * x
        return y.sin_().pow_(2).mul_((beta + 1e-9).reciprocal()).add_(x)


class ResidualUnit(nn.Module):
    """x + conv1x1(snake(dilated conv7(snake(x)))); the length is preserved."""

    def __init__(self, channels: int, dilation: int) -> None:
        super().__init__()
        self.snake1 = Snake1d(channels)
        self.conv1 = WNConv1d(channels, channels, 7, dilation=dilation, padding=3 * dilation)
        self.snake2 = Snake1d(channels)
        self.conv2 = WNConv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [B, C, L] -> [B, C, L]
        return x + self.conv2(self.snake2(self.conv1(self.snake1(x))))


class EncoderBlock(nn.Module):
    """Three residual units at the input width, then a strided conv down by ``stride``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.res_unit1 = ResidualUnit(in_channels, dilation=1)
        self.res_unit2 = ResidualUnit(in_channels, dilation=3)
        self.res_unit3 = ResidualUnit(in_channels, dilation=9)
        self.snake1 = Snake1d(in_channels)
        self.conv1 = WNConv1d(
            in_channels, out_channels, 2 * stride, stride=stride, padding=math.ceil(stride / 2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [B, in, L] -> [B, out, L // stride]
        x = self.res_unit3(self.res_unit2(self.res_unit1(x)))
        return self.conv1(self.snake1(x))


class DecoderBlock(nn.Module):
    """A transposed conv up by ``stride``, then three residual units at the output width."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.snake1 = Snake1d(in_channels)
        self.conv_t1 = WNConvTranspose1d(
            in_channels, out_channels, 2 * stride, stride=stride, padding=math.ceil(stride / 2)
        )
        self.res_unit1 = ResidualUnit(out_channels, dilation=1)
        self.res_unit2 = ResidualUnit(out_channels, dilation=3)
        self.res_unit3 = ResidualUnit(out_channels, dilation=9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [B, in, L] -> [B, out, L · stride]
        x = self.conv_t1(self.snake1(x))
        return self.res_unit3(self.res_unit2(self.res_unit1(x)))


class OobleckEncoder(nn.Module):
    """Waveform [B, audio_channels, S] -> mean ‖ scale [B, encoder_hidden_size, S // hop]."""

    def __init__(self, cfg: OobleckConfig) -> None:
        super().__init__()
        width = [cfg.encoder_hidden_size * m for m in [1, *cfg.channel_multiples]]
        self.conv1 = WNConv1d(cfg.audio_channels, width[0], 7, padding=3)
        self.block = nn.ModuleList(
            EncoderBlock(width[i], width[i + 1], stride)
            for i, stride in enumerate(cfg.downsampling_ratios)
        )
        self.snake1 = Snake1d(width[-1])
        self.conv2 = WNConv1d(width[-1], cfg.encoder_hidden_size, 3, padding=1)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        x = self.conv1(audio)  # [B, h, S]
        for block in self.block:
            x = block(x)  # strides 2, 4, 4, 6, 10 -> [B, h · 16, S // 1920]
        return self.conv2(self.snake1(x))  # [B, h, T]


class OobleckDecoder(nn.Module):
    """Latents [B, decoder_input_channels, T] -> waveform [B, audio_channels, T · hop]."""

    def __init__(self, cfg: OobleckConfig) -> None:
        super().__init__()
        width = [cfg.decoder_channels * m for m in [1, *cfg.channel_multiples]][::-1]
        self.conv1 = WNConv1d(cfg.decoder_input_channels, width[0], 7, padding=3)
        self.block = nn.ModuleList(
            DecoderBlock(width[i], width[i + 1], stride)
            for i, stride in enumerate(reversed(cfg.downsampling_ratios))
        )
        self.snake1 = Snake1d(width[-1])
        self.conv2 = WNConv1d(width[-1], cfg.audio_channels, 7, padding=3, bias=False)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        x = self.conv1(latents)  # [B, c · 16, T]
        for block in self.block:
            x = block(x)  # strides 10, 6, 4, 4, 2 -> [B, c, T · 1920]
        return self.conv2(self.snake1(x))  # [B, 2, T · 1920]; no tanh, no clamp


class OobleckVAE(nn.Module):
    """ACE-Step's audio VAE: ``encoder`` and ``decoder`` with the checkpoint's key names."""

    def __init__(self, cfg: OobleckConfig) -> None:
        super().__init__()
        self.config = cfg
        self.hop_length = cfg.hop_length
        self.encoder = OobleckEncoder(cfg)
        self.decoder = OobleckDecoder(cfg)

    @property
    def fold_weight_norm(self) -> bool:
        """Fast path: each convolution's weight g · v / ‖v‖ is computed once (at the first
        forward without gradients) and reused by every chunk, instead of at each call."""
        return all(m.reuse_weight for m in self.modules() if isinstance(m, _WeightNormed))

    @fold_weight_norm.setter
    def fold_weight_norm(self, enabled: bool) -> None:
        for module in self.modules():
            if isinstance(module, _WeightNormed):
                module.reuse_weight = enabled
                module._folded = None

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> OobleckVAE:
        """Build from a parsed ``vae/config.json`` (parameters on the current default device)."""
        return cls(OobleckConfig.from_dict(config))

    def encode(self, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Upstream ``vae.encode``: audio [B, 2, S] -> (mean, std), each [B, 64, S // 1920].

        std = softplus(scale) + 1e-4. Upstream draws ``latent_dist.sample()`` (mean + std · ε);
        callers here use the mean, so the service is deterministic.
        """
        mean, scale = self.encoder(audio).chunk(2, dim=1)
        return mean, F.softplus(scale) + 1e-4

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Upstream ``vae.decode``: latents [B, 64, T] -> audio [B, 2, T · 1920]."""
        return self.decoder(latents)

    def tiled_decode(
        self,
        latents: torch.Tensor,
        chunk_frames: int = DECODE_CHUNK_FRAMES,
        overlap_frames: int | None = None,
        on_chunk: ChunkCallback | None = None,
    ) -> torch.Tensor:
        """Upstream ``tiled_decode``: latents [B, 64, T] -> audio [B, 2, T · 1920] in windows.

        Cores of ``chunk_frames - 2 · overlap_frames`` frames are decoded with up to
        ``overlap_frames`` of context on each side, which is then cut off; the decoder's
        receptive field (about ±10 frames) is far smaller, so the result equals
        :meth:`decode`. As upstream, the overlap is halved until the core is positive, and
        latents no longer than one chunk are decoded in one call. Without ``overlap_frames``
        the overlap is a quarter of the chunk, at most ``DECODE_OVERLAP_FRAMES``.
        """
        if overlap_frames is None:
            overlap_frames = min(DECODE_OVERLAP_FRAMES, chunk_frames // 4)
        frames = latents.shape[-1]
        while chunk_frames - 2 * overlap_frames <= 0 and overlap_frames > 0:
            overlap_frames //= 2
        windows = _windows(frames, chunk_frames, overlap_frames)
        pieces = []
        for index, (win_start, core_start, core_end, win_end) in enumerate(windows):
            if on_chunk is not None:
                on_chunk(index, len(windows))
            audio = self.decode(latents[..., win_start:win_end])  # [B, 2, (win_end-win_start)·hop]
            keep_from = (core_start - win_start) * self.hop_length
            keep_to = audio.shape[-1] - (win_end - core_end) * self.hop_length
            pieces.append(audio[..., keep_from:keep_to])
        return torch.cat(pieces, dim=-1)

    def tiled_encode(
        self,
        audio: torch.Tensor,
        chunk_samples: int = 1_440_000,
        overlap_samples: int = 96_000,
        on_chunk: ChunkCallback | None = None,
    ) -> torch.Tensor:
        """Upstream ``tiled_encode`` with the mean: audio [B, 2, S] -> mean [B, 64, S // 1920].

        Defaults are upstream's for GPUs over 8 GB (30 s windows, 2 s overlap; upstream uses
        15 s on smaller GPUs). Each window's latents are trimmed by round(overlap / factor)
        frames per side, factor = samples / frames of the first window (1920 whenever the
        sizes are multiples of the hop), then the cores are concatenated.
        """
        samples = audio.shape[-1]
        if chunk_samples - 2 * overlap_samples <= 0:
            raise ValueError(f"chunk_samples {chunk_samples} must exceed 2 × {overlap_samples}")
        windows = _windows(samples, chunk_samples, overlap_samples)
        factor: float | None = None
        pieces = []
        for index, (win_start, core_start, core_end, win_end) in enumerate(windows):
            if on_chunk is not None:
                on_chunk(index, len(windows))
            mean, _ = self.encode(audio[..., win_start:win_end])  # [B, 64, frames]
            if factor is None:
                factor = (win_end - win_start) / mean.shape[-1]
            keep_from = round((core_start - win_start) / factor)
            keep_to = mean.shape[-1] - round((win_end - core_end) / factor)
            pieces.append(mean[..., keep_from:keep_to])
        return torch.cat(pieces, dim=-1)


def _windows(length: int, chunk: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """(window start, core start, core end, window end) per chunk; one window if it fits."""
    if length <= chunk:
        return [(0, 0, length, length)]
    stride = chunk - 2 * overlap
    windows = []
    for core_start in range(0, length, stride):
        core_end = min(core_start + stride, length)
        win_start, win_end = max(0, core_start - overlap), min(length, core_end + overlap)
        windows.append((win_start, core_start, core_end, win_end))
    return windows
