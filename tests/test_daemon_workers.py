"""Two workers behind one socket (`--devices cpu,cpu`): overlap, load, cancel, jobs, drain."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import soundfile

from tests.daemon_harness import (
    REPO,
    Daemon,
    ask,
    progress_client,
    read_line,
    running,
    spawn,
    until_running,
)

LONG = {"duration_s": 60, "progress": True}
ACESTEP_REQUEST = (sys.executable, "-m", "acestep_daemon", "request")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path):
    tmp = tmp_path_factory.mktemp("workers")
    args = ("--model-dir", str(tiny_checkpoint), "--devices", "cpu,cpu", "--queue-limit", "4")
    with running(tmp, *args) as d:
        yield d


def final(client: socket.socket) -> dict[str, Any]:
    while "progress" in (answer := read_line(client)):
        pass
    return answer


def test_status_lists_every_worker(daemon: Daemon):
    status = daemon.status()
    assert (status["device"], status["loaded"], status["loads"]) == ("cpu", True, 2)
    assert [w["device"] for w in status["workers"]] == ["cpu", "cpu"]
    assert all(w["loaded"] and not w["busy"] and w["job"] is None for w in status["workers"])


def test_two_long_jobs_run_at_once_and_cancel_stops_each(daemon: Daemon, tmp_path: Path):
    with ExitStack() as stack:
        clients = [
            stack.enter_context(progress_client(daemon.socket, {"caption": f"l{i}", **LONG}))
            for i in range(2)
        ]
        ids = [until_running(client) for client in clients]  # both ran a stage: overlap
        workers = daemon.status()["workers"]
        assert all(w["busy"] for w in workers)
        assert sorted(w["job"] for w in workers) == sorted(ids)
        jobs = daemon.ask({"command": "jobs"})["jobs"]
        assert {(j["id"], j["state"], j["position"]) for j in jobs} == {
            (ids[0], "running", 0),
            (ids[1], "running", 0),
        }
        assert sorted(j["worker"] for j in jobs) == [0, 1]
        for job_id, client in zip(ids, clients, strict=True):
            answer = daemon.ask({"command": "cancel", "id": job_id})
            assert answer == {
                "ok": True,
                "message": f"cancelled job {job_id} (running)",
                "id": job_id,
                "was": "running",
            }
            own = final(client)
            assert (own["ok"], own["code"], own["id"]) == (False, "cancelled", job_id)
    again = daemon.ask({"command": "cancel", "id": ids[0]})
    assert (again["code"], again["ended"]) == ("already_finished", "cancelled")
    assert daemon.ask({"command": "jobs"}) == {"ok": True, "jobs": []}


def test_queued_job_is_cancelled_at_once_and_ids_are_answered_truthfully(
    daemon: Daemon, tmp_path: Path
):
    done = daemon.ask({"caption": "short", "duration_s": 1, "output": str(tmp_path / "s.wav")})
    assert done["ok"] and done["id"]
    finished = daemon.ask({"command": "cancel", "id": done["id"]})
    assert (finished["ok"], finished["code"], finished["ended"]) == (
        False,
        "already_finished",
        "ok",
    )
    unknown = daemon.ask({"command": "cancel", "id": "nosuchjob"})
    assert (unknown["ok"], unknown["code"]) == (False, "unknown_job")
    assert daemon.ask({"command": "cancel"})["code"] == "invalid_request"
    with ExitStack() as stack:
        running_clients = [
            stack.enter_context(progress_client(daemon.socket, {"caption": f"b{i}", **LONG}))
            for i in range(2)
        ]
        running_ids = [until_running(client) for client in running_clients]
        waiting = stack.enter_context(progress_client(daemon.socket, {"caption": "w", **LONG}))
        queued = read_line(waiting)["progress"]
        assert (queued["stage"], queued["position"]) == ("queued", 1)
        jobs = daemon.ask({"command": "jobs"})["jobs"]
        assert jobs[-1] == {
            "id": queued["id"],
            "state": "queued",
            "position": 1,
            "worker": None,
            "caption": "w",
            "duration_s": 60,
        }
        cancel = subprocess.run(
            [*ACESTEP_REQUEST, "--socket", str(daemon.socket), "--cancel", queued["id"]],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert cancel.returncode == 0, cancel.stderr
        assert json.loads(cancel.stdout)["was"] == "queued"
        own = final(waiting)
        assert (own["code"], own["id"]) == ("cancelled", queued["id"])
        listed = subprocess.run(
            [sys.executable, "acestep_daemon/client.py", "--socket", str(daemon.socket), "--jobs"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert sorted(j["id"] for j in json.loads(listed.stdout)["jobs"]) == sorted(running_ids)
        for job_id in running_ids:
            assert daemon.ask({"command": "cancel", "id": job_id})["ok"]


def test_two_hundred_clients_lose_nothing(daemon: Daemon, tmp_path: Path):
    before = daemon.status()
    count = 200
    answers: list[list[dict]] = [[] for _ in range(count)]

    def client(i: int) -> None:
        request = {"caption": f"c{i}", "duration_s": 1, "output": str(tmp_path / f"{i}.wav")}
        answers[i] = ask(daemon.socket, request, timeout=600)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(len(a) == 1 for a in answers), answers
    finals = [a[0] for a in answers]
    ok = [f for f in finals if f["ok"]]
    busy = [f for f in finals if not f["ok"] and f["code"] == "busy"]
    assert len(ok) + len(busy) == count, [f for f in finals if f not in ok + busy]
    assert ok and busy and len({f["id"] for f in ok}) == len(ok)
    for f in ok:
        info = soundfile.info(f["path"])
        assert (info.samplerate, info.channels, info.frames) == (48000, 2, 48000)
    after = daemon.status()
    assert after["generated"] == before["generated"] + len(ok)
    served = [
        a["generated"] - b["generated"]
        for a, b in zip(after["workers"], before["workers"], strict=True)
    ]
    assert sum(served) == len(ok)


def test_sigterm_drains_both_workers(tmp_path: Path, tiny_checkpoint: Path):
    daemon = spawn(tmp_path, "--model-dir", str(tiny_checkpoint), "--devices", "cpu,cpu")
    daemon.wait_ready()
    outputs = [tmp_path / f"drain{i}.wav" for i in range(2)]
    with ExitStack() as stack:
        clients = [
            stack.enter_context(
                progress_client(
                    daemon.socket,
                    {"caption": f"d{i}", "duration_s": 20, "progress": True, "output": str(out)},
                )
            )
            for i, out in enumerate(outputs)
        ]
        for client in clients:
            until_running(client)
        queued: list[dict] = []
        waiter = threading.Thread(
            target=lambda: queued.extend(ask(daemon.socket, {"caption": "q", "duration_s": 1}))
        )
        waiter.start()
        deadline = time.monotonic() + 30
        while daemon.status()["queue_depth"] != 1:
            assert time.monotonic() < deadline
        daemon.proc.send_signal(signal.SIGTERM)
        finals = [final(client) for client in clients]
        waiter.join(60)
    assert daemon.proc.wait(60) == 0, daemon.stderr()
    assert [f["ok"] for f in finals] == [True, True], finals
    assert all(out.is_file() for out in outputs)
    assert [q["code"] for q in queued] == ["shutting_down"]
