"""GenerationManager: the resident pipeline, owned by one worker thread.

Jobs wait in a bounded queue; control commands (load, unload) jump ahead of
them. `submit` returns a `JobHandle`: a future for the result and a stream of
progress events. The worker runs each job through the memory policy
(`memory.py`), cancels it between diffusion steps and VAE chunks, and writes
its file. Nothing here knows about sockets or JSON.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from acestep_daemon import __version__
from acestep_daemon.audio import write_audio
from acestep_daemon.errors import AceStepError, Cancelled, InvalidRequest
from acestep_daemon.memory import FatalWorkerError, MemoryPolicy, Run, free_memory, move
from acestep_daemon.options import QUEUE_LIMIT
from acestep_daemon.params import GenerationParams
from acestep_daemon.paths import take_path
from acestep_daemon.pipeline import Pipeline

logger = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
"""(stage, step, of) of a running job."""


class QueueFull(AceStepError):
    """The queue holds `depth` waiting jobs already."""

    def __init__(self, depth: int, limit: int) -> None:
        super().__init__(f"busy: {depth} requests are waiting (queue limit {limit})")
        self.depth = depth
        self.limit = limit


class ShuttingDown(Cancelled):
    """The daemon is stopping; the job did not run (or was stopped)."""


@dataclass(frozen=True)
class Job:
    """One generation request: what to make and where to write it."""

    params: GenerationParams
    output: Path


@dataclass(frozen=True)
class JobResult:
    """The written file(s) and how they were made.

    `timings` are the run's stages (text, diffusion, vae) plus `write` (encoding
    the file(s)), `load` when this job had to load the pipeline, and `total`: the
    job's whole time in the worker, from leaving the queue to the written file.
    """

    path: Path
    """The first take's file."""
    run: Run
    timings: dict[str, float]
    takes: list[tuple[Path, int]] = field(default_factory=list)
    """(file, seed) of every take when the request named `seeds`; empty otherwise."""


@dataclass(eq=False)
class JobHandle:
    """A submitted job: its result future, its progress listeners and its cancellation."""

    job: Job
    position: int = 0
    """Jobs ahead of this one when it was queued, the running one included (0: starts now)."""
    result: Future[JobResult] = field(default_factory=Future)
    cancel_reason: AceStepError | None = None
    _listeners: list[Progress] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def on_progress(self, listener: Progress) -> None:
        """Call `listener(stage, step, of)` from the worker thread as the job advances."""
        self._listeners.append(listener)

    def _progress(self, stage: str, step: int, of: int) -> None:
        """The pipeline's callback: the cancellation point, then the listeners."""
        if self.cancel_reason is not None:
            raise self.cancel_reason
        for listener in self._listeners:
            listener(stage, step, of)

    def _finish(self, outcome: JobResult | BaseException) -> None:
        """Answer the job once; a cancel racing the end is ignored."""
        with self._lock:
            if self.result.done():
                return
            if isinstance(outcome, BaseException):
                self.result.set_exception(outcome)
            else:
                self.result.set_result(outcome)


@dataclass
class _Control:
    name: str
    on_done: Callable[[dict[str, Any] | BaseException], None]


@dataclass
class Counters:
    """Requests by outcome: `rejected` were invalid (answered `invalid_request`, before
    or after queueing); `failed` were valid and still failed."""

    generated: int = 0
    failed: int = 0
    rejected: int = 0
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
        queue_limit: int = QUEUE_LIMIT,
        idle_unload_s: float | None = None,
    ) -> None:
        self._factory = factory
        self.queue_limit = queue_limit
        self._idle_unload_s = idle_unload_s
        self._on_fatal: Callable[[BaseException], None] | None = None
        self._cond = threading.Condition()
        self._jobs: deque[JobHandle] = deque()
        self._controls: deque[_Control] = deque()
        self._running: JobHandle | None = None
        self._stopping = False
        self._pipeline: Pipeline | None = None
        self._home: tuple[torch.device, torch.dtype] | None = None
        self._model_dir: str | None = None
        self._model: str | None = None
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

    def submit(self, job: Job) -> JobHandle:
        """Queue a job and return its handle, or raise QueueFull / ShuttingDown at once."""
        handle = JobHandle(job)
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the daemon is shutting down")
            if len(self._jobs) >= self.queue_limit:
                raise QueueFull(len(self._jobs), self.queue_limit)
            handle.position = len(self._jobs) + (self._running is not None)
            self._jobs.append(handle)
            self._cond.notify()
        return handle

    def cancel(self, handle: JobHandle, reason: AceStepError) -> None:
        """Cancel a job: at once if it is still queued, else at its next step or chunk."""
        with self._cond:
            handle.cancel_reason = reason
            queued = handle in self._jobs
            if queued:
                self._jobs.remove(handle)
                self.counters.cancelled += 1
        if queued:
            handle._finish(reason)

    def command(self, name: str, on_done: Callable[[dict[str, Any] | BaseException], None]) -> None:
        """`load` / `unload`, run by the worker ahead of queued jobs."""
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the daemon is shutting down")
            self._controls.append(_Control(name, on_done))
            self._cond.notify()

    def count_rejected(self) -> None:
        """An invalid request, refused before it reached the queue."""
        with self._cond:
            self.counters.rejected += 1

    @property
    def stopping(self) -> bool:
        """True once shutdown began: no new work is taken."""
        with self._cond:
            return self._stopping

    def status(self) -> dict[str, Any]:
        """A snapshot for the `status` command."""
        with self._cond:
            pipeline = self._pipeline
            home = self._home
            depth = len(self._jobs)
            busy = self._running is not None
            stopping = self._stopping
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
            "stopping": stopping,
            "uptime_s": round(time.monotonic() - self._started, 1),
            "free_vram_bytes": free_vram,
            "model": self._model,
            "model_dir": self._model_dir,
            "lm": None if pipeline is None else pipeline.lm_size,
            "lm_loaded": pipeline is not None and pipeline.lm is not None,
            **vars(self.counters),
        }

    def shutdown(self) -> list[JobHandle]:
        """Stop taking work; queued jobs are answered ShuttingDown. Returns them."""
        with self._cond:
            self._stopping = True
            pending = list(self._jobs)
            controls = list(self._controls)
            self._jobs.clear()
            self._controls.clear()
            self._cond.notify_all()
        for handle in pending:
            handle._finish(ShuttingDown("the daemon is shutting down; the request did not run"))
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
                else:
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

    def _next(self) -> _Control | JobHandle | None:
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
            self._model = self._pipeline.spec.name
            self.counters.loads += 1
        elif self._home and (self._pipeline.device, self._pipeline.dtype) != self._home:
            move(self._pipeline, *self._home)
        return self._pipeline

    def _unload(self) -> None:
        self._pipeline = None
        free_memory()

    def _serve(self, handle: JobHandle) -> None:
        """Run one job and answer it; only a FatalWorkerError escapes."""
        started = time.perf_counter()
        job = handle.job
        try:
            if handle.cancel_reason is not None:
                raise handle.cancel_reason
            loading = self._pipeline is None
            pipeline = self._ensure_loaded()
            loaded = time.perf_counter()
            assert self._home is not None
            run = MemoryPolicy(
                pipeline,
                self._home,
                on_retry=self._count_retry,
                on_fallback=self._count_fallback,
            ).run(job.params, handle._progress)
            job.output.parent.mkdir(parents=True, exist_ok=True)
            writing = time.perf_counter()
            takes = []
            if job.params.seeds is None:
                path = write_audio(job.output, run.audio.samples, run.audio.sample_rate)
            else:
                for take in run.audio.takes:
                    target = take_path(job.output, take.seed)
                    written = write_audio(target, take.samples, run.audio.sample_rate)
                    takes.append((Path(written), take.seed))
                path = takes[0][0]
            done = time.perf_counter()
            timings = {
                **({"load": loaded - started} if loading else {}),
                **run.audio.timings,
                "write": done - writing,
                "total": done - started,
            }
        except FatalWorkerError as error:
            self.counters.failed += 1
            handle._finish(error)
            raise
        except Cancelled as error:
            self.counters.cancelled += 1
            handle._finish(error)
        except InvalidRequest as error:
            self.counters.rejected += 1
            handle._finish(error)
        except BaseException as error:
            self.counters.failed += 1
            handle._finish(error)
        else:
            self.counters.generated += 1
            handle._finish(JobResult(path=Path(path), run=run, timings=timings, takes=takes))

    def _count_retry(self) -> None:
        self.counters.oom_retries += 1

    def _count_fallback(self) -> None:
        self.counters.cpu_fallbacks += 1
