"""Starting the daemon: the README's commands on a clean clone, and short start-up errors."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.daemon_harness import REPO, ask_one, daemon_env


def serve(tmp: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`acestep serve ARGS` that is expected to stop at once."""
    return subprocess.run(
        [sys.executable, "-m", "acestep_daemon", "serve", "--socket", str(tmp / "s.sock"), *args],
        cwd=REPO,
        env=daemon_env(tmp, HF_HOME=str(tmp / "hf"), **env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_offline_without_weights_is_one_short_error_naming_the_way_out(tmp_path: Path):
    result = serve(tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "hf download ACE-Step/Ace-Step1.5 --include" in result.stderr
    assert "--model tiny" in result.stderr
    assert "no copy of ACE-Step/Ace-Step1.5" in result.stderr
    assert len(result.stderr.splitlines()) <= 8, result.stderr


def test_verbose_start_up_error_has_the_traceback(tmp_path: Path):
    result = serve(tmp_path, "-v")
    assert result.returncode == 2 and "Traceback" in result.stderr


def test_missing_model_dir_file_is_named(tmp_path: Path):
    result = serve(tmp_path, "--model-dir", str(tmp_path / "nowhere"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"model directory {tmp_path / 'nowhere'} does not exist" in result.stderr


def test_unreadable_weights_are_one_line_without_a_traceback(tmp_path: Path, tiny_checkpoint):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    (broken / "acestep-v15-turbo" / "model.safetensors").write_bytes(b"not safetensors")
    result = serve(tmp_path, "--model-dir", str(broken))
    assert result.returncode == 1
    assert "could not load the pipeline" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_without_cuda_says_so(tmp_path: Path):
    result = serve(tmp_path, "--model", "tiny", "--device", "cuda")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--device cuda: no CUDA device is available" in result.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--device", "gpu7"), "--device gpu7: not a device"),
        (("--queue-limit", "0"), "must be at least 1"),
        (("--idle-unload", "-5"), "must be a positive number of seconds"),
    ],
)
def test_bad_flags_are_one_line(tmp_path: Path, flags: tuple[str, ...], message: str):
    result = serve(tmp_path, "--model", "tiny", *flags)
    assert result.returncode == 2 and message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    """A clean clone of this repository's committed tree."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs git and a git checkout")
    dest = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(dest)], check=True, timeout=120)
    return dest


def clone_env(tmp: Path) -> dict[str, str]:
    """The test's own environment reused as the clone's (no 5-minute install), offline."""
    venv = Path(sys.prefix)
    if not (venv / "bin" / "activate").is_file():
        pytest.skip("the tests do not run in a virtual environment that ACESTEP_VENV could name")
    env = daemon_env(tmp, ACESTEP_VENV=str(venv), HF_HOME=str(tmp / "hf"))
    env.pop("PYTHONPATH")  # the clone's code, not this checkout's
    return env


def test_serve_help_from_a_clean_clone(clone: Path, tmp_path: Path):
    result = subprocess.run(
        [str(clone / "scripts" / "serve"), "--help"],
        env=clone_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "--model {turbo," in result.stdout and "'tiny'" in result.stdout


def test_serve_model_tiny_from_a_clean_clone_answers_ping(clone: Path, tmp_path: Path):
    sock = tmp_path / "clone.sock"
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(clone / "scripts" / "serve"), "--model", "tiny", "--socket", str(sock)],
            env=clone_env(tmp_path),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )
    try:
        deadline = time.monotonic() + 120
        while not sock.exists():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        assert ask_one(sock, {"command": "ping"}) == {"ok": True, "message": "pong"}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "--model tiny-turbo: serving a TINY checkpoint" in log.read_text()
