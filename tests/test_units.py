"""The committed systemd units are what `acestep install-service` renders by default."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from acestep_daemon import client, units
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


def install_service(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "acestep_daemon", "install-service", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


def test_dry_run_prints_units_and_paths_and_writes_nothing(tmp_path: Path):
    units_dir, skill_dir = tmp_path / "units", tmp_path / "skill"
    result = install_service("--unit-dir", str(units_dir), "--dry-run")
    assert not units_dir.exists()
    assert f"would write {units_dir / units.SERVICE_NAME}" in result.stdout
    assert f"would write {units_dir / units.SOCKET_UNIT_NAME}" in result.stdout
    assert units.render_socket() in result.stdout
    assert "systemctl --user enable --now ace-step-gen.socket" in result.stdout
    skill = install_service("--skill-dir", str(skill_dir), "--dry-run")
    assert not skill_dir.exists()
    assert f"would write {skill_dir / 'scripts' / 'acestep-request'} (mode 755)" in skill.stdout


def test_skill_dir_gets_the_skill_and_a_runnable_copy_of_the_client(tmp_path: Path):
    skill_dir = tmp_path / "skills" / "generate_music"
    install_service("--unit-dir", str(tmp_path / "units"), "--skill-dir", str(skill_dir))
    assert not (tmp_path / "units").exists()  # only the skill
    installed = skill_dir / "scripts" / "acestep-request"
    assert (skill_dir / "SKILL.md").read_text() == (
        REPO / "skills" / "generate_music" / "SKILL.md"
    ).read_text()
    assert not installed.is_symlink() and os.access(installed, os.X_OK)
    assert installed.read_text() == Path(client.__file__).read_text()
    ping = subprocess.run(
        [sys.executable, "-I", str(installed), "--socket", str(tmp_path / "none.sock"), "{}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ping.returncode == client.EXIT_NO_DAEMON and "no daemon" in ping.stderr


def test_without_skill_dir_it_says_where_the_skill_goes(tmp_path: Path):
    result = install_service("--unit-dir", str(tmp_path))
    assert "spacebot skill: run again with --skill-dir" in result.stdout
    assert "workspace/skills/generate_music" in result.stdout
