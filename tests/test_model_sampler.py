"""Turbo schedules, shift snapping, per-dtype rounding, and the official bf16 numerics."""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch
from model_fixtures import TINY, load_tiny_model, relative_error
from safetensors.torch import load_file
from torch.nn.attention import SDPBackend, sdpa_kernel

from acestep_daemon.model import AceStepModel, draw_noise, sample_turbo, snap_shift, turbo_timesteps
from acestep_daemon.model.attention import rope_inv_freq
from acestep_daemon.model.tokenizer import fsq_codes

# The values the official turbo sampler actually uses under bf16 (its timestep table
# rounded to bfloat16 before use).
BF16_TIMESTEPS = {
    3.0: [1.0, 0.953125, 0.8984375, 0.83203125, 0.75, 0.64453125, 0.5, 0.30078125],
    2.0: [1.0, 0.93359375, 0.85546875, 0.76953125, 0.66796875, 0.546875, 0.400390625, 0.22265625],
    1.0: [1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125],
}
BF16_DT = {
    3.0: [0.046875, 0.0546875, 0.06640625, 0.08203125, 0.10546875, 0.14453125, 0.19921875],
    2.0: [0.06640625, 0.078125, 0.0859375, 0.1015625, 0.12109375, 0.146484375, 0.177734375],
    1.0: [0.125] * 7,
}
BF16_T_TIMES_1000 = {
    3.0: [1000, 952, 900, 832, 752, 644, 500, 300],
    2.0: [1000, 932, 856, 768, 668, 548, 400, 223],
    1.0: [1000, 876, 752, 624, 500, 376, 250, 125],
}


@pytest.mark.parametrize(
    ("requested", "snapped"), [(1.0, 1.0), (1.5, 1.0), (2.5, 2.0), (2.6, 3.0), (0.1, 1.0), (9, 3.0)]
)
def test_shift_snaps_to_nearest_supported_value_ties_to_smaller(
    requested: float, snapped: float
) -> None:
    assert snap_shift(requested) == snapped


@pytest.mark.parametrize("shift", [1.0, 2.0, 3.0])
def test_tables_follow_the_shift_formula(shift: float) -> None:
    expected = [shift * u / (1 + (shift - 1) * u) for u in (1 - k / 8 for k in range(8))]
    assert turbo_timesteps(shift) == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize("shift", [1.0, 2.0, 3.0])
def test_bf16_schedule_rounding_matches_the_official_values(shift: float) -> None:
    used = torch.tensor(turbo_timesteps(shift), dtype=torch.bfloat16).tolist()
    assert used == BF16_TIMESTEPS[shift]
    assert [a - b for a, b in itertools.pairwise(used)] == BF16_DT[shift]
    scaled = (torch.tensor(used, dtype=torch.bfloat16) * 1000).tolist()
    assert scaled == BF16_T_TIMES_1000[shift]


class RecordingDiT:
    """Stands in for the DiT: records what the sampler feeds it and predicts v = 1."""

    reuse_step_constants = False  # nothing to compute once per run

    def __init__(self) -> None:
        self.timesteps: list[torch.Tensor] = []

    def __call__(self, x, timestep, timestep_r, encoder_hidden, context, constants):
        assert constants is None
        assert torch.equal(timestep, timestep_r)
        self.timesteps.append(timestep)
        return torch.ones_like(x)


class StubModel:
    def __init__(self) -> None:
        self.decoder = RecordingDiT()


def test_sampler_feeds_bf16_rounded_timesteps_and_reports_each_step() -> None:
    stub, steps = StubModel(), []
    noise, context = torch.zeros(2, 3, 4, dtype=torch.bfloat16), torch.zeros(2, 3, 8).bfloat16()
    out = sample_turbo(stub, noise, None, context, 3.0, on_step=lambda k, n: steps.append((k, n)))
    assert steps == [(k, 8) for k in range(8)]
    assert all(t.dtype == torch.bfloat16 and t.shape == (2,) for t in stub.decoder.timesteps)
    assert [t[0].item() for t in stub.decoder.timesteps] == BF16_TIMESTEPS[3.0]
    # v = 1 everywhere: x walks down by each rounded dt, then the last step subtracts t_7.
    expected = torch.zeros((), dtype=torch.bfloat16)
    for dt in BF16_DT[3.0]:
        expected = expected - dt * torch.ones((), dtype=torch.bfloat16)
    expected = expected - BF16_TIMESTEPS[3.0][-1]
    assert torch.equal(out, expected.expand_as(out))


def test_on_step_may_raise_to_cancel_before_the_dit_runs() -> None:
    stub = StubModel()

    def cancel_at_two(k: int, _: int) -> None:
        if k == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sample_turbo(
            stub, torch.zeros(1, 2, 4), None, torch.zeros(1, 2, 8), 1.0, on_step=cancel_at_two
        )
    assert len(stub.decoder.timesteps) == 2


def test_official_bf16_model_rounds_rope_frequencies_to_bf16() -> None:
    facts = load_file(TINY / "bf16.safetensors")
    ours = rope_inv_freq(16, 1_000_000.0, round_to=torch.bfloat16)
    assert torch.equal(ours, facts["rope_inv_freq"].float())
    assert not torch.equal(ours, rope_inv_freq(16, 1_000_000.0, round_to=None))


def test_bf16_fsq_codebook_is_formed_in_bf16_like_the_official_buffer() -> None:
    facts = load_file(TINY / "bf16.safetensors")
    levels = torch.tensor([8, 8, 8, 5, 5, 5], dtype=torch.int32)
    places = [1, 8, 64, 512, 2560, 12800]
    for d, place in enumerate(places):
        indices = torch.arange(int(levels[d])) * place
        grid = fsq_codes(indices, levels, torch.bfloat16)[:, d]
        assert torch.equal(grid, facts[f"fsq_codebook_grid.d{d}"])


BF16_ERROR_FACTOR = 2.0
"""How far past the official bf16 run's own error a correct bf16 port may land (see below)."""


@torch.no_grad()
def fixture_generation(
    model: AceStepModel,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    kernels: list[SDPBackend] | None = None,
) -> torch.Tensor:
    """The fixture's shift-3 generation with every input and the model in `dtype` on `device`,
    returned on the CPU; `kernels` limits the attention kernels of the DiT's sampling (the
    condition encoder, whose padding needs a mask, runs before)."""
    cases = load_file(TINY / "cases.safetensors")
    model = model.to(device, dtype)
    noise = draw_noise([11, 22], 17, 64, "cpu", dtype)
    # bf16 noise is the fp32 draw rounded, so it is the same on every CPU.
    assert torch.equal(noise, cases["generate.noise"].to(dtype))

    def put(name: str) -> torch.Tensor:
        tensor = cases[name].to(device)
        return tensor if "mask" in name or "order" in name else tensor.to(dtype)

    hidden, _ = model.encode_condition(
        *(put(f"condition.{n}") for n in ("text_hidden", "text_mask", "lyric_hidden")),
        *(put(f"condition.{n}") for n in ("lyric_mask", "refer_latents", "refer_order")),
    )
    source = put("generate.silence_latent")[:, :17].repeat(2, 1, 1)
    context = model.build_context(source, torch.ones(2, 17, device=device))
    with sdpa_kernel(kernels) if kernels else contextlib.nullcontext():
        return sample_turbo(model, noise.to(device), hidden, context, 3.0).cpu()


def load_fp32_result() -> torch.Tensor:
    """The official fp32 generation of the same case."""
    return load_file(TINY / "cases.safetensors")["generate.shift3"]


def bf16_error_budget() -> float:
    """BF16_ERROR_FACTOR x the official bf16 run's error against the official fp32 run."""
    official_bf16 = load_file(TINY / "bf16.safetensors")["generate_bf16.shift3"]
    return BF16_ERROR_FACTOR * relative_error(official_bf16, load_fp32_result())


def test_bf16_generation_stays_within_twice_the_official_bf16_error_of_the_fp32_run() -> None:
    """bf16 is compared with the official fp32 result, never bit for bit.

    bf16 keeps 8 significant bits (unit roundoff 2^-8 = 0.39 %), and which of two neighbouring
    values a matmul, softmax or norm output rounds to depends on the CPU's kernels (blocking,
    accumulation order, AMX or AVX-512 or neither), so two correct bf16 runs on different CPUs
    differ. Most of the bf16 error is common to every CPU: the rounded weights, inputs,
    RoPE frequencies and schedule; the kernel-dependent part is of the same size per rounding
    and grows the same way through 4 layers x 8 steps. The official bf16 run (fixture, made on
    another CPU) lands 3.5 % of the output scale from the official fp32 run; ours, here, 3.8 %;
    ours with half the noise values moved by one bf16 ulp (a stand-in for different kernel
    roundings) 3.5-3.8 %, and 0.65-1.3 % from the official bf16 output. A correct port thus
    lands within 2x the official bf16 error (6.9 %) on any CPU, while a one-off sliding window
    (9.4 %) or swapped AdaLN rows (39-77 %) fall outside (see the test below).
    """
    assert relative_error(fixture_generation(load_tiny_model()), load_fp32_result()) <= (
        bf16_error_budget()
    )


@pytest.mark.parametrize(
    "change",
    [{"sliding_window": 5}, {"sliding_window": 3}, {"use_sliding_window": False}],
    ids=["window-one-too-wide", "window-one-too-narrow", "no-sliding-window"],
)
def test_a_porting_mistake_falls_outside_the_bf16_error_budget(change: dict) -> None:
    out = fixture_generation(load_tiny_model(**change))
    assert relative_error(out, load_fp32_result()) > bf16_error_budget()
