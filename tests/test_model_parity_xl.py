"""Our port reproduces the official XL code (`xl_turbo/modeling_acestep_v15_xl_turbo.py`) on a
tiny random XL checkpoint: encoder-width condition encoder with the timbre CLS token, a DiT
whose condition embedder widens the condition, and the float32 quantizer.

Fixtures in tests/fixtures/acestep_tiny_xl come from the official code at fp32 on the CPU
(see tests/fixtures/README.md).
"""

from __future__ import annotations

import json

import pytest
import torch
from model_fixtures import (
    RELATIVE_TOLERANCE,
    TINY_XL,
    encode_condition_case,
    load_tiny_model,
    load_weights,
    relative_error,
)
from safetensors.torch import load_file

from acestep_daemon.model import AceStepModel


@pytest.fixture(scope="module")
def model() -> AceStepModel:
    return load_tiny_model(TINY_XL)


@pytest.fixture(scope="module")
def cases() -> dict[str, torch.Tensor]:
    return load_file(TINY_XL / "cases.safetensors")


@torch.no_grad()
def condition_error(model: AceStepModel, cases: dict[str, torch.Tensor]) -> float:
    hidden, mask = encode_condition_case(model, cases)
    assert torch.equal(mask.long(), cases["condition.mask"])
    return relative_error(hidden, cases["condition.hidden"])


def test_tiny_xl_config_is_xl_with_a_narrower_encoder(model: AceStepModel) -> None:
    assert model.config.is_xl
    assert model.null_condition_emb.shape == (1, 1, 64)
    assert model.decoder.condition_embedder.weight.shape == (96, 64)


def test_xl_condition_encoder_with_timbre_cls_matches_official(
    model: AceStepModel, cases: dict[str, torch.Tensor]
) -> None:
    assert condition_error(model, cases) <= RELATIVE_TOLERANCE


@torch.no_grad()
def test_xl_timbre_encoder_reads_the_cls_output_like_official(
    model: AceStepModel, cases: dict[str, torch.Tensor]
) -> None:
    timbre, mask = model.encoder.timbre_encoder(
        cases["condition.refer_latents"], cases["condition.refer_order"]
    )
    assert relative_error(timbre, cases["timbre.hidden"]) <= RELATIVE_TOLERANCE
    assert torch.equal(mask, cases["timbre.mask"])


@torch.no_grad()
def test_xl_dit_forward_matches_official(
    model: AceStepModel, cases: dict[str, torch.Tensor]
) -> None:
    names = ("x", "timestep", "timestep_r", "encoder_hidden", "context")
    v = model.decoder(*(cases[f"dit_t21.{n}"] for n in names))
    assert relative_error(v, cases["dit_t21.v"]) <= RELATIVE_TOLERANCE


@torch.no_grad()
def test_xl_tokenizer_matches_official(model: AceStepModel, cases: dict[str, torch.Tensor]) -> None:
    quantized, indices = model.tokenize(cases["cover.latents"], cases["generate.silence_latent"])
    assert torch.equal(indices, cases["cover.indices"])
    assert relative_error(quantized, cases["cover.quantized"]) <= RELATIVE_TOLERANCE


@torch.no_grad()
def test_xl_quantizer_runs_in_float32_under_bf16(model: AceStepModel) -> None:
    """Official XL casts the quantizer to float32, so bf16 inputs quantize like fp32 ones."""
    quantizer = model.tokenizer.quantizer
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(5)).bfloat16()
    ours, indices = quantizer(x)
    reference, reference_indices = quantizer(x.float())
    assert ours.dtype == torch.bfloat16
    assert torch.equal(indices, reference_indices)
    assert torch.equal(ours, reference.bfloat16())


def test_dropping_the_timbre_cls_token_breaks_xl_condition_parity(
    cases: dict[str, torch.Tensor],
) -> None:
    """The 2 B reading (no CLS: output at the first reference frame) misses by far."""
    model = load_tiny_model(TINY_XL)
    model.encoder.timbre_encoder.prepend_cls = False
    assert condition_error(model, cases) > 100 * RELATIVE_TOLERANCE


def test_xl_weights_need_the_encoder_fields_to_load() -> None:
    """Without the `encoder_*` fields the model is built at the decoder width and refuses them."""
    config = json.loads((TINY_XL / "config.json").read_text())
    plain = {k: v for k, v in config.items() if not k.startswith("encoder_")}
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_weights(plain, load_file(TINY_XL / "model.safetensors"))
