"""Our PyTorch port of the ACE-Step v1.5 generation networks (pure tensor code).

Every DiT of the family (2 B and XL; turbo, sft, base) is one `AceStepModel`; turbo samples
with `sample_turbo`, sft/base with the guided sampler; both take Euler, Heun or SDE steps.
Nothing here opens files, tokenizes text or picks devices; `pipeline.py` wires it up.
"""

from .acestep import AceStepModel
from .config import AceStepConfig
from .dcw import DcwSettings
from .guided import sample_guided
from .sampler import (
    RepaintInputs,
    SamplerSettings,
    draw_noise,
    mix_retake,
    sample_turbo,
    snap_shift,
    turbo_timesteps,
)

__all__ = [
    "AceStepConfig",
    "AceStepModel",
    "DcwSettings",
    "RepaintInputs",
    "SamplerSettings",
    "draw_noise",
    "mix_retake",
    "sample_guided",
    "sample_turbo",
    "snap_shift",
    "turbo_timesteps",
]
