"""`thinking` through a real daemon: tiny checkpoint and tiny 5 Hz LM in one model folder."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.daemon_harness import Daemon, ask, daemon_env, running


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint_with_lm: Path) -> Path:
    return tiny_checkpoint_with_lm


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, model_dir: Path):
    tmp = tmp_path_factory.mktemp("thinking-daemon")
    with running(tmp, "--model-dir", str(model_dir), "--lm", "0.6B") as d:
        yield d


def test_metas_fills_only_missing_fields_and_the_answer_says_which(daemon: Daemon):
    answer = daemon.ask(
        {"caption": "jazz", "duration_s": 1.5, "bpm": 90, "thinking": "metas", "seed": 1}
    )
    assert answer["ok"] is True, answer
    assert answer["duration_s"] == pytest.approx(1.5)
    thinking = answer["thinking"]
    assert thinking["mode"] == "metas" and thinking["codes"] is None
    assert set(thinking["inferred"]) == {"key", "time_signature", "language"}
    assert "plan" in answer["timings"]
    status = daemon.status()
    assert (status["lm"], status["lm_loaded"]) == ("0.6B", True)
    assert daemon.ask({"command": "unload"})["ok"] is True  # the LM goes with the pipeline
    assert daemon.status()["lm_loaded"] is False


def test_full_answers_audio_with_progress_per_phase(daemon: Daemon, tmp_path: Path):
    output = tmp_path / "planned.wav"
    request = {
        "caption": "synth pop",
        "duration_s": 2,
        "thinking": "full",
        "progress": True,
        "output": str(output),
    }
    lines = ask(daemon.socket, request)
    answer = lines[-1]
    assert answer["ok"] is True, answer
    assert answer["thinking"]["codes"] == 10
    assert output.is_file()
    stages = [line["progress"]["stage"] for line in lines[:-1]]
    assert stages.index("lm-thought") < stages.index("lm-codes") < stages.index("diffusion")
    codes = [line["progress"] for line in lines[:-1] if line["progress"]["stage"] == "lm-codes"]
    assert codes[-1] == {"stage": "lm-codes", "step": 10, "of": 10}


def test_a_plain_request_does_not_think(daemon: Daemon):
    answer = daemon.ask({"caption": "plain", "duration_s": 1})
    assert answer["ok"] is True and "thinking" not in answer


def test_hangup_while_decoding_codes_cancels_the_job(daemon: Daemon):
    before = daemon.status()
    request = {"caption": "long", "duration_s": 120, "thinking": "full", "progress": True}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(str(daemon.socket))
        client.sendall(json.dumps(request).encode() + b"\n")
        client.shutdown(socket.SHUT_WR)
        with client.makefile("rb") as reader:  # the socket closes only with its file
            while json.loads(reader.readline())["progress"]["stage"] != "lm-codes":
                pass
    deadline = time.monotonic() + 60
    while (status := daemon.status())["busy"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert status["cancelled"] == before["cancelled"] + 1
    assert status["generated"] == before["generated"]
    assert daemon.ask({"caption": "after", "duration_s": 1})["ok"] is True


def test_oom_in_the_planner_at_a_cpu_home_is_answered_once_and_the_next_request_thinks(
    tmp_path: Path, model_dir: Path
):
    # the LM's own move to the CPU is for a GPU home (tests/test_cuda.py); at a CPU home
    # running out of memory while planning is the answer, and the daemon goes on
    env = daemon_env(tmp_path, ACESTEP_INJECT_OOM="plan:1")
    with running(tmp_path, "--model-dir", str(model_dir), "--lm", "0.6B", env=env) as daemon:
        answer = daemon.ask({"caption": "x", "duration_s": 1, "thinking": "metas"})
        assert answer["ok"] is False and answer["code"] == "oom", answer
        assert daemon.status()["cpu_fallbacks"] == 0
        again = daemon.ask({"caption": "x", "duration_s": 1, "thinking": "metas"})
        assert again["ok"] and again["fallback"] is None and again["oom_retries"] == 0
        assert again["thinking"]["mode"] == "metas"


def acestep_request(daemon: Daemon, *flags: str) -> dict:
    """`acestep request FLAGS` against `daemon`, as a user types it; the answer line."""
    env = daemon_env(daemon.tmp, ACESTEP_SOCKET=str(daemon.socket))
    command = [sys.executable, "-m", "acestep_daemon", "request", *flags]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode in (0, 1), done.stderr
    return json.loads(done.stdout)


def test_model_tiny_thinks_out_of_the_box_as_in_the_quick_start(tmp_path: Path):
    # README's quick start: `scripts/serve --model tiny`, no model folder, no --lm, offline
    with running(tmp_path, "--model", "tiny") as daemon:
        for mode, codes in (("full", 10), ("metas", None)):
            answer = acestep_request(daemon, "-c", "lofi", "--thinking", mode, "--duration", "2")
            assert answer["ok"] is True, answer
            assert answer["thinking"]["mode"] == mode and answer["thinking"]["codes"] == codes
            assert Path(answer["path"]).is_file()
        status = daemon.status()
        assert (status["lm"], status["lm_loaded"]) == ("0.6B", True)


def test_model_tiny_with_lm_none_refuses_thinking(tmp_path: Path):
    with running(tmp_path, "--model", "tiny", "--lm", "none") as daemon:
        answer = acestep_request(daemon, "-c", "lofi", "--thinking", "metas", "--duration", "2")
        assert answer["ok"] is False and "--lm none" in answer["error"]
        assert daemon.status()["lm"] is None
        assert acestep_request(daemon, "-c", "lofi", "--duration", "1")["ok"] is True
