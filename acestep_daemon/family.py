"""The ACE-Step v1.5 DiT family: names, where the weights live, per-model sampling defaults.

Torch-free, so the request parameters can be checked against the chosen model before a job is
queued. Defaults follow upstream `ace-step/ACE-Step-1.5`: turbo models take 1-20 steps (8 by
default) at shift 3 with DCW on and no guidance (`get_ui_control_config`); sft and base take
guided steps (50 for sft, 32 for base, up to 200) with guidance 7 (APG) and shift 1, the
default of their `generate_audio` and of the API's `GenerationParams`, and DCW off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

TURBO, SFT, BASE = "turbo", "sft", "base"
GuidanceMethod = Literal["apg", "cfg", "adg"]
GUIDANCE_METHODS: tuple[str, ...] = get_args(GuidanceMethod)
"""How sft/base combine the conditional and unconditional predictions (APG is upstream's)."""
DcwMode = Literal["pix", "low", "high", "double"]
DCW_MODES: tuple[str, ...] = get_args(DcwMode)
"""Which bands the wavelet correction (DCW) pushes."""
Sampler = Literal["euler", "heun", "sde"]
SAMPLERS: tuple[str, ...] = get_args(Sampler)
"""How each step moves the latent: Euler (upstream's default ODE step), Heun (a second DiT call
per step, upstream `sampler_mode="heun"`) or SDE (predict x0, re-noise; upstream
`infer_method="sde"`)."""
TURBO_MAX_STEPS = 20
"""Most turbo steps (official turbo `generate_audio` clamps `infer_steps` to 20)."""
GUIDED_MAX_STEPS = 200
"""Most sft/base steps upstream's interface offers."""


@dataclass(frozen=True)
class ModelSpec:
    """One DiT checkpoint of the family and how it samples by default."""

    name: str
    """What `acestep serve --model` takes."""
    repo: str
    """Hugging Face repository holding the DiT folder."""
    folder: str
    """The DiT folder: a sub-folder of `ACE-Step/Ace-Step1.5`, or a whole repository."""
    kind: str
    xl: bool
    steps: int
    shift: float
    dcw: bool
    guidance_scale: float | None
    """None: the model is guidance-distilled (turbo) and takes no guidance fields."""
    dit_gib: float
    """The DiT's bf16 weights in GiB (the VAE and text encoder add 1.4 GiB)."""

    @property
    def max_steps(self) -> int:
        return TURBO_MAX_STEPS if self.kind == TURBO else GUIDED_MAX_STEPS

    @property
    def guided(self) -> bool:
        return self.guidance_scale is not None


_DIT_GIB = {False: 4.46, True: 9.29}
"""2 B: 2,393,872,518 parameters; XL: 4,987,310,726 (its decoder alone 4,168,897,088)."""


def _spec(name: str, kind: str, xl: bool) -> ModelSpec:
    folder = f"acestep-v15-{name}"
    repo = "ACE-Step/Ace-Step1.5" if name == TURBO else f"ACE-Step/{folder}"
    turbo = kind == TURBO
    return ModelSpec(
        name=name,
        repo=repo,
        folder=folder,
        kind=kind,
        xl=xl,
        steps=8 if turbo else (50 if kind == SFT else 32),
        shift=3.0 if turbo else 1.0,
        dcw=turbo,
        guidance_scale=None if turbo else 7.0,
        dit_gib=_DIT_GIB[xl],
    )


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        _spec("turbo", TURBO, False),
        _spec("sft", SFT, False),
        _spec("base", BASE, False),
        _spec("xl-turbo", TURBO, True),
        _spec("xl-sft", SFT, True),
        _spec("xl-base", BASE, True),
    )
}
DEFAULT_MODEL = "turbo"
