"""Heun, SDE, the velocity norm clamp and the velocity EMA reproduce the official
`generate_audio` (`sampler_mode`, `infer_method`, `velocity_norm_threshold`,
`velocity_ema_factor`) of the turbo, sft, XL turbo and XL base code on the tiny checkpoints.

Fixture: `acestep_tiny/samplers.safetensors` from the official code at fp32
(tests/fixtures/README.md). The SDE runs were made after `torch.manual_seed(11)` (upstream
re-noises with `torch.randn_like` from the global generator); ours draws from a generator
seeded with 11. 2 B runs without DCW are equal bit for bit; the others within 1e-4 of the
output scale, as the other sampling tests: our wavelet transform is not upstream's
`pytorch_wavelets` (3e-7 apart), and the XL base run's float sums round differently (5e-7 to
2e-6 apart, as its Euler runs).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from model_fixtures import SAMPLING_TOLERANCE, TINY, TINY_XL, load_tiny_model, relative_error
from safetensors.torch import load_file

from acestep_daemon.model import (
    AceStepModel,
    DcwSettings,
    SamplerSettings,
    draw_noise,
    sample_guided,
    sample_turbo,
)

CONDITION = ("text_hidden", "text_mask", "lyric_hidden", "lyric_mask", "refer_latents")
SDE_SEED = 11

TURBO_RUNS = {
    "heun": {"sampler": "heun"},
    "heun_steps5_shift2.5": {"sampler": "heun", "steps": 5, "shift": 2.5},
    "heun_dcw": {"sampler": "heun", "dcw": DcwSettings()},
    "sde": {"sampler": "sde"},
    "sde_steps5_shift2.5": {"sampler": "sde", "steps": 5, "shift": 2.5},
    "clamp": {"velocity_norm_threshold": 0.5},
    "ema": {"velocity_ema_factor": 0.3},
    "heun_clamp_ema": {
        "sampler": "heun",
        "velocity_norm_threshold": 0.5,
        "velocity_ema_factor": 0.3,
    },
}
GUIDED_RUNS = {
    "heun": {"sampler": "heun"},
    "heun_shift3": {"sampler": "heun", "shift": 3.0},
    "heun_interval_adg": {"sampler": "heun", "method": "adg", "interval": (0.3, 0.8)},
    "heun_scale1": {"sampler": "heun", "guidance_scale": 1.0},
    "sde": {"sampler": "sde"},
    "sde_shift3": {"sampler": "sde", "shift": 3.0},
    "clamp_ema": {"velocity_norm_threshold": 0.5, "velocity_ema_factor": 0.3},
    "heun_clamp_ema_dcw": {
        "sampler": "heun",
        "velocity_norm_threshold": 0.5,
        "velocity_ema_factor": 0.3,
        "dcw": DcwSettings(),
    },
}


def assert_matches(out: torch.Tensor, reference: torch.Tensor, run: str) -> None:
    if "dcw" in run:
        assert relative_error(out, reference) <= SAMPLING_TOLERANCE
    else:
        assert torch.equal(out, reference)


SAMPLER_KEYS = ("sampler", "velocity_norm_threshold", "velocity_ema_factor", "seed")


def _settings(kw: dict) -> tuple[SamplerSettings, dict]:
    """Split a run's keywords into the sampler settings and the sampling function's own."""
    given = {k: kw[k] for k in SAMPLER_KEYS if k in kw}
    rest = {k: v for k, v in kw.items() if k not in SAMPLER_KEYS}
    name = given.pop("sampler", "euler")
    return SamplerSettings(name, seed=given.pop("seed", SDE_SEED), **given), rest


class Setup:
    def __init__(self, folder: Path) -> None:
        cases = load_file(folder / "cases.safetensors")
        self.model: AceStepModel = load_tiny_model(folder)
        with torch.no_grad():
            self.hidden, _ = self.model.encode_condition(
                *(cases[f"condition.{n}"] for n in CONDITION), cases["condition.refer_order"]
            )
            source = cases["generate.silence_latent"][:, :17].repeat(2, 1, 1)
            self.context = self.model.build_context(source, torch.ones(2, 17))
        self.noise = draw_noise([11, 22], 17, 64, "cpu", torch.float32)

    def turbo(self, **kw: object) -> torch.Tensor:
        """The official turbo run (shift 3, 8-step table, DCW off) unless `kw` says otherwise."""
        sampler, rest = _settings(kw)
        settings = {"shift": 3.0} | rest
        return sample_turbo(
            self.model, self.noise, self.hidden, self.context, sampler=sampler, **settings
        )

    def guided(self, **kw: object) -> torch.Tensor:
        """The official sft defaults (6 steps, shift 1, guidance 7, APG, DCW off) unless `kw`
        says otherwise."""
        sampler, rest = _settings(kw)
        settings = {"steps": 6, "shift": 1.0, "guidance_scale": 7.0} | rest
        return sample_guided(
            self.model, self.noise, self.hidden, self.context, sampler=sampler, **settings
        )


@pytest.fixture(scope="module")
def tiny() -> Setup:
    return Setup(TINY)


@pytest.fixture(scope="module")
def tiny_xl() -> Setup:
    return Setup(TINY_XL)


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return load_file(TINY / "samplers.safetensors")


@pytest.mark.parametrize("run", sorted(TURBO_RUNS))
def test_turbo_samplers_match_official(
    tiny: Setup, reference: dict[str, torch.Tensor], run: str
) -> None:
    assert_matches(tiny.turbo(**TURBO_RUNS[run]), reference[f"turbo.{run}"], run)


@pytest.mark.parametrize("run", sorted(GUIDED_RUNS))
def test_guided_samplers_match_official_sft(
    tiny: Setup, reference: dict[str, torch.Tensor], run: str
) -> None:
    assert_matches(tiny.guided(**GUIDED_RUNS[run]), reference[f"guided.{run}"], run)


@pytest.mark.parametrize("sampler", ["heun", "sde"])
def test_samplers_on_xl_weights_match_official_xl_turbo_and_xl_base(
    tiny_xl: Setup, reference: dict[str, torch.Tensor], sampler: str
) -> None:
    turbo = tiny_xl.turbo(sampler=sampler)
    assert relative_error(turbo, reference[f"xl_turbo.{sampler}"]) <= SAMPLING_TOLERANCE
    guided = tiny_xl.guided(sampler=sampler)
    assert relative_error(guided, reference[f"xl_base.{sampler}"]) <= SAMPLING_TOLERANCE


@pytest.mark.parametrize(
    ("kind", "run", "wrong"),
    [
        ("turbo", "heun", {}),  # Heun without its corrector is Euler
        ("guided", "heun", {}),
        ("guided", "heun", {"sampler": "heun", "method": "cfg"}),  # APG on the predictor lost
        ("turbo", "sde", {}),  # no re-noising
        ("turbo", "sde", {"sampler": "sde", "seed": 12}),  # other noise draws
        ("guided", "sde", {"sampler": "sde", "seed": 12}),
        ("guided", "sde_shift3", {"sampler": "sde", "timesteps": None, "shift": 1.0}),
        ("turbo", "clamp", {"velocity_norm_threshold": 0.6}),
        ("turbo", "ema", {"velocity_ema_factor": 0.2}),
    ],
)
def test_sampler_fixtures_catch_mistakes(
    tiny: Setup, reference: dict[str, torch.Tensor], kind: str, run: str, wrong: dict
) -> None:
    out = getattr(tiny, kind)(**wrong)
    assert relative_error(out, reference[f"{kind}.{run}"]) > 100 * SAMPLING_TOLERANCE


def test_sde_renoises_at_the_next_timestep_of_the_turbo_schedule(tiny: Setup) -> None:
    """A turbo SDE step lands at t_next: re-noising x0 by hand with the same draws agrees."""
    out = tiny.turbo(sampler="sde", steps=2, shift=1.0)
    generator = torch.Generator().manual_seed(SDE_SEED)
    x, t = tiny.noise, torch.ones(2)
    with torch.no_grad():
        v = tiny.model.decoder(x, t, t, tiny.hidden, tiny.context, None)
        x0 = x - v
        x = 0.5 * torch.randn(x.shape, generator=generator) + 0.5 * x0
        t = torch.full((2,), 0.5)
        v = tiny.model.decoder(x, t, t, tiny.hidden, tiny.context, None)
    assert torch.equal(out, x - v * 0.5)


def test_euler_settings_leave_the_default_path_unchanged(tiny: Setup) -> None:
    default = sample_turbo(tiny.model, tiny.noise, tiny.hidden, tiny.context, 3.0)
    assert torch.equal(tiny.turbo(), default)


def test_heun_calls_the_dit_twice_per_step_but_reports_each_step_once(tiny: Setup) -> None:
    seen: list[tuple[int, int]] = []
    tiny.guided(sampler="heun", steps=3, on_step=lambda k, n: seen.append((k, n)))
    assert seen == [(0, 3), (1, 3), (2, 3)]


def test_unknown_sampler_is_refused() -> None:
    with pytest.raises(ValueError, match="sampler must be one of euler, heun, sde"):
        SamplerSettings("dpm")
