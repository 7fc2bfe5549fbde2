"""GenerationManager: the resident pipeline, owned by one worker thread.

Jobs wait in a bounded queue; control commands (load, unload) jump ahead of
them. The worker cancels a job between diffusion steps and VAE chunks (the
pipeline's progress callback), and recovers from running out of GPU memory:
free the cache and retry the failing stage (the VAE with half the chunk, down
to a floor), then run that one request on the CPU in float32 and move the
pipeline back home afterwards. Nothing here knows about sockets or JSON.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from acestep_daemon import __version__
from acestep_daemon.audio import write_audio
from acestep_daemon.errors import AceStepError, Cancelled
from acestep_daemon.pipeline import Audio, GenerationParams, Pipeline, ProgressFn, latent_frames

logger = logging.getLogger(__name__)

T = TypeVar("T")

STAGES = ("text", "diffusion", "vae")
VAE_CHUNK_FRAMES = 512
"""Latent frames per VAE decode tile when memory is plentiful."""
VAE_CHUNK_FLOOR = 64
"""Halving the VAE tile stops here; the next step is the CPU."""

# Rough GPU memory needs, measured in the order of magnitude only: the DiT's
# activations grow with the whole latent length, the VAE's with one tile.
DIFFUSION_BYTES_PER_FRAME = 256 << 10
VAE_BYTES_PER_CHUNK_FRAME = 4 << 20
VRAM_HEADROOM_BYTES = 512 << 20


class QueueFull(AceStepError):
    """The queue holds `depth` waiting jobs already."""

    def __init__(self, depth: int, limit: int) -> None:
        super().__init__(f"busy: {depth} requests are waiting (queue limit {limit})")
        self.depth = depth
        self.limit = limit


class ShuttingDown(Cancelled):
    """The daemon is stopping; the job did not run (or was stopped)."""


class OutOfMemory(AceStepError):
    """Out of memory even after every fallback (GPU retries and the CPU)."""


class FatalWorkerError(AceStepError):
    """The worker cannot go on (the model cannot be loaded or moved); the process must exit."""


def parse_inject_oom(spec: str | None) -> dict[str, int]:
    """`ACESTEP_INJECT_OOM="vae:1,diffusion:99"` → {"vae": 1, "diffusion": 99}."""
    plan: dict[str, int] = {}
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        stage, _, count = item.strip().partition(":")
        if stage not in STAGES:
            raise ValueError(f"ACESTEP_INJECT_OOM: unknown stage {stage!r} (use {STAGES})")
        plan[stage] = int(count) if count else 1
    return plan


@dataclass
class JobResult:
    """A written file and how it was made."""

    path: Path
    audio: Audio
    device: str
    dtype: str
    fallback: str | None  # "cpu" when this request ran on the CPU to avoid running out of memory
    oom_retries: int
    vae_chunk_frames: int


@dataclass(eq=False)
class Job:
    """One generation request. `on_done` is called exactly once, from any thread."""

    params: GenerationParams
    output: Path
    on_done: Callable[[JobResult | BaseException], None]
    on_progress: ProgressFn | None = None
    cancel_reason: AceStepError | None = None
    retries: int = 0
    chunk: int = VAE_CHUNK_FRAMES
    fallback: str | None = None
    _finished: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def finish(self, result: JobResult | BaseException) -> None:
        """Answer the job; later calls (a cancel racing the end) are ignored."""
        with self._lock:
            if self._finished:
                return
            self._finished = True
        self.on_done(result)


@dataclass
class _Control:
    name: str
    on_done: Callable[[dict[str, Any] | BaseException], None]


@dataclass
class Counters:
    generated: int = 0
    failed: int = 0
    cancelled: int = 0
    oom_retries: int = 0
    cpu_fallbacks: int = 0
    loads: int = 0


class GenerationManager:
    """Owns the Pipeline on one worker thread; every public method is thread-safe."""

    def __init__(
        self,
        factory: Callable[[], Pipeline],
        *,
        queue_limit: int = 16,
        idle_unload_s: float | None = None,
        inject_oom: dict[str, int] | None = None,
    ) -> None:
        self._factory = factory
        self.queue_limit = queue_limit
        self._idle_unload_s = idle_unload_s
        self._inject = dict(inject_oom or {})
        self._on_fatal: Callable[[BaseException], None] | None = None
        self._cond = threading.Condition()
        self._jobs: deque[Job] = deque()
        self._controls: deque[_Control] = deque()
        self._running: Job | None = None
        self._stopping = False
        self._pipeline: Pipeline | None = None
        self._home: tuple[torch.device, torch.dtype] | None = None
        self._model_dir: str | None = None
        self._last_active = time.monotonic()
        self._started = time.monotonic()
        self.counters = Counters()
        self._thread = threading.Thread(target=self._work, name="acestep-worker", daemon=True)

    # -- public API (any thread) --------------------------------------------------------

    def start(
        self,
        on_loaded: Callable[[dict[str, Any] | BaseException], None],
        on_fatal: Callable[[BaseException], None],
    ) -> None:
        """Start the worker: it loads the pipeline first and reports through `on_loaded`.

        `on_fatal` is called (from the worker) when the worker cannot go on.
        """
        self._on_fatal = on_fatal
        self._controls.append(_Control("load", on_loaded))
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue a job, or raise QueueFull / ShuttingDown at once."""
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the daemon is shutting down")
            if len(self._jobs) >= self.queue_limit:
                raise QueueFull(len(self._jobs), self.queue_limit)
            self._jobs.append(job)
            self._cond.notify()

    def cancel(self, job: Job, reason: AceStepError) -> None:
        """Cancel a job: at once if it is still queued, else at its next step or chunk."""
        with self._cond:
            job.cancel_reason = reason
            queued = job in self._jobs
            if queued:
                self._jobs.remove(job)
                self.counters.cancelled += 1
        if queued:
            job.finish(reason)

    def command(self, name: str, on_done: Callable[[dict[str, Any] | BaseException], None]) -> None:
        """`load` / `unload`, run by the worker ahead of queued jobs."""
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the daemon is shutting down")
            self._controls.append(_Control(name, on_done))
            self._cond.notify()

    def status(self) -> dict[str, Any]:
        """A snapshot for the `status` command."""
        with self._cond:
            pipeline = self._pipeline
            home = self._home
            depth = len(self._jobs)
            busy = self._running is not None
        free_vram = None
        if home is not None and home[0].type == "cuda":
            free_vram = torch.cuda.mem_get_info(home[0])[0]
        return {
            "version": __version__,
            "device": str(home[0]) if home else None,
            "dtype": str(home[1]).removeprefix("torch.") if home else None,
            "loaded": pipeline is not None,
            "queue_depth": depth,
            "queue_limit": self.queue_limit,
            "busy": busy,
            "uptime_s": round(time.monotonic() - self._started, 1),
            "free_vram_bytes": free_vram,
            "model_dir": self._model_dir,
            **vars(self.counters),
        }

    def shutdown(self) -> list[Job]:
        """Stop taking work; queued jobs are answered ShuttingDown. Returns them."""
        with self._cond:
            self._stopping = True
            pending = list(self._jobs)
            controls = list(self._controls)
            self._jobs.clear()
            self._controls.clear()
            self._cond.notify_all()
        for job in pending:
            job.finish(ShuttingDown("the daemon is shutting down; the request did not run"))
        for control in controls:
            control.on_done(ShuttingDown("the daemon is shutting down"))
        return pending

    def stop_running(self) -> None:
        """After the grace period: stop the running job at its next step."""
        with self._cond:
            if self._running is not None:
                self._running.cancel_reason = ShuttingDown("the daemon stopped before it finished")

    def join(self, timeout: float | None) -> bool:
        """Wait for the worker to exit; True when it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def queue_depth(self) -> int:
        with self._cond:
            return len(self._jobs)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- the worker ------------------------------------------------------------------------

    def _work(self) -> None:
        try:
            while (item := self._next()) is not None:
                if isinstance(item, _Control):
                    self._control(item)
                elif isinstance(item, Job):
                    self._serve(item)
                    with self._cond:
                        self._running = None
                        self._last_active = time.monotonic()
        except BaseException as error:
            logger.critical("generation worker failed: %s", error, exc_info=True)
            with self._cond:
                self._stopping = True
            if self._on_fatal:
                self._on_fatal(error)

    def _next(self) -> _Control | Job | None:
        """The next control or job; None when stopping. Unloads after the idle window."""
        with self._cond:
            while True:
                if self._controls:
                    return self._controls.popleft()
                if self._stopping:
                    return None
                if self._jobs:
                    self._running = self._jobs.popleft()
                    return self._running
                timeout = None
                if self._idle_unload_s is not None and self._pipeline is not None:
                    timeout = self._last_active + self._idle_unload_s - time.monotonic()
                    if timeout <= 0:
                        logger.info("unloading after %.0f s idle", self._idle_unload_s)
                        self._unload()
                        continue
                self._cond.wait(timeout)

    def _control(self, control: _Control) -> None:
        try:
            if control.name == "load":
                self._ensure_loaded()
                result: dict[str, Any] = {"message": "pipeline loaded", **self._where()}
            elif control.name == "unload":
                self._unload()
                result = {"message": "pipeline unloaded"}
            else:
                raise ValueError(f"unknown command {control.name!r}")
        except BaseException as error:
            control.on_done(error)
            raise
        with self._cond:
            self._last_active = time.monotonic()
        control.on_done(result)

    def _where(self) -> dict[str, str]:
        assert self._pipeline is not None
        return {
            "device": str(self._pipeline.device),
            "dtype": str(self._pipeline.dtype).removeprefix("torch."),
        }

    def _ensure_loaded(self) -> Pipeline:
        """The pipeline at home; loads it lazily, and brings it back after a CPU fallback."""
        if self._pipeline is None:
            try:
                self._pipeline = self._factory()
            except Exception as error:
                raise FatalWorkerError(f"could not load the pipeline: {error}") from error
            self._home = (self._pipeline.device, self._pipeline.dtype)
            self._model_dir = str(self._pipeline.checkpoint.root)
            self.counters.loads += 1
        elif self._home and (self._pipeline.device, self._pipeline.dtype) != self._home:
            self._move(self._pipeline, *self._home)
        return self._pipeline

    def _unload(self) -> None:
        self._pipeline = None
        _free_memory()

    def _move(self, pipeline: Pipeline, device: torch.device, dtype: torch.dtype) -> None:
        """Move the weights; running out of memory on the way home leaves them on the CPU."""
        try:
            pipeline.to(device, dtype)
        except torch.OutOfMemoryError:
            _free_memory()
            pipeline.to("cpu", torch.float32)
            logger.warning(
                "too little memory to move the pipeline to %s; it stays on the CPU", device
            )
        except Exception as error:
            raise FatalWorkerError(f"could not move the pipeline to {device}: {error}") from error

    def _serve(self, job: Job) -> None:
        """Run one job and answer it; only a FatalWorkerError escapes."""
        started = time.monotonic()
        try:
            if job.cancel_reason is not None:
                raise job.cancel_reason
            audio, device, dtype = self._generate(job)
            job.output.parent.mkdir(parents=True, exist_ok=True)
            path = write_audio(job.output, audio.samples, audio.sample_rate)
            result = JobResult(
                path=Path(path),
                audio=audio,
                device=str(device),
                dtype=str(dtype).removeprefix("torch."),
                fallback=job.fallback,
                oom_retries=job.retries,
                vae_chunk_frames=job.chunk,
            )
        except FatalWorkerError as error:
            self.counters.failed += 1
            job.finish(error)
            raise
        except Cancelled as error:
            self.counters.cancelled += 1
            job.finish(error)
        except BaseException as error:
            self.counters.failed += 1
            job.finish(error)
        else:
            self.counters.generated += 1
            logger.debug("job done in %.2f s", time.monotonic() - started)
            job.finish(result)

    def _generate(self, job: Job) -> tuple[Audio, torch.device, torch.dtype]:
        """Generate at home with the OOM policy; returns the audio and where it was made."""
        pipeline = self._ensure_loaded()
        if (pipeline.device, pipeline.dtype) != self._home or not self._plan(job, pipeline):
            return self._on_cpu(job, pipeline)
        audio = self._at_home(job, pipeline)
        if audio is None:
            _free_memory()
            return self._on_cpu(job, pipeline)
        return audio, pipeline.device, pipeline.dtype

    def _at_home(self, job: Job, pipeline: Pipeline) -> Audio | None:
        """The three stages with their retries; None when memory ran out anyway.

        Retries start outside the `except` blocks, so that the failed attempt's
        traceback (and the tensors its frames hold) is gone before trying again.
        """
        progress = self._progress(job, inject=True)
        try:
            cond = self._retry(job, lambda: pipeline.prepare(job.params, progress))
            latents = self._retry(job, lambda: pipeline.diffuse(cond, progress))
            while True:
                try:
                    return pipeline.decode(cond, latents, progress, vae_chunk_frames=job.chunk)
                except torch.OutOfMemoryError:
                    if job.chunk // 2 < VAE_CHUNK_FLOOR:
                        raise
                job.chunk //= 2
                self._count_retry(job, f"the VAE, retrying with {job.chunk}-frame chunks")
        except torch.OutOfMemoryError:
            return None

    def _retry(self, job: Job, stage: Callable[[], T]) -> T:
        """Run a stage; after running out of memory, free the cache and try once more."""
        try:
            return stage()
        except torch.OutOfMemoryError:
            pass
        self._count_retry(job, "a stage, retrying it once")
        return stage()

    def _count_retry(self, job: Job, what: str) -> None:
        _free_memory()
        job.retries += 1
        self.counters.oom_retries += 1
        logger.warning("out of memory in %s", what)

    def _on_cpu(self, job: Job, pipeline: Pipeline) -> tuple[Audio, torch.device, torch.dtype]:
        """Run this request on the CPU in float32, then move the pipeline back home."""
        home = self._home or (pipeline.device, pipeline.dtype)
        logger.warning("running this request on the CPU (float32) to avoid running out of memory")
        job.fallback = "cpu"
        self.counters.cpu_fallbacks += 1
        self._move(pipeline, torch.device("cpu"), torch.float32)
        try:
            audio = pipeline.generate(
                job.params,
                progress=self._progress(job, inject=False),
                vae_chunk_frames=job.chunk,
            )
        except torch.OutOfMemoryError as error:
            raise OutOfMemory(f"out of memory even on the CPU: {error}") from error
        finally:
            self._move(pipeline, *home)
        return audio, torch.device("cpu"), torch.float32

    def _plan(self, job: Job, pipeline: Pipeline) -> bool:
        """Choose the VAE chunk from free GPU memory; False means: go to the CPU up front."""
        if pipeline.device.type != "cuda":
            return True
        free, _ = torch.cuda.mem_get_info(pipeline.device)
        frames = latent_frames(job.params.duration_s)
        budget = free - VRAM_HEADROOM_BYTES - frames * DIFFUSION_BYTES_PER_FRAME
        while job.chunk > VAE_CHUNK_FLOOR and job.chunk * VAE_BYTES_PER_CHUNK_FRAME > budget:
            job.chunk //= 2
        fits = job.chunk * VAE_BYTES_PER_CHUNK_FRAME <= budget
        if not fits:
            logger.warning("%.0f MiB free on %s is too little", free / 2**20, pipeline.device)
        return fits

    def _progress(self, job: Job, *, inject: bool) -> ProgressFn:
        """The pipeline's callback: cancellation point, OOM injection, progress forwarding."""

        def progress(stage: str, step: int, of: int) -> None:
            if job.cancel_reason is not None:
                raise job.cancel_reason
            if inject and self._inject.get(stage, 0) > 0:
                self._inject[stage] -= 1
                raise torch.cuda.OutOfMemoryError(f"injected out-of-memory at stage {stage!r}")
            if job.on_progress is not None:
                job.on_progress(stage, step, of)

        return progress


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def inject_from_env() -> dict[str, int]:
    return parse_inject_oom(os.environ.get("ACESTEP_INJECT_OOM"))
