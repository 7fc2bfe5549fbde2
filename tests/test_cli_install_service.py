"""`acestep install-service` writes units that systemd can start as written."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

from acestep_daemon import units
from tests.daemon_harness import REPO

SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"
"""The PATH systemd gives a service (`systemd-path search-binaries-default`)."""


def unit_values(text: str, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in text.splitlines() if line.startswith(f"{key}=")]


def test_exec_start_runs_with_systemds_environment(tmp_path: Path):
    subprocess.run(
        [sys.executable, "-m", "acestep_daemon", "install-service", "--unit-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    service = (tmp_path / units.SERVICE_NAME).read_text()
    (exec_start,) = unit_values(service, "ExecStart")
    command = shlex.split(exec_start)
    assert Path(command[0]).is_absolute() and command[-1] == "serve", exec_start
    env = {"PATH": SYSTEMD_PATH, "HOME": str(tmp_path)}
    for assignment in unit_values(service, "Environment"):
        name, _, value = shlex.split(assignment)[0].partition("=")
        env[name] = value
    started = subprocess.run(
        [*command, "--help"], cwd="/", env=env, capture_output=True, text=True, timeout=120
    )
    assert started.returncode == 0, started.stderr
    assert "usage: acestep serve" in started.stdout


def test_service_environment_names_the_checkout_only_when_needed():
    from acestep_daemon.cli import service_environment

    environment = service_environment(sys.executable)
    assert environment in ({}, {"PYTHONPATH": str(REPO)})
    isolated = subprocess.run(
        [sys.executable, "-c", "import acestep_daemon, sys; print(acestep_daemon.__file__)"],
        cwd="/",
        env={},
        capture_output=True,
        text=True,
        check=False,
    )
    imports_this_checkout = isolated.stdout.strip() == str(REPO / "acestep_daemon" / "__init__.py")
    assert (environment == {}) == imports_this_checkout


def test_skill_dir_refuses_serve_flags(tmp_path: Path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "acestep_daemon",
            "install-service",
            "--skill-dir",
            str(tmp_path),
            "--",
            "--idle-unload",
            "60",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2 and "only the skill" in result.stderr
    assert not any(tmp_path.iterdir())
