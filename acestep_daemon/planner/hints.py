"""Audio codes -> the DiT's context hints (the LM's plan in the place of cover latents).

As the official handler does (`_decode_audio_codes_to_latents`, then the padding in
`generate_music`): the FSQ codebook entries of the codes, the detokenizer (each 5 Hz code
-> 5 frames of 25 Hz latents), then padded with the first frames of the silence latent or
cropped to the length of the song.
"""

from __future__ import annotations

import torch

from acestep_daemon.model import AceStepModel


@torch.inference_mode()
def codes_to_hints(
    model: AceStepModel, codes: torch.Tensor, silence_latent: torch.Tensor, frames: int
) -> torch.Tensor:
    """codes [T5] (0–63,999) -> hints [1, frames, C] in the model's dtype and device.

    silence_latent [1, >=frames, C] supplies the padding when 5·T5 < frames.
    """
    indices = codes.to(model.null_condition_emb.device, torch.long).view(1, -1, 1)  # [1, T5, 1]
    hints = model.detokenize(model.dequantize(indices))  # [1, 5·T5, C]
    if hints.shape[1] < frames:
        pad = silence_latent[:, : frames - hints.shape[1]].to(hints.device, hints.dtype)
        hints = torch.cat([hints, pad], dim=1)
    return hints[:, :frames]
