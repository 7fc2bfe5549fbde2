"""The DiT's fast paths (reused step constants, mask-free and banded attention) change no
result beyond the dtype's rounding."""

from __future__ import annotations

import pytest
import torch
from model_fixtures import TINY, load_tiny_model, relative_error
from safetensors.torch import load_file

from acestep_daemon.model import AceStepModel, RepaintInputs, sample_turbo
from acestep_daemon.model.attention import Band, additive_mask
from acestep_daemon.model.dit import BAND_MIN_WINDOWS, DiT

CONDITION = ("text_hidden", "text_mask", "lyric_hidden", "lyric_mask", "refer_latents")


@pytest.fixture(scope="module")
def cases() -> dict[str, torch.Tensor]:
    return load_file(TINY / "cases.safetensors")


def set_fast_paths(model: AceStepModel, enabled: bool) -> AceStepModel:
    model.decoder.reuse_step_constants = enabled
    model.decoder.mask_free_attention = enabled
    model.decoder.banded_attention = enabled
    return model


@torch.no_grad()
def generate(
    model: AceStepModel, cases: dict, dtype: torch.dtype, repaint: bool = False
) -> torch.Tensor:
    model = model.to(dtype)
    inputs = [cases[f"condition.{n}"] for n in CONDITION]
    inputs = [t if "mask" in n else t.to(dtype) for n, t in zip(CONDITION, inputs, strict=True)]
    hidden, _ = model.encode_condition(*inputs, cases["condition.refer_order"])
    if repaint:
        mask = cases["repaint.mask"]
        context = model.build_context(cases["repaint.src"].to(dtype), mask.to(dtype))
        inputs = RepaintInputs(mask=mask, clean_latents=cases["repaint.clean"].to(dtype))
        return sample_turbo(
            model, cases["generate.noise"].to(dtype), hidden, context, 3.0, repaint=inputs
        )
    source = cases["generate.silence_latent"][:, :17].repeat(2, 1, 1).to(dtype)
    context = model.build_context(source, torch.ones(2, 17, dtype=dtype))
    return sample_turbo(model, cases["generate.noise"].to(dtype), hidden, context, 3.0)


@pytest.mark.parametrize("repaint", [False, True], ids=["text2music", "repaint"])
@pytest.mark.parametrize("window", [4, 64], ids=["banded", "window-covers"])
def test_fp32_generation_is_bit_identical_with_and_without_fast_paths(
    cases: dict, repaint: bool, window: int
) -> None:
    """On the CPU the same attention kernel runs with a zero mask and with none, and the
    reused keys/values are the very tensors each step would recompute: nothing changes."""
    slow = generate(
        set_fast_paths(load_tiny_model(sliding_window=window), False), cases, torch.float32, repaint
    )
    fast = generate(
        set_fast_paths(load_tiny_model(sliding_window=window), True), cases, torch.float32, repaint
    )
    assert torch.equal(fast, slow)


def test_bf16_generation_with_fast_paths_stays_within_the_bf16_budget(cases: dict) -> None:
    slow = generate(set_fast_paths(load_tiny_model(), False), cases, torch.bfloat16)
    fast = generate(set_fast_paths(load_tiny_model(), True), cases, torch.bfloat16)
    # A small part of the bf16 error budget of tests/test_model_sampler.py (6.9 %).
    assert relative_error(fast, slow) <= 1e-2


class CountingDiT:
    """Counts condition-embedder calls of a real DiT."""

    def __init__(self, dit: DiT) -> None:
        self.calls = 0
        embedder = dit.condition_embedder
        original = embedder.forward

        def counted(x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return original(x)

        embedder.forward = counted


@torch.no_grad()
def test_condition_keys_and_values_are_computed_once_per_sampling_run(cases: dict) -> None:
    model = load_tiny_model()
    counter = CountingDiT(model.decoder)
    generate(model, cases, torch.float32)
    assert counter.calls == 1
    model.decoder.reuse_step_constants = False
    generate(model, cases, torch.float32)
    assert counter.calls == 1 + 8


@torch.no_grad()
def test_given_step_constants_equal_those_each_call_computes(cases: dict) -> None:
    dit = load_tiny_model().decoder
    names = ("x", "timestep", "timestep_r", "encoder_hidden", "context")
    x, t, r, hidden, context = (cases[f"dit_t21.{n}"] for n in names)
    constants = dit.step_constants(hidden, x.shape[1], x.dtype)
    computed = dit(x, t, r, hidden, context)
    assert torch.equal(dit(x, t, r, hidden, context, constants), computed)
    other = dit.step_constants(hidden * 2, x.shape[1], x.dtype)  # the constants are what counts
    assert not torch.equal(dit(x, t, r, hidden, context, other), computed)


@torch.no_grad()
def test_step_constants_for_another_length_are_refused(cases: dict) -> None:
    dit = load_tiny_model().decoder
    names = ("x", "timestep", "timestep_r", "encoder_hidden", "context")
    x, t, r, hidden, context = (cases[f"dit_t21.{n}"] for n in names)
    constants = dit.step_constants(hidden, x.shape[1] + 2, x.dtype)
    with pytest.raises(ValueError, match="patches"):
        dit(x, t, r, hidden, context, constants)


def test_mask_free_attention_builds_no_dense_mask_where_every_key_is_attended() -> None:
    model = load_tiny_model()  # sliding window 4
    hidden = torch.zeros(1, 3, 64)
    short = model.decoder.step_constants(hidden, 10, torch.float32)  # 5 patches
    assert short.full_mask is short.sliding_mask is short.cross_mask is None
    long = model.decoder.step_constants(hidden, 11, torch.float32)  # 6 patches
    assert long.full_mask is None and long.cross_mask is None
    assert long.sliding_mask is not None and long.sliding_mask.shape == (1, 1, 6, 6)
    model.decoder.mask_free_attention = False
    dense = model.decoder.step_constants(hidden, 9, torch.float32)  # 5 patches
    assert dense.full_mask.shape == dense.sliding_mask.shape == (1, 1, 5, 5)
    assert dense.cross_mask.shape == (1, 1, 5, 3)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize(("length", "window", "block"), [(37, 4, 8), (300, 16, 32), (5, 4, 8)])
def test_banded_attention_equals_the_dense_band_mask(
    dtype: torch.dtype, tolerance: float, length: int, window: int, block: int
) -> None:
    generator = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(2, 3, length, 16, generator=generator).to(dtype) for _ in range(3))
    dense = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=additive_mask(length, dtype, q.device, window), scale=0.25
    )
    banded = Band.build(length, window, block, dtype, q.device).attend(q, k, v, 0.25)
    assert relative_error(banded, dense) <= tolerance


def test_banded_attention_is_wrong_with_a_wrong_window() -> None:
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 8, generator=generator) for _ in range(3))
    dense = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=additive_mask(40, torch.float32, q.device, 4)
    )
    assert (
        relative_error(
            Band.build(40, 5, 8, torch.float32, q.device).attend(q, k, v, 8**-0.5), dense
        )
        > 1e-2
    )


@torch.no_grad()
def test_dit_with_banded_sliding_layers_tracks_the_dense_masks(cases: dict) -> None:
    model = load_tiny_model()  # window 4: banded above 32 patches
    frames = 2 * BAND_MIN_WINDOWS * 4 + 6  # 35 patches
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, frames, 64, generator=generator)
    context = torch.randn(2, frames, 128, generator=generator)
    t = torch.tensor([0.9, 0.6])
    hidden = cases["dit_t21.encoder_hidden"]
    constants = model.decoder.step_constants(hidden, frames, torch.float32)
    assert isinstance(constants.sliding_mask, Band)
    fast = model.decoder(x, t, t, hidden, context)
    model.decoder.banded_attention = False
    dense = model.decoder(x, t, t, hidden, context)
    assert relative_error(fast, dense) <= 1e-6
