"""OobleckVAE: checkpoint keys, parity with diffusers' AutoencoderOobleck, tiled = full."""

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from acestep_daemon.model.vae import OobleckVAE, Snake1d, WNConvTranspose1d

FIXTURES = Path(__file__).parent / "fixtures"
TINY_WEIGHTS = FIXTURES / "vae_tiny.safetensors"
TINY_IO = FIXTURES / "vae_tiny_io.safetensors"


def tiny_config() -> dict:
    with safe_open(TINY_WEIGHTS, "pt") as f:
        return json.loads(f.metadata()["config"])


def load_tiny(state_dict: dict[str, torch.Tensor] | None = None) -> OobleckVAE:
    with torch.device("meta"):
        vae = OobleckVAE.from_config(tiny_config())
    vae.load_state_dict(state_dict or load_file(TINY_WEIGHTS), strict=True, assign=True)
    return vae.eval()


@pytest.fixture(scope="module")
def vae() -> OobleckVAE:
    return load_tiny()


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return load_file(TINY_IO)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    assert actual.shape == expected.shape
    tolerance = rel * expected.abs().max().item()
    assert (actual - expected).abs().max().item() <= tolerance


def test_full_size_vae_built_on_meta_has_the_checkpoint_keys_and_shapes() -> None:
    manifest = json.loads((FIXTURES / "vae.keys.json").read_text())
    with torch.device("meta"):
        vae = OobleckVAE.from_config({"_class_name": "AutoencoderOobleck", **manifest["config"]})
    shapes = {name: list(t.shape) for name, t in vae.state_dict().items()}
    assert shapes == {name: spec["shape"] for name, spec in manifest["keys"].items()}
    assert len(shapes) == 365
    assert sum(1 for name in shapes if name.startswith("encoder.")) == 183
    assert list(vae.buffers()) == []
    assert vae.hop_length == 1920


def test_strict_load_rejects_a_missing_weight_g() -> None:
    state_dict = load_file(TINY_WEIGHTS)
    del state_dict["decoder.conv2.weight_g"]
    with pytest.raises(RuntimeError, match=r"decoder\.conv2\.weight_g"):
        load_tiny(state_dict)


def test_decode_matches_diffusers_reference(vae: OobleckVAE, reference: dict) -> None:
    with torch.no_grad():
        audio = vae.decode(reference["decode.latents"])
    assert_close(audio, reference["decode.audio"])


def test_encode_mean_and_std_match_diffusers_posterior(vae: OobleckVAE, reference: dict) -> None:
    with torch.no_grad():
        mean, std = vae.encode(reference["encode.audio"])
    assert_close(mean, reference["encode.mean"])
    assert_close(std, reference["encode.std"])


def test_bf16_decode_and_encode_are_bit_identical_to_the_reference(reference: dict) -> None:
    vae = load_tiny().to(torch.bfloat16)
    with torch.no_grad():
        audio = vae.decode(reference["decode.latents"].to(torch.bfloat16))
        mean, _ = vae.encode(reference["encode.audio"].to(torch.bfloat16))
    assert torch.equal(audio, reference["decode.audio_bf16"])
    assert torch.equal(mean, reference["encode.mean_bf16"])


def test_parametrization_key_names_load_as_weight_g_and_weight_v(reference: dict) -> None:
    renamed = {
        name.replace("weight_g", "parametrizations.weight.original0").replace(
            "weight_v", "parametrizations.weight.original1"
        ): tensor
        for name, tensor in load_file(TINY_WEIGHTS).items()
    }
    vae = load_tiny(renamed)
    with torch.no_grad():
        audio = vae.decode(reference["decode.latents"])
    assert_close(audio, reference["decode.audio"])


def snake_without_exp(self: Snake1d, x: torch.Tensor) -> torch.Tensor:
    return x + (self.beta + 1e-9).reciprocal() * torch.sin(self.alpha * x).pow(2)


def transposed_norm_per_output_channel(self: WNConvTranspose1d) -> torch.Tensor:
    v = self.weight_v  # [in, out, k]: normalise over dims 0 and 2 instead of 1 and 2
    return v * (self.weight_g.view(-1, 1, 1).mean() / v.norm(dim=(0, 2), keepdim=True))


@pytest.mark.parametrize(
    ("owner", "name", "wrong"),
    [
        (Snake1d, "forward", snake_without_exp),
        (WNConvTranspose1d, "weight", transposed_norm_per_output_channel),
    ],
    ids=["snake-without-exp", "transposed-weight-norm-wrong-dim"],
)
def test_subtly_wrong_port_fails_the_parity_check(
    monkeypatch: pytest.MonkeyPatch,
    vae: OobleckVAE,
    reference: dict,
    owner: type,
    name: str,
    wrong: Callable,
) -> None:
    monkeypatch.setattr(owner, name, wrong)
    with torch.no_grad():
        audio = vae.decode(reference["decode.latents"])
    with pytest.raises(AssertionError):
        assert_close(audio, reference["decode.audio"])


@pytest.mark.parametrize("frames", [30, 49, 61])
def test_tiled_decode_equals_full_decode(vae: OobleckVAE, frames: int) -> None:
    latents = torch.randn(1, 64, frames, generator=torch.Generator().manual_seed(frames))
    calls: list[tuple[int, int]] = []
    with torch.no_grad():
        full = vae.decode(latents)
        tiled = vae.tiled_decode(latents, 48, 16, on_chunk=lambda i, n: calls.append((i, n)))
    assert tiled.shape == (1, 2, frames * 1920)
    assert_close(tiled, full)
    total = 1 if frames <= 48 else -(-frames // 16)
    assert calls == [(i, total) for i in range(total)]


def test_tiled_decode_halves_an_overlap_that_leaves_no_core(vae: OobleckVAE) -> None:
    calls: list[tuple[int, int]] = []
    with torch.no_grad():
        audio = vae.tiled_decode(
            torch.randn(1, 64, 20), 16, 8, on_chunk=lambda i, n: calls.append((i, n))
        )
    assert audio.shape == (1, 2, 20 * 1920)
    assert calls == [(i, 3) for i in range(3)]  # overlap 8 -> 4, cores of 8 frames


def test_on_chunk_raising_stops_the_tiled_decode(vae: OobleckVAE) -> None:
    seen = []

    def cancel_at_second(index: int, total: int) -> None:
        seen.append(index)
        if index == 1:
            raise KeyboardInterrupt

    with torch.no_grad(), pytest.raises(KeyboardInterrupt):
        vae.tiled_decode(torch.zeros(1, 64, 80), 48, 16, on_chunk=cancel_at_second)
    assert seen == [0, 1]


@pytest.mark.parametrize("seconds", [1.5, 3.3, 4.0])
def test_tiled_encode_equals_full_encode(vae: OobleckVAE, seconds: float) -> None:
    samples = int(seconds * 48_000)
    audio = 0.3 * torch.randn(1, 2, samples, generator=torch.Generator().manual_seed(samples))
    chunk, overlap = 48 * 1920, 12 * 1920  # 1.92 s windows, 0.48 s overlap (field ±0.3 s)
    calls: list[tuple[int, int]] = []
    with torch.no_grad():
        full, _ = vae.encode(audio)
        tiled = vae.tiled_encode(audio, chunk, overlap, on_chunk=lambda i, n: calls.append((i, n)))
    assert tiled.shape == (1, 4, samples // 1920)
    assert_close(tiled, full)
    total = 1 if samples <= chunk else -(-samples // (24 * 1920))
    assert calls == [(i, total) for i in range(total)]


def test_tiled_encode_rejects_an_overlap_that_leaves_no_core(vae: OobleckVAE) -> None:
    with pytest.raises(ValueError, match="chunk_samples"):
        vae.tiled_encode(torch.zeros(1, 2, 48_000), 19_200, 9_600)
