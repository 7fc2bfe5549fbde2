"""SKILL.md's command, run the way spacebot runs a worker's shell command (bubblewrap).

The sandbox: the root file system read-only, a private tmpfs on /tmp, a
read-write workspace that is also HOME, and an environment cleared to PATH
(without the project's virtual environment), HOME, TMPDIR, USER, LANG and
TERM. The daemon runs outside with its default socket, which is
`/run/user/<uid>/ace-step-gen.sock` when XDG_RUNTIME_DIR is unset.
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
from tests.daemon_harness import Daemon, daemon_env, spawn

REPO = Path(__file__).resolve().parent.parent
SKILL_DIR = REPO / "skills" / "generate_music"


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


def in_sandbox(
    bwrap: str, workspace: Path, command: str, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": sandbox_path(),
        "HOME": str(workspace),
        "TMPDIR": "/tmp",
        "USER": os.environ.get("USER", "agent"),
        "LANG": "C.UTF-8",
        "TERM": "dumb",
    }
    setenv = [arg for name, value in env.items() for arg in ("--setenv", name, value)]
    mounts = ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
    # Spacebot's skills folder is visible (read-only) through the root bind; a checkout that
    # lies under /tmp (CI's clone, say) would vanish under the tmpfs, so bind it back.
    mounts += ["--ro-bind", str(REPO), str(REPO)]
    mounts += ["--bind", str(workspace), str(workspace), "--chdir", str(workspace)]
    isolation = ["--unshare-pid", "--die-with-parent", "--clearenv", *setenv]
    return subprocess.run(
        [bwrap, *mounts, *isolation, "bash", "-c", command],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def documented_command(duration_s: float) -> str:
    """The first sh block of SKILL.md, with {baseDir} filled in and a short duration."""
    block = re.search(r"```sh\n(.*?)```", (SKILL_DIR / "SKILL.md").read_text(), re.S)
    assert block is not None
    command = block.group(1).replace("{baseDir}", str(SKILL_DIR))
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
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    result = in_sandbox(_bwrap(), workspace, documented_command(2))
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout.splitlines()[-1])
    assert answer["ok"] is True, answer
    path = Path(answer["path"])
    assert path.parent.parent == workspace and path.suffix == ".ogg"
    info = soundfile.info(str(path))
    assert (info.samplerate, info.channels) == (48000, 2)
    assert abs(info.frames - 2 * 48000) <= 1920


def test_bad_request_in_the_sandbox_exits_non_zero_with_the_daemons_error(
    run_user_daemon: Daemon, tmp_path: Path
):
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    command = documented_command(2).replace('"duration_s": 2', '"duration_s": 9999')
    result = in_sandbox(_bwrap(), workspace, command)
    assert result.returncode == client.EXIT_DAEMON_ERROR
    answer = json.loads(result.stdout.splitlines()[-1])
    assert answer["code"] == "invalid_request"
    assert answer["error"] in result.stderr and "duration_s" in result.stderr
    assert not any(workspace.rglob("*.ogg"))
