"""One connection: read a request line, check the peer, answer a command or run a job.

A caller that half-closes (socat, the ace-step-rs client) is still waiting for
its answer; only a peer that can no longer receive (EPOLLHUP/EPOLLERR on the
socket, EPIPE on a write) has hung up. A hang-up cancels the job when the request
says `on_hangup: "cancel"` (the default without `output`); otherwise the job
finishes and writes its file (socat without `-t` closes 0.5 s after its input
ends). Relative paths are resolved against the peer's working directory
(SO_PEERCRED pid, /proc/PID/cwd). Errors from below are turned into wire answers
here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import select
import socket
import struct
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from acestep_daemon import paths, protocol, sdnotify
from acestep_daemon.errors import (
    AceStepError,
    Cancelled,
    InvalidRequest,
    OutputError,
    RemoteError,
)
from acestep_daemon.family import MODELS
from acestep_daemon.front import QueueFront
from acestep_daemon.manager import (
    GenerationManager,
    Job,
    JobHandle,
    JobResult,
    QueueFull,
    ShuttingDown,
    abbreviate,
    ending,
)
from acestep_daemon.memory import OutOfMemory
from acestep_daemon.options import ServerOptions

logger = logging.getLogger(__name__)

_UCRED = struct.Struct("3i")  # pid, uid, gid


def wire_error(error: BaseException) -> dict[str, Any]:
    """A typed error from below → the wire's error answer."""
    if isinstance(error, RemoteError):
        return error.answer
    if isinstance(error, protocol.ProtocolError):
        return protocol.error_answer(str(error), error.code)
    if isinstance(error, InvalidRequest):
        return protocol.error_answer(str(error), "invalid_request")
    if isinstance(error, QueueFull):
        return protocol.error_answer(
            str(error), "busy", queue_depth=error.depth, queue_limit=error.limit
        )
    if isinstance(error, ShuttingDown):
        return protocol.error_answer(str(error), "shutting_down")
    if isinstance(error, Cancelled):
        return protocol.error_answer(str(error), "cancelled")
    if isinstance(error, OutOfMemory | MemoryError):
        return protocol.error_answer(str(error), "oom")
    if isinstance(error, OutputError):
        return protocol.error_answer(str(error), "io")
    if isinstance(error, AceStepError | OSError):
        return protocol.error_answer(f"generation failed: {error}", "internal")
    return protocol.error_answer(f"internal error: {type(error).__name__}: {error}", "internal")


def peer_cwd(pid: int) -> str | None:
    """The peer's working directory, or None when it cannot be read (another user's
    process, another mount namespace, a deleted folder)."""
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return None
    return cwd if os.path.isabs(cwd) and os.path.isdir(cwd) else None


def output_path(request: protocol.GenerateRequest) -> Path:
    """The requested file (its folder created) or a fresh spool file."""
    path = Path(request.output) if request.output else paths.spool_path()
    if path.is_dir():
        raise InvalidRequest(f"output {path} is a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InvalidRequest(f"could not create output directory: {error}") from None
    if not os.access(path.parent, os.W_OK):
        raise InvalidRequest(f"output directory {path.parent} is not writable")
    return path


class HangupWatcher:
    """Calls back when a connection's peer has fully closed (EPOLLHUP / EPOLLERR).

    Sockets are registered with an empty event mask, so a half-close (EPOLLRDHUP,
    readable EOF) never wakes us; one epoll fd sits in the event loop.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._epoll = select.epoll()
        self._callbacks: dict[int, Callable[[], None]] = {}
        self._loop = loop
        loop.add_reader(self._epoll.fileno(), self._ready)

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        self._epoll.register(fd, 0)
        self._callbacks[fd] = callback

    def unwatch(self, fd: int) -> None:
        if self._callbacks.pop(fd, None) is not None:
            self._epoll.unregister(fd)

    def _ready(self) -> None:
        for fd, _ in self._epoll.poll(0):
            callback = self._callbacks.get(fd)
            self.unwatch(fd)
            if callback:
                callback()

    def close(self) -> None:
        self._loop.remove_reader(self._epoll.fileno())
        self._epoll.close()


class Connection:
    """The request/answer protocol of one accepted connection."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        manager: GenerationManager | QueueFront,
        options: ServerOptions,
        watcher: HangupWatcher,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.manager = manager
        self.options = options
        self.watcher = watcher
        self.allow_uids = {os.getuid(), 0, *options.allow_uids}

    async def handle(self) -> None:
        """Answer the connection once (never leaving the caller without an answer), close it."""
        try:
            try:
                answer = await self._answer()
            except Exception as error:
                logger.exception("request failed")
                answer = wire_error(error)
            if answer is not None:
                await self._send(answer)
        except ConnectionError:
            logger.info("the client hung up before its answer")
        finally:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()

    async def _answer(self) -> dict[str, Any] | None:
        sock = self.writer.get_extra_info("socket")
        pid, uid, gid = _UCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        )
        try:
            line = await self._read_line()
            if uid not in self.allow_uids and gid not in self.options.allow_gids:
                logger.warning("refused a request from pid %d uid %d gid %d", pid, uid, gid)
                raise protocol.ProtocolError(f"uid {uid} may not use this daemon")
            request = protocol.parse_request(line, cwd=peer_cwd(pid))
        except protocol.ProtocolError as error:
            logger.info("request rejected: %s", error)
            self.manager.count_rejected()
            if isinstance(error, protocol.IncompleteLine):
                await self._discard_rest()
            return wire_error(error)
        if isinstance(request, protocol.CommandRequest):
            if request.command == "cancel":
                assert request.id is not None
                return await cancel_job(self.manager, request.id)
            return await self._command(request.command)
        return await self._generate(request, sock.fileno())

    async def _read_line(self) -> bytes:
        """One line; end-of-input without a newline also ends it (half-closing clients)."""
        try:
            return await asyncio.wait_for(self.reader.readuntil(b"\n"), self.options.read_timeout_s)
        except asyncio.IncompleteReadError as error:
            return error.partial
        except asyncio.TimeoutError:
            raise protocol.ProtocolError("timed out waiting for the request line") from None
        except asyncio.LimitOverrunError:
            await self._discard_line()
            raise protocol.ProtocolError(
                f"request line is longer than {protocol.MAX_LINE_BYTES} bytes"
            ) from None

    async def _discard_line(self) -> None:
        """Swallow the rest of an overlong line so the caller can read our answer."""

        async def discard() -> None:
            while chunk := await self.reader.read(1 << 16):
                if b"\n" in chunk:
                    return

        with contextlib.suppress(asyncio.TimeoutError, ConnectionError):
            await asyncio.wait_for(discard(), self.options.read_timeout_s)

    async def _discard_rest(self, idle_s: float = 0.5) -> None:
        """Swallow the other lines of a request spread over several (until the caller's
        end of input or `idle_s` of silence), so that closing does not reset the caller."""
        with contextlib.suppress(asyncio.TimeoutError, ConnectionError):
            while await asyncio.wait_for(self.reader.read(1 << 16), idle_s):
                pass

    async def _command(self, name: str) -> dict[str, Any]:
        if name == "ping":
            if self.manager.stopping:
                return wire_error(ShuttingDown("the daemon is shutting down"))
            return {"ok": True, "message": "pong"}
        if name == "status":
            return {"ok": True, **self.manager.status()}
        if name == "jobs":
            return {"ok": True, "jobs": self.manager.jobs()}
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Any] = loop.create_future()
        try:
            self.manager.command(name, lambda r: loop.call_soon_threadsafe(settle, done, r))
            result = await done
        except Exception as error:
            logger.info("command %s failed: %s", name, error)
            return wire_error(error)
        logger.info("command %s: %s", name, result["message"])
        return {"ok": True, **result}

    async def _generate(self, request: protocol.GenerateRequest, fd: int) -> dict[str, Any] | None:
        """Queue the job, forward progress, and turn its outcome into the final answer."""
        try:
            params = request.to_params()
            problem = params.model_problem(MODELS[self.options.model])
            if problem is not None:
                raise InvalidRequest(problem)
            handle = self.manager.submit(Job(params, output_path(request)))
        except AceStepError as error:
            if isinstance(error, InvalidRequest):
                self.manager.count_rejected()
            answer = wire_error(error)
            _log_request(request, answer)
            return answer
        events = _Events(handle, asyncio.get_running_loop(), progress=request.progress)
        self.watcher.watch(fd, events.hangup)
        try:
            if request.progress:
                try:
                    await self._send(protocol.queued_line(handle.position, handle.id))
                except ConnectionError:
                    events.hangup()
            while (progress := await events.next_progress()) is not None:
                try:
                    await self._send(protocol.progress_line(*progress))
                except ConnectionError:
                    events.hangup()
            if events.hung_up and request.hangup_policy == "cancel":
                self.manager.cancel(handle, Cancelled("the client hung up"))
                logger.info("client hung up; request cancelled (%s)", _abbreviate(request.caption))
                return None
        finally:
            self.watcher.unwatch(fd)
        if events.hung_up:
            logger.info("client hung up; request goes on (%s)", _abbreviate(request.caption))
        answer = _answer(await events.outcome())
        _log_request(request, answer)
        counts = self.manager.counters
        sdnotify.notify(
            f"STATUS={counts.generated} generated, {counts.failed} failed, "
            f"{self.manager.queue_depth} waiting"
        )
        if events.hung_up:
            return None  # nobody to answer; the journal line above tells what happened
        return {**answer, "id": handle.id}

    async def _send(self, answer: dict[str, Any]) -> None:
        try:
            self.writer.write(protocol.encode(answer))
            await self.writer.drain()
        except OSError as error:
            if error.errno not in (errno.EPIPE, errno.ECONNRESET, None):
                raise
            raise ConnectionResetError(error.errno, "the client hung up") from None


class _Events:
    """A job's progress, end and the peer's hang-up, as one stream on the event loop."""

    def __init__(
        self, handle: JobHandle, loop: asyncio.AbstractEventLoop, *, progress: bool
    ) -> None:
        self._inbox: asyncio.Queue[tuple[str, int, int] | None] = asyncio.Queue()
        self._handle = handle
        self.hung_up = False
        if progress:
            handle.on_progress(lambda *p: loop.call_soon_threadsafe(self._inbox.put_nowait, p))
        handle.result.add_done_callback(
            lambda _: loop.call_soon_threadsafe(self._inbox.put_nowait, None)
        )

    def hangup(self) -> None:
        self.hung_up = True
        self._inbox.put_nowait(None)

    async def next_progress(self) -> tuple[str, int, int] | None:
        """The next progress event; None when the job ended or the peer hung up."""
        if self.hung_up:
            return None
        return await self._inbox.get()

    async def outcome(self) -> JobResult | BaseException:
        """The job's result or error, once it has ended."""
        future: Future[JobResult] = self._handle.result
        await asyncio.wait([asyncio.wrap_future(future)])
        error = future.exception()
        return error if error is not None else future.result()


async def cancel_job(manager: GenerationManager | QueueFront, job_id: str) -> dict[str, Any]:
    """The `cancel` command: a queued job is cancelled at once, a running one at its next
    step (answered once it has stopped); the job's own client gets a `cancelled` answer."""
    found = manager.find(job_id)
    if found is None:
        return protocol.error_answer(f"no job has the id {job_id!r}", "unknown_job", id=job_id)
    if isinstance(found, str):
        return _already_finished(job_id, found)
    queued = manager.cancel(found, Cancelled(f"job {job_id} was cancelled by a cancel command"))
    was = "queued" if queued else "running"
    with contextlib.suppress(Exception):
        await asyncio.wrap_future(found.result)
    if ending(found.result) != "cancelled":
        return _already_finished(job_id, ending(found.result))
    logger.info("job %s cancelled while %s", job_id, was)
    return {"ok": True, "message": f"cancelled job {job_id} ({was})", "id": job_id, "was": was}


def _already_finished(job_id: str, how: str) -> dict[str, Any]:
    return protocol.error_answer(
        f"job {job_id} already finished ({how}); nothing to cancel",
        "already_finished",
        id=job_id,
        ended=how,
    )


def _answer(outcome: JobResult | BaseException) -> dict[str, Any]:
    """The answer of a job's outcome: its written file(s), or its error."""
    return wire_error(outcome) if isinstance(outcome, BaseException) else outcome.answer()


def settle(future: asyncio.Future[Any], result: Any) -> None:
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


def _abbreviate(text: str) -> str:
    return repr(abbreviate(text))


def _log_request(request: protocol.GenerateRequest, answer: dict[str, Any]) -> None:
    """One line per request for the journal: caption, duration, seed, timings, result."""
    caption = _abbreviate(request.caption)
    if not answer["ok"]:
        logger.info(
            "request %s duration=%gs seed=%s -> %s: %s",
            caption,
            request.duration_s,
            request.seed,
            answer["code"],
            answer["error"],
        )
        return
    timings = " ".join(f"{k}={v:.2f}s" for k, v in answer["timings"].items())
    extra = f" fallback={answer['fallback']}" if answer["fallback"] else ""
    extra += "".join(f" note={note!r}" for note in answer["notes"])
    logger.info(
        "request %s duration=%gs seed=%d %s device=%s%s -> %s",
        caption,
        answer["duration_s"],  # what was generated (a source's length, a planned duration)
        answer["seed"],
        timings,
        answer["device"],
        extra,
        answer["path"],
    )
