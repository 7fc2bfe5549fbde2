"""DCW, Differential Correction in the Wavelet domain: a training-free sampler-side correction.

After each sampler step the new latent x is pushed away from the step's clean estimate
y = x_t - v·t, band by band: x_band <- x_band + s·(x_band - y_band), with a one-level Haar
transform along time (Yu et al., "Elucidating the SNR-t Bias of Diffusion Probabilistic
Models", CVPR 2026; upstream `acestep/models/common/dcw_correction.py`). Strengths per mode at
timestep t: "low" t·scaler on the low band; "high" (1 - t)·scaler on the high band; "double"
both, t·scaler low and (1 - t)·high_scaler high; "pix" the raw scaler on the latent itself.
The wavelet arithmetic is float32; the result takes the latent's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from acestep_daemon.family import DCW_MODES

from .wavelet import haar_merge, haar_split


@dataclass(frozen=True)
class DcwSettings:
    """One DCW configuration; the defaults are upstream's (grid-searched for ACE-Step)."""

    mode: str = "double"
    scaler: float = 0.05
    high_scaler: float = 0.02

    def __post_init__(self) -> None:
        if self.mode not in DCW_MODES:
            raise ValueError(f"dcw mode must be one of {', '.join(DCW_MODES)}, not {self.mode!r}")

    def band_strengths(self, t: float) -> tuple[float, float]:
        """(low, high) strengths at timestep t for the wavelet modes."""
        if self.mode == "low":
            return t * self.scaler, 0.0
        if self.mode == "high":
            return 0.0, (1.0 - t) * self.scaler
        return t * self.scaler, (1.0 - t) * self.high_scaler


def dcw_correct(
    x: torch.Tensor, denoised: torch.Tensor, t: float, settings: DcwSettings
) -> torch.Tensor:
    """Corrected latent [B, T, C] from the stepped latent x and the clean estimate `denoised`."""
    if settings.mode == "pix":
        return x if settings.scaler == 0.0 else x + settings.scaler * (x - denoised)
    low_s, high_s = settings.band_strengths(t)
    if low_s == 0.0 and high_s == 0.0:
        return x
    x_low, x_high = haar_split(x.float())
    y_low, y_high = haar_split(denoised.float())
    if low_s != 0.0:
        x_low = x_low + low_s * (x_low - y_low)
    if high_s != 0.0:
        x_high = x_high + high_s * (x_high - y_high)
    return haar_merge(x_low, x_high, x.shape[1]).to(x.dtype)
