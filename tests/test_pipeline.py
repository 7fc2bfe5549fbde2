"""The end-to-end pipeline on the tiny checkpoint: modes, seeds, stage outputs, failures."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from acestep_daemon.audio import write_audio
from acestep_daemon.checkpoint import resolve_checkpoint
from acestep_daemon.constants import LATENT_HOP, SAMPLE_RATE
from acestep_daemon.errors import GenerationFailed, InvalidRequest
from acestep_daemon.memory import cpu_place
from acestep_daemon.params import GenerationParams
from acestep_daemon.pipeline import Pipeline, default_dtype, latent_frames, repaint_window


@pytest.fixture(scope="module")
def pipeline(tiny_checkpoint) -> Pipeline:
    """fp32 whatever the CPU's default: these tests compare values (tiled = whole, ...)."""
    return Pipeline.load(resolve_checkpoint(tiny_checkpoint), device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def source_audio(tmp_path_factory) -> object:
    """Six seconds of a stereo chord, as a user's source or reference file."""
    t = np.arange(6 * SAMPLE_RATE) / SAMPLE_RATE
    left = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.1 * np.sin(2 * np.pi * 330 * t)
    right = 0.3 * np.sin(2 * np.pi * 277 * t)
    path = tmp_path_factory.mktemp("audio") / "source.wav"
    sf.write(path, np.stack([left, right], axis=1), SAMPLE_RATE, subtype="FLOAT")
    return path


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "expected"),
    [(True, False, torch.bfloat16), (False, True, torch.bfloat16), (False, False, torch.float32)],
)
def test_cpu_default_dtype_is_bf16_only_with_native_bf16_products(
    monkeypatch, avx512_bf16, amx, expected
):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    cpu = torch.device("cpu")
    assert default_dtype(cpu) == expected
    assert cpu_place() == (cpu, expected)  # the out-of-memory fallback follows it
    assert default_dtype(torch.device("cuda")) == torch.bfloat16


def test_latent_length_follows_upstream_rounding():
    assert latent_frames(10) == 250
    assert latent_frames(30) == 750
    assert latent_frames(10.3) == 257  # odd lengths are kept
    assert latent_frames(10.26) == 257  # rounded to 0.1 s first
    assert latent_frames(1) == 128  # never below 128 frames
    assert latent_frames(600) == 15000


def test_generate_returns_requested_duration_of_stereo_audio(pipeline):
    audio = pipeline.generate(GenerationParams(caption="calm piano", duration_s=2.5, seed=3))
    assert audio.samples.shape == (2, int(2.5 * SAMPLE_RATE))
    assert audio.samples.dtype == torch.float32
    assert audio.sample_rate == SAMPLE_RATE
    assert audio.duration_s == pytest.approx(2.5)
    assert audio.seed == 3
    assert set(audio.timings) == {"text", "diffusion", "vae"}
    assert torch.isfinite(audio.samples).all()
    assert 0 < audio.samples.abs().max() <= 1.0


def test_same_seed_is_bit_identical_and_seeds_differ(pipeline):
    params = GenerationParams(caption="lofi beat", lyrics="[verse]\nhello", duration_s=2, seed=7)
    first = pipeline.generate(params)
    second = pipeline.generate(params)
    other = pipeline.generate(params.replace(seed=8))
    assert torch.equal(first.samples, second.samples)
    assert not torch.equal(first.samples, other.samples)


def test_returned_seed_reproduces_a_random_run(pipeline):
    random_run = pipeline.generate(GenerationParams(caption="synth pop", duration_s=2))
    replay = pipeline.generate(
        GenerationParams(caption="synth pop", duration_s=2, seed=random_run.seed)
    )
    assert torch.equal(random_run.samples, replay.samples)


def test_progress_reports_every_stage_in_order(pipeline):
    events: list[tuple[str, int, int]] = []
    pipeline.generate(
        GenerationParams(caption="drums", duration_s=2, seed=1),
        progress=lambda stage, step, of: events.append((stage, step, of)),
        vae_chunk_frames=64,
    )
    stages = [stage for stage, _, _ in events]
    assert stages[0] == "text"
    assert [e for e in events if e[0] == "diffusion"] == [("diffusion", k, 8) for k in range(9)]
    assert events[1] == ("text", 1, 1) and events[-1][1] == events[-1][2]
    assert stages.index("vae") > stages.index("diffusion")
    assert stages[-1] == "vae"


def test_vae_chunk_size_does_not_change_the_audio(pipeline):
    params = GenerationParams(caption="ambient", duration_s=8, seed=11)
    whole = pipeline.generate(params, vae_chunk_frames=512)
    tiled = pipeline.generate(params, vae_chunk_frames=64)
    torch.testing.assert_close(tiled.samples, whole.samples, rtol=0, atol=1e-5)


def test_repaint_keeps_latents_outside_the_range(pipeline, source_audio):
    params = GenerationParams(
        caption="guitar",
        task="repaint",
        src_audio=source_audio,
        repaint_start_s=2.0,
        repaint_end_s=3.0,
        seed=5,
    )
    cond = pipeline.prepare(params)
    latents = pipeline.diffuse(cond)
    # The crossfade returns float32 whatever the model dtype (as upstream); widening the
    # clean latents to it is exact, so the outside must be equal bit for bit in any dtype.
    clean = cond.repaint.clean_latents.to(latents.dtype)
    start_f, end_f = 2 * SAMPLE_RATE // LATENT_HOP, 3 * SAMPLE_RATE // LATENT_HOP
    ramp = 10  # crossfade frames on each side
    assert torch.equal(latents[:, : start_f - ramp], clean[:, : start_f - ramp])
    assert torch.equal(latents[:, end_f + ramp :], clean[:, end_f + ramp :])
    assert not torch.allclose(latents[:, start_f:end_f], clean[:, start_f:end_f])
    # The chunk mask tells the DiT which frames to generate.
    latent = clean.shape[-1]
    mask = cond.context[0, :, latent]
    assert mask[start_f:end_f].eq(1).all() and mask[:start_f].eq(0).all()
    audio = pipeline.decode(cond, latents)
    assert audio.duration_s == pytest.approx(6.0)


def test_reference_audio_changes_the_timbre_condition(pipeline, source_audio):
    params = GenerationParams(caption="strings", duration_s=2, seed=2)
    plain = pipeline.prepare(params)
    with_reference = pipeline.prepare(params.replace(reference_audio=source_audio))
    assert plain.encoder_hidden.shape == with_reference.encoder_hidden.shape
    assert not torch.allclose(plain.encoder_hidden, with_reference.encoder_hidden)
    # Only the conditioning moved: the noise is the seed's.
    assert torch.equal(plain.noise, with_reference.noise)


def test_cover_conditions_on_tokenized_source(pipeline, source_audio):
    cond = pipeline.prepare(
        GenerationParams(caption="jazz", task="cover", src_audio=source_audio, seed=4)
    )
    clean = pipeline._encode_audio(
        torch.from_numpy(sf.read(source_audio, dtype="float32")[0].T.copy())
    )
    quantized, _ = pipeline.model.tokenize(clean, pipeline.silence_latent)
    hints = pipeline.model.detokenize(quantized)[:, : clean.shape[1]]
    source, chunk_mask = cond.context.split(clean.shape[-1], dim=-1)
    torch.testing.assert_close(source, hints)
    assert not torch.allclose(source, clean)
    assert chunk_mask.eq(1).all()
    audio = pipeline.decode(cond, pipeline.diffuse(cond))
    assert audio.duration_s == pytest.approx(6.0)


def test_compiled_dit_is_warmed_up_at_load_and_matches_eager(pipeline, tiny_checkpoint):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    compiled = Pipeline.load(
        resolve_checkpoint(tiny_checkpoint), device="cpu", dtype=torch.float32, compile=True
    )
    warmed = counters["stats"]["unique_graphs"]
    assert warmed > 0  # compiled at load ...
    params = GenerationParams(caption="organ", duration_s=2, seed=4)
    fast = compiled.generate(params).samples
    assert counters["stats"]["unique_graphs"] == warmed  # ... not by the request
    eager = pipeline.generate(params).samples
    torch._dynamo.reset()
    torch.testing.assert_close(fast, eager, rtol=0, atol=1e-4 * eager.abs().max().item())


def test_nan_output_is_an_error_not_audio(tiny_checkpoint):
    broken = Pipeline.load(resolve_checkpoint(tiny_checkpoint), device="cpu")
    with torch.no_grad():
        broken.model.decoder.proj_out[1].bias.fill_(float("nan"))
    with pytest.raises(GenerationFailed, match="NaN"):
        broken.generate(GenerationParams(caption="x", duration_s=2, seed=1))


def test_written_file_round_trips(pipeline, tmp_path):
    audio = pipeline.generate(GenerationParams(caption="folk", duration_s=2, seed=9))
    path = write_audio(tmp_path / "out.wav", audio.samples, audio.sample_rate, float_wav=True)
    data, rate = sf.read(path, dtype="float32", always_2d=True)
    assert rate == SAMPLE_RATE
    np.testing.assert_array_equal(data.T, audio.samples.numpy())


@pytest.mark.parametrize(
    ("start", "end", "window"),
    [
        (2.0, 3.0, (0, 0, 50, 75)),
        (-2.0, 3.0, (96_000, 0, 0, 125)),  # outpaint an intro: frames from the padded start
        (-2.0, 0.0, (96_000, 0, 0, 50)),
        (4.0, 8.0, (0, 96_000, 100, 200)),  # outpaint past the end
        (1.0, None, (0, 0, 25, 150)),
    ],
)
def test_repaint_window_counts_frames_in_padded_coordinates(start, end, window):
    assert repaint_window(start, end, 6 * SAMPLE_RATE) == window


def test_left_outpainting_regenerates_the_added_intro(pipeline, source_audio):
    cond = pipeline.prepare(
        GenerationParams(
            caption="intro",
            task="repaint",
            src_audio=source_audio,
            repaint_start_s=-2.0,
            repaint_end_s=0.0,
            seed=1,
        )
    )
    inside = torch.nonzero(cond.repaint.mask[0]).squeeze(-1)
    assert (int(inside[0]), int(inside[-1]) + 1) == (0, 50)
    assert cond.duration_s == pytest.approx(8.0)


def test_too_short_source_is_an_invalid_request(pipeline, tmp_path):
    blip = tmp_path / "blip.wav"
    sf.write(blip, np.zeros((100, 2)), SAMPLE_RATE)
    with pytest.raises(InvalidRequest, match="src_audio"):
        pipeline.generate(GenerationParams(caption="x", task="cover", src_audio=blip))
    with pytest.raises(InvalidRequest, match="reference_audio"):
        pipeline.generate(GenerationParams(caption="x", duration_s=2, reference_audio=blip))
