"""Our port reproduces the official ACE-Step v1.5 turbo code on a tiny random checkpoint.

Fixtures in tests/fixtures/acestep_tiny were produced by running the official model at fp32 on
the CPU (see tests/fixtures/README.md); every stage must match within 1e-5 of its scale.
"""

from __future__ import annotations

import pytest
import torch
from model_fixtures import (
    RELATIVE_TOLERANCE,
    TINY,
    encode_condition_case,
    load_tiny_model,
    relative_error,
)
from safetensors.torch import load_file

from acestep_daemon.model import AceStepModel, RepaintInputs, draw_noise, sample_turbo


@pytest.fixture(scope="module")
def model() -> AceStepModel:
    return load_tiny_model()


@pytest.fixture(scope="module")
def cases() -> dict[str, torch.Tensor]:
    return load_file(TINY / "cases.safetensors")


def assert_parity(ours: torch.Tensor, reference: torch.Tensor) -> None:
    assert relative_error(ours, reference) <= RELATIVE_TOLERANCE


def generate(
    model: AceStepModel,
    cases: dict[str, torch.Tensor],
    shift: float,
    src: torch.Tensor,
    chunk_mask: torch.Tensor,
    *,
    cover_hints: torch.Tensor | None = None,
    is_cover: torch.Tensor | None = None,
    repaint: RepaintInputs | None = None,
) -> torch.Tensor:
    hidden, _ = encode_condition_case(model, cases)
    context = model.build_context(src, chunk_mask, cover_hints, is_cover)
    return sample_turbo(model, cases["generate.noise"], hidden, context, shift, repaint=repaint)


def silence_source(cases: dict[str, torch.Tensor], frames: int = 17) -> torch.Tensor:
    return cases["generate.silence_latent"][:, :frames].repeat(2, 1, 1)


@torch.no_grad()
def test_condition_encoder_matches_official_with_padding_and_two_references(
    model: AceStepModel, cases: dict[str, torch.Tensor]
) -> None:
    hidden, mask = encode_condition_case(model, cases)
    assert_parity(hidden, cases["condition.hidden"])
    assert torch.equal(mask.long(), cases["condition.mask"])


@pytest.mark.parametrize("frames", [21, 16])
@torch.no_grad()
def test_one_dit_forward_matches_official_for_odd_and_even_length(
    model: AceStepModel, cases: dict[str, torch.Tensor], frames: int
) -> None:
    prefix = f"dit_t{frames}."
    v = model.decoder(
        *(cases[prefix + n] for n in ("x", "timestep", "timestep_r", "encoder_hidden", "context"))
    )
    assert_parity(v, cases[prefix + "v"])


def test_seeded_noise_is_drawn_like_official(cases: dict[str, torch.Tensor]) -> None:
    seeds = cases["generate.seeds"].tolist()
    noise = draw_noise(seeds, 17, 64, "cpu", torch.float32)
    assert torch.equal(noise, cases["generate.noise"])


@pytest.mark.parametrize("shift", [1, 2, 3])
def test_full_generation_matches_official_for_each_shift(
    model: AceStepModel, cases: dict[str, torch.Tensor], shift: int
) -> None:
    out = generate(model, cases, float(shift), silence_source(cases), torch.ones(2, 17))
    assert_parity(out, cases[f"generate.shift{shift}"])


def test_repaint_with_injection_and_crossfade_matches_official(
    model: AceStepModel, cases: dict[str, torch.Tensor]
) -> None:
    mask = cases["repaint.mask"]
    repaint = RepaintInputs(mask=mask, clean_latents=cases["repaint.clean"])
    out = generate(model, cases, 3.0, cases["repaint.src"], mask.float(), repaint=repaint)
    assert_parity(out, cases["repaint.out"])


@torch.no_grad()
def test_cover_tokenize_detokenize_and_codes_match_official(
    model: AceStepModel, cases: dict[str, torch.Tensor]
) -> None:
    quantized, indices = model.tokenize(cases["cover.latents"], cases["generate.silence_latent"])
    assert torch.equal(indices, cases["cover.indices"])
    assert_parity(quantized, cases["cover.quantized"])
    assert_parity(model.detokenize(quantized), cases["cover.hints"])
    assert_parity(model.dequantize(indices), cases["cover.from_indices"])


def test_cover_generation_matches_official(
    model: AceStepModel, cases: dict[str, torch.Tensor]
) -> None:
    latents = cases["cover.latents"]
    with torch.no_grad():
        hints = model.detokenize(model.tokenize(latents, cases["generate.silence_latent"])[0])
    is_cover = torch.tensor([True, False])
    out = generate(
        model, cases, 3.0, latents, torch.ones(2, 17), cover_hints=hints, is_cover=is_cover
    )
    assert_parity(out, cases["cover.out"])


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float16, 1e-2), (torch.bfloat16, 1e-1)])
@torch.no_grad()
def test_half_precision_generation_tracks_the_official_fp32_result(
    cases: dict[str, torch.Tensor], dtype: torch.dtype, tolerance: float
) -> None:
    model = load_tiny_model().to(dtype)
    names = ("text_hidden", "text_mask", "lyric_hidden", "lyric_mask", "refer_latents")
    inputs = [cases[f"condition.{n}"] for n in names]
    inputs = [t.to(dtype) if "mask" not in n else t for n, t in zip(names, inputs, strict=True)]
    hidden, _ = model.encode_condition(*inputs, cases["condition.refer_order"])
    context = model.build_context(silence_source(cases).to(dtype), torch.ones(2, 17))
    out = sample_turbo(model, cases["generate.noise"].to(dtype), hidden, context, 3.0)
    assert out.dtype == dtype
    assert relative_error(out, cases["generate.shift3"]) <= tolerance
