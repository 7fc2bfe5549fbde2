"""float16: the lyric encoder's last projection must not overflow (GPUs without bf16)."""

from __future__ import annotations

import copy

import pytest
import torch
from model_fixtures import TINY, load_tiny_model, relative_error
from safetensors.torch import load_file

from acestep_daemon.model.encoders import LyricEncoder

FP16_MAX = torch.finfo(torch.float16).max
STREAM_PEAK = 1e4


def overflowing_lyric_encoder() -> tuple[LyricEncoder, torch.Tensor, torch.Tensor]:
    """The tiny lyric encoder scaled the way the real checkpoints are: the stream reaches
    ~1e4, then the last down projection's output twice float16's range (real: ~1.15e4 and
    ~5e5). Returns (encoder in float32, lyric_hidden, lyric_mask)."""
    encoder = load_tiny_model().encoder.lyric_encoder
    cases = load_file(TINY / "cases.safetensors")
    hidden, mask = cases["condition.lyric_hidden"], cases["condition.lyric_mask"]
    down = encoder.layers[-1].mlp.down_proj
    with torch.no_grad():
        stream = encoder.embed_tokens(hidden).abs().max()
        encoder.embed_tokens.weight *= STREAM_PEAK / stream
        encoder.embed_tokens.bias *= STREAM_PEAK / stream
        peak = {}
        hook = down.register_forward_hook(lambda _m, _i, out: peak.setdefault("out", out))
        encoder(hidden, mask)
        hook.remove()
        down.weight *= 2 * FP16_MAX / peak["out"].abs().max()
    return encoder, hidden, mask


@torch.no_grad()
def test_float16_lyric_states_are_finite_and_close_to_float32() -> None:
    encoder, hidden, mask = overflowing_lyric_encoder()
    reference = encoder(hidden, mask)  # float32: [B, L, D]
    half = copy.deepcopy(encoder).half()

    out = half(hidden.half(), mask)

    assert out.dtype == torch.float16
    assert torch.isfinite(out).all()
    # A norm's output (scale ~1) after float16 layers: float16's epsilon is ~1e-3 and the
    # run lands within it (measured 7.7e-4); 1e-2 leaves room for other CPUs' kernels, and
    # a lost residual (the stream's 1e4 beside the projection's 1.3e5) is off by 5.5e-2.
    assert relative_error(out, reference) < 1e-2


@torch.no_grad()
def test_the_overflow_is_real_without_the_float32_projection() -> None:
    """Control: the same float16 encoder with its last projection in float16 gives NaN."""
    encoder, hidden, mask = overflowing_lyric_encoder()
    half = copy.deepcopy(encoder).half()
    x = half.embed_tokens(hidden.half())

    plain = half.run_layers(x, mask, float32_last_projection=False)

    assert not torch.isfinite(plain).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_other_dtypes_keep_the_plain_path(dtype: torch.dtype) -> None:
    """Only float16 takes the float32 projection: float32 and bf16 stay the official path."""
    encoder = load_tiny_model().encoder.lyric_encoder.to(dtype)
    cases = load_file(TINY / "cases.safetensors")
    hidden = cases["condition.lyric_hidden"].to(dtype)
    mask = cases["condition.lyric_mask"]

    out = encoder(hidden, mask)

    plain = encoder.run_layers(encoder.embed_tokens(hidden), mask)
    assert out.dtype == dtype
    assert torch.equal(out, plain)
