"""A daemon as a worker of the job queue: take jobs while a pipeline is idle, post answers.

`QueuePuller` runs beside the socket server (`acestep serve --queue URL`). Its thread
takes an entry only while the manager has an idle worker: first one whose worker died
(pending longer than `claim_idle_s`), else a new one — from the streams of the adapters
this daemon ran last (they are still in its cache), then from the model's own stream,
then from the other adapter streams. The job runs through the same
`GenerationManager` as a socket request, writing into a private folder; its progress and
its answer, with the encoded file(s), go to the job's reply stream, and only then is the
entry acknowledged. Every few seconds the thread re-claims the entries it runs (so that
nobody takes them from a live worker), looks for their cancel marks and publishes this
daemon's status. A job stopped by this daemon's shutdown is not acknowledged: another
worker runs it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from acestep_daemon import jobqueue
from acestep_daemon.adapters import ADAPTER_CACHE_SIZE
from acestep_daemon.connection import wire_error
from acestep_daemon.constants import OUTPUT_EXTENSIONS
from acestep_daemon.errors import Cancelled, InvalidRequest
from acestep_daemon.family import MODELS
from acestep_daemon.jobqueue import GROUP, Keys
from acestep_daemon.manager import (
    GenerationManager,
    Job,
    JobHandle,
    JobResult,
    QueueFull,
    ShuttingDown,
)
from acestep_daemon.params import CWD, GenerationParams
from acestep_daemon.protocol import JOB_ID_MAX_CHARS

logger = logging.getLogger(__name__)

JOB_ID = re.compile(rf"[A-Za-z0-9_-]{{1,{JOB_ID_MAX_CHARS}}}")
"""What a job id of an entry may be (it names files in the private folder)."""

IDLE_POLL_S = 0.1
"""How often a daemon with no idle worker looks again (at once when a queue job ends)."""

FOLDER_PREFIX = "acestep-queue-"
"""A worker's private folder for its jobs' files: `<temporary directory>/acestep-queue-<pid>-*`."""


def private_folder() -> Path:
    """A fresh private folder for this worker, after removing the ones this user's workers
    left when they died without cleaning up (SIGKILL, a crash: no process has their pid)."""
    for folder in Path(tempfile.gettempdir()).glob(f"{FOLDER_PREFIX}*-*"):
        pid = folder.name.removeprefix(FOLDER_PREFIX).partition("-")[0]
        with contextlib.suppress(OSError):
            if pid.isdigit() and folder.stat().st_uid == os.getuid() and not _running(int(pid)):
                logger.info("removing %s, left by a worker that died", folder)
                shutil.rmtree(folder, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{os.getpid()}-"))


def _running(pid: int) -> bool:
    """Whether a process has `pid` (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


@dataclass(frozen=True)
class _Entry:
    """One entry of a jobs stream."""

    stream: str
    id: bytes
    fields: dict[bytes, bytes]


@dataclass(frozen=True)
class _Taken:
    """An entry this daemon runs, and its job in the manager."""

    entry: _Entry
    handle: JobHandle


class QueuePuller:
    """Feeds the manager from one model's jobs stream while it has idle workers."""

    def __init__(
        self,
        manager: GenerationManager,
        client: redis.Redis,
        keys: Keys,
        *,
        model: str,
        claim_idle_s: float = jobqueue.CLAIM_IDLE_S,
    ) -> None:
        self.manager = manager
        self.client = client
        self.keys = keys
        self.model = model
        self.claim_idle_s = claim_idle_s
        self.consumer = jobqueue.consumer_name()
        self._taken: dict[str, _Taken] = {}
        self._lock = threading.Lock()
        self._taking = True
        self._closed = threading.Event()
        self._job_ended = threading.Event()
        self._folder = private_folder()
        self._thread = threading.Thread(target=self._pull, name="acestep-queue", daemon=True)
        self._last_watch = 0.0
        self._streams = [keys.jobs]
        """Every jobs stream of the model: its own, then the adapter streams."""
        self._warm: deque[str] = deque(maxlen=ADAPTER_CACHE_SIZE)
        """The adapter streams of the jobs run last, the latest last."""

    def start(self) -> None:
        logger.info("taking %s jobs from %s as %s", self.model, self.keys.jobs, self.consumer)
        self._thread.start()

    def stop_taking(self) -> None:
        """Take no more jobs; the running ones stay claimed until `close`."""
        self._taking = False

    def close(self, timeout: float = 5.0) -> None:
        """After the manager has stopped: stop the thread and the status, leave the group
        when nothing is pending here (a pending entry stays for another worker), remove the
        private folder."""
        self._closed.set()
        self._thread.join(timeout)
        with contextlib.suppress(redis.RedisError):
            self.client.hdel(self.keys.workers, self.consumer)
            for stream in self._streams:
                pending = self.client.xpending_range(
                    stream, GROUP, min="-", max="+", count=1, consumername=self.consumer
                )
                if not pending:
                    self.client.xgroup_delconsumer(stream, GROUP, self.consumer)
        shutil.rmtree(self._folder, ignore_errors=True)

    # -- the pulling thread ---------------------------------------------------------------

    def _pull(self) -> None:
        while not self._closed.is_set():
            try:
                self._watch()
                if not self._taking or self.manager.idle_workers() == 0:
                    self._job_ended.wait(IDLE_POLL_S)
                    self._job_ended.clear()
                    continue
                entry = self._claim_stale() or self._read_new()
                if entry is not None:
                    self._take(entry)
            except redis.RedisError as error:
                logger.warning("queue: %s; trying again in a second", error)
                self._closed.wait(1.0)

    def _heartbeat_s(self) -> float:
        return min(max(self.claim_idle_s / 3, 0.2), jobqueue.STATUS_EVERY_S)

    def _claim_stale(self) -> _Entry | None:
        """An entry pending longer than `claim_idle_s`: its worker died or let it go."""
        idle_ms = int(self.claim_idle_s * 1000)
        for stream in self._streams:
            _, claimed, _ = self.client.xautoclaim(
                stream, GROUP, self.consumer, idle_ms, start_id="0-0", count=1
            )
            for entry, fields in claimed:
                if fields:
                    logger.info("queue: took over entry %s of %s", entry.decode(), stream)
                    return _Entry(stream, entry, fields)
        return None

    def _read_new(self) -> _Entry | None:
        """The first new entry of the streams in order of preference; if none has one, wait
        a heartbeat for one on any."""
        warm = [stream for stream in reversed(self._warm) if stream in self._streams]
        preferred = [*warm, *(s for s in self._streams if s not in warm)]
        for stream in preferred:
            found = self._read({stream: ">"}, block_ms=None)
            if found:
                return found[0]
        found = self._read(dict.fromkeys(preferred, ">"), int(self._heartbeat_s() * 1000))
        for extra in found[1:]:  # entries arrived on several streams at once: keep one
            logger.info("queue: letting entry %s of %s go", extra.id.decode(), extra.stream)
            stale_ms = int(self.claim_idle_s * 1000) + 1  # claimable at once, by anyone
            self.client.xclaim(
                extra.stream, GROUP, self.consumer, 0, [extra.id], idle=stale_ms, justid=True
            )
        return found[0] if found else None

    def _read(self, streams: dict[str, str], block_ms: int | None) -> list[_Entry]:
        answer = self.client.xreadgroup(GROUP, self.consumer, streams, count=1, block=block_ms)
        return [
            _Entry(stream.decode(), entry, fields)
            for stream, entries in answer or []
            for entry, fields in entries
        ]

    def _take(self, entry: _Entry) -> None:
        """Submit one entry's job to the manager, or answer it at once when it cannot run."""
        job_id = jobqueue.text(entry.fields, "id")
        if not job_id or not JOB_ID.fullmatch(job_id):
            logger.warning("queue: dropping entry %s without a usable job id", entry.id.decode())
            self._answer(entry, None, {})
            return
        if self.client.exists(self.keys.done(job_id)):
            logger.info("queue: job %s was answered already; dropping its entry", job_id)
            self._answer(entry, None, {})
            return
        if self.client.exists(self.keys.cancel(job_id)):
            self._answer(entry, job_id, wire_error(Cancelled(f"job {job_id} was cancelled")))
            return
        try:
            job = self._job(job_id, entry.fields)
        except (InvalidRequest, ValueError, KeyError) as error:
            logger.info("queue: job %s refused: %s", job_id, error)
            self._answer(entry, job_id, wire_error(InvalidRequest(str(error))))
            return
        try:
            handle = self.manager.submit(job, job_id)
        except (ShuttingDown, QueueFull):
            return  # not acknowledged: claimed again after claim_idle_s
        with self._lock:
            self._taken[job_id] = _Taken(entry, handle)
        self._post(job_id, "taken", {"worker": self.consumer, "position": handle.position})
        handle.on_progress(lambda stage, step, of: self._progress(job_id, stage, step, of))
        handle.result.add_done_callback(lambda result: self._finished(entry, job_id, result))
        logger.info("queue: job %s taken from %s", job_id, entry.stream)

    def _job(self, job_id: str, fields: dict[bytes, bytes]) -> Job:
        """The entry's job, its input files written into the private folder."""
        params = json.loads(fields[b"params"])
        for name in jobqueue.INPUT_FILES:
            data = fields.get(f"input:{name}".encode())
            if data is not None:
                path = self._folder / f"{job_id}-{name}{Path(params[name]).suffix}"
                path.write_bytes(data)
                params[name] = str(path)
        params = GenerationParams.model_validate(params, context={CWD: None})
        problem = params.model_problem(MODELS[self.model])
        if problem is not None:
            raise InvalidRequest(problem)
        suffix = (jobqueue.text(fields, "suffix") or ".ogg").lower()
        if suffix not in OUTPUT_EXTENSIONS:
            raise InvalidRequest(f"unsupported output format {suffix!r}")
        return Job(params, self._folder / f"{job_id}{suffix}")

    def _watch(self) -> None:
        """Every heartbeat: re-claim the running entries, pass on cancels, publish status,
        learn the adapter streams."""
        if time.monotonic() - self._last_watch < self._heartbeat_s():
            return
        self._last_watch = time.monotonic()
        adapter_streams = sorted(s.decode() for s in self.client.smembers(self.keys.streams))
        self._streams = [self.keys.jobs, *adapter_streams]
        with self._lock:
            taken = list(self._taken.items())
        if taken:
            for _, t in taken:
                entry = t.entry
                self.client.xclaim(entry.stream, GROUP, self.consumer, 0, [entry.id], justid=True)
            with self.client.pipeline(transaction=False) as batch:
                for job_id, _ in taken:
                    batch.exists(self.keys.cancel(job_id))
                marks = batch.execute()
            for (job_id, t), marked in zip(taken, marks, strict=True):
                if marked:
                    reason = Cancelled(f"job {job_id} was cancelled by a cancel command")
                    self.manager.cancel(t.handle, reason)
        status = {"at": time.time(), "workers": self.manager.status()["workers"]}
        self.client.hset(self.keys.workers, self.consumer, json.dumps(status))

    # -- the manager's threads --------------------------------------------------------

    def _progress(self, job_id: str, stage: str, step: int, of: int) -> None:
        with contextlib.suppress(redis.RedisError):
            self._post(job_id, "progress", {"stage": stage, "step": step, "of": of})

    def _finished(self, entry: _Entry, job_id: str, result: Future[JobResult]) -> None:
        with self._lock:
            self._taken.pop(job_id, None)
        self._job_ended.set()
        error = result.exception()
        if isinstance(error, ShuttingDown):
            logger.info("queue: job %s stopped by the shutdown; left to another worker", job_id)
            return
        if error is not None:
            self._answer(entry, job_id, wire_error(error))
            return
        outcome = result.result()
        if entry.stream != self.keys.jobs:
            with contextlib.suppress(ValueError):
                self._warm.remove(entry.stream)
            self._warm.append(entry.stream)
        audio = [path.read_bytes() for path in outcome.files]
        for path in outcome.files:
            path.unlink(missing_ok=True)
        self._answer(entry, job_id, outcome.answer(), audio)

    def _answer(
        self, entry: _Entry, job_id: str | None, answer: dict[str, Any], audio: list[bytes] = ()
    ) -> None:
        """Post the answer, mark the job done and acknowledge its entry, in one transaction
        (`job_id` None: only acknowledge)."""
        keys = self.keys
        try:
            with self.client.pipeline(transaction=True) as batch:
                if job_id is not None:
                    for path in self._folder.glob(f"{job_id}-*"):
                        path.unlink(missing_ok=True)  # its input files
                    answer = {**answer, "id": job_id, "worker": self.consumer}
                    batch.xadd(keys.reply(job_id), jobqueue.event("done", answer, audio))
                    batch.expire(keys.reply(job_id), jobqueue.REPLY_TTL_S)
                    code = answer.get("code", "ok")
                    batch.set(keys.done(job_id), code, ex=jobqueue.REPLY_TTL_S)
                batch.xack(entry.stream, GROUP, entry.id)
                batch.xdel(entry.stream, entry.id)
                batch.execute()
        except redis.RedisError as error:
            logger.error("queue: could not post the answer of job %s: %s", job_id, error)

    def _post(self, job_id: str, kind: str, data: dict[str, Any]) -> None:
        reply = self.keys.reply(job_id)
        with self.client.pipeline(transaction=True) as batch:
            batch.xadd(reply, jobqueue.event(kind, data))
            batch.expire(reply, jobqueue.REPLY_TTL_S)
            batch.execute()
