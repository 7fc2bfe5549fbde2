"""The daemon process: listen, serve until a signal, shut down cleanly.

asyncio on uvloop. The life of the process reads as named steps:
`startup` (bind or take over the socket, start the worker, report READY to
systemd once the pipeline is loaded), `serve` (accept connections until
SIGTERM/SIGINT or a fatal worker error) and `shutdown` (stop accepting, answer
queued jobs, give the running one a grace period; a client arriving meanwhile
is answered `shutting_down`, not refused as at a stale socket). A second
SIGTERM/SIGINT exits at once. What happens on one connection lives in `connection.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import stat
from pathlib import Path
from typing import Any

from acestep_daemon import paths, protocol, sdnotify
from acestep_daemon.connection import Connection, HangupWatcher, settle
from acestep_daemon.front import QueueFront
from acestep_daemon.manager import GenerationManager
from acestep_daemon.options import ServerOptions
from acestep_daemon.queue_worker import QueuePuller

logger = logging.getLogger(__name__)

LISTEN_BACKLOG = socket.SOMAXCONN
"""Connections the kernel holds until they are accepted (the system's limit; asyncio's
default of 100 turns a burst of clients into refused connects, EAGAIN)."""

FORCED_EXIT_STATUS = 130
"""Exit status when a second signal cuts the shutdown short."""


class StartupError(Exception):
    """The daemon cannot start listening (another daemon, a bad socket hand-over)."""


class AlreadyRunning(StartupError):
    """Another daemon answers on the socket path."""


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
    sock.listen(LISTEN_BACKLOG)
    return sock


class Server:
    """The daemon's event-loop side: listening, connections, signals, systemd."""

    def __init__(
        self,
        manager: GenerationManager | QueueFront,
        options: ServerOptions,
        puller: QueuePuller | None = None,
    ) -> None:
        self.manager = manager
        self.options = options
        self.puller = puller
        self._connections: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        self._fatal: BaseException | None = None
        self._watcher: HangupWatcher | None = None
        self._listener: asyncio.AbstractServer | None = None
        self._owns_path = False
        self._loaded: asyncio.Future[Any] | None = None

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT (exit 0) or a fatal worker error (exit 1)."""
        await self.startup()
        try:
            await self.serve()
        finally:
            await self.shutdown()
        if self._fatal is not None:
            logger.critical("exiting after a fatal worker error: %s", self._fatal)
            return 1
        logger.info("stopped")
        return 0

    async def startup(self) -> None:
        """Listen, install the signal handlers, start the worker (which loads the pipeline)."""
        loop = asyncio.get_running_loop()
        socket_path = self.options.socket_path
        try:
            activated = sdnotify.listen_socket()
            sock = activated or bind_socket(socket_path, self.options.socket_mode)
        except (OSError, RuntimeError) as error:
            raise StartupError(f"cannot listen on {socket_path}: {error}") from error
        self._owns_path = activated is None
        self._watcher = HangupWatcher(loop)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)
        self._listener = await asyncio.start_unix_server(
            self._connection, sock=sock, limit=protocol.MAX_LINE_BYTES + 1, backlog=LISTEN_BACKLOG
        )
        where = sock.getsockname() or socket_path
        logger.info("listening on %s%s", where, " (socket activation)" * bool(activated))
        self._loaded = loop.create_future()
        loaded = self._loaded
        self.manager.start(
            on_loaded=lambda result: loop.call_soon_threadsafe(settle, loaded, result),
            on_fatal=lambda error: loop.call_soon_threadsafe(self._fail, error),
        )
        if self.puller is not None:
            self.puller.start()

    async def serve(self) -> None:
        """Report READY once loaded, keep the watchdog fed, wait for the stop."""
        assert self._loaded is not None
        watchdog = asyncio.ensure_future(self._watchdog())
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait([self._loaded, stop], return_when=asyncio.FIRST_COMPLETED)
            if self._loaded.done() and not self._loaded.exception():
                where = self._loaded.result()
                serving = where.get("serving") or "pipeline on {device} ({dtype})".format_map(where)
                sdnotify.notify(f"READY=1\nSTATUS=serving: {serving}")
                logger.info("ready: %s", serving)
            await stop
        finally:
            watchdog.cancel()
            stop.cancel()

    async def shutdown(self) -> None:
        """Stop taking work; queued jobs are answered, the running one gets the grace period.

        The socket keeps listening until the worker is done, so that a client arriving
        meanwhile learns that the daemon is shutting down."""
        assert self._loaded is not None and self._listener is not None
        self._loaded.cancel()  # a load still running reports into the void
        sdnotify.notify("STOPPING=1")
        await self._drain()
        self._listener.close()
        if self._connections:
            await asyncio.wait(self._connections, timeout=5.0)
        if self._watcher is not None:
            self._watcher.close()
        if self._owns_path:
            with contextlib.suppress(FileNotFoundError):
                self.options.socket_path.unlink()

    def _on_signal(self, signum: int) -> None:
        if self._stop.is_set():
            logger.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(FORCED_EXIT_STATUS)
        logger.info("%s: shutting down", signal.Signals(signum).name)
        self._stop.set()

    def _fail(self, error: BaseException) -> None:
        self._fatal = error
        self._stop.set()

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        if self.puller is not None:
            self.puller.stop_taking()
        self.manager.shutdown()
        sdnotify.notify("STATUS=finishing the running request")
        grace = self.options.shutdown_grace_s
        if not await loop.run_in_executor(None, self.manager.join, grace):
            logger.warning("grace period over; stopping the running request")
            self.manager.stop_running()
            await loop.run_in_executor(None, self.manager.join, 10.0)
        if self.puller is not None:
            await loop.run_in_executor(None, self.puller.close)

    async def _watchdog(self) -> None:
        interval = sdnotify.watchdog_interval()
        if interval is None:
            return
        while self.manager.alive:
            sdnotify.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None and self._watcher is not None
        self._connections.add(task)
        try:
            await Connection(reader, writer, self.manager, self.options, self._watcher).handle()
        finally:
            self._connections.discard(task)


def serve(
    manager: GenerationManager | QueueFront,
    options: ServerOptions,
    puller: QueuePuller | None = None,
) -> int:
    """Run the server on uvloop until it stops; returns the process exit status."""
    import uvloop

    try:
        return uvloop.run(Server(manager, options, puller).run())
    except StartupError as error:
        logger.error("%s", error)
        return 1
