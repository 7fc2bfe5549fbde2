"""One real daemon (tiny checkpoint, queue limit 4) answering real socket clients."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import soundfile

from tests.daemon_harness import REPO, Daemon, ask, running, running_job, send

DURATION_S = 1.0


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path):
    tmp = tmp_path_factory.mktemp("daemon")
    with running(tmp, "--model-dir", str(tiny_checkpoint), "--queue-limit", "4") as d:
        yield d


def assert_complete_audio(path: Path, duration_s: float) -> None:
    info = soundfile.info(str(path))
    assert (info.samplerate, info.channels) == (48000, 2)
    assert abs(info.frames - duration_s * 48000) <= 1920, info.frames
    samples, _ = soundfile.read(str(path))
    assert len(samples) == info.frames


def test_socat_request_gets_one_line_naming_valid_audio(daemon: Daemon, tmp_path: Path):
    if shutil.which("socat") is None:
        if os.environ.get("CI"):
            pytest.fail("socat is not installed (.ci/run installs it)")
        pytest.skip("socat is not installed")
    output = tmp_path / "new" / "folder" / "piano.ogg"
    line = json.dumps(
        {"caption": "ambient piano", "duration_s": DURATION_S, "seed": 7, "output": str(output)}
    )
    result = subprocess.run(
        ["socat", "-t", "120", "-", f"UNIX-CONNECT:{daemon.socket}"],
        input=line + "\n",
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    )
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    answer = json.loads(lines[0])
    assert answer["ok"] is True, answer
    assert answer["path"] == str(output)
    assert answer["duration_s"] == pytest.approx(DURATION_S)
    assert (answer["sample_rate"], answer["channels"], answer["seed"]) == (48000, 2, 7)
    assert set(answer["timings"]) >= {"text", "diffusion", "vae"}
    assert answer["device"] == "cpu"
    assert_complete_audio(output, DURATION_S)
    logged = [line for line in daemon.stderr().splitlines() if str(output) in line]
    assert len(logged) == 1 and "'ambient piano' duration=1s seed=7" in logged[0], logged


def test_request_without_output_is_spooled(daemon: Daemon):
    answer = daemon.ask({"caption": "drums", "duration_s": DURATION_S, "output": None})
    path = Path(answer["path"])
    assert path.parent == daemon.tmp / "data" / "ace-step" / "spool"
    assert path.suffix == ".ogg" and path.stem.isdigit()
    assert_complete_audio(path, DURATION_S)


def test_ping_and_status_answer(daemon: Daemon):
    assert daemon.ask({"command": "ping"}) == {"ok": True, "message": "pong"}
    status = daemon.status()
    assert status["ok"] and status["loaded"] and status["device"] == "cpu"
    assert status["queue_limit"] == 4 and status["queue_depth"] == 0
    assert {"version", "dtype", "busy", "uptime_s", "generated", "free_vram_bytes"} <= set(status)
    assert Path(status["model_dir"]).is_dir()


def test_unload_then_next_request_reloads(daemon: Daemon, tmp_path: Path):
    loads = daemon.status()["loads"]
    assert daemon.ask({"command": "unload"}) == {"ok": True, "message": "pipeline unloaded"}
    assert daemon.status()["loaded"] is False
    output = tmp_path / "after-unload.wav"
    answer = daemon.ask({"caption": "reload", "duration_s": DURATION_S, "output": str(output)})
    assert answer["ok"], answer
    status = daemon.status()
    assert status["loaded"] is True and status["loads"] == loads + 1
    assert_complete_audio(output, DURATION_S)


def test_load_command_loads(daemon: Daemon):
    daemon.ask({"command": "unload"})
    answer = daemon.ask({"command": "load"})
    assert answer["ok"] and answer["message"] == "pipeline loaded" and answer["device"] == "cpu"
    assert daemon.status()["loaded"] is True


def test_progress_lines_come_in_order_before_the_final_line(daemon: Daemon, tmp_path: Path):
    output = tmp_path / "progress.flac"
    request = {"caption": "p", "duration_s": DURATION_S, "progress": True, "output": str(output)}
    answers = ask(daemon.socket, request)
    queued, *progress, final = answers
    assert final["ok"] is True and final["path"] == str(output)
    assert queued == {"progress": {"stage": "queued", "position": 0, "id": final["id"]}}
    steps = [(p["progress"]["stage"], p["progress"]["step"], p["progress"]["of"]) for p in progress]
    assert steps[:2] == [("text", 0, 1), ("text", 1, 1)]
    assert [s for s in steps if s[0] == "diffusion"] == [("diffusion", i, 8) for i in range(9)]
    vae = [s for s in steps if s[0] == "vae"]
    assert vae and vae == [("vae", i, vae[0][2]) for i in range(vae[0][2] + 1)]
    assert steps == sorted(steps, key=lambda s: ("text", "diffusion", "vae").index(s[0]))
    assert steps[-1] == ("vae", vae[0][2], vae[0][2])  # every stage ends at n of n


def test_fifty_concurrent_clients_get_one_answer_each(daemon: Daemon, tmp_path: Path):
    answers: list[list[dict]] = [[] for _ in range(50)]

    def client(i: int) -> None:
        request = {
            "caption": f"c{i}",
            "duration_s": DURATION_S,
            "output": str(tmp_path / f"{i}.wav"),
        }
        answers[i] = ask(daemon.socket, request, timeout=300)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(len(a) == 1 for a in answers), answers
    finals = [a[0] for a in answers]
    ok = [f for f in finals if f["ok"]]
    busy = [f for f in finals if not f["ok"] and f["code"] == "busy"]
    assert len(ok) + len(busy) == 50, finals
    assert ok and busy
    assert all(b["queue_depth"] == 4 and b["queue_limit"] == 4 for b in busy)
    for f in ok:
        assert_complete_audio(Path(f["path"]), DURATION_S)


def test_hangup_while_queued_cancels_job_before_it_runs(daemon: Daemon, tmp_path: Path):
    before = daemon.status()
    long_request = {"caption": "long", "duration_s": 60, "progress": True}
    long_request["output"] = str(tmp_path / "long.wav")
    with running_job(daemon.socket, long_request) as running_client:
        queued = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        queued.connect(str(daemon.socket))
        hung_up = tmp_path / "hung-up.wav"
        gone = {"caption": "gone", "output": str(hung_up), "on_hangup": "cancel"}
        queued.sendall(json.dumps(gone).encode() + b"\n")
        deadline = time.monotonic() + 30
        while daemon.status()["queue_depth"] != 1:
            assert time.monotonic() < deadline
        queued.close()
        while (status := daemon.status())["cancelled"] != before["cancelled"] + 1:
            assert time.monotonic() < deadline
        assert status["queue_depth"] == 0 and status["busy"] is True
        final = b""
        while chunk := running_client.recv(1 << 16):
            final += chunk
    assert json.loads(final.splitlines()[-1])["ok"] is True
    after = daemon.status()
    assert after["generated"] == before["generated"] + 1
    assert after["cancelled"] == before["cancelled"] + 1
    assert not hung_up.exists()
    assert daemon.ask({"command": "ping"})["ok"]


def acestep(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "acestep_daemon", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_acestep_request_prints_the_answer(daemon: Daemon, tmp_path: Path):
    output = tmp_path / "client.wav"
    sock = ("--socket", str(daemon.socket))
    flags = ("--duration", "1", "--seed", "3", "--output", str(output))
    result = acestep("request", "cli piano", *flags, *sock)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["ok"] and answer["path"] == str(output) and answer["seed"] == 3
    assert_complete_audio(output, 1.0)
    status = acestep("request", "--command", "status", *sock)
    assert status.returncode == 0 and json.loads(status.stdout)["loaded"] is True
    progress = acestep("request", "-c", "p", "--duration", "1", "--progress", *sock)
    assert json.loads(progress.stdout)["ok"] is True
    assert all("progress" in json.loads(line) for line in progress.stderr.splitlines())
    assert progress.stderr
    refused = acestep("request", "--json", '{"caption": "x", "output": "/a/../b.wav"}', *sock)
    assert refused.returncode == 1 and json.loads(refused.stdout)["code"] == "invalid_request"
    assert "must not contain '..'" in refused.stderr
    bad = acestep("request", "--json", "{oops", *sock)
    assert bad.returncode == 2 and "not valid JSON" in bad.stderr and "Traceback" not in bad.stderr


def test_hangup_while_running_cancels_between_steps(daemon: Daemon, tmp_path: Path):
    before = daemon.status()
    output = tmp_path / "abandoned.wav"
    request = {"caption": "abandoned", "duration_s": 60, "progress": True, "output": str(output)}
    request["on_hangup"] = "cancel"
    with running_job(daemon.socket, request):
        pass  # the job runs; closing the connection hangs up
    deadline = time.monotonic() + 30
    while (status := daemon.status())["busy"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert status["cancelled"] == before["cancelled"] + 1
    assert status["generated"] == before["generated"]
    assert not output.exists()


def test_heun_sampler_runs_and_the_answer_reports_it(daemon: Daemon, tmp_path: Path):
    request = {"caption": "ambient piano", "duration_s": DURATION_S, "seed": 7, "progress": True}
    euler = ask(daemon.socket, request | {"output": str(tmp_path / "euler.wav")})
    heun = ask(daemon.socket, request | {"output": str(tmp_path / "heun.wav"), "sampler": "heun"})
    assert euler[-1]["ok"] is True and heun[-1]["ok"] is True, heun[-1]
    assert (euler[-1]["sampler"], heun[-1]["sampler"]) == ("euler", "heun")
    steps = [a["progress"] for a in heun[:-1] if a["progress"]["stage"] == "diffusion"]
    # one line per step (not per DiT call), then the closing 8 of 8
    assert [(s["step"], s["of"]) for s in steps] == [(k, 8) for k in range(9)]
    assert_complete_audio(tmp_path / "heun.wav", DURATION_S)
    first, _ = soundfile.read(str(tmp_path / "euler.wav"))
    second, _ = soundfile.read(str(tmp_path / "heun.wav"))
    assert not (first == second).all()


def test_unknown_sampler_is_an_invalid_request(daemon: Daemon):
    answer = daemon.ask({"caption": "x", "duration_s": 1, "sampler": "dpm"})
    assert answer["ok"] is False and answer["code"] == "invalid_request"
    assert "sampler" in answer["error"]
    answer = daemon.ask({"caption": "x", "duration_s": 1, "velocity_ema_factor": 0.9})
    assert answer["ok"] is False and "velocity_ema_factor" in answer["error"]
    assert daemon.ask({"command": "ping"})["ok"]


def test_bad_time_signature_is_answered_as_an_invalid_request(daemon: Daemon):
    answer = daemon.ask({"caption": "x", "duration_s": 1, "time_signature": "banana"})
    assert answer["ok"] is False and answer["code"] == "invalid_request"
    assert "time_signature" in answer["error"]
    assert daemon.ask({"command": "ping"})["ok"]


def test_bad_requests_are_refused_at_once_while_a_long_job_runs(daemon: Daemon, tmp_path: Path):
    """Checks that need no model run before queueing: nothing waits behind the long job."""
    before = daemon.status()
    clip = tmp_path / "clip.wav"
    clip.write_bytes(b"")  # a readable file: the range alone makes the request bad
    long_request = {"caption": "long", "duration_s": 600, "progress": True}
    bad_requests = [
        (
            {"caption": "x", "task": "cover", "src_audio": str(tmp_path / "missing.wav")},
            "src_audio",
        ),
        (
            {
                "caption": "x",
                "task": "repaint",
                "src_audio": str(clip),
                "repaint_start_s": 5.0,
                "repaint_end_s": 2.0,
            },
            "repaint_end_s",
        ),
        ({"caption": "x", "time_signature": "7/5"}, "time_signature"),
        ({"caption": "x", "key": "H major"}, "key"),
    ]
    with running_job(daemon.socket, long_request):
        for request, field in bad_requests:
            answer = daemon.ask(request, timeout=10)
            assert answer["ok"] is False and answer["code"] == "invalid_request", answer
            assert field in answer["error"]
            status = daemon.status()
            assert status["busy"] is True and status["generated"] == before["generated"]
    assert daemon.ask({"command": "ping"})["ok"]


def test_the_journal_line_names_the_duration_generated(daemon: Daemon, tmp_path: Path):
    """A cover is as long as its source, whatever `duration_s` says; the log tells the truth."""
    source = tmp_path / "source.wav"
    soundfile.write(str(source), [[0.1, -0.1]] * (2 * 48000), 48000)
    output = tmp_path / "cover.wav"
    request = {"caption": "journal", "task": "cover", "src_audio": str(source), "seed": 3}
    answer = daemon.ask({**request, "duration_s": 30, "output": str(output)})
    assert answer["ok"] is True and answer["duration_s"] == pytest.approx(2.0), answer
    line = next(line for line in daemon.stderr().splitlines() if "request 'journal'" in line)
    assert " duration=2s seed=3 " in line
    assert "duration_s 30 ignored: a cover is as long as its source (2.0 s)" in answer["notes"]


def socat(daemon: Daemon, line: str, *args: str, cwd: Path | None = None) -> str:
    """Pipe one line through socat, as the ace-step-rs one-liner does; its stdout."""
    if shutil.which("socat") is None:
        if os.environ.get("CI"):
            pytest.fail("socat is not installed (.ci/run installs it)")
        pytest.skip("socat is not installed")
    return subprocess.run(
        ["socat", *args, "-", f"UNIX-CONNECT:{daemon.socket}"],
        input=line + "\n",
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
        cwd=cwd,
    ).stdout


def wait_for_log(daemon: Daemon, text: str, timeout: float = 120.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lines := [line for line in daemon.stderr().splitlines() if text in line]:
            return lines[-1]
        time.sleep(0.1)
    raise AssertionError(f"no log line with {text!r}:\n{daemon.stderr()}")


def test_socat_without_t_still_gets_its_file_and_a_relative_output_is_the_callers(
    daemon: Daemon, tmp_path: Path
):
    """The ace-step-rs one-liner: socat closes 0.5 s after its input ends, long before the
    job is done; a request naming its output finishes anyway (on_hangup "finish"), and a
    relative output lands in socat's working directory."""
    line = json.dumps({"caption": "no t", "duration_s": 20, "seed": 5, "output": "music.ogg"})
    assert socat(daemon, line, cwd=tmp_path) == ""  # gone before the answer
    output = tmp_path / "music.ogg"
    logged = wait_for_log(daemon, f"-> {output}")
    assert "'no t' duration=20s seed=5" in logged
    assert "client hung up; request goes on ('no t')" in daemon.stderr()
    assert_complete_audio(output, 20)


def test_a_spooled_request_is_cancelled_when_its_client_hangs_up(daemon: Daemon):
    before = daemon.status()
    assert socat(daemon, json.dumps({"caption": "spooled, unwanted", "duration_s": 60})) == ""
    wait_for_log(daemon, "client hung up; request cancelled ('spooled, unwanted')")
    deadline = time.monotonic() + 60
    while (status := daemon.status())["busy"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert status["cancelled"] == before["cancelled"] + 1
    assert status["generated"] == before["generated"]


def test_a_request_over_several_lines_is_told_to_send_one_line(daemon: Daemon):
    pretty = json.dumps({"caption": "x", "duration_s": 1}, indent=2)
    answers = [json.loads(line) for line in socat(daemon, pretty, "-t", "30").splitlines()]
    assert len(answers) == 1 and answers[0]["code"] == "invalid_request", answers
    assert "the request must be ONE line of JSON" in answers[0]["error"]


def test_answers_are_utf8_and_name_non_ascii_paths_as_they_are(daemon: Daemon, tmp_path: Path):
    output = tmp_path / "müsik" / "café ♪.wav"
    request = {"caption": "ünïcode", "duration_s": DURATION_S, "output": str(output)}
    (raw,) = send(daemon.socket, json.dumps(request).encode() + b"\n")
    assert str(output).encode() in raw and b"\\u" not in raw
    assert json.loads(raw)["path"] == str(output)
    assert_complete_audio(output, DURATION_S)


def test_status_counts_rejected_requests_apart_from_failed_ones(daemon: Daemon, tmp_path: Path):
    before = daemon.status()
    blip = tmp_path / "blip.wav"
    soundfile.write(str(blip), [[0.0, 0.0]] * 100, 48000)  # refused by the worker: too short
    bad = [
        b"{oops\n",
        json.dumps({"caption": "x", "language": "klingon"}).encode() + b"\n",
        json.dumps({"caption": "x", "task": "cover", "src_audio": str(blip)}).encode() + b"\n",
    ]
    for line in bad:
        (answer,) = [json.loads(a) for a in send(daemon.socket, line)]
        assert answer["code"] == "invalid_request", answer
    status = daemon.status()
    assert status["rejected"] == before["rejected"] + 3
    assert status["failed"] == before["failed"]
    language = daemon.ask({"caption": "x", "language": "klingon"})
    assert "language 'klingon' is not one the model knows" in language["error"]
    assert " en " in language["error"] and "yue" in language["error"]
