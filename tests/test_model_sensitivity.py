"""The parity fixtures are sharp: subtly wrong ports miss them by far more than the tolerance."""

from __future__ import annotations

import json

import pytest
import torch
from model_fixtures import RELATIVE_TOLERANCE, TINY, load_weights, relative_error
from safetensors.torch import load_file

from acestep_daemon.model import AceStepModel


def tiny_model(state: dict[str, torch.Tensor], **config_changes: object) -> AceStepModel:
    config = json.loads((TINY / "config.json").read_text()) | config_changes
    return load_weights(config, state)


@torch.no_grad()
def dit_error(model: AceStepModel) -> float:
    cases = load_file(TINY / "cases.safetensors")
    names = ("x", "timestep", "timestep_r", "encoder_hidden", "context")
    v = model.decoder(*(cases[f"dit_t21.{n}"] for n in names))
    return relative_error(v, cases["dit_t21.v"])


@torch.no_grad()
def condition_error(model: AceStepModel) -> float:
    cases = load_file(TINY / "cases.safetensors")
    names = ("text_hidden", "text_mask", "lyric_hidden", "lyric_mask")
    hidden, _ = model.encode_condition(
        *(cases[f"condition.{n}"] for n in names),
        cases["condition.refer_latents"],
        cases["condition.refer_order"],
    )
    return relative_error(hidden, cases["condition.hidden"])


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return load_file(TINY / "model.safetensors")


def test_fixture_weights_pass_with_the_true_configuration(state: dict) -> None:
    model = tiny_model(state)
    assert dit_error(model) <= RELATIVE_TOLERANCE
    assert condition_error(model) <= RELATIVE_TOLERANCE


@pytest.mark.parametrize(
    "change",
    [
        {"sliding_window": 3},  # one less, like flash-attention's (w - 1) band
        {"sliding_window": 5},
        {"use_sliding_window": False},
    ],
)
def test_wrong_sliding_window_breaks_dit_and_encoder_parity(state: dict, change: dict) -> None:
    model = tiny_model(state, **change)
    assert dit_error(model) > 100 * RELATIVE_TOLERANCE
    assert condition_error(model) > 100 * RELATIVE_TOLERANCE


def _swap_adaln_rows(state: dict[str, torch.Tensor], a: int, b: int) -> dict[str, torch.Tensor]:
    """Weights under which our DiT behaves like one that reads modulation rows a and b in
    swapped order (the table rows and the matching `time_proj` output blocks)."""
    swapped = dict(state)
    dim = state["decoder.norm_out.weight"].shape[0]

    def swap(t: torch.Tensor, axis: int) -> torch.Tensor:
        blocks = list(t.split(dim if axis == 0 else 1, dim=axis))
        blocks[a], blocks[b] = blocks[b], blocks[a]
        return torch.cat(blocks, dim=axis)

    for name, tensor in state.items():
        if name.endswith("time_proj.weight") or name.endswith("time_proj.bias"):
            swapped[name] = swap(tensor, 0)
        elif name.startswith("decoder.layers.") and name.endswith("scale_shift_table"):
            swapped[name] = swap(tensor, 1)
    return swapped


@pytest.mark.parametrize(("a", "b"), [(0, 1), (1, 2), (3, 4), (4, 5)])
def test_swapped_adaln_modulation_order_breaks_dit_parity(state: dict, a: int, b: int) -> None:
    assert dit_error(tiny_model(_swap_adaln_rows(state, a, b))) > 100 * RELATIVE_TOLERANCE
