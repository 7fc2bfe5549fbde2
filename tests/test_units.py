"""The committed systemd units are what `acestep install-service` renders by default."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from acestep_daemon import units
from tests.daemon_harness import REPO


def test_committed_units_match_the_renderer():
    assert (REPO / "systemd" / units.SERVICE_NAME).read_text() == units.render_service()
    assert (REPO / "systemd" / units.SOCKET_UNIT_NAME).read_text() == units.render_socket()


def test_install_service_writes_both_units_for_this_interpreter(tmp_path: Path):
    install = ("install-service", "--unit-dir", str(tmp_path), "--socket", "/tmp/ace-step-gen.sock")
    result = subprocess.run(
        [sys.executable, "-m", "acestep_daemon", *install, "--", "--idle-unload", "600"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    service = (tmp_path / units.SERVICE_NAME).read_text()
    socket_unit = (tmp_path / units.SOCKET_UNIT_NAME).read_text()
    assert f"ExecStart={sys.executable} -m acestep_daemon serve --idle-unload 600" in service
    assert "Type=notify" in service and "WatchdogSec=" in service
    assert "ListenStream=/tmp/ace-step-gen.sock" in socket_unit and "SocketMode=0600" in socket_unit
    assert "systemctl --user enable --now ace-step-gen.socket" in result.stdout
