"""Real daemons for the tests: `python -m acestep_daemon serve` on a temp socket, tiny checkpoint.

Clients talk like socat and the ace-step-rs client: send the line, half-close,
read answer lines until the daemon closes.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def daemon_env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACESTEP_", "LISTEN_"))}
    env.pop("NOTIFY_SOCKET", None)
    env.update(
        XDG_DATA_HOME=str(tmp / "data"),
        XDG_RUNTIME_DIR=str(tmp / "run"),
        HF_HUB_OFFLINE="1",
        PYTHONPATH=str(REPO),
        **extra,
    )
    return env


def send(path: Path, data: bytes, *, timeout: float = 120.0) -> list[bytes]:
    """Send raw bytes, half-close, and return every answer line."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        # The daemon may answer early (an overlong line) and stop reading.
        with contextlib.suppress(BrokenPipeError):
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(1 << 16):
            chunks.append(chunk)
    return b"".join(chunks).splitlines(keepends=True)


def read_line(sock: socket.socket) -> dict[str, Any]:
    """One answer line, byte by byte (the rest stays in the socket)."""
    line = b""
    while not line.endswith(b"\n"):
        byte = sock.recv(1)
        assert byte, f"the daemon closed the connection after {line!r}"
        line += byte
    return json.loads(line)


@contextmanager
def progress_client(path: Path, request: dict[str, Any]) -> Iterator[socket.socket]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(str(path))
        client.sendall(json.dumps(request).encode() + b"\n")
        client.shutdown(socket.SHUT_WR)
        yield client


def until_running(client: socket.socket) -> str:
    """The job's id (from its queued line), once a running stage's progress line came."""
    line = read_line(client)
    assert "progress" in line, line
    queued = line["progress"]
    assert queued["stage"] == "queued", queued
    while read_line(client)["progress"]["stage"] == "queued":
        pass
    return queued["id"]


def wait_running(sock: socket.socket) -> None:
    """Read a progress client's lines up to the first one of a running stage (not "queued");
    the rest of the answer stays in the socket."""
    while read_line(sock).get("progress", {}).get("stage") == "queued":
        pass


@contextmanager
def running_job(path: Path, request: dict[str, Any]) -> Iterator[socket.socket]:
    """Send a progress request, half-close like socat, wait until its job runs; yields the
    connection (closing it is a hang-up)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(str(path))
        client.sendall(json.dumps(request).encode() + b"\n")
        client.shutdown(socket.SHUT_WR)
        wait_running(client)
        yield client


def ask(path: Path, request: dict[str, Any], *, timeout: float = 120.0) -> list[dict[str, Any]]:
    """One request object → the answer lines, parsed."""
    lines = send(path, json.dumps(request).encode() + b"\n", timeout=timeout)
    assert all(line.endswith(b"\n") for line in lines), lines
    return [json.loads(line) for line in lines]


def ask_one(path: Path, request: dict[str, Any], *, timeout: float = 120.0) -> dict[str, Any]:
    answers = ask(path, request, timeout=timeout)
    assert len(answers) == 1, answers
    return answers[0]


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    socket: Path
    tmp: Path
    log: Path

    def ask(self, request: dict[str, Any], **kw: Any) -> dict[str, Any]:
        return ask_one(self.socket, request, **kw)

    def status(self) -> dict[str, Any]:
        return self.ask({"command": "status"})

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.stderr()}")
            try:
                if self.status().get("loaded"):
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"daemon not ready after {timeout} s:\n{self.stderr()}")

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout)


def spawn(
    tmp: Path, *args: str, env: dict[str, str] | None = None, default_socket: Path | None = None
) -> Daemon:
    """Start `acestep serve --socket tmp/d.sock *args` (args name the model).

    With `default_socket`, no --socket is given: the daemon is expected to pick that path.
    """
    sock = default_socket or tmp / "d.sock"
    log = tmp / f"daemon-{time.monotonic_ns()}.log"
    command = [sys.executable, "-m", "acestep_daemon", "serve"]
    if default_socket is None:
        command += ["--socket", str(sock)]
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [*command, *args],
            cwd=REPO,
            env=env or daemon_env(tmp),
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=err,
        )
    return Daemon(proc, sock, tmp, log)


@contextmanager
def running(tmp: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[Daemon]:
    daemon = spawn(tmp, *args, env=env)
    try:
        daemon.wait_ready()
        yield daemon
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait()
