"""SKILL.md's command, run the way spacebot runs a worker's shell command (bubblewrap).

The sandbox is spacebot's (`src/sandbox.rs`, `wrap_bubblewrap`): read-only binds
of /bin /sbin /usr /lib /lib64 /etc /opt /run /nix (those that exist) and of the
instance's tools/bin, a fresh /dev and /proc, a private tmpfs on /tmp, the agent's
workspace read-write (also HOME), the agent's data folder masked, and an
environment cleared to PATH (tools/bin first, then spacebot's own PATH),
HOME, TMPDIR, CI, DEBIAN_FRONTEND, USER, LANG and TERM. Nothing else of the
host's HOME is there: the skill is installed into the workspace's skills/
folder, as `acestep install-service --skill-dir` does. The daemon runs
outside with its default socket, which is `/run/user/<uid>/ace-step-gen.sock`
when XDG_RUNTIME_DIR is unset.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import soundfile

from acestep_daemon import client
from tests.daemon_harness import REPO, Daemon, daemon_env, spawn

SKILL_DIR = REPO / "skills" / "generate_music"
SKILL_TEXT = (SKILL_DIR / "SKILL.md").read_text()


def _bwrap() -> str:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        if os.environ.get("CI"):
            pytest.fail("bubblewrap is not installed (.ci/run installs it)")
        pytest.skip("bubblewrap (bwrap) is not installed")
    probe = subprocess.run(
        [bwrap, "--ro-bind", "/", "/", "--tmpfs", "/tmp", "--unshare-pid", "true"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        pytest.skip(f"bwrap cannot create namespaces here: {probe.stderr.strip()}")
    return bwrap


def sandbox_path() -> str:
    """This PATH without any virtual environment's bin folder."""
    venvs = {Path(sys.prefix).resolve(), Path(os.environ.get("VIRTUAL_ENV", sys.prefix)).resolve()}
    kept = [
        entry
        for entry in os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep)
        if entry and not any(Path(entry).resolve().is_relative_to(v) for v in venvs)
    ]
    return os.pathsep.join(kept)


SYSTEM_PATHS = ("/bin", "/sbin", "/usr", "/lib", "/lib64", "/etc", "/opt", "/run", "/nix")
"""spacebot's LINUX_READ_ONLY_SYSTEM_PATHS."""


def in_sandbox(
    bwrap: str, instance: Path, command: str, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """`command` in spacebot's sandbox of an agent whose instance folder is `instance`."""
    workspace, data, tools_bin = instance / "workspace", instance / "data", instance / "tools/bin"
    for folder in (workspace, data, tools_bin):
        folder.mkdir(parents=True, exist_ok=True)
    mounts = [a for p in SYSTEM_PATHS if Path(p).exists() for a in ("--ro-bind", p, p)]
    mounts += ["--ro-bind", str(tools_bin), str(tools_bin)]
    mounts += ["--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
    mounts += ["--bind", str(workspace), str(workspace), "--tmpfs", str(data)]
    env = {
        "PATH": f"{tools_bin}{os.pathsep}{sandbox_path()}",
        "HOME": str(workspace),
        "TMPDIR": "/tmp",
        "CI": "true",
        "DEBIAN_FRONTEND": "noninteractive",
        "USER": os.environ.get("USER", "agent"),
        "LANG": "C.UTF-8",
        "TERM": "dumb",
    }
    setenv = [arg for name, value in env.items() for arg in ("--setenv", name, value)]
    isolation = ["--unshare-pid", "--new-session", "--die-with-parent", "--clearenv"]
    isolation += ["--chdir", str(workspace), *setenv]
    return subprocess.run(
        [bwrap, *mounts, *isolation, "--", "bash", "-c", command],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def install_skill(skill_dir: Path) -> Path:
    """`acestep install-service --skill-dir skill_dir`, as README says; returns skill_dir."""
    subprocess.run(
        [sys.executable, "-m", "acestep_daemon", "install-service", "--skill-dir", str(skill_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return skill_dir


def documented_command(duration_s: float, base_dir: Path) -> str:
    """The first sh block of SKILL.md, with {baseDir} filled in and a short duration."""
    block = re.search(r"```sh\n(.*?)```", (SKILL_DIR / "SKILL.md").read_text(), re.S)
    assert block is not None
    command = block.group(1).replace("{baseDir}", str(base_dir))
    command, count = re.subn(r'"duration_s": [0-9.]+', f'"duration_s": {duration_s}', command)
    assert count == 1, command
    return command


@pytest.fixture(scope="module")
def run_user_daemon(
    tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path
) -> Iterator[Daemon]:
    """A daemon on its default socket with XDG_RUNTIME_DIR unset: /run/user/<uid>/…."""
    _bwrap()
    run_dir = client.RUN_USER / str(os.getuid())
    created = not run_dir.exists()
    try:
        run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as error:
        pytest.skip(f"cannot create {run_dir}: {error}")
    sock = run_dir / client.SOCKET_NAME
    if sock.exists():
        if created:
            raise AssertionError(f"{sock} in a folder just made")
        pytest.skip(f"{sock} exists already (a daemon of this user?); not touching it")
    tmp = tmp_path_factory.mktemp("sandbox-daemon")
    env = daemon_env(tmp)
    del env["XDG_RUNTIME_DIR"]
    daemon = spawn(tmp, "--model-dir", str(tiny_checkpoint), env=env, default_socket=sock)
    try:
        daemon.wait_ready()
        yield daemon
    finally:
        daemon.stop()
        sock.unlink(missing_ok=True)
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)


def test_skill_command_in_the_sandbox_writes_audio_into_the_workspace(
    run_user_daemon: Daemon, tmp_path: Path
):
    instance = tmp_path / "agents" / "main"
    skill = install_skill(instance / "workspace" / "skills" / "generate_music")
    result = in_sandbox(_bwrap(), instance, documented_command(2, skill))
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout.splitlines()[-1])
    assert answer["ok"] is True, answer
    path = Path(answer["path"])
    assert path.parent.parent == instance / "workspace" and path.suffix == ".ogg"
    info = soundfile.info(str(path))
    assert (info.samplerate, info.channels) == (48000, 2)
    assert abs(info.frames - 2 * 48000) <= 1920


def test_ping_in_the_sandbox(run_user_daemon: Daemon, tmp_path: Path):
    instance = tmp_path / "agents" / "main"
    skill = install_skill(instance / "workspace" / "skills" / "generate_music")
    ping = re.search(r"`(\{baseDir\}/scripts/acestep-request --command ping)`", SKILL_TEXT)
    assert ping is not None
    result = in_sandbox(_bwrap(), instance, ping.group(1).replace("{baseDir}", str(skill)))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"ok": True, "message": "pong"}


def test_bad_request_in_the_sandbox_exits_non_zero_with_the_daemons_error(
    run_user_daemon: Daemon, tmp_path: Path
):
    instance = tmp_path / "agents" / "main"
    skill = install_skill(instance / "workspace" / "skills" / "generate_music")
    command = documented_command(2, skill).replace('"duration_s": 2', '"duration_s": 9999')
    result = in_sandbox(_bwrap(), instance, command)
    assert result.returncode == client.EXIT_DAEMON_ERROR
    answer = json.loads(result.stdout.splitlines()[-1])
    assert answer["code"] == "invalid_request"
    assert answer["error"] in result.stderr and "duration_s" in result.stderr
    assert not any((instance / "workspace").rglob("*.ogg"))


def test_skill_outside_the_workspace_is_client_not_found(tmp_path: Path):
    """Installed where the sandbox cannot see it (the instance's skills folder, the
    checkout): exit 127, which SKILL.md tells apart from every answer of the client."""
    instance = tmp_path / "agents" / "main"
    for hidden in (install_skill(tmp_path / "skills" / "generate_music"), SKILL_DIR):
        result = in_sandbox(_bwrap(), instance, documented_command(2, hidden))
        assert result.returncode == 127, (hidden, result.stderr)
        assert "No such file or directory" in result.stderr
    assert "127 the client itself was not found" in SKILL_TEXT
