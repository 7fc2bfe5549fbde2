"""Full-size models have exactly the 2 B turbo and XL turbo tensor names and shapes."""

import json
from pathlib import Path

import pytest
import torch

from acestep_daemon.model import AceStepConfig, AceStepModel

FIXTURES = Path(__file__).parent / "fixtures"


def _manifest(name: str = "acestep-v15-turbo") -> dict:
    return json.loads((FIXTURES / f"{name}.keys.json").read_text())


@pytest.mark.parametrize(
    ("name", "count"), [("acestep-v15-turbo", 677), ("acestep-v15-xl-turbo", 829)]
)
def test_full_size_state_dict_matches_checkpoint_keys_and_shapes(name: str, count: int) -> None:
    manifest = _manifest(name)
    with torch.device("meta"):
        model = AceStepModel.from_config(manifest["config"])
    shapes = {name: list(t.shape) for name, t in model.state_dict().items()}
    assert shapes == {name: entry["shape"] for name, entry in manifest["keys"].items()}
    assert len(shapes) == manifest["num_tensors"] == count
    assert sum(t.numel() for t in model.state_dict().values()) == manifest["num_elements"]


def test_xl_config_builds_the_encoder_side_at_the_encoder_width() -> None:
    config = AceStepConfig.from_dict(_manifest("acestep-v15-xl-turbo")["config"])
    assert config.is_xl and config.encoder_width == 2048 and config.hidden_size == 2560
    encoder = config.for_encoder()
    assert (encoder.hidden_size, encoder.intermediate_size) == (2048, 6144)
    assert (encoder.num_attention_heads, encoder.num_key_value_heads) == (16, 8)
    assert not AceStepConfig.from_dict(_manifest()["config"]).is_xl


def test_model_owns_no_buffers_so_meta_construction_loads_with_assign() -> None:
    with torch.device("meta"):
        model = AceStepModel.from_config(_manifest()["config"])
    assert list(model.buffers()) == []


def test_config_ignores_unknown_keys_and_defaults_to_alternating_windows() -> None:
    config = AceStepConfig.from_dict({"num_hidden_layers": 4, "auto_map": {}, "is_turbo": True})
    assert [config.is_sliding(i) for i in range(4)] == [True, False, True, False]


@pytest.mark.parametrize(
    "change", [{"hidden_act": "gelu"}, {"rope_scaling": {"rope_type": "yarn"}}]
)
def test_config_rejects_variants_the_port_does_not_implement(change: dict) -> None:
    with pytest.raises(ValueError):
        AceStepConfig.from_dict(change)


def test_full_size_xl_stages_produce_the_documented_shapes_on_the_meta_device() -> None:
    def empty(*shape: int) -> torch.Tensor:
        return torch.empty(*shape, dtype=torch.bfloat16)

    with torch.device("meta"):
        model = AceStepModel.from_config(_manifest("acestep-v15-xl-turbo")["config"])
        model = model.to(torch.bfloat16)
        velocity = model.decoder(
            empty(1, 255, 64), empty(1), empty(1), empty(1, 40, 2048), empty(1, 255, 128)
        )
        quantized, _ = model.tokenize(empty(1, 255, 64), empty(1, 15000, 64))
        lyrics = model.encoder.lyric_encoder(empty(1, 30, 1024), torch.ones(1, 30))
    assert velocity.shape == (1, 255, 64) and velocity.dtype == torch.bfloat16
    assert quantized.shape == (1, 51, 2048) and quantized.dtype == torch.bfloat16
    assert lyrics.shape == (1, 30, 2048)


def test_full_size_stages_produce_the_documented_shapes_on_the_meta_device() -> None:
    def empty(*shape: int) -> torch.Tensor:
        return torch.empty(*shape, dtype=torch.bfloat16)

    with torch.device("meta"):
        model = AceStepModel.from_config(_manifest()["config"]).to(torch.bfloat16)
        velocity = model.decoder(
            empty(1, 255, 64), empty(1), empty(1), empty(1, 40, 2048), empty(1, 255, 128)
        )
        quantized, indices = model.tokenize(empty(1, 255, 64), empty(1, 15000, 64))
        hints = model.detokenize(quantized)
        lyrics = model.encoder.lyric_encoder(empty(1, 30, 1024), torch.ones(1, 30))
    assert velocity.shape == (1, 255, 64) and velocity.dtype == torch.bfloat16
    assert quantized.shape == (1, 51, 2048) and indices.shape == (1, 51, 1)
    assert hints.shape == (1, 255, 64)
    assert lyrics.shape == (1, 30, 2048)
