"""The memory policy sizes a request by the latents it generates, not by its nominal duration.

A real tiny pipeline on the CPU; only the free GPU memory the policy sees is made up
(`memory.free_gpu_bytes`), as this machine may have no GPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from acestep_daemon import memory
from acestep_daemon.checkpoint import resolve_checkpoint
from acestep_daemon.constants import LATENT_HOP, SAMPLE_RATE
from acestep_daemon.memory import (
    CPU,
    DIFFUSION_BYTES_PER_FRAME,
    VAE_BYTES_PER_CHUNK_FRAME,
    VAE_CHUNK_FLOOR,
    VRAM_HEADROOM_BYTES,
    MemoryPolicy,
)
from acestep_daemon.params import GenerationParams
from acestep_daemon.pipeline import Pipeline

ROOM_FRAMES = 200
"""The made-up GPU holds the diffusion of this many latent frames (8 s) and the smallest
VAE tile."""


@pytest.fixture(scope="module")
def pipeline(tiny_checkpoint: Path) -> Pipeline:
    return Pipeline.load(resolve_checkpoint(tiny_checkpoint), device=CPU[0], dtype=CPU[1])


@pytest.fixture
def small_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    free = (
        VRAM_HEADROOM_BYTES
        + ROOM_FRAMES * DIFFUSION_BYTES_PER_FRAME
        + VAE_CHUNK_FLOOR * VAE_BYTES_PER_CHUNK_FRAME
    )
    monkeypatch.setattr(memory, "free_gpu_bytes", lambda device: free)


def source(folder: Path, seconds: float) -> str:
    t = np.arange(round(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    wave = 0.3 * np.sin(2 * np.pi * 220 * t)
    path = folder / f"source-{seconds:g}s.wav"
    sf.write(path, np.stack([wave, wave], axis=1), SAMPLE_RATE, subtype="FLOAT")
    return str(path)


def cover(src_audio: str, duration_s: float) -> GenerationParams:
    """A cover: its latents are as long as its source, whatever `duration_s` says."""
    return GenerationParams(
        caption="c", task="cover", src_audio=src_audio, duration_s=duration_s, seed=1
    )


def run(pipeline: Pipeline, params: GenerationParams) -> memory.Run:
    return MemoryPolicy(pipeline, CPU).run(params, lambda stage, step, of: None)


@pytest.mark.usefixtures("small_gpu")
def test_a_long_source_goes_to_the_cpu_although_its_duration_field_is_short(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    seconds = 12.0
    assert seconds * SAMPLE_RATE // LATENT_HOP > ROOM_FRAMES
    result = run(pipeline, cover(source(tmp_path, seconds), duration_s=2.0))
    assert result.fallback == "cpu"
    assert result.audio.duration_s == pytest.approx(seconds)


@pytest.mark.usefixtures("small_gpu")
def test_a_short_source_stays_home_although_its_duration_field_is_long(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    result = run(pipeline, cover(source(tmp_path, 2.0), duration_s=60.0))
    assert result.fallback is None and result.vae_chunk_frames == VAE_CHUNK_FLOOR
    assert (result.device, result.dtype) == (torch.device("cpu"), torch.float32)
