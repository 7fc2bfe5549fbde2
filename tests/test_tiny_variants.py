"""Tiny checkpoints of every DiT variant: real key names, real config fields, strict loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from acestep_daemon.model import AceStepModel
from acestep_daemon.tiny import VARIANTS, dit_config, dit_folder, make_tiny_checkpoint

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("variants")
    return {v: make_tiny_checkpoint(root / v, variant=v) for v in VARIANTS}


def key_names(manifest: str) -> set[str]:
    return set(json.loads((FIXTURES / f"{manifest}.keys.json").read_text())["keys"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_dit_has_the_real_key_names_and_loads_strictly(
    checkpoints: dict[str, Path], variant: str
) -> None:
    folder = checkpoints[variant] / dit_folder(variant)
    config = json.loads((folder / "config.json").read_text())
    weights = load_file(folder / "model.safetensors")
    manifest = "acestep-v15-xl-turbo" if variant.startswith("xl-") else "acestep-v15-turbo"
    assert set(weights) == key_names(manifest)
    with torch.device("meta"):
        model = AceStepModel.from_config(config)
    model.load_state_dict(weights, strict=True, assign=True)
    assert model.config.is_xl == variant.startswith("xl-")
    assert config["is_turbo"] == variant.endswith("turbo")
    assert (folder / "silence_latent.pt").is_file()


def test_xl_variant_keeps_the_encoder_at_the_2b_tiny_width() -> None:
    xl, turbo = dit_config("xl-turbo"), dit_config("turbo")
    assert xl["encoder_hidden_size"] == turbo["hidden_size"] < xl["hidden_size"]
    assert xl["num_hidden_layers"] == 32 and len(xl["layer_types"]) == 32
    real_fields = set(
        json.loads((FIXTURES / "acestep-v15-xl-turbo.keys.json").read_text())["config"]
    )
    assert {k for k in xl if k.startswith("encoder_")} <= real_fields


def test_variants_share_the_text_encoder_bytes(checkpoints: dict[str, Path]) -> None:
    name = "Qwen3-Embedding-0.6B/model.safetensors"
    assert len({(checkpoints[v] / name).read_bytes() for v in VARIANTS}) == 1


def test_unknown_variant_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown variant"):
        make_tiny_checkpoint(tmp_path, variant="xl-mega")
