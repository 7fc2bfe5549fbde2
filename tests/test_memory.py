"""The memory policy's VAE tile: one call when memory allows, halved tiles when not, sized
by the latents a request really generates (its source's length, not its `duration_s`).

A real tiny pipeline on the CPU; only the available memory the policy sees is made up
(`memory.available_bytes`).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
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
from acestep_daemon.model.vae import DECODE_CHUNK_FRAMES
from acestep_daemon.params import GenerationParams
from acestep_daemon.pipeline import Pipeline, latent_frames

DURATION_S = 12.0
"""300 latent frames: more than one tile of 256."""


@pytest.fixture(scope="module")
def pipeline(tiny_checkpoint: Path) -> Pipeline:
    return Pipeline.load(resolve_checkpoint(tiny_checkpoint), device="cpu", dtype=torch.float32)


def run_with_ram(
    pipeline: Pipeline, available: int, monkeypatch, params: GenerationParams | None = None
) -> memory.Run:
    monkeypatch.setattr(memory, "available_bytes", lambda device: available)
    home = (pipeline.device, pipeline.dtype)
    params = params or GenerationParams(caption="drums", duration_s=DURATION_S, seed=1)
    return MemoryPolicy(pipeline, home).run(params, lambda *_: None)


def ram_for(frames: int, tile: int) -> int:
    """Available memory that holds the diffusion of `frames` and a VAE tile of `tile`."""
    return HEADROOM_BYTES + frames * DIFFUSION_BYTES_PER_FRAME + tile * VAE_BYTES_PER_CHUNK_FRAME


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
    tiled = run_with_ram(pipeline, ram_for(frames, 280), monkeypatch)
    assert (tiled.vae_chunk_frames, tiled.fallback) == (256, None)  # 512 did not fit, 256 does
    assert len(calls) > 1 and max(calls) <= 256
    torch.testing.assert_close(tiled.audio.samples, whole.audio.samples, rtol=0, atol=1e-5)


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


def test_a_long_source_is_tiled_although_its_duration_field_is_short(
    pipeline, monkeypatch, tmp_path
):
    frames = latent_frames(DURATION_S)
    # Sized from the 2 s field, the whole decode would fit in one call.
    params = cover(source(tmp_path, DURATION_S), duration_s=2.0)
    result = run_with_ram(pipeline, ram_for(frames, frames - 1), monkeypatch, params)
    assert result.vae_chunk_frames == DECODE_CHUNK_FRAMES // 2 < frames
    assert result.audio.duration_s == pytest.approx(DURATION_S)


def test_a_short_source_is_one_call_although_its_duration_field_is_long(
    pipeline, monkeypatch, tmp_path
):
    frames = latent_frames(2.0)
    # Sized from the 60 s field, the diffusion alone would leave no room for any tile.
    params = cover(source(tmp_path, 2.0), duration_s=60.0)
    result = run_with_ram(pipeline, ram_for(frames, frames), monkeypatch, params)
    assert result.fallback is None and result.vae_chunk_frames == DECODE_CHUNK_FRAMES
    assert result.audio.duration_s == pytest.approx(2.0)


HEAP_PROBE = """
import gc, os, torch
from acestep_daemon.memory import free_memory

def resident_mib():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

blocks = [torch.ones(16 * 1024) for _ in range(4000)]  # 64 KiB each: from glibc's heap
last = torch.ones(16 * 1024)  # allocated last: the heap's top stays in use
del blocks
gc.collect()
held = resident_mib()
gc.collect()
collected = resident_mib()
free_memory()
print(held - collected, held - resident_mib())
"""


@pytest.mark.skipif(memory._glibc() is None, reason="needs glibc's malloc_trim")
def test_free_memory_hands_freed_heap_pages_back_to_the_system() -> None:
    """250 MiB of freed tensors stay resident after `gc.collect` (glibc keeps the pages under
    the heap's top); `free_memory` returns them."""
    probe = subprocess.run(
        [sys.executable, "-c", HEAP_PROBE], capture_output=True, text=True, check=True
    )
    by_collecting, by_freeing = map(float, probe.stdout.split())
    assert by_collecting < 50 and by_freeing > 200, probe.stdout
