"""The systemd user units, rendered in one place.

`systemd/` in the repository holds them rendered with the defaults (a test
keeps the two equal): `acestep` installed for the user (pipx, `pip install
--user`) as `~/.local/bin/acestep`. systemd does not search a virtual
environment or `~/.local/bin`, so `acestep install-service` renders them with
the absolute path of the interpreter it runs with (and the checkout it runs
from, when that interpreter does not import it by itself), so that the service
starts the same installation.
"""

from __future__ import annotations

import shlex

SERVICE_NAME = "ace-step-gen.service"
SOCKET_UNIT_NAME = "ace-step-gen.socket"
DEFAULT_LISTEN = "%t/ace-step-gen.sock"
DEFAULT_EXEC_START = "%h/.local/bin/acestep serve"

SERVICE = """\
[Unit]
Description=ACE-Step v1.5 music generation daemon (resident model, Unix socket)
Requires={socket_unit}
After={socket_unit}

[Service]
Type=notify
NotifyAccess=main
ExecStart={exec_start}
Restart=on-failure
RestartSec=5
# The first start downloads the weights from the Hugging Face Hub.
TimeoutStartSec=1800
# SIGTERM lets the running request finish (acestep serve --shutdown-grace, 60 s).
TimeoutStopSec=90
WatchdogSec=120
Environment=PYTHONUNBUFFERED=1
{environment}
[Install]
WantedBy=default.target
"""

SOCKET = """\
[Unit]
Description=ACE-Step v1.5 music generation daemon socket

[Socket]
ListenStream={listen}
SocketMode=0600
RemoveOnStop=true

[Install]
WantedBy=sockets.target
"""


def exec_start(python: str, serve_args: list[str]) -> str:
    """`ExecStart=` for an interpreter: `<python> -m acestep_daemon serve <args>`."""
    return shlex.join([python, "-m", "acestep_daemon", "serve", *serve_args])


def render_service(
    exec_start: str = DEFAULT_EXEC_START, environment: dict[str, str] | None = None
) -> str:
    """The service unit; `environment` adds `Environment=NAME=VALUE` lines."""
    lines = "".join(
        f"Environment={shlex.quote(f'{name}={value}')}\n"
        for name, value in (environment or {}).items()
    )
    return SERVICE.format(exec_start=exec_start, socket_unit=SOCKET_UNIT_NAME, environment=lines)


def render_socket(listen: str = DEFAULT_LISTEN) -> str:
    return SOCKET.format(listen=listen)
