"""The memory policy's VAE tile on the CPU: one call when RAM allows, halved tiles when not."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from acestep_daemon import memory
from acestep_daemon.checkpoint import resolve_checkpoint
from acestep_daemon.constants import SAMPLE_RATE
from acestep_daemon.memory import (
    DIFFUSION_BYTES_PER_FRAME,
    HEADROOM_BYTES,
    VAE_BYTES_PER_CHUNK_FRAME,
    MemoryPolicy,
)
from acestep_daemon.params import GenerationParams
from acestep_daemon.pipeline import Pipeline, latent_frames

DURATION_S = 12.0
"""300 latent frames: more than one tile of 256."""


@pytest.fixture(scope="module")
def pipeline(tiny_checkpoint: Path) -> Pipeline:
    return Pipeline.load(resolve_checkpoint(tiny_checkpoint), device="cpu", dtype=torch.float32)


def run_with_ram(pipeline: Pipeline, available: int, monkeypatch) -> memory.Run:
    monkeypatch.setattr(memory, "available_bytes", lambda device: available)
    home = (pipeline.device, pipeline.dtype)
    params = GenerationParams(caption="drums", duration_s=DURATION_S, seed=1)
    return MemoryPolicy(pipeline, home).run(params, lambda *_: None)


def test_cpu_decodes_in_one_call_when_ram_allows_and_in_halved_tiles_when_not(
    pipeline, monkeypatch
):
    calls = []
    decode = pipeline.vae.decode
    monkeypatch.setattr(pipeline.vae, "decode", lambda z: calls.append(z.shape[-1]) or decode(z))
    frames = latent_frames(DURATION_S)
    whole = run_with_ram(pipeline, 64 << 30, monkeypatch)
    assert (whole.fallback, calls) == (None, [frames]) and whole.vae_chunk_frames >= frames
    assert whole.audio.samples.shape[1] == DURATION_S * SAMPLE_RATE

    calls.clear()
    short = HEADROOM_BYTES + frames * DIFFUSION_BYTES_PER_FRAME + 280 * VAE_BYTES_PER_CHUNK_FRAME
    tiled = run_with_ram(pipeline, short, monkeypatch)
    assert (tiled.vae_chunk_frames, tiled.fallback) == (256, None)  # 512 did not fit, 256 does
    assert len(calls) > 1 and max(calls) <= 256
    torch.testing.assert_close(tiled.audio.samples, whole.audio.samples, rtol=0, atol=1e-5)
