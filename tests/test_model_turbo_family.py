"""Current upstream turbo sampling on the 2 B and XL tiny checkpoints: DCW (on by default
upstream), a free step count with an unsnapped shift, and retake noise mixing.

Fixtures: `acestep_tiny/sampling.safetensors` and the `sample.*` entries of
`acestep_tiny_xl/cases.safetensors`, from the official code at fp32 (tests/fixtures/README.md).
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
    draw_noise,
    mix_retake,
    sample_turbo,
    turbo_timesteps,
)
from acestep_daemon.model.wavelet import haar_merge, haar_split

CONDITION = ("text_hidden", "text_mask", "lyric_hidden", "lyric_mask", "refer_latents")
RUNS = {
    "dcw_off": {"steps": 8},
    "dcw_double": {"steps": 8, "dcw": DcwSettings()},
    "dcw_low": {"steps": 8, "dcw": DcwSettings("low", 0.1)},
    "dcw_high": {"steps": 8, "dcw": DcwSettings("high", 0.1)},
    "dcw_pix": {"steps": 8, "dcw": DcwSettings("pix", 0.05)},
    "steps5_shift2.5": {"steps": 5, "shift": 2.5, "dcw": DcwSettings()},
    "steps12_shift3_dcw_off": {"steps": 12},
}


class Setup:
    """One tiny checkpoint with its fixture inputs, ready to sample."""

    def __init__(self, folder: Path, cases: dict[str, torch.Tensor], samples: dict) -> None:
        self.model: AceStepModel = load_tiny_model(folder)
        self.samples = samples
        with torch.no_grad():
            self.hidden, _ = self.model.encode_condition(
                *(cases[f"condition.{n}"] for n in CONDITION), cases["condition.refer_order"]
            )
            source = cases["generate.silence_latent"][:, :17].repeat(2, 1, 1)
            self.context = self.model.build_context(source, torch.ones(2, 17))
        self.noise = draw_noise([11, 22], 17, 64, "cpu", torch.float32)

    def sample(self, noise: torch.Tensor | None = None, shift: float = 3.0, **kw) -> torch.Tensor:
        noise = self.noise if noise is None else noise
        return sample_turbo(self.model, noise, self.hidden, self.context, shift, **kw)


@pytest.fixture(scope="module", params=["2b", "xl"])
def setup(request: pytest.FixtureRequest) -> Setup:
    if request.param == "2b":
        cases = load_file(TINY / "cases.safetensors")
        return Setup(TINY, cases, load_file(TINY / "sampling.safetensors"))
    cases = load_file(TINY_XL / "cases.safetensors")
    assert torch.equal(cases["generate.noise"], draw_noise([11, 22], 17, 64, "cpu", torch.float32))
    return Setup(TINY_XL, cases, cases)


@pytest.mark.parametrize("run", sorted(RUNS))
def test_turbo_sampling_matches_current_official(setup: Setup, run: str) -> None:
    out = setup.sample(**RUNS[run])
    assert relative_error(out, setup.samples[f"sample.{run}"]) <= SAMPLING_TOLERANCE


def test_retake_mixes_a_second_seed_like_official(setup: Setup) -> None:
    retake = draw_noise([33, 44], 17, 64, "cpu", torch.float32)
    out = setup.sample(mix_retake(setup.noise, retake, 0.3), steps=8)
    assert relative_error(out, setup.samples["sample.retake"]) <= SAMPLING_TOLERANCE


def test_eight_steps_with_dcw_off_equal_the_old_table_bit_for_bit(setup: Setup) -> None:
    assert torch.equal(setup.sample(steps=8), setup.sample())
    assert torch.equal(setup.samples["sample.dcw_off"], setup.samples["sample.table_shift3"])


def test_dcw_fixture_catches_dcw_left_off_or_bands_swapped(setup: Setup) -> None:
    reference = setup.samples["sample.dcw_double"]
    assert relative_error(setup.sample(steps=8), reference) > 100 * SAMPLING_TOLERANCE
    swapped = DcwSettings("double", scaler=0.02, high_scaler=0.05)
    assert relative_error(setup.sample(steps=8, dcw=swapped), reference) > 10 * SAMPLING_TOLERANCE


def test_step_fixture_catches_a_snapped_shift(setup: Setup) -> None:
    snapped = setup.sample(shift=2.0, steps=5, dcw=DcwSettings())
    assert (
        relative_error(snapped, setup.samples["sample.steps5_shift2.5"]) > 100 * SAMPLING_TOLERANCE
    )


@pytest.mark.parametrize("shift", [1.0, 2.0, 3.0])
def test_eight_step_formula_gives_the_tables_exactly(shift: float) -> None:
    assert turbo_timesteps(shift, 8) == turbo_timesteps(shift)


@pytest.mark.parametrize("steps", [0, 21])
def test_turbo_steps_outside_one_to_twenty_are_refused(steps: int) -> None:
    with pytest.raises(ValueError, match=r"1\.\.20"):
        turbo_timesteps(3.0, steps)


def test_retake_variance_zero_keeps_and_one_replaces_the_noise() -> None:
    a, b = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    assert mix_retake(a, b, 0.0) is a
    assert torch.allclose(mix_retake(a, b, 1.0), b, atol=1e-6)
    with pytest.raises(ValueError):
        mix_retake(a, b, 1.5)


@pytest.mark.parametrize("frames", [8, 17])
def test_haar_transform_is_orthonormal_and_inverts(frames: int) -> None:
    x = torch.randn(2, frames, 4, dtype=torch.float64)
    low, high = haar_split(x)
    assert low.shape == high.shape == (2, (frames + 1) // 2, 4)
    assert torch.allclose(haar_merge(low, high, frames), x)
    energy = low.square().sum() + high.square().sum()
    assert torch.allclose(energy, x.square().sum())


def test_unknown_dcw_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="pix, low, high, double"):
        DcwSettings("band")
