"""Start, refuse, replace, stop: the daemon's life as a process and a socket file."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.daemon_harness import REPO, Daemon, ask, daemon_env, running, running_job, spawn


def test_sigterm_lets_the_running_job_finish_and_refuses_the_queue(tmp_path: Path):
    daemon = spawn(tmp_path, "--model", "tiny")
    daemon.wait_ready()
    assert "RANDOM weights" in daemon.stderr()
    long_output = tmp_path / "long.wav"
    long_request = {
        "caption": "long",
        "duration_s": 60,
        "progress": True,
        "output": str(long_output),
    }
    with running_job(daemon.socket, long_request) as first:
        queued: list[list[dict]] = [[], []]

        def client(i: int) -> None:
            queued[i] = ask(daemon.socket, {"caption": f"q{i}", "duration_s": 1})

        threads = [threading.Thread(target=client, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while daemon.status()["queue_depth"] != 2:
            assert time.monotonic() < deadline
        daemon.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        final = b""
        while chunk := first.recv(1 << 16):
            final += chunk
    assert daemon.proc.wait(60) == 0, daemon.stderr()
    assert json.loads(final.splitlines()[-1])["ok"] is True
    assert long_output.is_file()
    assert [q[0]["code"] for q in queued] == ["shutting_down", "shutting_down"]
    assert all(len(q) == 1 for q in queued)
    assert not daemon.socket.exists()


def test_second_daemon_on_a_live_socket_refuses(tmp_path: Path, tiny_checkpoint: Path):
    model = ("--model-dir", str(tiny_checkpoint))
    with running(tmp_path, *model) as first:
        second = spawn(tmp_path, *model)
        assert second.proc.wait(60) != 0
        assert "already listening" in second.stderr()
        assert first.ask({"command": "ping"})["ok"]
        assert first.socket.exists()


def test_stale_socket_is_replaced_and_mode_is_0600(tmp_path: Path, tiny_checkpoint: Path):
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "d.sock"))
    stale.close()  # the file stays, nobody listens
    with running(tmp_path, "--model-dir", str(tiny_checkpoint)) as daemon:
        assert daemon.ask({"command": "ping"})["ok"]
        assert stat.S_IMODE(daemon.socket.stat().st_mode) == 0o600


def _ping_as(uid: int, path: Path) -> dict:
    """Ping from a forked child that switched to `uid`."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setgid(uid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(30)
                sock.connect(str(path))
                sock.sendall(b'{"command": "ping"}\n')
                sock.shutdown(socket.SHUT_WR)
                os.write(write_end, sock.recv(4096))
        except BaseException as error:
            os.write(write_end, repr(error).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    with os.fdopen(read_end, "rb") as answer:
        return json.loads(answer.read())


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another uid")
def test_peer_of_another_uid_is_refused_unless_allowed(tiny_checkpoint: Path):
    public = Path(tempfile.mkdtemp(prefix="acestep-peer-"))
    public.chmod(0o755)
    try:
        for extra, allowed in (((), False), (("--allow-uid", "65534"), True)):
            args = ("--model-dir", str(tiny_checkpoint), "--socket-mode", "0666", *extra)
            with running(public, *args) as daemon:
                assert stat.S_IMODE(daemon.socket.stat().st_mode) == 0o666
                answer = _ping_as(65534, daemon.socket)
                assert answer["ok"] is allowed, answer
                daemon.stop()
    finally:
        shutil.rmtree(public, ignore_errors=True)


def test_failed_reload_makes_the_daemon_exit_nonzero(tmp_path: Path, tiny_checkpoint: Path):
    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, model)
    daemon = spawn(tmp_path, "--model-dir", str(model))
    daemon.wait_ready()
    daemon.ask({"command": "unload"})
    shutil.rmtree(model)
    answer = daemon.ask({"caption": "x", "duration_s": 1})
    assert answer["ok"] is False and answer["code"] == "internal"
    assert daemon.proc.wait(60) == 1
    assert not daemon.socket.exists()


class NotifyListener:
    """A test NOTIFY_SOCKET: datagrams are read only after `start_reading`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.lines: list[str] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)

    def start_reading(self) -> None:
        self._thread.start()

    def _read(self) -> None:
        while not self._closed.is_set():
            with contextlib.suppress(TimeoutError):
                self.lines += self.sock.recv(4096).decode().splitlines()

    def wait_for(self, wanted: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while wanted not in self.lines:
            assert time.monotonic() < deadline, (wanted, self.lines)
            time.sleep(0.05)

    def close(self) -> None:
        self._closed.set()
        if self._thread.is_alive():
            self._thread.join()
        self.sock.close()


def test_socket_activation_and_sd_notify(tmp_path: Path, tiny_checkpoint: Path):
    """systemd-socket-activate (or the same fd hand-over) starts us on the first connection."""
    sock_path = tmp_path / "activated.sock"
    notify = NotifyListener(tmp_path / "notify")
    env = daemon_env(tmp_path, NOTIFY_SOCKET=str(tmp_path / "notify"), WATCHDOG_USEC="400000")
    serve = [sys.executable, "-m", "acestep_daemon", "serve", "--model-dir", str(tiny_checkpoint)]
    if launcher := shutil.which("systemd-socket-activate"):
        passed = ["-E" + name for name in env]
        command = [launcher, "-l", str(sock_path), *passed, *serve]
        listener = None
    else:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(sock_path))
        listener.listen(8)
        hand_over = (  # the child moves the socket to fd 3 and execs the daemon, same pid
            "import os, sys\nfd = int(sys.argv[1])\n"
            "if fd != 3: os.dup2(fd, 3); os.close(fd)\n"
            "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1')\n"
            "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])"
        )
        command = [sys.executable, "-c", hand_over, str(listener.fileno()), *serve[1:]]
    proc = subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        pass_fds=(listener.fileno(),) if listener else (),
        stderr=(tmp_path / "activated.log").open("wb"),
    )
    daemon = Daemon(proc, sock_path, tmp_path, tmp_path / "activated.log")
    try:
        deadline = time.monotonic() + 30
        while not sock_path.exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert daemon.ask({"command": "ping"}, timeout=120)["ok"]
        daemon.wait_ready()
        # Nobody reads the notify socket yet: its queue fills up with WATCHDOG=1
        # datagrams, and the daemon must go on serving regardless.
        time.sleep(3)
        answer = daemon.ask({"caption": "activated", "duration_s": 1})
        assert answer["ok"], answer
        notify.start_reading()
        notify.wait_for("READY=1")
        notify.wait_for("WATCHDOG=1")
        proc.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING=1")
        assert proc.wait(60) == 0, daemon.stderr()
        assert any(line.startswith("STATUS=") for line in notify.lines)
        assert "socket activation" in daemon.stderr()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        print(daemon.stderr())  # shown when the test fails
        notify.close()
        if listener:
            listener.close()


def test_idle_unload_frees_the_pipeline_and_the_next_request_reloads(
    tmp_path: Path, tiny_checkpoint: Path
):
    args = ("--model-dir", str(tiny_checkpoint), "--idle-unload", "1")
    with running(tmp_path, *args) as daemon:
        deadline = time.monotonic() + 30
        while daemon.status()["loaded"]:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        answer = daemon.ask({"caption": "after idle", "duration_s": 1})
        assert answer["ok"], answer
        assert daemon.status()["loads"] == 2


def test_running_job_past_the_grace_period_is_stopped(tmp_path: Path, tiny_checkpoint: Path):
    args = ("--model-dir", str(tiny_checkpoint), "--shutdown-grace", "0.2")
    daemon = spawn(tmp_path, *args)
    daemon.wait_ready()
    output = tmp_path / "cut.wav"
    request = {"caption": "long", "duration_s": 120, "progress": True, "output": str(output)}
    with running_job(daemon.socket, request) as client:
        daemon.proc.send_signal(signal.SIGINT)
        answers = client.makefile("rb").read().splitlines()
    assert json.loads(answers[-1])["code"] == "shutting_down"
    assert daemon.proc.wait(60) == 0
    assert not output.exists() and not daemon.socket.exists()


def test_second_signal_exits_at_once_during_the_grace_period(tmp_path: Path, tiny_checkpoint: Path):
    daemon = spawn(tmp_path, "--model-dir", str(tiny_checkpoint), "--shutdown-grace", "600")
    daemon.wait_ready()
    output = tmp_path / "cut.wav"
    request = {"caption": "long", "duration_s": 600, "progress": True, "output": str(output)}
    with running_job(daemon.socket, request):
        daemon.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while "shutting down" not in daemon.stderr():
            assert time.monotonic() < deadline, daemon.stderr()
            time.sleep(0.05)
        with pytest.raises(subprocess.TimeoutExpired):
            daemon.proc.wait(0.5)  # the first signal waits for the running job
        # a client arriving now is told why, not refused as at a stale socket
        late = ask(daemon.socket, {"caption": "late", "duration_s": 1}, timeout=10)
        assert [(a["ok"], a["code"]) for a in late] == [(False, "shutting_down")], late
        assert ask(daemon.socket, {"command": "ping"}, timeout=10)[0]["code"] == "shutting_down"
        assert ask(daemon.socket, {"command": "status"}, timeout=10)[0]["stopping"] is True
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(10) == 130
    assert "second SIGTERM: exiting now" in daemon.stderr()
    assert not output.exists()
