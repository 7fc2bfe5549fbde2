#!/usr/bin/env python3
"""Send one request to the ACE-Step daemon and print its answer (standard library only).

This one file is both `acestep_daemon.client` (used by `acestep request`) and a
script that runs with a bare `python3`, without the project's virtual
environment: the spacebot skill ships it as `scripts/acestep-request`.

    acestep-request [--socket PATH] [--timeout SECONDS] [--progress] [JSON]
    acestep-request --command ping|status|load|unload
    acestep-request --jobs | --cancel ID

The request is a JSON object given as the argument or on stdin, or one of the
daemon's commands given with --command; a JSON request is checked
only for being a JSON object (the daemon validates the fields). The final
answer line goes to stdout as the daemon sent it; progress lines (with
`--progress`) and every error message go to stderr. `--jobs` lists the queued
and running jobs; `--cancel ID` cancels one (its id is in its first progress
line, its answer and the list).

Exit status:
  0    the daemon answered ok
  1    the daemon answered an error (its text is on stderr, its line on stdout)
  2    usage error or a request that is not a JSON object
  3    no daemon on the socket, or the connection dropped before the answer
  124  no answer within --timeout (the job is cancelled)
  130  interrupted by Ctrl-C / SIGINT, 143 by SIGTERM (the job is cancelled)

Closing the connection before the answer cancels the job in the daemon, so a
client that gives up (timeout, Ctrl-C, being killed) never leaves it running.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, TextIO

SOCKET_NAME = "ace-step-gen.sock"
SOCKET_ENV = "ACESTEP_SOCKET"
LEGACY_SOCKET = Path("/tmp") / SOCKET_NAME
"""The ace-step-rs daemon's fixed path, the last fallback."""
RUN_USER = Path("/run/user")
"""Parent of the per-user runtime folders (what `XDG_RUNTIME_DIR` names when it is set)."""

EXIT_OK = 0
EXIT_DAEMON_ERROR = 1
EXIT_USAGE = 2
EXIT_NO_DAEMON = 3
EXIT_TIMEOUT = 124
EXIT_SIGINT = 128 + signal.SIGINT
EXIT_SIGTERM = 128 + signal.SIGTERM

COMMANDS = ("ping", "status", "load", "unload", "jobs")
"""The daemon's commands that take no argument (`{"command": NAME}`): all that
`protocol.CommandName` lists but `cancel`, which names a job (`--cancel ID`)."""

PROG = "acestep-request"
_CANCELLED = "closing the connection cancels the job in the daemon"


def default_socket_path() -> Path:
    """Where the daemon listens when no `--socket` is given.

    `$ACESTEP_SOCKET`; else `$XDG_RUNTIME_DIR/ace-step-gen.sock`; else, where that
    variable is unset (root, ssh, containers, sandboxes), the user's runtime
    folder `/run/user/<uid>/ace-step-gen.sock` when that folder exists; else
    `/tmp/ace-step-gen.sock`.
    """
    if env := os.environ.get(SOCKET_ENV):
        return Path(env)
    if runtime := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(runtime) / SOCKET_NAME
    user_runtime = RUN_USER / str(os.getuid())
    if user_runtime.is_dir():
        return user_runtime / SOCKET_NAME
    return LEGACY_SOCKET


class ClientError(Exception):
    """The request got no answer; `status` is the exit status to leave with."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class _Terminated(Exception):
    """SIGTERM arrived (a shell timeout killing us politely)."""


def parse_request(text: str) -> dict[str, Any]:
    """The request object from its JSON text; ClientError (exit 2) when it is not one."""
    try:
        request = json.loads(text)
    except ValueError as error:
        raise ClientError(f"the request is not valid JSON: {error}", EXIT_USAGE) from None
    if not isinstance(request, dict):
        raise ClientError("the request must be a JSON object ({...})", EXIT_USAGE)
    return request


def control_request(*, jobs: bool, cancel: str | None) -> dict[str, Any]:
    """`{"command": "jobs"}` or `{"command": "cancel", "id": cancel}`."""
    if jobs and cancel is not None:
        raise ClientError("give --jobs or --cancel, not both", EXIT_USAGE)
    return {"command": "jobs"} if jobs else {"command": "cancel", "id": cancel}


def _connect(path: Path, timeout: float | None) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout if timeout is not None else 10.0)
    try:
        sock.connect(str(path))
    except OSError as error:
        sock.close()
        if error.errno in (errno.ENOENT, errno.ENOTDIR):
            why = f"no daemon: there is no socket at {path}"
        elif error.errno == errno.ECONNREFUSED:
            why = f"no daemon: nothing listens on {path} (a stale socket file)"
        elif error.errno == errno.EACCES:
            why = f"no daemon we may use: permission denied on {path}"
        else:
            why = f"cannot connect to {path}: {error.strerror or error}"
        hint = (
            "start it (`systemctl --user start ace-step-gen.socket`, or `scripts/serve` in the "
            f"acestep-daemon checkout), or name its socket with --socket or ${SOCKET_ENV}"
        )
        raise ClientError(f"{why}; {hint}", EXIT_NO_DAEMON) from None
    return sock


def exchange(
    request: dict[str, Any],
    path: Path,
    *,
    timeout: float | None = None,
    progress: TextIO | None = None,
) -> bytes:
    """Send one request line, half-close, and return the final answer line.

    Progress lines (any line with a `progress` key) are written to `progress`
    when it is given. Raises ClientError (no daemon, dropped connection,
    timeout); KeyboardInterrupt passes through after the socket is closed.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    if "command" not in request:  # a client that gives up cancels its job
        request = {"on_hangup": "cancel", **request}
    line = json.dumps(request, ensure_ascii=False).encode() + b"\n"
    with _connect(path, timeout) as sock:
        try:
            sock.sendall(line)
            sock.shutdown(socket.SHUT_WR)  # like socat: the daemon still answers
            buffer = b""
            while True:
                if deadline is not None:
                    sock.settimeout(max(deadline - time.monotonic(), 1e-3))
                else:
                    sock.settimeout(None)
                chunk = sock.recv(1 << 16)
                if not chunk:
                    raise ClientError(
                        "the daemon closed the connection without an answer "
                        "(it stopped or crashed during the job; see its log)",
                        EXIT_NO_DAEMON,
                    )
                buffer += chunk
                while b"\n" in buffer:
                    answer, buffer = buffer.split(b"\n", 1)
                    if not _is_progress(answer):
                        return answer + b"\n"
                    if progress is not None:
                        progress.write(answer.decode(errors="replace") + "\n")
                        progress.flush()
        except TimeoutError:
            raise ClientError(
                f"no answer within {timeout:g} s; gave up, and {_CANCELLED}. "
                "Allow more time (--timeout, and the shell's timeout) or ask for a shorter "
                "duration_s",
                EXIT_TIMEOUT,
            ) from None
        except (ConnectionResetError, BrokenPipeError):
            raise ClientError(
                "the connection dropped before the answer (the daemon stopped or crashed; "
                "see its log)",
                EXIT_NO_DAEMON,
            ) from None


def _is_progress(line: bytes) -> bool:
    try:
        obj = json.loads(line)
    except ValueError:
        return False
    return isinstance(obj, dict) and "progress" in obj


def run(
    request: dict[str, Any],
    path: Path,
    *,
    timeout: float | None = None,
    progress: bool = False,
    prog: str = PROG,
) -> int:
    """Send, print the answer on stdout and errors on stderr; return the exit status."""
    if progress:
        request = {**request, "progress": True}

    def terminate(signum: int, frame: object) -> None:
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        answer = exchange(request, path, timeout=timeout, progress=sys.stderr if progress else None)
    except ClientError as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return error.status
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; the job is cancelled ({_CANCELLED})", file=sys.stderr)
        return EXIT_SIGINT
    except _Terminated:
        print(f"{prog}: terminated; the job is cancelled ({_CANCELLED})", file=sys.stderr)
        return EXIT_SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)
    sys.stdout.buffer.write(answer)
    sys.stdout.flush()
    try:
        result = json.loads(answer)
    except ValueError:
        print(f"{prog}: the daemon's answer is not JSON", file=sys.stderr)
        return EXIT_DAEMON_ERROR
    if isinstance(result, dict) and result.get("ok") is True:
        return EXIT_OK
    if isinstance(result, dict):
        code = result.get("code", "error")
        print(f"{prog}: daemon error ({code}): {result.get('error', answer)}", file=sys.stderr)
    return EXIT_DAEMON_ERROR


def positive_seconds(text: str) -> float:
    """An argparse type: a number of seconds greater than zero."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    description, _, epilog = (__doc__ or "").partition("\n\n")
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    given = parser.add_mutually_exclusive_group()
    given.add_argument("request", nargs="?", help="the request as JSON (default: read stdin)")
    given.add_argument("--command", choices=COMMANDS, help='send {"command": NAME}')
    parser.add_argument(
        "--socket", type=Path, default=None, help=f"default here: {default_socket_path()}"
    )
    parser.add_argument(
        "--timeout", type=positive_seconds, default=None, metavar="SECONDS", help="default: none"
    )
    parser.add_argument(
        "--progress", action="store_true", help="ask for progress lines and print them on stderr"
    )
    parser.add_argument("--jobs", action="store_true", help="list the queued and running jobs")
    parser.add_argument("--cancel", metavar="ID", help="cancel the job with this id")
    args = parser.parse_args(argv)
    try:
        if args.jobs or args.cancel is not None:
            if args.request is not None:
                raise ClientError("give a request or --jobs / --cancel, not both", EXIT_USAGE)
            request = control_request(jobs=args.jobs, cancel=args.cancel)
        elif args.command is not None:
            request = {"command": args.command}
        else:
            text = args.request if args.request is not None else sys.stdin.read()
            request = parse_request(text)
    except ClientError as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return error.status
    except KeyboardInterrupt:
        return EXIT_SIGINT
    return run(
        request, args.socket or default_socket_path(), timeout=args.timeout, progress=args.progress
    )


if __name__ == "__main__":
    sys.exit(main())
