"""The out-of-memory policy: run one job's stages so that running out of memory never loses it.

At home (the device and dtype the pipeline was loaded with): run the stages; once the
conditioning says how long the latents are (after the planner, from the request's
duration or its source audio), choose the VAE tile from free memory (on the CPU, the
whole sequence in one call when RAM allows); after running out of memory free the
cache and retry the failing stage once — the VAE with half the tile each time, down
to a floor. The planner (5 Hz LM) that still runs out of memory runs on the CPU for
this request while the DiT stays home. When that is not enough, run this one request
on the CPU, in the CPU's default dtype (`pipeline.default_dtype`: bf16 where the CPU
multiplies bf16 natively, else fp32), keeping a plan made at home, and move the
pipeline back home afterwards.

A pipeline whose home is the CPU has nowhere to fall back to and no cache to free: its
request runs once, and running out of RAM answers `OutOfMemory` at once, saying how much
RAM was free and what to ask for instead. `run` returns where and how the request ran;
nothing here knows about queues, sockets or files.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import logging
import os
import resource
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from acestep_daemon import protocol
from acestep_daemon.errors import AceStepError
from acestep_daemon.model.vae import DECODE_CHUNK_FRAMES
from acestep_daemon.params import GenerationParams
from acestep_daemon.pipeline import (
    Audio,
    Conditioning,
    Pipeline,
    Planned,
    ProgressFn,
    default_dtype,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

VAE_CHUNK_FLOOR = 64
"""Halving the VAE tile stops here; the next step is the CPU."""

# Rough memory needs, measured in the order of magnitude only: the DiT's
# activations grow with the whole latent length, the VAE's with one tile (fp32: the
# decoder's last block holds a few [128, tile · 1920] tensors at once).
DIFFUSION_BYTES_PER_FRAME = 256 << 10
VAE_BYTES_PER_CHUNK_FRAME = 4 << 20
HEADROOM_BYTES = 512 << 20


def cpu_place() -> tuple[torch.device, torch.dtype]:
    """Where a request goes when the GPU cannot hold it: the CPU in its default dtype."""
    cpu = torch.device("cpu")
    return cpu, default_dtype(cpu)


class OutOfMemory(AceStepError):
    """Out of memory even after every fallback (GPU retries and the CPU)."""


class FatalWorkerError(AceStepError):
    """The worker cannot go on (the model cannot be loaded or moved); the process must exit."""


@dataclass(frozen=True)
class Run:
    """A generated request and how it was made."""

    audio: Audio
    device: torch.device
    dtype: torch.dtype
    fallback: str | None  # "cpu": the request ran on the CPU; "lm-cpu": only its planner did
    oom_retries: int
    vae_chunk_frames: int
    quantize: str | None = None  # the quantization that ran (`quantization_kind`)
    offload: bool = False  # whether the text encoder, LM and VAE waited on the CPU

    def answer(
        self, path: Path, timings: dict[str, float], takes: list[tuple[Path, int]]
    ) -> dict[str, Any]:
        """The success answer for this run written to `path` (and, per take, `takes`)."""
        return protocol.success_answer(
            path=str(path),
            duration_s=self.audio.duration_s,
            seed=self.audio.seed,
            timings=timings,
            device=str(self.device),
            dtype=str(self.dtype),
            fallback=self.fallback,
            oom_retries=self.oom_retries,
            vae_chunk_frames=self.vae_chunk_frames,
            notes=self.audio.notes,
            thinking=self.audio.thinking,
            sampler=self.audio.sampler,
            adapters=self.audio.adapters,
            dcw=self.audio.dcw,
            takes=[(str(take), seed) for take, seed in takes],
            quantize=self.quantize,
            offload=self.offload,
        )


CPU_OOM_MARK = "DefaultCPUAllocator: can't allocate memory"
"""How torch's CPU allocator words a failed allocation (a plain RuntimeError)."""

ADVICE = "try a shorter duration_s, fewer seeds, or a smaller model"


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is running out of memory: on a GPU, or in the CPU's allocator."""
    return isinstance(error, torch.OutOfMemoryError | MemoryError) or (
        isinstance(error, RuntimeError) and CPU_OOM_MARK in str(error)
    )


def _meminfo_available() -> int:
    try:
        with open("/proc/meminfo") as meminfo:  # Linux: counts reclaimable page cache too
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) << 10
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _address_space_left() -> int | None:
    """What the process's address-space limit (`ulimit -v`, RLIMIT_AS) still allows."""
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit == resource.RLIM_INFINITY:
        return None
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmSize:"):
                    return max(0, limit - (int(line.split()[1]) << 10))
    except OSError:
        pass
    return None


def available_bytes(device: torch.device) -> int:
    """Memory a request may still use on `device`: free GPU memory, or available RAM
    (within the process's address-space limit, when it has one)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    left = _address_space_left()
    available = _meminfo_available()
    return available if left is None else min(available, left)


def out_of_ram(error: BaseException) -> OutOfMemory:
    """The answer to running out of RAM: plainly that, how much was free, what to try."""
    free_memory()
    free = available_bytes(torch.device("cpu")) / 2**20
    logger.warning("out of memory on the CPU (%.0f MiB free): %s", free, error)
    return OutOfMemory(f"out of memory on the CPU ({free:.0f} MiB of RAM free); {ADVICE}")


def free_memory() -> None:
    """Collect garbage, hand CUDA's cached blocks back to the driver and the C heap's free
    pages back to the system, so that what was freed is free for others too."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    trim_heap()


def trim_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc's `malloc_trim`; elsewhere
    nothing). glibc keeps the pages of freed mid-sized blocks (up to its mmap threshold,
    which grows to 32 MiB as big blocks come and go) in the process: without it, a job's
    activations or a quantized model's full-precision weights stay in the resident memory."""
    if (libc := _glibc()) is not None:
        libc.malloc_trim(0)


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it has glibc's `malloc_trim` (not on musl or macOS)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None


def move(pipeline: Pipeline, device: torch.device, dtype: torch.dtype) -> None:
    """Move the weights; running out of memory on the way leaves them on the CPU."""
    try:
        pipeline.to(device, dtype)
    except torch.OutOfMemoryError:
        free_memory()
        pipeline.to(*cpu_place())
        logger.warning(
            "too little memory to move the pipeline to %s; it stays on the CPU (%s)",
            device,
            pipeline.dtype,
        )
    except Exception as error:
        raise FatalWorkerError(f"could not move the pipeline to {device}: {error}") from error


class MemoryPolicy:
    """Runs one request's stages with retries, smaller VAE tiles and the CPU fallback."""

    def __init__(
        self,
        pipeline: Pipeline,
        home: tuple[torch.device, torch.dtype],
        on_retry: Callable[[], None] = lambda: None,
        on_fallback: Callable[[], None] = lambda: None,
    ) -> None:
        self.pipeline = pipeline
        self.home = home
        self._on_retry = on_retry
        self._on_fallback = on_fallback
        self.retries = 0
        self.chunk = DECODE_CHUNK_FRAMES
        self.lm_on_cpu = False
        self.ran_on: tuple[torch.device, torch.dtype] | None = None
        """Where the CPU fallback actually ran (None: it did not run)."""
        self.planned: Planned | None = None
        """The plan made at home, kept by the CPU run."""

    def run(self, params: GenerationParams, progress: ProgressFn) -> Run:
        """Generate at home if memory allows, else on the CPU; returns where it ran."""
        pipeline = self.pipeline
        if self.home[0].type == "cpu":
            return self._result(self._once(params, progress), None)
        if (pipeline.device, pipeline.dtype) == self.home:
            audio = self._at_home(params, progress)
            if audio is not None:
                return self._result(audio, "lm-cpu" if self.lm_on_cpu else None)
            free_memory()
        return self._result(self._on_cpu(params, progress), "cpu")

    def _result(self, audio: Audio, fallback: str | None) -> Run:
        pipeline = self.pipeline
        device, dtype = self.ran_on or (pipeline.device, pipeline.dtype)
        return Run(
            audio=audio,
            device=device,
            dtype=dtype,
            fallback=fallback,
            oom_retries=self.retries,
            vae_chunk_frames=self.chunk,
            quantize=pipeline.quantization,
            offload=pipeline.offloads_on(device),
        )

    def _once(self, params: GenerationParams, progress: ProgressFn) -> Audio:
        """The stages at a CPU home, once: running out of RAM is the answer."""
        pipeline = self.pipeline
        try:
            cond = pipeline.prepare(params, progress, pipeline.plan(params, progress))
            self._fits(cond)
            latents = pipeline.diffuse(cond, progress)
            return pipeline.decode(cond, latents, progress, vae_chunk_frames=self.chunk)
        except BaseException as error:
            if not is_out_of_memory(error):
                raise
            oom = error.with_traceback(None)  # frees the failed stage's tensors
        raise out_of_ram(oom)

    def _fits(self, cond: Conditioning) -> bool:
        """Choose the VAE tile from free memory for the latents this request generates;
        False means: too little for them on the GPU, go to the CPU.

        On the CPU a sequence whose decode fits in available RAM is decoded in one call
        (no tile overhead); otherwise tiles halve from the default as on the GPU, and the
        request stays (there is nowhere else to go).
        """
        device = self.pipeline.device
        free = available_bytes(device)
        # Every take, and the unconditional half of a guided model's batch, is one more row.
        rows = cond.noise.shape[0] * (2 if self.pipeline.spec.guided else 1)
        length = cond.frames
        budget = free - HEADROOM_BYTES - length * rows * DIFFUSION_BYTES_PER_FRAME
        if device.type != "cuda" and length * VAE_BYTES_PER_CHUNK_FRAME <= budget:
            self.chunk = max(self.chunk, length)  # the whole sequence in one call
            return True
        while self.chunk > VAE_CHUNK_FLOOR and self.chunk * VAE_BYTES_PER_CHUNK_FRAME > budget:
            self.chunk //= 2
        fits = self.chunk * VAE_BYTES_PER_CHUNK_FRAME <= budget or device.type != "cuda"
        if not fits:
            logger.warning("%.0f MiB free on %s is too little", free / 2**20, device)
        return fits

    def _at_home(self, params: GenerationParams, progress: ProgressFn) -> Audio | None:
        """The stages with their retries; None when memory ran out anyway, or when the
        conditioned request does not fit (`_fits`).

        Retries start outside the `except` blocks, so that the failed attempt's
        traceback (and the tensors its frames hold) is gone before trying again.
        """
        pipeline = self.pipeline
        try:
            planned = self.planned = self._plan(params, progress)
            cond = self._retry(lambda: pipeline.prepare(params, progress, planned))
            if not self._fits(cond):
                return None
            latents = self._retry(lambda: pipeline.diffuse(cond, progress))
            while True:
                try:
                    return pipeline.decode(cond, latents, progress, vae_chunk_frames=self.chunk)
                except torch.OutOfMemoryError:
                    if self.chunk // 2 < VAE_CHUNK_FLOOR:
                        raise
                self.chunk //= 2
                self._count_retry(f"the VAE, retrying with {self.chunk}-frame chunks")
        except torch.OutOfMemoryError:
            return None

    def _plan(self, params: GenerationParams, progress: ProgressFn) -> Planned | None:
        """The planner stage with its retry; then on the CPU, the DiT staying home."""
        pipeline = self.pipeline
        try:
            return self._retry(lambda: pipeline.plan(params, progress))
        except torch.OutOfMemoryError:
            pass
        free_memory()
        cpu = cpu_place()
        logger.warning(
            "out of memory in the planner; running the LM on the CPU (%s) for this request", cpu[1]
        )
        self.lm_on_cpu = True
        pipeline.move_lm(*cpu)
        try:
            return pipeline.plan(params, progress)
        finally:
            pipeline.move_lm(*self.home)

    def _retry(self, stage: Callable[[], T]) -> T:
        """Run a stage; after running out of memory, free the cache and try once more."""
        try:
            return stage()
        except torch.OutOfMemoryError:
            pass
        self._count_retry("a stage, retrying it once")
        return stage()

    def _count_retry(self, what: str) -> None:
        free_memory()
        self.retries += 1
        self._on_retry()
        logger.warning("out of memory in %s", what)

    def _on_cpu(self, params: GenerationParams, progress: ProgressFn) -> Audio:
        """Run this request on the CPU (`cpu_place`), then move the pipeline back home.

        A plan made at home is kept; without one the planner runs here.
        """
        self._on_fallback()
        move(self.pipeline, *cpu_place())
        self.ran_on = (self.pipeline.device, self.pipeline.dtype)
        logger.warning(
            "running this request on the %s (%s) to avoid running out of memory", *self.ran_on
        )
        pipeline = self.pipeline
        try:
            planned = self.planned or pipeline.plan(params, progress)
            cond = pipeline.prepare(params, progress, planned)
            latents = pipeline.diffuse(cond, progress)
            return pipeline.decode(cond, latents, progress, vae_chunk_frames=self.chunk)
        except BaseException as error:
            if not is_out_of_memory(error):
                raise
            oom = error.with_traceback(None)  # frees the failed stage's tensors
        finally:
            move(self.pipeline, *self.home)
        raise out_of_ram(oom)
