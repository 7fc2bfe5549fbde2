"""Shared helpers of the model tests: the tiny official-code fixtures and the parity measure."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from acestep_daemon.model import AceStepModel

TINY = Path(__file__).parent / "fixtures" / "acestep_tiny"
TINY_XL = Path(__file__).parent / "fixtures" / "acestep_tiny_xl"
RELATIVE_TOLERANCE = 1e-5
SAMPLING_TOLERANCE = 1e-4
"""Full sampling loops (several DiT calls, guidance, wavelets) are compared at 1e-4 of scale."""


def load_tiny_model(folder: Path = TINY, **config_changes: object) -> AceStepModel:
    """A fixture checkpoint in our model (meta construction, strict load with assign)."""
    config = json.loads((folder / "config.json").read_text()) | config_changes
    return load_weights(config, load_file(folder / "model.safetensors"))


def load_weights(config: dict, state: dict[str, torch.Tensor]) -> AceStepModel:
    with torch.device("meta"):
        model = AceStepModel.from_config(config)
    # Fresh (aligned) copies, as the pipeline loads them; see pipeline.load_module.
    model.load_state_dict({k: t.clone() for k, t in state.items()}, strict=True, assign=True)
    return model.eval()


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """max |ours - reference| / max |reference|."""
    assert ours.shape == reference.shape
    return float((ours.float() - reference.float()).abs().max() / reference.abs().max())


CONDITION_INPUTS = (
    "text_hidden",
    "text_mask",
    "lyric_hidden",
    "lyric_mask",
    "refer_latents",
    "refer_order",
)
"""The condition encoder's inputs, in argument order, as `condition.<name>` in the cases."""


def encode_condition_case(
    model: AceStepModel, cases: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, ...]:
    """Our condition encoder on a fixture's recorded inputs."""
    return model.encode_condition(*(cases[f"condition.{name}"] for name in CONDITION_INPUTS))
