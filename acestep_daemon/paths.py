"""Where the daemon listens and where it spools files nobody named (XDG locations).

The socket search order has one home, `client.default_socket_path` (the client
must run without this package's dependencies); the daemon uses the same.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

from acestep_daemon.client import LEGACY_SOCKET, SOCKET_NAME, default_socket_path

__all__ = [
    "LEGACY_SOCKET",
    "SOCKET_NAME",
    "daemon_answers",
    "default_socket_path",
    "spool_dir",
    "spool_path",
]


def daemon_answers(path: Path) -> bool:
    """True when something accepts connections on the socket path."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def spool_dir() -> Path:
    """`$XDG_DATA_HOME/ace-step/spool` (XDG default `~/.local/share`)."""
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "ace-step" / "spool"


_spool_lock = threading.Lock()
_last_ms = 0


def spool_path() -> Path:
    """A fresh `<spool>/<milliseconds>.ogg`; two requests in one millisecond get distinct names."""
    global _last_ms
    with _spool_lock:
        _last_ms = max(time.time_ns() // 1_000_000, _last_ms + 1)
        return spool_dir() / f"{_last_ms}.ogg"


def take_path(output: Path, seed: int) -> Path:
    """Where the take of `seed` goes when a request asked for several: `<stem>-<seed><ext>`."""
    return output.with_name(f"{output.stem}-{seed}{output.suffix}")
