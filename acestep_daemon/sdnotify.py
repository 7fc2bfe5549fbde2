"""systemd integration with the standard library: socket activation and sd_notify."""

from __future__ import annotations

import logging
import os
import socket

logger = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3


def listen_socket() -> socket.socket | None:
    """The listening socket systemd handed over (`LISTEN_FDS`), or None.

    The variables are removed so that child processes do not inherit them.
    """
    pid = os.environ.pop("LISTEN_PID", None)
    count = os.environ.pop("LISTEN_FDS", None)
    os.environ.pop("LISTEN_FDNAMES", None)
    if pid is None or count is None or int(pid) != os.getpid():
        return None
    if int(count) != 1:
        raise RuntimeError(f"expected one socket from systemd, got LISTEN_FDS={count}")
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise RuntimeError("the socket from systemd must be a Unix stream socket (ListenStream=)")
    os.set_inheritable(sock.fileno(), False)
    return sock


def notify(message: str) -> bool:
    """Send `READY=1`, `STATUS=…`, `STOPPING=1` or `WATCHDOG=1` to `NOTIFY_SOCKET`, if set."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), address)
    except OSError as error:
        logger.warning("sd_notify %r failed: %s", message, error)
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between `WATCHDOG=1` pings (half of `WATCHDOG_USEC`), or None when not asked."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 1e6 / 2
