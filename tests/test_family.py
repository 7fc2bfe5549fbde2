"""The model family table agrees with the tiny checkpoints and with upstream's defaults."""

from __future__ import annotations

import pytest

from acestep_daemon.family import MODELS
from acestep_daemon.model import AceStepConfig
from acestep_daemon.tiny import VARIANTS, dit_config, dit_folder


def test_every_model_has_a_tiny_variant_with_its_folder_and_architecture() -> None:
    assert sorted(MODELS) == sorted(VARIANTS)
    for name, spec in MODELS.items():
        config = dit_config(name)
        assert spec.folder == dit_folder(name)
        assert AceStepConfig.from_dict(config).is_xl == spec.xl
        assert config["is_turbo"] == (spec.kind == "turbo")


@pytest.mark.parametrize(
    ("name", "steps", "shift", "guidance", "dcw"),
    [
        ("turbo", 8, 3.0, None, True),
        ("xl-turbo", 8, 3.0, None, True),
        ("sft", 50, 1.0, 7.0, False),
        ("xl-base", 32, 1.0, 7.0, False),
    ],
)
def test_per_model_defaults(
    name: str, steps: int, shift: float, guidance: float | None, dcw: bool
) -> None:
    spec = MODELS[name]
    assert (spec.steps, spec.shift, spec.guidance_scale, spec.dcw) == (steps, shift, guidance, dcw)
    assert spec.max_steps == (20 if spec.kind == "turbo" else 200)


def test_repositories() -> None:
    assert MODELS["turbo"].repo == "ACE-Step/Ace-Step1.5"
    assert MODELS["xl-sft"].repo == "ACE-Step/acestep-v15-xl-sft"
