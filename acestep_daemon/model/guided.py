"""The guided sampler of the sft and base checkpoints (official sft/base `generate_audio`).

N Euler, Heun or SDE steps over t = linspace(1, 0, N+1) shifted by `shift_timestep` (or
custom timesteps), each DiT call on the batch [cond; null] where null is `null_condition_emb`
spread over the condition sequence; inside the guidance interval the two velocities are
combined by APG (default), plain CFG or ADG, outside it the conditional one is used. Heun's
corrector call is guided by plain CFG when the method is APG (upstream: APG's momentum must
advance once per step) and by ADG only at t > 0. The schedule is a tensor in the model dtype
and every step is computed with it, as upstream.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

from acestep_daemon.family import GUIDANCE_METHODS

from .acestep import AceStepModel
from .dcw import DcwSettings, dcw_correct
from .guidance import Momentum, adg, apg, cfg
from .sampler import (
    RepaintInputs,
    SamplerSettings,
    crossfade_repaint,
    heun_velocity,
    inject_source,
    renoise,
    run_constants,
    shape_velocity,
)


def guided_timesteps(
    steps: int, shift: float, dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """[steps + 1] timesteps from 1 to 0 in `dtype`, shifted (computed in `dtype`, as upstream)."""
    if steps < 1:
        raise ValueError(f"guided steps must be at least 1, not {steps}")
    t = torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=dtype)
    return t if shift == 1.0 else shift * t / (1 + (shift - 1) * t)


def _custom_timesteps(
    timesteps: list[float], dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    if len(timesteps) < 2 or any(a <= b for a, b in itertools.pairwise(timesteps)):
        raise ValueError("timesteps must be at least two strictly decreasing values")
    if not all(0.0 <= t <= 1.0 for t in timesteps):
        raise ValueError("timesteps must lie in [0, 1]")
    return torch.tensor(timesteps, device=device, dtype=dtype)


def _guide(
    method: str,
    x: torch.Tensor,
    v: torch.Tensor,
    t: torch.Tensor,
    scale: float,
    momentum: Momentum,
) -> torch.Tensor:
    """v [2B, T, C] from the [cond; null] batch -> guided velocity [B, T, C]."""
    cond, uncond = v.chunk(2)
    if method == "apg":
        return apg(cond, uncond, scale, momentum)
    if method == "cfg":
        return cfg(cond, uncond, scale)
    return adg(x, cond, uncond, t, scale)


def _guide_corrector(
    method: str, x: torch.Tensor, v: torch.Tensor, t: torch.Tensor, scale: float
) -> torch.Tensor:
    """Heun's corrector guidance: ADG at t > 0 when the method is ADG, else plain CFG."""
    cond, uncond = v.chunk(2)
    if method == "adg" and t > 0:
        return adg(x, cond, uncond, t, scale)
    return cfg(cond, uncond, scale)


@torch.no_grad()
def sample_guided(
    model: AceStepModel,
    noise: torch.Tensor,
    encoder_hidden: torch.Tensor,
    context: torch.Tensor,
    *,
    steps: int,
    shift: float,
    guidance_scale: float,
    method: str = "apg",
    interval: tuple[float, float] = (0.0, 1.0),
    timesteps: list[float] | None = None,
    sampler: SamplerSettings | None = None,
    dcw: DcwSettings | None = None,
    repaint: RepaintInputs | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Full sft/base generation (cover strength 1) -> [B, T, 64].

    noise [B, T, 64] (see `draw_noise`, `mix_retake`), encoder_hidden [B, S, De], context
    [B, T, 128]; per-model defaults live in `acestep_daemon.family`. `timesteps` (a decreasing
    list, usually ending at 0) replaces steps and shift.
    Guidance runs only for guidance_scale > 1, and only at steps whose t lies inside
    `interval` (inclusive). `sampler` picks the step rule (None: Euler). SDE re-noises to
    1 - (k+1)/N, the unshifted linear schedule, whatever the shift or custom timesteps (as
    upstream does). `on_step(k, total)` runs before each step's DiT call(s) and may raise to
    cancel.
    """
    sampler = sampler or SamplerSettings()
    if method not in GUIDANCE_METHODS:
        raise ValueError(f"guidance method must be one of {', '.join(GUIDANCE_METHODS)}")
    batch, device, dtype = context.shape[0], context.device, context.dtype
    if timesteps is not None:
        schedule = _custom_timesteps(timesteps, dtype, device)
    else:
        schedule = guided_timesteps(steps, shift, dtype, device)
    total = len(schedule) - 1
    inject_steps = round(repaint.injection_ratio * total) if repaint is not None else 0
    guided = guidance_scale > 1.0
    if guided:
        null = model.null_condition_emb.expand_as(encoder_hidden)
        encoder_hidden = torch.cat([encoder_hidden, null], dim=0)  # [2B, S, De]: cond, null
        context = torch.cat([context, context], dim=0)
    constants = run_constants(model, encoder_hidden, context)
    generator = sampler.noise_source(device)
    momentum = Momentum()
    start, end = interval
    x, v_previous = noise, None
    for k in range(total):
        if on_step is not None:
            on_step(k, total)
        t, t_next = schedule[k], schedule[k + 1]  # 0-d tensors in dtype
        x_in = torch.cat([x, x], dim=0) if guided else x
        t_batch = t * torch.ones((x_in.shape[0],), device=device, dtype=dtype)
        v = model.decoder(x_in, t_batch, t_batch, encoder_hidden, context, constants)
        if guided:
            if start <= t <= end:
                v = _guide(method, x, v, t, guidance_scale, momentum)
            else:
                v = v.chunk(2)[0]
        v = shape_velocity(v, x, v_previous, sampler)
        x_before, v_first = x, v
        dt = (t - t_next) * torch.ones((batch,), device=device, dtype=dtype)
        t_after = float(t_next)
        if generator is not None:
            t_after = 1.0 - float(k + 1) / total
            x0 = x - v * (t * torch.ones((batch,), device=device, dtype=dtype))[:, None, None]
            x = renoise(x0, t_after, generator)
        elif sampler.name == "heun":
            x_guess = x - v * dt[:, None, None]
            x_in = torch.cat([x_guess, x_guess], dim=0) if guided else x_guess
            t_next_batch = t_next * torch.ones((x_in.shape[0],), device=device, dtype=dtype)
            v_corrector = model.decoder(
                x_in, t_next_batch, t_next_batch, encoder_hidden, context, constants
            )
            if guided:
                if start <= t_next <= end:
                    v_corrector = _guide_corrector(
                        method, x_guess, v_corrector, t_next, guidance_scale
                    )
                else:
                    v_corrector = v_corrector.chunk(2)[0]
            v = heun_velocity(v, v_corrector, x_guess, sampler)
            x = x - v * dt[:, None, None]
        else:
            x = x - v * dt[:, None, None]
        if dcw is not None:
            t_value = float(t)
            t_column = t_value * torch.ones((batch,), device=device, dtype=dtype)[:, None, None]
            x = dcw_correct(x, x_before - v_first * t_column, t_value, dcw)
        v_previous = v
        if k < inject_steps:
            x = inject_source(x, repaint, noise, t_after)
    if repaint is not None and repaint.crossfade_frames > 0:
        x = crossfade_repaint(x, repaint)
    return x
