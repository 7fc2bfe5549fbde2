"""The standard-library client (the skill's `scripts/acestep-request`) against real daemons."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
import soundfile

from acestep_daemon import client
from acestep_daemon.protocol import CommandName
from tests.daemon_harness import REPO, Daemon, running, spawn

SCRIPT = REPO / "skills" / "generate_music" / "scripts" / "acestep-request"
LONG = 60.0
"""Seconds of audio that keep the tiny model busy for many steps on a CPU."""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path):
    tmp = tmp_path_factory.mktemp("client")
    with running(tmp, "--model-dir", str(tiny_checkpoint)) as d:
        yield d


def run_client(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """The skill's script, run by the interpreter alone (-I: no PYTHONPATH, no site-packages)."""
    return subprocess.run(
        [sys.executable, "-I", str(SCRIPT), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def start_client(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-I", str(SCRIPT), "--progress", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_progress(proc: subprocess.Popen[str]) -> dict:
    """The first progress line of a running stage the client printed on stderr."""
    assert proc.stderr is not None
    while line := proc.stderr.readline():
        progress = json.loads(line)["progress"]
        if progress["stage"] != "queued":
            return progress
    raise AssertionError(proc.communicate())


def wait_until(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_script_is_the_package_module():
    assert SCRIPT.is_symlink()
    assert SCRIPT.resolve() == Path(client.__file__).resolve()
    assert os.access(SCRIPT, os.X_OK)


def test_no_package_module_shadows_the_standard_library():
    """Run as a script, the client's folder comes first on sys.path."""
    names = {p.stem for p in Path(client.__file__).parent.glob("*.py")} - {"__init__", "__main__"}
    names |= {p.name for p in Path(client.__file__).parent.iterdir() if p.is_dir()}
    assert not names & sys.stdlib_module_names


def test_ok_prints_the_answer_line_and_exits_0(daemon: Daemon, tmp_path: Path):
    output = tmp_path / "ok.ogg"
    request = {"caption": "sandbox piano", "duration_s": 1, "seed": 5, "output": str(output)}
    result = run_client("--socket", str(daemon.socket), stdin=json.dumps(request))
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["ok"] and answer["path"] == str(output) and answer["seed"] == 5
    assert soundfile.info(str(output)).samplerate == 48000
    assert result.stderr == ""


def test_progress_lines_go_to_stderr(daemon: Daemon, tmp_path: Path):
    request = {"caption": "p", "duration_s": 1, "output": str(tmp_path / "p.wav")}
    result = run_client("--socket", str(daemon.socket), "--progress", json.dumps(request))
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 1 and json.loads(result.stdout)["ok"]
    stages = [json.loads(line)["progress"]["stage"] for line in result.stderr.splitlines()]
    assert "diffusion" in stages and "vae" in stages


def test_daemon_error_exits_1_with_its_text_on_stderr(daemon: Daemon):
    result = run_client("--socket", str(daemon.socket), '{"caption": "x", "output": "song.exe"}')
    assert result.returncode == client.EXIT_DAEMON_ERROR
    answer = json.loads(result.stdout)
    assert answer["code"] == "invalid_request"
    assert answer["error"] in result.stderr and "invalid_request" in result.stderr


def test_command_flag_sends_the_command(daemon: Daemon):
    result = run_client("--socket", str(daemon.socket), "--command", "ping")
    assert result.returncode == client.EXIT_OK, result.stderr
    assert json.loads(result.stdout) == {"ok": True, "message": "pong"}
    status = run_client("--socket", str(daemon.socket), "--command", "status")
    assert json.loads(status.stdout)["loaded"] is True


def test_client_commands_are_the_protocols():
    assert sorted((*client.COMMANDS, "cancel")) == sorted(typing.get_args(CommandName))


def test_command_and_json_together_are_a_usage_error(tmp_path: Path):
    result = run_client("--socket", str(tmp_path / "none.sock"), "--command", "ping", "{}")
    assert result.returncode == client.EXIT_USAGE and "not allowed" in result.stderr


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", ""])
def test_bad_json_exits_2_without_a_traceback(daemon: Daemon, text: str):
    result = run_client("--socket", str(daemon.socket), stdin=text)
    assert result.returncode == client.EXIT_USAGE
    assert "JSON" in result.stderr and "Traceback" not in result.stderr


def test_no_daemon_exits_3_and_says_so(tmp_path: Path):
    result = run_client("--socket", str(tmp_path / "none.sock"), '{"command": "ping"}')
    assert result.returncode == client.EXIT_NO_DAEMON
    assert "no daemon" in result.stderr and str(tmp_path / "none.sock") in result.stderr


def test_timeout_exits_124_and_the_job_is_cancelled(daemon: Daemon, tmp_path: Path):
    before = daemon.status()["cancelled"]
    request = {"caption": "slow", "duration_s": LONG, "output": str(tmp_path / "t.wav")}
    result = run_client("--socket", str(daemon.socket), "--timeout", "0.5", json.dumps(request))
    assert result.returncode == client.EXIT_TIMEOUT, result.stderr
    assert "no answer within 0.5 s" in result.stderr and "cancels the job" in result.stderr
    wait_until(lambda: daemon.status()["cancelled"] == before + 1)
    assert not (tmp_path / "t.wav").exists()


def test_sigint_cancels_the_running_job(daemon: Daemon, tmp_path: Path):
    before = daemon.status()["cancelled"]
    request = {"caption": "interrupted", "duration_s": LONG, "output": str(tmp_path / "i.wav")}
    proc = start_client("--socket", str(daemon.socket), json.dumps(request))
    wait_for_progress(proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == client.EXIT_SIGINT
    assert stdout == "" and "interrupted; the job is cancelled" in stderr
    assert "Traceback" not in stderr
    wait_until(lambda: daemon.status()["cancelled"] == before + 1)
    assert "request cancelled" in daemon.stderr()
    assert not (tmp_path / "i.wav").exists()


def test_daemon_killed_mid_job_exits_3_and_says_so(tmp_path: Path, tiny_checkpoint: Path):
    dying = spawn(tmp_path, "--model-dir", str(tiny_checkpoint))
    try:
        dying.wait_ready()
        request = {"caption": "doomed", "duration_s": LONG, "output": str(tmp_path / "d.wav")}
        proc = start_client("--socket", str(dying.socket), json.dumps(request))
        wait_for_progress(proc)
        dying.proc.kill()
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if dying.proc.poll() is None:
            dying.proc.kill()
        dying.proc.wait()
    assert proc.returncode == client.EXIT_NO_DAEMON
    assert stdout == "" and "without an answer" in stderr


def test_socket_discovery_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("ACESTEP_SOCKET", str(tmp_path / "explicit.sock"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg"))
    assert client.default_socket_path() == tmp_path / "explicit.sock"
    monkeypatch.delenv("ACESTEP_SOCKET")
    assert client.default_socket_path() == tmp_path / "xdg" / client.SOCKET_NAME
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.setattr(client, "RUN_USER", tmp_path / "run-user")
    assert client.default_socket_path() == client.LEGACY_SOCKET
    (tmp_path / "run-user" / str(os.getuid())).mkdir(parents=True)
    expected = tmp_path / "run-user" / str(os.getuid()) / client.SOCKET_NAME
    assert client.default_socket_path() == expected
