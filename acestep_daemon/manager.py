"""GenerationManager: resident pipelines, one per device, each owned by one worker thread.

Jobs wait in one bounded queue that every worker takes from (a job goes to the
first idle worker); control commands (load, unload) jump ahead of them on every
worker. `submit` returns a `JobHandle`: an id, a future for the result and a
stream of progress events. A worker runs each job through the memory policy
(`memory.py`, per worker: its CPU fallback moves only its own pipeline),
cancels it between diffusion steps and VAE chunks, and writes its file.
Nothing here knows about sockets or JSON.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from acestep_daemon import __version__
from acestep_daemon.audio import write_audio
from acestep_daemon.errors import AceStepError, Cancelled, InvalidRequest
from acestep_daemon.memory import (
    FatalWorkerError,
    MemoryPolicy,
    Run,
    free_memory,
    move,
    trim_heap,
)
from acestep_daemon.options import QUEUE_LIMIT
from acestep_daemon.params import GenerationParams
from acestep_daemon.paths import take_path
from acestep_daemon.pipeline import Pipeline

logger = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
"""(stage, step, of) of a running job."""

PipelineFactory = Callable[[], Pipeline]
"""Loads one worker's pipeline (on its device); called on that worker's thread."""

JOB_ID_BYTES = 6
"""A job id is this many random bytes in hex: no id comes back after a restart."""

REMEMBERED_JOBS = 1024
"""How many ended jobs `cancel` can still tell apart from ids it never saw."""


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

    def answer(self) -> dict[str, Any]:
        """The wire's success answer of the written file(s)."""
        return self.run.answer(self.path, self.timings, self.takes)

    @property
    def files(self) -> list[Path]:
        """Every file written, in answer order (the takes', or the one file)."""
        return [path for path, _ in self.takes] or [self.path]


@dataclass(eq=False)
class JobHandle:
    """A submitted job: its id, result future, progress listeners and cancellation."""

    job: Job
    id: str = field(default_factory=lambda: secrets.token_hex(JOB_ID_BYTES))
    """Names the job on the wire (the `cancel` command, the `jobs` list, its answer)."""
    position: int = 0
    """Jobs that had to end before this one could start when it was queued (0: starts now)."""
    worker: int | str | None = None
    """The worker running it (its index; through a queue, its daemon's name); None while it
    waits."""
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
        self._report(stage, step, of)

    def _report(self, stage: str, step: int, of: int) -> None:
        """Tell the listeners how far the job is."""
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


def job_summary(handle: JobHandle, state: str, position: int) -> dict[str, Any]:
    """One job of the `jobs` command's list."""
    return {
        "id": handle.id,
        "state": state,
        "position": position,
        "worker": handle.worker,
        "caption": abbreviate(handle.job.params.caption),
        "duration_s": handle.job.params.duration_s,
    }


class EndedJobs:
    """How the last `REMEMBERED_JOBS` jobs ended, by id (guarded by its owner's lock)."""

    def __init__(self) -> None:
        self._endings: OrderedDict[str, str] = OrderedDict()

    def remember(self, job_id: str, result: Future[JobResult]) -> None:
        self._endings[job_id] = ending(result)
        while len(self._endings) > REMEMBERED_JOBS:
            self._endings.popitem(last=False)

    def get(self, job_id: str) -> str | None:
        return self._endings.get(job_id)


def ending(result: Future[JobResult]) -> str:
    """How a finished job ended: "ok", "cancelled" or "failed"."""
    error = result.exception()
    if error is None:
        return "ok"
    return "cancelled" if isinstance(error, Cancelled) else "failed"


@dataclass
class _Control:
    name: str
    on_done: Callable[[dict[str, Any] | BaseException], None]


class _Gather:
    """Answers a control once every worker has run it: the first error, or the merged results."""

    def __init__(
        self, count: int, on_done: Callable[[dict[str, Any] | BaseException], None]
    ) -> None:
        self._results: list[dict[str, Any] | BaseException | None] = [None] * count
        self._left = count
        self._lock = threading.Lock()
        self._on_done = on_done

    def part(self, index: int) -> Callable[[dict[str, Any] | BaseException], None]:
        def done(result: dict[str, Any] | BaseException) -> None:
            with self._lock:
                self._results[index] = result
                self._left -= 1
                if self._left:
                    return
            errors = [r for r in self._results if isinstance(r, BaseException)]
            self._on_done(errors[0] if errors else merge(self._results))  # type: ignore[arg-type]

        return done


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One answer from every worker's: the message; distinct devices, dtypes joined by commas."""
    merged = dict(results[0])
    for key in ("device", "dtype"):
        if key in merged:
            merged[key] = ",".join(dict.fromkeys(r[key] for r in results))
    return merged


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


class _Worker:
    """One device's resident pipeline and the thread that runs jobs on it.

    Its state is guarded by the manager's condition; only its own thread loads,
    moves or unloads its pipeline.
    """

    def __init__(self, manager: GenerationManager, index: int, factory: PipelineFactory) -> None:
        self.manager = manager
        self.index = index
        self._factory = factory
        self.controls: deque[_Control] = deque()
        self.running: JobHandle | None = None
        self.pipeline: Pipeline | None = None
        self.home: tuple[torch.device, torch.dtype] | None = None
        self.generated = 0
        self.last_active = time.monotonic()
        name = "acestep-worker" if index == 0 else f"acestep-worker-{index}"
        self.thread = threading.Thread(target=self._work, name=name, daemon=True)

    def status(self) -> dict[str, Any]:
        """This worker's part of `status` (call with the manager's condition held)."""
        home = self.home
        return {
            "device": str(home[0]) if home else None,
            "dtype": str(home[1]).removeprefix("torch.") if home else None,
            "loaded": self.pipeline is not None,
            "busy": self.running is not None,
            "job": self.running.id if self.running else None,
            "generated": self.generated,
        }

    def _work(self) -> None:
        manager = self.manager
        try:
            while (item := self._next()) is not None:
                if isinstance(item, _Control):
                    self._control(item)
                else:
                    self._serve(item)
                    with manager._cond:
                        self.running = None
                        self.last_active = time.monotonic()
        except BaseException as error:
            logger.critical("generation worker %d failed: %s", self.index, error, exc_info=True)
            with manager._cond:
                manager._stopping = True
                manager._cond.notify_all()
            if manager._on_fatal:
                manager._on_fatal(error)

    def _next(self) -> _Control | JobHandle | None:
        """The next control or job; None when stopping. Unloads after the idle window."""
        manager = self.manager
        with manager._cond:
            while True:
                if self.controls:
                    return self.controls.popleft()
                if manager._stopping:
                    return None
                if manager._jobs:
                    self.running = manager._jobs.popleft()
                    self.running.worker = self.index
                    return self.running
                timeout = None
                if manager._idle_unload_s is not None and self.pipeline is not None:
                    timeout = self.last_active + manager._idle_unload_s - time.monotonic()
                    if timeout <= 0:
                        logger.info(
                            "worker %d: unloading after %.0f s idle",
                            self.index,
                            manager._idle_unload_s,
                        )
                        self._unload()
                        continue
                manager._cond.wait(timeout)

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
        with self.manager._cond:
            self.last_active = time.monotonic()
        control.on_done(result)

    def _where(self) -> dict[str, str]:
        assert self.pipeline is not None
        return {
            "device": str(self.pipeline.device),
            "dtype": str(self.pipeline.dtype).removeprefix("torch."),
        }

    def _ensure_loaded(self) -> Pipeline:
        """The pipeline at home; loads it lazily, and brings it back after a CPU fallback."""
        manager = self.manager
        if self.pipeline is None:
            try:
                with manager._load_lock:  # building modules (on `meta`) is not thread-safe
                    pipeline = self._factory()
            except Exception as error:
                raise FatalWorkerError(f"could not load the pipeline: {error}") from error
            free_memory()  # what loading and quantizing let go of
            if pipeline.device.type == "cuda":
                torch.cuda.set_device(pipeline.device)  # this thread's current device
            with manager._cond:
                self.pipeline = pipeline
                self.home = (pipeline.device, pipeline.dtype)
                manager._model_dir = str(pipeline.checkpoint.root)
                manager._model = pipeline.spec.name
                manager.counters.loads += 1
        elif self.home and (self.pipeline.device, self.pipeline.dtype) != self.home:
            move(self.pipeline, *self.home)
        return self.pipeline

    def _unload(self) -> None:
        with self.manager._cond:
            self.pipeline = None
        free_memory()

    def _serve(self, handle: JobHandle) -> None:
        """Run one job and answer it; only a FatalWorkerError escapes."""
        manager = self.manager
        started = time.perf_counter()
        job = handle.job
        try:
            if handle.cancel_reason is not None:
                raise handle.cancel_reason
            loading = self.pipeline is None
            pipeline = self._ensure_loaded()
            loaded = time.perf_counter()
            assert self.home is not None
            run = MemoryPolicy(
                pipeline,
                self.home,
                on_retry=lambda: manager._count("oom_retries"),
                on_fallback=lambda: manager._count("cpu_fallbacks"),
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
            manager._count("failed")
            handle._finish(error)
            raise
        except Cancelled as error:
            manager._count("cancelled")
            handle._finish(error)
        except InvalidRequest as error:
            manager._count("rejected")
            handle._finish(error)
        except BaseException as error:
            manager._count("failed")
            handle._finish(error)
        else:
            with manager._cond:
                manager.counters.generated += 1
                self.generated += 1
            handle._finish(JobResult(path=Path(path), run=run, timings=timings, takes=takes))
        finally:
            trim_heap()  # the job's freed activations leave the resident memory


class GenerationManager:
    """One worker thread per pipeline factory (one per device), all fed from one bounded
    queue: a job goes to the first idle worker. Every public method is thread-safe."""

    def __init__(
        self,
        factories: Sequence[PipelineFactory],
        *,
        queue_limit: int = QUEUE_LIMIT,
        idle_unload_s: float | None = None,
    ) -> None:
        if not factories:
            raise ValueError("a manager needs at least one pipeline factory")
        self.queue_limit = queue_limit
        self._idle_unload_s = idle_unload_s
        self._on_fatal: Callable[[BaseException], None] | None = None
        self._cond = threading.Condition()
        self._load_lock = threading.Lock()
        self._jobs: deque[JobHandle] = deque()
        self._ended = EndedJobs()
        self._stopping = False
        self._model_dir: str | None = None
        self._model: str | None = None
        self._started = time.monotonic()
        self.counters = Counters()
        self._workers = [_Worker(self, i, factory) for i, factory in enumerate(factories)]

    # -- public API (any thread) --------------------------------------------------------

    def start(
        self,
        on_loaded: Callable[[dict[str, Any] | BaseException], None],
        on_fatal: Callable[[BaseException], None],
    ) -> None:
        """Start the workers: each loads its pipeline first; `on_loaded` hears once all have
        (`device` and `dtype` joined by commas when there are several).

        `on_fatal` is called (from a worker) when a worker cannot go on.
        """
        self._on_fatal = on_fatal
        gather = _Gather(len(self._workers), on_loaded)
        for worker in self._workers:
            worker.controls.append(_Control("load", gather.part(worker.index)))
            worker.thread.start()

    def submit(self, job: Job, job_id: str | None = None) -> JobHandle:
        """Queue a job and return its handle, or raise QueueFull / ShuttingDown at once.

        `job_id` keeps an id given elsewhere (the job queue's); by default a fresh one."""
        handle = JobHandle(job) if job_id is None else JobHandle(job, id=job_id)
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the daemon is shutting down")
            if len(self._jobs) >= self.queue_limit:
                raise QueueFull(len(self._jobs), self.queue_limit)
            handle.position = self._must_end_before(len(self._jobs))
            self._jobs.append(handle)
            self._cond.notify()
        handle.result.add_done_callback(lambda result: self._remember(handle.id, result))
        return handle

    def cancel(self, handle: JobHandle, reason: AceStepError) -> bool:
        """Cancel a job: at once if it is still queued (True), else at its next step or chunk.

        A job already being cancelled keeps its first reason.
        """
        with self._cond:
            if handle.cancel_reason is None:
                handle.cancel_reason = reason
            queued = handle in self._jobs
            if queued:
                self._jobs.remove(handle)
                self.counters.cancelled += 1
        if queued:
            handle._finish(handle.cancel_reason)
        return queued

    def find(self, job_id: str) -> JobHandle | str | None:
        """The queued or running job `job_id`; else how it ended ("ok", "cancelled",
        "failed") if it ended lately; None when no job had this id."""
        with self._cond:
            for handle in self._active():
                if handle.id == job_id:
                    return handle
            return self._ended.get(job_id)

    def jobs(self) -> list[dict[str, Any]]:
        """The running jobs, then the queued ones in order, for the `jobs` command.

        `position` counts the jobs that must end before the job can start (0: running).
        """
        with self._cond:
            running = [(worker.running, "running", 0) for worker in self._workers if worker.running]
            queued = [
                (handle, "queued", self._must_end_before(i)) for i, handle in enumerate(self._jobs)
            ]
            return [job_summary(*job) for job in running + queued]

    def command(self, name: str, on_done: Callable[[dict[str, Any] | BaseException], None]) -> None:
        """`load` / `unload`, run by every worker ahead of queued jobs; answered once all have."""
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the daemon is shutting down")
            gather = _Gather(len(self._workers), on_done)
            for worker in self._workers:
                worker.controls.append(_Control(name, gather.part(worker.index)))
            self._cond.notify_all()

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
        """A snapshot for the `status` command: the whole daemon, then `workers`, one each.

        `device` and `dtype` are the workers' distinct values, joined; `loaded` means every worker
        is, `busy` that one is running a job; `free_vram_bytes` adds up the GPUs served.
        """
        with self._cond:
            workers = [worker.status() for worker in self._workers]
            pipelines = [worker.pipeline for worker in self._workers]
            homes = [worker.home for worker in self._workers]
            depth = len(self._jobs)
            stopping = self._stopping
            counters = dict(vars(self.counters))
        gpus = {home[0] for home in homes if home is not None and home[0].type == "cuda"}
        free = {gpu: torch.cuda.mem_get_info(gpu)[0] for gpu in gpus}
        for worker, home in zip(workers, homes, strict=True):
            worker["free_vram_bytes"] = free.get(home[0]) if home else None
        lead = next((p for p in pipelines if p is not None), None)
        return {
            "version": __version__,
            "device": joined(w["device"] for w in workers),
            "dtype": joined(w["dtype"] for w in workers),
            "loaded": all(p is not None for p in pipelines),
            "queue_depth": depth,
            "queue_limit": self.queue_limit,
            "busy": any(w["busy"] for w in workers),
            "stopping": stopping,
            "uptime_s": round(time.monotonic() - self._started, 1),
            "free_vram_bytes": sum(free.values()) if free else None,
            "model": self._model,
            "model_dir": self._model_dir,
            "lm": None if lead is None else lead.lm_size,
            "lm_loaded": any(p is not None and p.lm is not None for p in pipelines),
            **counters,
            "workers": workers,
        }

    def shutdown(self) -> list[JobHandle]:
        """Stop taking work; queued jobs are answered ShuttingDown. Returns them."""
        with self._cond:
            self._stopping = True
            pending = list(self._jobs)
            controls = [control for worker in self._workers for control in worker.controls]
            self._jobs.clear()
            for worker in self._workers:
                worker.controls.clear()
            self._cond.notify_all()
        for handle in pending:
            handle._finish(ShuttingDown("the daemon is shutting down; the request did not run"))
        for control in controls:
            control.on_done(ShuttingDown("the daemon is shutting down"))
        return pending

    def stop_running(self) -> None:
        """After the grace period: stop the running jobs at their next step."""
        with self._cond:
            for worker in self._workers:
                if worker.running is not None:
                    reason = ShuttingDown("the daemon stopped before it finished")
                    worker.running.cancel_reason = reason

    def join(self, timeout: float | None) -> bool:
        """Wait for every worker to exit (`timeout` in all); True when they have."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for worker in self._workers:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            worker.thread.join(left)
        return not self.alive

    def idle_workers(self) -> int:
        """Workers that would start a job submitted now."""
        with self._cond:
            if self._stopping:
                return 0
            idle = sum(
                worker.running is None or worker.running.result.done()  # ending: free next
                for worker in self._workers
            )
            return max(0, idle - len(self._jobs))

    @property
    def queue_depth(self) -> int:
        with self._cond:
            return len(self._jobs)

    @property
    def alive(self) -> bool:
        """True while any worker runs."""
        return any(worker.thread.is_alive() for worker in self._workers)

    # -- helpers (the condition held where noted) ---------------------------------------

    def _active(self) -> list[JobHandle]:
        """Running, then queued jobs (condition held)."""
        return [w.running for w in self._workers if w.running] + list(self._jobs)

    def _must_end_before(self, queued_ahead: int) -> int:
        """How many jobs must end before a job with `queued_ahead` waiting ahead of it can
        start (condition held): with one worker, the jobs ahead, the running one included."""
        busy = sum(worker.running is not None for worker in self._workers)
        return max(0, busy + queued_ahead - (len(self._workers) - 1))

    def _remember(self, job_id: str, result: Future[JobResult]) -> None:
        with self._cond:
            self._ended.remember(job_id, result)

    def _count(self, name: str) -> None:
        with self._cond:
            setattr(self.counters, name, getattr(self.counters, name) + 1)


def joined(values: Iterable[str | None]) -> str | None:
    """Distinct values in order, joined by commas; None when there are none."""
    distinct = dict.fromkeys(v for v in values if v is not None)
    return ",".join(distinct) if distinct else None


def abbreviate(text: str, limit: int = 40) -> str:
    """One line of at most `limit` characters (an ellipsis marks a cut)."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
