"""A daemon as the front of the job queue: socket requests become queue entries.

`QueueFront` stands where the `GenerationManager` stands in a daemon with its own
pipelines (`acestep serve --front --queue URL`), with the same surface to the connection
code: `submit` returns a `JobHandle`, `cancel`, `find`, `jobs`, `status`. It loads no
model. An accepted job is one transaction: the entry on its jobs stream (the model's, or
that of its adapters; its
parameters, the extension of its file, the bytes of its input files) and the job in this
front's hash. A thread per job follows the job's reply stream from its start, forwards the
progress, and on `done` writes the worker's encoded file(s) at the client's path(s), so
that answers name the client's files. A restarted front follows the jobs left in its hash
and writes their files: nothing accepted is lost.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from acestep_daemon import __version__, jobqueue
from acestep_daemon.audio import write_encoded
from acestep_daemon.errors import AceStepError, InvalidRequest, remote_error
from acestep_daemon.jobqueue import Keys, QueueUnavailable
from acestep_daemon.manager import (
    Counters,
    EndedJobs,
    Job,
    JobHandle,
    QueueFull,
    ShuttingDown,
    job_summary,
    joined,
)
from acestep_daemon.options import QUEUE_LIMIT
from acestep_daemon.params import GenerationParams
from acestep_daemon.paths import take_path

logger = logging.getLogger(__name__)

FOLLOW_BLOCK_MS = 1000
"""How long one read of a reply stream waits for its next event."""


@dataclass(frozen=True)
class RemoteResult:
    """A job answered by a worker, its file(s) written here: the worker's answer with the
    client's paths."""

    answer_fields: dict[str, Any]

    def answer(self) -> dict[str, Any]:
        return dict(self.answer_fields)


def front_name(socket_path: Path) -> str:
    """Names this front's hash: its host and socket, the same after a restart."""
    return f"{socket.gethostname()}:{socket_path}"


class QueueFront:
    """Puts socket requests on the queue and follows them to their answers."""

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        *,
        name: str,
        url: str,
        queue_limit: int = QUEUE_LIMIT,
    ) -> None:
        self.client = client
        self.keys = keys
        self.name = name
        self.url = jobqueue.redacted(url)
        self.queue_limit = queue_limit
        self.counters = Counters()
        self._lock = threading.Lock()
        self._active: dict[str, JobHandle] = {}
        self._stream_of: dict[str, str] = {}
        """The jobs stream of each active job."""
        self._adapter_streams: set[str] = set()
        """Adapter streams known to exist, with their group."""
        self._ended = EndedJobs()
        self._followers: list[threading.Thread] = []
        self._stopping = False
        self._closed = threading.Event()
        self._started = time.monotonic()

    # -- the manager's surface ------------------------------------------------------------

    def start(
        self,
        on_loaded: Callable[[dict[str, Any] | BaseException], None],
        on_fatal: Callable[[BaseException], None],
    ) -> None:
        """Follow the jobs a previous run of this front left unanswered; report ready."""
        try:
            left = self.client.hgetall(self.keys.front(self.name))
        except redis.RedisError as error:
            on_loaded(QueueUnavailable(f"queue {self.url}: {error}"))
            on_fatal(error)
            return
        for job_id, stored in left.items():
            record = json.loads(stored)
            params = GenerationParams.model_construct(**record["params"])
            handle = JobHandle(Job(params, Path(record["output"])), id=job_id.decode())
            logger.info("following job %s again (accepted before a restart)", handle.id)
            self._follow(handle, record["stream"])
        on_loaded({"serving": f"the queue {self.url} ({self.keys.jobs})"})

    def submit(self, job: Job) -> JobHandle:
        """Put a job on its stream (with this front's record of it) and follow it."""
        handle = JobHandle(job)
        with self._lock:
            if self._stopping:
                raise ShuttingDown("the daemon is shutting down")
            if len(self._active) >= self.queue_limit:
                raise QueueFull(len(self._active), self.queue_limit)
        fields = self._entry(handle)
        stream = self.keys.jobs_for([adapter.path for adapter in job.params.adapters])
        record = {"output": str(job.output), "params": _params_json(job.params), "stream": stream}
        try:
            if stream != self.keys.jobs and stream not in self._adapter_streams:
                jobqueue.create_group(self.client, stream)
                self.client.sadd(self.keys.streams, stream)
                self._adapter_streams.add(stream)
            ahead = self.client.xlen(stream)
            with self.client.pipeline(transaction=True) as batch:
                batch.xadd(stream, fields)
                batch.hset(self.keys.front(self.name), handle.id, json.dumps(record))
                batch.execute()
        except redis.RedisError as error:
            raise QueueUnavailable(f"the queue {self.url} failed: {error}") from error
        workers = sum(len(status) for _, status in self._worker_statuses())
        handle.position = max(0, ahead - max(workers - 1, 0))  # as the manager counts
        self._follow(handle, stream)
        return handle

    def cancel(self, handle: JobHandle, reason: AceStepError) -> bool:
        """Mark the job cancelled; a job no worker has taken leaves the queue at once (True),
        a running one stops at its next step (its worker answers `cancelled`)."""
        if handle.cancel_reason is None:
            handle.cancel_reason = reason
        keys = self.keys
        try:
            self.client.set(keys.cancel(handle.id), "1", ex=jobqueue.REPLY_TTL_S)
            if handle.worker is not None:
                return False
            stream = self._stream_of.get(handle.id)
            entry = None if stream is None else self._entry_of(stream, handle.id)
            if entry is None or not self.client.xdel(stream, entry):
                return False
        except redis.RedisError as error:
            logger.warning("could not cancel job %s: %s", handle.id, error)
            return False
        self._count("cancelled")
        self._end(handle, handle.cancel_reason)
        return True

    def find(self, job_id: str) -> JobHandle | str | None:
        """This front's queued or running job `job_id`, else how it ended, else None."""
        with self._lock:
            return self._active.get(job_id) or self._ended.get(job_id)

    def jobs(self) -> list[dict[str, Any]]:
        """This front's jobs: the running ones (a worker took them), then the waiting ones."""
        with self._lock:
            handles = list(self._active.values())
        running = [h for h in handles if h.worker is not None]
        waiting = [h for h in handles if h.worker is None]
        return [job_summary(handle, "running", 0) for handle in running] + [
            job_summary(handle, "queued", handle.position) for handle in waiting
        ]

    def command(self, name: str, on_done: Callable[[dict[str, Any] | BaseException], None]) -> None:
        raise InvalidRequest(
            f"{name} acts on a worker's pipeline; this daemon is a queue front and loads no "
            "model: send it to a worker's own socket"
        )

    def count_rejected(self) -> None:
        self._count("rejected")

    @property
    def stopping(self) -> bool:
        with self._lock:
            return self._stopping

    def status(self) -> dict[str, Any]:
        """The front and the workers that published their status lately."""
        daemons = self._worker_statuses()
        workers = [{**worker, "daemon": daemon} for daemon, status in daemons for worker in status]
        with self._lock:
            counters = dict(vars(self.counters))
            stopping = self._stopping
            mine = len(self._active)
        try:
            streams = [self.keys.jobs, *self.client.smembers(self.keys.streams)]
            depth = sum(self.client.xlen(stream) for stream in streams)
        except redis.RedisError:
            depth = None
        return {
            "version": __version__,
            "queue": self.url,
            "stream": self.keys.jobs,
            "device": joined(w["device"] for w in workers),
            "dtype": joined(w["dtype"] for w in workers),
            "loaded": bool(workers) and all(w["loaded"] for w in workers),
            "queue_depth": depth,
            "queue_limit": self.queue_limit,
            "front_jobs": mine,
            "busy": any(w["busy"] for w in workers),
            "stopping": stopping,
            "uptime_s": round(time.monotonic() - self._started, 1),
            **counters,
            "workers": workers,
        }

    def shutdown(self) -> list[JobHandle]:
        """Take no new jobs; the accepted ones keep their answers coming until `join`."""
        with self._lock:
            self._stopping = True
        return []

    def stop_running(self) -> None:
        """After the grace period: stop following. The jobs stay on the queue and in this
        front's hash; the next start writes their files."""
        self._closed.set()
        with self._lock:
            handles = list(self._active.values())
        for handle in handles:
            handle._finish(
                ShuttingDown(
                    f"the front stopped before job {handle.id} was answered; it stays on the "
                    "queue and the front writes its file when it starts again"
                )
            )

    def join(self, timeout: float | None) -> bool:
        """Wait for every followed job to be answered; True when all are."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in list(self._followers):
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            thread.join(left)
        return not self.alive

    @property
    def alive(self) -> bool:
        return any(thread.is_alive() for thread in self._followers)

    @property
    def queue_depth(self) -> int:
        with self._lock:
            return len(self._active)

    # -- following one job ------------------------------------------------------------

    def _entry(self, handle: JobHandle) -> dict[str, Any]:
        """The jobs-stream entry: id, front, parameters, file extension, input files."""
        params = handle.job.params
        fields: dict[str, Any] = {
            "id": handle.id,
            "front": self.name,
            "params": json.dumps(_params_json(params), ensure_ascii=False),
            "suffix": handle.job.output.suffix,
        }
        for name in jobqueue.INPUT_FILES:
            path = getattr(params, name)
            if path is not None:
                try:
                    fields[f"input:{name}"] = Path(path).read_bytes()
                except OSError as error:
                    raise InvalidRequest(f"cannot read {name} {path}: {error.strerror}") from None
        return fields

    def _follow(self, handle: JobHandle, stream: str) -> None:
        with self._lock:
            self._active[handle.id] = handle
            self._stream_of[handle.id] = stream
        thread = threading.Thread(
            target=self._follow_replies, args=(handle,), name=f"follow-{handle.id}", daemon=True
        )
        self._followers = [t for t in self._followers if t.is_alive()] + [thread]
        thread.start()

    def _follow_replies(self, handle: JobHandle) -> None:
        """Read the job's reply stream from its start until `done` (or the front stops)."""
        reply = self.keys.reply(handle.id)
        last = b"0"
        while not self._closed.is_set() and not handle.result.done():
            try:
                batch = self.client.xread({reply: last}, block=FOLLOW_BLOCK_MS)
            except redis.RedisError as error:
                logger.warning("job %s: the queue failed (%s); reading again", handle.id, error)
                self._closed.wait(1.0)
                continue
            for _, events in batch or []:
                for last, fields in events:  # noqa: B007 (`last` is where the next read starts)
                    kind, data, audio = jobqueue.parse_event(fields)
                    if kind == "taken":
                        handle.worker = data["worker"]
                    elif kind == "progress":
                        handle._report(data["stage"], data["step"], data["of"])
                    elif kind == "done":
                        self._done(handle, data, audio)
                        return

    def _done(self, handle: JobHandle, answer: dict[str, Any], audio: list[bytes]) -> None:
        """Write the worker's file(s) at the client's path(s); answer the job."""
        if not answer.get("ok"):
            self._count("cancelled" if answer.get("code") == "cancelled" else "failed")
            self._end(handle, remote_error(answer))
            return
        output = handle.job.output
        try:
            if "takes" in answer:
                for take, data in zip(answer["takes"], audio, strict=True):
                    take["path"] = str(write_encoded(take_path(output, take["seed"]), data))
                answer["path"] = answer["takes"][0]["path"]
            else:
                answer["path"] = str(write_encoded(output, audio[0]))
        except AceStepError as error:
            self._count("failed")
            self._end(handle, error)
            return
        self._count("generated")
        self._end(handle, RemoteResult(answer))

    def _end(self, handle: JobHandle, outcome: RemoteResult | BaseException) -> None:
        """Forget the job on the queue and here, then answer it once.

        The queue is cleared first so that whoever holds the answer finds no trace of the job
        left behind by this front.
        """
        try:
            with self.client.pipeline(transaction=True) as batch:
                batch.hdel(self.keys.front(self.name), handle.id)
                batch.delete(self.keys.reply(handle.id))
                batch.execute()
        except redis.RedisError as error:
            logger.warning("job %s: could not clear it from the queue: %s", handle.id, error)
        handle._finish(outcome)  # type: ignore[arg-type]
        with self._lock:
            self._active.pop(handle.id, None)
            self._stream_of.pop(handle.id, None)
            self._ended.remember(handle.id, handle.result)

    # -- helpers ----------------------------------------------------------------------

    def _entry_of(self, stream: str, job_id: str) -> bytes | None:
        """The entry of `job_id` still waiting on `stream`, if any."""
        for entry, fields in self.client.xrange(stream):
            if jobqueue.text(fields, "id") == job_id:
                return entry
        return None

    def _worker_statuses(self) -> list[tuple[str, list[dict[str, Any]]]]:
        """(daemon, its workers) of each worker daemon that published lately."""
        try:
            published = self.client.hgetall(self.keys.workers)
        except redis.RedisError:
            return []
        fresh_after = time.time() - 5 * jobqueue.STATUS_EVERY_S
        daemons = []
        for daemon, stored in sorted(published.items()):
            status = json.loads(stored)
            if status["at"] >= fresh_after:
                daemons.append((daemon.decode(), status["workers"]))
        return daemons

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self.counters, name, getattr(self.counters, name) + 1)


def _params_json(params: GenerationParams) -> dict[str, Any]:
    """The parameters the caller gave, as JSON values (the worker validates them again)."""
    return params.model_dump(mode="json", include=params.model_fields_set)
