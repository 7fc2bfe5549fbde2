"""The guided sampler, run as a base request runs it, reproduces the official **base**
`generate_audio` on the tiny 2 B checkpoint: APG (default), shift 3, a guidance interval, ADG
and guidance 1.

Fixture: `acestep_tiny/base.safetensors`, made by upstream's `base/modeling_acestep_v15_base.py`
at fp32 (tests/fixtures/README.md). Upstream's base takes no custom timesteps, so there is no
timesteps case; base requests refuse them (`GenerationParams.model_problem`).
"""

from __future__ import annotations

import pytest
import torch
from model_fixtures import SAMPLING_TOLERANCE, TINY, load_tiny_model, relative_error
from safetensors.torch import load_file
from test_model_guided import Setup

from acestep_daemon.family import MODELS
from acestep_daemon.model import guided
from acestep_daemon.model.guidance import Momentum

BASE = MODELS["base"]
RUNS: dict[str, dict[str, object]] = {
    "apg": {},
    "apg_shift3": {"shift": 3.0},
    "interval": {"interval": (0.3, 0.8)},
    "adg": {"method": "adg"},
    "scale1": {"guidance_scale": 1.0},
}
"""What each official run changes from base's defaults (6 steps here to keep it short)."""


def sample_as_base(setup: Setup, **kw: object) -> torch.Tensor:
    """Base's request defaults (shift, guidance 7 with APG, DCW off), 6 steps, `kw` on top."""
    settings = {"steps": 6, "shift": BASE.shift, "guidance_scale": BASE.guidance_scale} | kw
    return setup.sample(**settings)


@pytest.fixture(scope="module")
def tiny() -> Setup:
    return Setup(TINY)


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return load_file(TINY / "base.safetensors")


def test_base_request_defaults_are_upstream_base_defaults() -> None:
    assert (BASE.kind, BASE.shift, BASE.guidance_scale, BASE.dcw) == ("base", 1.0, 7.0, False)


@pytest.mark.parametrize("run", sorted(RUNS))
def test_guided_sampling_matches_official_base(
    tiny: Setup, reference: dict[str, torch.Tensor], run: str
) -> None:
    out = sample_as_base(tiny, **RUNS[run])
    assert relative_error(out, reference[f"base.{run}"]) <= SAMPLING_TOLERANCE


@pytest.mark.parametrize("run", sorted(RUNS))
def test_official_base_and_sft_samplers_agree(reference: dict[str, torch.Tensor], run: str) -> None:
    """The sft fixture's "identical sampler to base" claim, on every shared case."""
    sft = load_file(TINY / "guided.safetensors")[f"guided.{run}"]
    assert relative_error(reference[f"base.{run}"], sft) <= SAMPLING_TOLERANCE


def test_base_fixture_catches_a_wrong_shift(
    tiny: Setup, reference: dict[str, torch.Tensor]
) -> None:
    out = sample_as_base(tiny, shift=3.0)  # the turbo shift on a base model
    assert relative_error(out, reference["base.apg"]) > 100 * SAMPLING_TOLERANCE


def test_base_fixture_catches_apg_without_momentum(
    tiny: Setup, reference: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(guided, "Momentum", lambda: Momentum(0.0))
    out = sample_as_base(tiny)
    assert relative_error(out, reference["base.apg"]) > 100 * SAMPLING_TOLERANCE


def test_base_fixture_catches_a_one_off_sliding_window(
    reference: dict[str, torch.Tensor],
) -> None:
    setup = Setup(TINY)  # the condition from the true model, the DiT with the band one short
    setup.model = load_tiny_model(TINY, sliding_window=3)  # flash-attention's (w - 1) band
    out = sample_as_base(setup)
    assert relative_error(out, reference["base.apg"]) > 100 * SAMPLING_TOLERANCE
