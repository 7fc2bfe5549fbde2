"""The sft/base guided sampler reproduces the official sft `generate_audio` on the tiny 2 B and
XL checkpoints: APG (default), plain CFG, ADG, a guidance interval, custom timesteps, DCW.

Fixtures: `acestep_tiny/guided.safetensors` from the official code at fp32
(tests/fixtures/README.md); full sampling is compared within 1e-4 of the output scale.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from model_fixtures import SAMPLING_TOLERANCE, TINY, TINY_XL, load_tiny_model, relative_error
from safetensors.torch import load_file

from acestep_daemon.model import AceStepModel, DcwSettings, draw_noise, sample_guided

CONDITION = ("text_hidden", "text_mask", "lyric_hidden", "lyric_mask", "refer_latents")
RUNS = {
    "apg": {"steps": 6},
    "apg_shift3": {"steps": 6, "shift": 3.0},
    "interval": {"steps": 6, "interval": (0.3, 0.8)},
    "timesteps": {"timesteps": [1.0, 0.9, 0.7, 0.4, 0.2, 0.0]},
    "adg": {"steps": 6, "method": "adg"},
    "cfg": {"steps": 6, "method": "cfg"},
    "scale3_dcw": {"steps": 6, "guidance_scale": 3.0, "dcw": DcwSettings()},
    "scale1": {"steps": 6, "guidance_scale": 1.0},
}


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

    def sample(self, **kw: object) -> torch.Tensor:
        """The official defaults (shift 1, guidance 7, APG) unless `kw` says otherwise."""
        settings = {"steps": 6, "shift": 1.0, "guidance_scale": 7.0} | kw
        return sample_guided(self.model, self.noise, self.hidden, self.context, **settings)


@pytest.fixture(scope="module")
def tiny() -> Setup:
    return Setup(TINY)


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return load_file(TINY / "guided.safetensors")


@pytest.mark.parametrize("run", sorted(RUNS))
def test_guided_sampling_matches_official(
    tiny: Setup, reference: dict[str, torch.Tensor], run: str
) -> None:
    out = tiny.sample(**RUNS[run])
    assert relative_error(out, reference[f"guided.{run}"]) <= SAMPLING_TOLERANCE


def test_guided_sampling_on_xl_weights_matches_official_xl_base(
    reference: dict[str, torch.Tensor],
) -> None:
    out = Setup(TINY_XL).sample(steps=6)
    assert relative_error(out, reference["guided.xl_apg"]) <= SAMPLING_TOLERANCE


@pytest.mark.parametrize(
    ("run", "wrong"),
    [
        ("apg", {"steps": 6, "shift": 3.0}),  # the turbo shift on a base model
        ("apg", {"steps": 6, "method": "cfg"}),  # APG replaced by plain CFG
        ("interval", {"steps": 6}),  # the interval ignored
        ("apg", {"steps": 6, "guidance_scale": 1.0}),  # no null batch at all
    ],
)
def test_guided_fixtures_catch_porting_mistakes(
    tiny: Setup, reference: dict[str, torch.Tensor], run: str, wrong: dict
) -> None:
    assert (
        relative_error(tiny.sample(**wrong), reference[f"guided.{run}"]) > 100 * SAMPLING_TOLERANCE
    )


def test_guided_sampler_reports_every_step(tiny: Setup) -> None:
    seen: list[tuple[int, int]] = []
    tiny.sample(steps=3, on_step=lambda k, n: seen.append((k, n)))
    assert seen == [(0, 3), (1, 3), (2, 3)]


@pytest.mark.parametrize(
    "kw",
    [
        {"method": "pag"},
        {"steps": 0},
        {"timesteps": [1.0]},
        {"timesteps": [1.0, 0.5, 0.6, 0.0]},
        {"timesteps": [1.5, 0.5, 0.0]},
    ],
)
def test_guided_sampler_refuses_bad_settings(tiny: Setup, kw: dict) -> None:
    with pytest.raises(ValueError):
        tiny.sample(**kw)
