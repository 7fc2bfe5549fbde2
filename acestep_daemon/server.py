"""The Unix-socket server: one request line per connection, answers as JSON lines.

asyncio on uvloop. Each connection: check the peer's credentials, read one
line (≤ 1 MiB, with a timeout), answer commands at once and hand generation
jobs to the GenerationManager. A caller that half-closes (socat, the
ace-step-rs client) is still waiting for its answer; only a peer that can no
longer receive (EPOLLHUP/EPOLLERR on the socket, EPIPE on a write) has hung
up, and that cancels its job.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import select
import signal
import socket
import stat
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from acestep_daemon import paths, protocol, sdnotify
from acestep_daemon.errors import AceStepError, Cancelled, InvalidRequest
from acestep_daemon.manager import (
    GenerationManager,
    Job,
    JobResult,
    OutOfMemory,
    QueueFull,
    ShuttingDown,
)
from acestep_daemon.pipeline import GenerationParams

logger = logging.getLogger(__name__)

READ_TIMEOUT_S = 30.0
SHUTDOWN_GRACE_S = 60.0
_UCRED = struct.Struct("3i")  # pid, uid, gid


class StartupError(Exception):
    """The daemon cannot start listening (another daemon, a bad socket hand-over)."""


class AlreadyRunning(StartupError):
    """Another daemon answers on the socket path."""


def wire_error(error: BaseException) -> dict[str, Any]:
    """A typed error from below → the wire's error answer."""
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
    if isinstance(error, AceStepError | OSError):
        return protocol.error_answer(f"generation failed: {error}", "internal")
    return protocol.error_answer(f"internal error: {type(error).__name__}: {error}", "internal")


def generation_params(request: protocol.GenerateRequest) -> GenerationParams:
    return GenerationParams(
        caption=request.caption,
        lyrics=request.lyrics,
        metas=request.metas,
        language=request.language,
        duration_s=request.duration_s,
        shift=request.shift,
        seed=request.seed,
        bpm=request.bpm,
        key=request.key,
        time_signature=request.time_signature,
        task=request.task,
        reference_audio=Path(request.reference_audio) if request.reference_audio else None,
        src_audio=Path(request.src_audio) if request.src_audio else None,
        repaint_start_s=request.repaint_start_s,
        repaint_end_s=request.repaint_end_s,
    )


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


def bind_socket(path: Path, mode: int) -> socket.socket:
    """Bind a fresh listening socket with `mode`; refuse if a live daemon answers there."""
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise AlreadyRunning(f"{path} exists and is not a socket; refusing to replace it")
        if paths.daemon_answers(path):
            raise AlreadyRunning(f"a daemon is already listening on {path}")
        logger.info("removing stale socket %s", path)
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o777 & ~mode)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old_umask)
    os.chmod(path, mode)
    sock.listen(128)
    return sock


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


class Server:
    """The daemon's event loop side: listening, connections, signals, systemd."""

    def __init__(
        self,
        manager: GenerationManager,
        socket_path: Path,
        *,
        socket_mode: int = 0o600,
        allow_uids: Iterable[int] = (),
        allow_gids: Iterable[int] = (),
        read_timeout_s: float = READ_TIMEOUT_S,
        shutdown_grace_s: float = SHUTDOWN_GRACE_S,
    ) -> None:
        self.manager = manager
        self.socket_path = socket_path
        self.socket_mode = socket_mode
        self.allow_uids = {os.getuid(), 0, *allow_uids}
        self.allow_gids = set(allow_gids)
        self.read_timeout_s = read_timeout_s
        self.shutdown_grace_s = shutdown_grace_s
        self._connections: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        self._fatal: BaseException | None = None
        self._watcher: HangupWatcher | None = None

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT (exit 0) or a fatal worker error (exit 1)."""
        loop = asyncio.get_running_loop()
        try:
            activated = sdnotify.listen_socket()
            sock = activated or bind_socket(self.socket_path, self.socket_mode)
        except (OSError, RuntimeError) as error:
            raise StartupError(f"cannot listen on {self.socket_path}: {error}") from error
        owns_path = activated is None
        self._watcher = HangupWatcher(loop)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)
        server = await asyncio.start_unix_server(
            self._connection, sock=sock, limit=protocol.MAX_LINE_BYTES + 1
        )
        where = sock.getsockname() or self.socket_path
        logger.info("listening on %s%s", where, " (socket activation)" * bool(activated))

        loaded: asyncio.Future[Any] = loop.create_future()
        self.manager.start(
            on_loaded=lambda result: loop.call_soon_threadsafe(_resolve, loaded, result),
            on_fatal=lambda error: loop.call_soon_threadsafe(self._fail, error),
        )
        watchdog = asyncio.ensure_future(self._watchdog())
        try:
            await asyncio.wait(
                [loaded, asyncio.ensure_future(self._stop.wait())],
                return_when=asyncio.FIRST_COMPLETED,
            )
            if loaded.done() and not loaded.exception():
                where = loaded.result()
                sdnotify.notify(f"READY=1\nSTATUS=serving on {where['device']} ({where['dtype']})")
                logger.info("ready: pipeline on %s (%s)", where["device"], where["dtype"])
            await self._stop.wait()
        finally:
            loaded.cancel()  # a load still running reports into the void
            sdnotify.notify("STOPPING=1")
            watchdog.cancel()
            server.close()
            await self._drain()
            self._watcher.close()
            if owns_path:
                with contextlib.suppress(FileNotFoundError):
                    self.socket_path.unlink()
        if self._fatal is not None:
            logger.critical("exiting after a fatal worker error: %s", self._fatal)
            return 1
        logger.info("stopped")
        return 0

    def _fail(self, error: BaseException) -> None:
        self._fatal = error
        self._stop.set()

    async def _drain(self) -> None:
        """Stopping: queued jobs are answered, the running one gets the grace period."""
        loop = asyncio.get_running_loop()
        self.manager.shutdown()
        sdnotify.notify("STATUS=finishing the running request")
        if not await loop.run_in_executor(None, self.manager.join, self.shutdown_grace_s):
            logger.warning("grace period over; stopping the running request")
            self.manager.stop_running()
            await loop.run_in_executor(None, self.manager.join, 10.0)
        if self._connections:
            await asyncio.wait(self._connections, timeout=5.0)

    async def _watchdog(self) -> None:
        interval = sdnotify.watchdog_interval()
        if interval is None:
            return
        while self.manager.alive:
            sdnotify.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    # -- one connection ----------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            try:
                answer = await self._answer(reader, writer)
            except Exception as error:  # never leave a caller without an answer
                logger.exception("request failed")
                answer = wire_error(error)
            if answer is not None:
                await _send(writer, answer)
        except ConnectionError:
            logger.info("the client hung up before its answer")
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> dict[str, Any] | None:
        sock = writer.get_extra_info("socket")
        pid, uid, gid = _UCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        )
        try:
            line = await self._read_line(reader)
            if uid not in self.allow_uids and gid not in self.allow_gids:
                logger.warning("refused a request from pid %d uid %d gid %d", pid, uid, gid)
                raise protocol.ProtocolError(f"uid {uid} may not use this daemon")
            request = protocol.parse_request(line)
        except protocol.ProtocolError as error:
            logger.info("request rejected: %s", error)
            return wire_error(error)
        if isinstance(request, protocol.CommandRequest):
            return await self._command(request.command)
        return await self._generate(request, writer, sock.fileno())

    async def _read_line(self, reader: asyncio.StreamReader) -> bytes:
        """One line; end-of-input without a newline also ends it (half-closing clients)."""
        try:
            return await asyncio.wait_for(reader.readuntil(b"\n"), self.read_timeout_s)
        except asyncio.IncompleteReadError as error:
            return error.partial
        except asyncio.TimeoutError:
            raise protocol.ProtocolError("timed out waiting for the request line") from None
        except asyncio.LimitOverrunError:
            await self._discard_line(reader)
            raise protocol.ProtocolError(
                f"request line is longer than {protocol.MAX_LINE_BYTES} bytes"
            ) from None

    async def _discard_line(self, reader: asyncio.StreamReader) -> None:
        """Swallow the rest of an overlong line so the caller can read our answer."""

        async def discard() -> None:
            while chunk := await reader.read(1 << 16):
                if b"\n" in chunk:
                    return

        with contextlib.suppress(asyncio.TimeoutError, ConnectionError):
            await asyncio.wait_for(discard(), self.read_timeout_s)

    async def _command(self, name: str) -> dict[str, Any]:
        if name == "ping":
            return {"ok": True, "message": "pong"}
        if name == "status":
            return {"ok": True, **self.manager.status()}
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Any] = loop.create_future()
        try:
            self.manager.command(name, lambda r: loop.call_soon_threadsafe(_resolve, done, r))
            result = await done
        except Exception as error:
            logger.info("command %s failed: %s", name, error)
            return wire_error(error)
        logger.info("command %s: %s", name, result["message"])
        return {"ok": True, **result}

    async def _generate(
        self, request: protocol.GenerateRequest, writer: asyncio.StreamWriter, fd: int
    ) -> dict[str, Any] | None:
        """Queue the job, forward progress, and turn its outcome into the final answer."""
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def post(kind: str, payload: Any) -> None:
            loop.call_soon_threadsafe(inbox.put_nowait, (kind, payload))

        try:
            job = Job(
                params=generation_params(request),
                output=output_path(request),
                on_done=lambda result: post("done", result),
                on_progress=(lambda *p: post("progress", p)) if request.progress else None,
            )
            self.manager.submit(job)
        except AceStepError as error:
            _log_request(request, error)
            return wire_error(error)
        assert self._watcher is not None
        self._watcher.watch(fd, lambda: inbox.put_nowait(("hangup", None)))
        try:
            while True:
                kind, payload = await inbox.get()
                if kind == "done":
                    break
                if kind == "progress":
                    try:
                        await _send(writer, protocol.progress_line(*payload))
                        continue
                    except (ConnectionError, OSError):
                        pass
                self.manager.cancel(job, Cancelled("the client hung up"))
                logger.info("client hung up; request cancelled (%s)", _abbreviate(request.caption))
                return None
        finally:
            self._watcher.unwatch(fd)
        _log_request(request, payload)
        counts = self.manager.counters
        sdnotify.notify(
            f"STATUS={counts.generated} generated, {counts.failed} failed, "
            f"{self.manager.queue_depth} waiting"
        )
        if isinstance(payload, JobResult):
            return _success(payload)
        return wire_error(payload)


def _success(result: JobResult) -> dict[str, Any]:
    return protocol.success_answer(
        path=str(result.path),
        duration_s=result.audio.duration_s,
        seed=result.audio.seed,
        timings=result.audio.timings,
        device=result.device,
        dtype=result.dtype,
        fallback=result.fallback,
        oom_retries=result.oom_retries,
        vae_chunk_frames=result.vae_chunk_frames,
    )


def _resolve(future: asyncio.Future[Any], result: Any) -> None:
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


async def _send(writer: asyncio.StreamWriter, answer: dict[str, Any]) -> None:
    try:
        writer.write(protocol.encode(answer))
        await writer.drain()
    except OSError as error:
        if error.errno not in (errno.EPIPE, errno.ECONNRESET, None):
            raise
        raise ConnectionResetError(error.errno, "the client hung up") from None


def _abbreviate(text: str, limit: int = 40) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")


def _log_request(request: protocol.GenerateRequest, outcome: Any) -> None:
    """One line per request for the journal: caption, duration, seed, timings, result."""
    if isinstance(outcome, JobResult):
        timings = " ".join(f"{k}={v:.2f}s" for k, v in outcome.audio.timings.items())
        extra = f" fallback={outcome.fallback}" if outcome.fallback else ""
        logger.info(
            "request %s duration=%gs seed=%d %s device=%s%s -> %s",
            _abbreviate(request.caption),
            request.duration_s,
            outcome.audio.seed,
            timings,
            outcome.device,
            extra,
            outcome.path,
        )
    else:
        answer = wire_error(outcome)
        logger.info(
            "request %s duration=%gs seed=%s -> %s: %s",
            _abbreviate(request.caption),
            request.duration_s,
            request.seed,
            answer["code"],
            answer["error"],
        )


def serve(manager: GenerationManager, socket_path: Path, **options: Any) -> int:
    """Run the server on uvloop until it stops; returns the process exit status."""
    import uvloop

    server = Server(manager, socket_path, **options)
    try:
        return uvloop.run(server.run())
    except StartupError as error:
        logger.error("%s", error)
        return 1
