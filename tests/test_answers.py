"""Answers that tell the truth, through a real daemon: timings, notes, queue position, disk full."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.daemon_harness import REPO, Daemon, ask, daemon_env, running, running_job

STAGES = ("text", "diffusion", "vae")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path):
    with running(tmp_path_factory.mktemp("answers"), "--model-dir", str(tiny_checkpoint)) as d:
        yield d


def test_timings_include_the_write_and_the_total(daemon: Daemon, tmp_path: Path):
    answer = daemon.ask({"caption": "t", "duration_s": 2, "output": str(tmp_path / "t.opus")})
    timings = answer["timings"]
    assert set(timings) == {*STAGES, "write", "total"}, timings
    assert timings["write"] > 0
    parts = sum(timings[k] for k in (*STAGES, "write"))
    assert parts <= timings["total"] + 1e-3 and timings["total"] < parts + 5.0
    assert answer["notes"] == []


def test_snapped_shift_is_named_in_the_answer(daemon: Daemon, tmp_path: Path):
    answer = daemon.ask(
        {"caption": "s", "duration_s": 1, "shift": 7, "output": str(tmp_path / "s.wav")}
    )
    assert answer["ok"] is True
    assert answer["notes"] == [
        "shift 7 was snapped to 3 (the turbo schedule has shifts 1, 2 and 3)"
    ]


def test_truncated_lyrics_are_named_with_the_token_count(daemon: Daemon, tmp_path: Path):
    lyrics = "[verse]\n" + "\n".join(f"line {i} of a song that goes on" for i in range(600))
    answer = daemon.ask(
        {"caption": "l", "duration_s": 1, "lyrics": lyrics, "output": str(tmp_path / "l.wav")}
    )
    assert answer["ok"] is True
    (note,) = answer["notes"]
    assert note.startswith("lyrics truncated to 2048 tokens: the lyrics prompt has ")
    assert int(note.split(" has ")[1].split(",")[0]) > 2048


def test_free_metas_with_structured_fields_is_refused(daemon: Daemon):
    answer = daemon.ask({"caption": "m", "metas": "bpm: 90", "bpm": 120, "key": "C major"})
    assert answer["code"] == "invalid_request"
    assert "metas cannot be combined with bpm, key" in answer["error"]


def test_accepted_job_is_told_its_queue_position(daemon: Daemon, tmp_path: Path):
    long_request = {"caption": "long", "duration_s": 60, "progress": True}
    with (
        running_job(daemon.socket, long_request),
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as second,
    ):
        second.connect(str(daemon.socket))
        request = {"caption": "next", "duration_s": 1, "progress": True}
        second.sendall(json.dumps(request).encode() + b"\n")
        second.shutdown(socket.SHUT_WR)
        first_line = second.makefile("rb").readline()
    queued = json.loads(first_line)["progress"]
    assert (queued["stage"], queued["position"]) == ("queued", 1) and queued["id"]


def test_full_disk_answers_io_naming_the_path(tmp_path: Path, tiny_checkpoint: Path):
    """The daemon runs in a mount namespace whose /full is a 64 KiB tmpfs (bubblewrap)."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        pytest.skip("bubblewrap (bwrap) is not installed")
    probe = [bwrap, "--bind", "/", "/", "--size", "65536", "--tmpfs", "/full", "true"]
    if subprocess.run(probe, capture_output=True, check=False).returncode != 0:
        pytest.skip("bwrap cannot create a mount namespace with a sized tmpfs here")
    sock = tmp_path / "d.sock"
    serve = [sys.executable, "-m", "acestep_daemon", "serve", "--socket", str(sock)]
    sandbox = [bwrap, "--bind", "/", "/", "--dev", "/dev", "--size", "65536", "--tmpfs", "/full"]
    log = (tmp_path / "daemon.log").open("wb")
    proc = subprocess.Popen(
        [*sandbox, "--die-with-parent", *serve, "--model-dir", str(tiny_checkpoint)],
        cwd=REPO,
        env=daemon_env(tmp_path),
        stdout=log,
        stderr=log,
    )
    daemon = Daemon(proc, sock, tmp_path, tmp_path / "daemon.log")
    try:
        daemon.wait_ready()
        (answer,) = ask(sock, {"caption": "big", "duration_s": 10, "output": "/full/big.wav"})
        assert answer["ok"] is False and answer["code"] == "io", answer
        assert answer["error"] == "could not write /full/big.wav: No space left on device"
        assert daemon.ask({"command": "ping"})["ok"]
    finally:
        daemon.stop()
        log.close()


def test_generate_prints_the_daemons_fields(daemon: Daemon, tmp_path: Path, tiny_checkpoint):
    flags = ["-c", "g", "-d", "1", "--shift", "2.5", "-o", str(tmp_path / "g.wav")]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "acestep_daemon",
            "generate",
            *flags,
            "--model-dir",
            str(tiny_checkpoint),
        ],
        cwd=REPO,
        env=daemon_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    printed = json.loads(result.stdout)
    answer = daemon.ask({"caption": "g", "duration_s": 1, "output": str(tmp_path / "d.wav")})
    assert [*printed, "id"] == list(answer)  # only a daemon's job has an id
    assert set(printed["timings"]) == {"load", *STAGES, "write", "total"}
    assert printed["notes"] == [
        "shift 2.5 was snapped to 2 (the turbo schedule has shifts 1, 2 and 3)"
    ]
