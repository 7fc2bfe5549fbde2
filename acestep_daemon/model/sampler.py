"""The turbo sampler (official turbo `generate_audio`): Euler, Heun or SDE steps, the last one
jumps to x0; plus the step rules it shares with the guided sampler (`guided.py`).

Rounding follows the official code exactly: the schedule becomes a tensor in the model dtype
whose values are read back as Python floats, dt is the difference of those rounded values,
and every update is two rounded tensor ops. Optional DCW (see `dcw.py`) corrects each step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from acestep_daemon.family import SAMPLERS, TURBO_MAX_STEPS, Sampler

from .acestep import AceStepModel
from .dcw import DcwSettings, dcw_correct
from .dit import StepConstants

SHIFT_TIMESTEPS: dict[float, tuple[float, ...]] = {
    1.0: (1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125),
    2.0: (
        1.0,
        0.9333333333333333,
        0.8571428571428571,
        0.7692307692307693,
        0.6666666666666666,
        0.5454545454545454,
        0.4,
        0.2222222222222222,
    ),
    3.0: (1.0, 0.9545454545454546, 0.9, 0.8333333333333334, 0.75, 0.6428571428571429, 0.5, 0.3),
}
"""t_k = s·u / (1 + (s - 1)·u), u = 1 - k/8, for the three supported shifts s."""


@dataclass(frozen=True)
class RepaintInputs:
    """Repaint a time range of `clean_latents`, keeping the rest (newer official behaviour).

    mask [B, T] bool, true where frames are regenerated. For steps k < round(injection_ratio
    · steps), after the Euler update, frames outside the range are reset to the source noised
    to the next timestep; after the loop the result is blended back into the source with
    linear ramps of up to `crossfade_frames` frames on both sides of the range
    (0 disables the blend).
    """

    mask: torch.Tensor
    clean_latents: torch.Tensor
    injection_ratio: float = 0.5
    crossfade_frames: int = 10


@dataclass(frozen=True)
class SamplerSettings:
    """How each step moves x (upstream `sampler_mode`, `infer_method`, `velocity_*`).

    name: "euler" (x -= v·dt), "heun" (a second DiT call at the Euler guess's t_next; the
    step uses the mean of both velocities) or "sde" (x0 = x - v·t, then re-noised to the next
    t with fresh noise from a generator seeded with `seed`; upstream draws the same values
    from torch's global generator, `torch.randn_like`).
    velocity_norm_threshold: > 0 caps each item's ‖v‖ at threshold · ‖x‖ (0: off).
    velocity_ema_factor: > 0 blends each velocity with the previous step's, v <- (1 - f)·v +
    f·v_prev (0: off); Heun's corrector velocity is blended with the step's first one.
    """

    name: Sampler = "euler"
    velocity_norm_threshold: float = 0.0
    velocity_ema_factor: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}")

    def noise_source(self, device: torch.device | str) -> torch.Generator | None:
        """The SDE's re-noising generator (None for the ODE samplers)."""
        if self.name != "sde":
            return None
        return torch.Generator(device=device).manual_seed(int(self.seed))


def clamp_velocity(v: torch.Tensor, x: torch.Tensor, threshold: float) -> torch.Tensor:
    """v [B, T, C] scaled so that no item's ‖v‖ exceeds threshold · ‖x‖ (upstream's eps)."""
    v_norm = torch.norm(v, dim=(1, 2), keepdim=True)
    x_norm = torch.norm(x, dim=(1, 2), keepdim=True) + 1e-10
    return v * torch.clamp(threshold * x_norm / (v_norm + 1e-10), max=1.0)


def blend_velocity(v: torch.Tensor, previous: torch.Tensor, factor: float) -> torch.Tensor:
    """The velocity EMA: (1 - factor)·v + factor·previous."""
    return (1.0 - factor) * v + factor * previous


def shape_velocity(
    v: torch.Tensor, x: torch.Tensor, previous: torch.Tensor | None, sampler: SamplerSettings
) -> torch.Tensor:
    """A step's first velocity after the optional norm clamp and EMA (upstream order)."""
    if sampler.velocity_norm_threshold > 0.0:
        v = clamp_velocity(v, x, sampler.velocity_norm_threshold)
    if sampler.velocity_ema_factor > 0.0 and previous is not None:
        v = blend_velocity(v, previous, sampler.velocity_ema_factor)
    return v


def heun_velocity(
    v: torch.Tensor, v_corrector: torch.Tensor, x_guess: torch.Tensor, sampler: SamplerSettings
) -> torch.Tensor:
    """Heun's step velocity: the mean of v and the (clamped, blended) corrector velocity at
    the Euler guess x_guess."""
    if sampler.velocity_norm_threshold > 0.0:
        v_corrector = clamp_velocity(v_corrector, x_guess, sampler.velocity_norm_threshold)
    if sampler.velocity_ema_factor > 0.0:
        v_corrector = blend_velocity(v_corrector, v, sampler.velocity_ema_factor)
    return 0.5 * (v + v_corrector)


def renoise(x0: torch.Tensor, t: float, generator: torch.Generator) -> torch.Tensor:
    """SDE step: t·ε + (1 - t)·x0 with ε [B, T, C] drawn in x0's dtype and device
    (as upstream's `renoise` with `torch.randn_like`)."""
    noise = torch.randn(
        x0.shape, generator=generator, device=x0.device, dtype=x0.dtype
    )  # [B, T, C]
    return t * noise + (1 - t) * x0


def snap_shift(shift: float) -> float:
    """Nearest supported shift (1, 2 or 3); ties go to the smaller one."""
    return min(SHIFT_TIMESTEPS, key=lambda s: abs(s - shift))


def shift_timestep(t: float, shift: float) -> float:
    """t -> shift·t / (1 + (shift - 1)·t): spends more of the steps at high noise for shift > 1."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def turbo_timesteps(shift: float, steps: int | None = None) -> list[float]:
    """The turbo schedule before rounding, without the final 0.

    steps None: the 8-step table of the nearest supported shift (`snap_shift`). steps N in
    1..20: u = 1 - k/N for k < N, shifted by `shift` as given (current upstream `infer_steps`);
    N = 8 reproduces the tables exactly.
    """
    if steps is None:
        return list(SHIFT_TIMESTEPS[snap_shift(shift)])
    if not 1 <= steps <= TURBO_MAX_STEPS:
        raise ValueError(f"turbo steps must be 1..{TURBO_MAX_STEPS}, not {steps}")
    raw = [1.0 - k / steps for k in range(steps)]
    return raw if shift == 1.0 else [shift_timestep(t, shift) for t in raw]


def draw_noise(
    seeds: list[int], frames: int, channels: int, device: torch.device | str, dtype: torch.dtype
) -> torch.Tensor:
    """Initial noise [B, T, C] exactly as upstream draws it from a seed list.

    One `torch.Generator(device).manual_seed(seed)` per item and one standard-normal draw of
    shape [1, T, C] directly in `dtype` on `device` (values differ between CPU and CUDA).
    """
    draws = []
    for seed in seeds:
        generator = torch.Generator(device=device).manual_seed(int(seed))
        draws.append(
            torch.randn(1, frames, channels, generator=generator, device=device, dtype=dtype)
        )
    return torch.cat(draws, dim=0)


def mix_retake(noise: torch.Tensor, retake_noise: torch.Tensor, variance: float) -> torch.Tensor:
    """Retake: cos(v·π/2)·noise + sin(v·π/2)·retake_noise, a variance-preserving blend.

    v = 0 keeps the take, v = 1 is the retake seed's own take; in between, "the same song, a
    little different". Both draws come from `draw_noise` (official `prepare_noise`).
    """
    if not 0.0 <= variance <= 1.0:
        raise ValueError(f"retake variance must be in [0, 1], not {variance}")
    if variance == 0.0:
        return noise
    angle = variance * (math.pi / 2.0)
    return math.cos(angle) * noise + math.sin(angle) * retake_noise


def run_constants(
    model: AceStepModel, encoder_hidden: torch.Tensor, context: torch.Tensor
) -> StepConstants | None:
    """The DiT's step constants for one sampling run over encoder_hidden [B, S, D] and
    context [B, T, 128], computed once; None (each step computes its own) when the DiT's
    `reuse_step_constants` fast path is off."""
    if not model.decoder.reuse_step_constants:
        return None
    return model.decoder.step_constants(encoder_hidden, context.shape[1], context.dtype)


def inject_source(
    x: torch.Tensor, repaint: RepaintInputs, noise: torch.Tensor, t_next: float
) -> torch.Tensor:
    """Frames outside the repaint range <- source noised to t_next."""
    noised = t_next * noise + (1.0 - t_next) * repaint.clean_latents
    return torch.where(repaint.mask[..., None].expand_as(x), x, noised)


def crossfade_repaint(x: torch.Tensor, repaint: RepaintInputs) -> torch.Tensor:
    """Blend generated frames into the source: 1 inside the range, linear ramps outside.

    The soft mask is float32, so the result is float32 (as upstream).
    """
    soft = repaint.mask.float().clone()  # [B, T]
    frames, ramp = soft.shape[1], repaint.crossfade_frames
    for row, keep in zip(soft, repaint.mask, strict=True):
        if keep.all() or not keep.any():
            continue
        inside = torch.nonzero(keep).squeeze(-1)
        left, right = int(inside[0]), int(inside[-1]) + 1
        start, end = max(left - ramp, 0), min(right + ramp, frames)
        if left > start:
            row[start:left] = torch.linspace(0, 1, left - start + 2, device=row.device)[1:-1]
        if end > right:
            row[right:end] = torch.linspace(1, 0, end - right + 2, device=row.device)[1:-1]
    m = soft[..., None].expand_as(x)
    return m * x + (1.0 - m) * repaint.clean_latents


@torch.no_grad()
def sample_turbo(
    model: AceStepModel,
    noise: torch.Tensor,
    encoder_hidden: torch.Tensor,
    context: torch.Tensor,
    shift: float,
    *,
    steps: int | None = None,
    sampler: SamplerSettings | None = None,
    dcw: DcwSettings | None = None,
    repaint: RepaintInputs | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Full turbo generation (official `generate_audio`, cover strength 1) -> [B, T, 64].

    noise [B, T, 64] (see `draw_noise`, `mix_retake`), encoder_hidden [B, S, D] from
    `encode_condition`, context [B, T, 128] from `build_context`; the schedule
    (`turbo_timesteps(shift, steps)`) takes the context's dtype and device, as upstream.
    `sampler` picks the step rule (None: Euler); the last step always jumps to x0 with the
    step's first velocity. `dcw` corrects every step, the last one included (None: off), with
    x0 from the first velocity. `on_step(k, total)` runs before each step's DiT call(s) and
    may raise to cancel.
    """
    sampler = sampler or SamplerSettings()
    batch, device, dtype = context.shape[0], context.device, context.dtype
    schedule = torch.tensor(turbo_timesteps(shift, steps), device=device, dtype=dtype)
    steps = len(schedule)
    inject_steps = round(repaint.injection_ratio * steps) if repaint is not None else 0
    constants = run_constants(model, encoder_hidden, context)
    generator = sampler.noise_source(device)
    x, v_previous = noise, None
    for k in range(steps):
        if on_step is not None:
            on_step(k, steps)
        t = schedule[k].item()
        t_batch = t * torch.ones((batch,), device=device, dtype=dtype)
        v = model.decoder(x, t_batch, t_batch, encoder_hidden, context, constants)
        v = shape_velocity(v, x, v_previous, sampler)
        x_before, v_first = x, v
        if k == steps - 1:
            x = x - v * t_batch[:, None, None]  # the last step predicts x0 directly
            if dcw is not None:
                x = dcw_correct(x, x_before - v * t_batch[:, None, None], t, dcw)
            break
        t_next = schedule[k + 1].item()
        dt = (t - t_next) * torch.ones((batch,), device=device, dtype=dtype)
        if generator is not None:
            x = renoise(x - v * t_batch[:, None, None], t_next, generator)
        elif sampler.name == "heun":
            x_guess = x - v * dt[:, None, None]
            t_next_batch = t_next * torch.ones((batch,), device=device, dtype=dtype)
            v_corrector = model.decoder(
                x_guess, t_next_batch, t_next_batch, encoder_hidden, context, constants
            )
            v = heun_velocity(v, v_corrector, x_guess, sampler)
            x = x - v * dt[:, None, None]
        else:
            x = x - v * dt[:, None, None]
        if dcw is not None:
            x = dcw_correct(x, x_before - v_first * t_batch[:, None, None], t, dcw)
        v_previous = v
        if k < inject_steps:
            x = inject_source(x, repaint, noise, t_next)
    if repaint is not None and repaint.crossfade_frames > 0:
        x = crossfade_repaint(x, repaint)
    return x
