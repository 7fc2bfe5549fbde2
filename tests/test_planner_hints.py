"""Audio codes -> DiT context hints, against the official codes path on tiny random weights.

The official path (`_decode_audio_codes_to_latents`) is the quantizer's
`get_output_from_indices` followed by the detokenizer; `cover.*` of the acestep_tiny fixture
holds both stages of the official model for the same codes (see tests/fixtures/README.md).
"""

from __future__ import annotations

import pytest
import torch
from model_fixtures import RELATIVE_TOLERANCE, TINY, load_tiny_model, relative_error
from safetensors.torch import load_file

from acestep_daemon.model import AceStepModel
from acestep_daemon.planner.hints import codes_to_hints


@pytest.fixture(scope="module")
def model() -> AceStepModel:
    return load_tiny_model()


@pytest.fixture(scope="module")
def cases() -> dict[str, torch.Tensor]:
    return load_file(TINY / "cases.safetensors")


@pytest.mark.parametrize("item", [0, 1])
def test_hints_from_codes_match_the_official_codes_path(
    model: AceStepModel, cases: dict[str, torch.Tensor], item: int
) -> None:
    codes = cases["cover.indices"][item, :, 0]  # [4] 5 Hz codes
    silence = cases["generate.silence_latent"]
    hints = codes_to_hints(model, codes, silence, frames=20)
    with torch.no_grad():
        official = model.detokenize(cases["cover.from_indices"][item : item + 1])
    assert relative_error(hints, official) <= RELATIVE_TOLERANCE
    # the tokenize path of the official model gives the same hints for these codes
    assert relative_error(hints, cases["cover.hints"][item : item + 1]) <= RELATIVE_TOLERANCE


def test_short_codes_are_padded_with_the_head_of_the_silence_latent(
    model: AceStepModel, cases: dict[str, torch.Tensor]
) -> None:
    codes, silence = cases["cover.indices"][0, :, 0], cases["generate.silence_latent"]
    hints = codes_to_hints(model, codes, silence, frames=32)
    assert hints.shape == (1, 32, 64)
    assert torch.equal(hints[:, :20], codes_to_hints(model, codes, silence, frames=20))
    assert torch.equal(hints[:, 20:], silence[:, :12])


def test_long_codes_are_cropped_to_the_song(
    model: AceStepModel, cases: dict[str, torch.Tensor]
) -> None:
    codes, silence = cases["cover.indices"][1, :, 0], cases["generate.silence_latent"]
    full = codes_to_hints(model, codes, silence, frames=20)
    assert torch.equal(codes_to_hints(model, codes, silence, frames=13), full[:, :13])


def test_parity_catches_codes_in_the_wrong_order(
    model: AceStepModel, cases: dict[str, torch.Tensor]
) -> None:
    codes = cases["cover.indices"][0, :, 0].flip(0)
    hints = codes_to_hints(model, codes, cases["generate.silence_latent"], frames=20)
    assert relative_error(hints, cases["cover.hints"][:1]) > 100 * RELATIVE_TOLERANCE
