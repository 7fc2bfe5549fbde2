"""Our PyTorch port of the ACE-Step v1.5 turbo generation network (pure tensor code).

Nothing here opens files, tokenizes text or picks devices; `pipeline.py` wires it up.
"""

from .acestep import AceStepModel
from .config import AceStepConfig
from .sampler import RepaintInputs, draw_noise, sample_turbo, snap_shift, turbo_timesteps

__all__ = [
    "AceStepConfig",
    "AceStepModel",
    "RepaintInputs",
    "draw_noise",
    "sample_turbo",
    "snap_shift",
    "turbo_timesteps",
]
