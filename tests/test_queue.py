"""Several daemons on one job queue: a real `redis-server`, a front, tiny CPU workers.

The front (`serve --front --queue URL`) takes the socket's requests; workers (`serve
--queue URL`) take the jobs. Everything runs for real: the Redis server from the
distribution's package on a Unix socket, the daemons as processes, the clients on the
front's socket.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import redis
import soundfile

from acestep_daemon.tiny import dit_config, make_tiny_lora
from tests.daemon_harness import (
    Daemon,
    ask,
    daemon_env,
    progress_client,
    read_line,
    spawn,
    until_running,
)

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="needs redis-server (.ci/run installs it)"
)

LONG = {"caption": "long", "duration_s": 120, "progress": True}


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private redis-server on a Unix socket (no TCP port, nothing saved)."""
    folder = tmp_path_factory.mktemp("redis")
    sock = folder / "redis.sock"
    server = subprocess.Popen(
        [
            "redis-server",
            "--port",
            "0",
            "--unixsocket",
            str(sock),
            "--unixsocketperm",
            "700",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(folder),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"unix://{sock}"
    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis.from_url(url).ping()
            break
        except redis.ConnectionError:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
    yield url
    server.terminate()
    server.wait(10)


class Farm:
    """A front and workers on one queue (a prefix of their own), killed at the end."""

    def __init__(self, tmp: Path, url: str, prefix: str, checkpoint: Path) -> None:
        self.tmp = tmp
        self.url = url
        self.prefix = prefix
        self.checkpoint = checkpoint
        self.daemons: list[Daemon] = []
        self.queue = redis.Redis.from_url(url)
        self.temporary = tmp / "tmp"

    def _queue_args(self) -> tuple[str, ...]:
        return ("--queue", self.url, "--queue-name", self.prefix, "--claim-idle", "2")

    def front(self) -> Daemon:
        front = spawn(self.tmp / "front", "--front", *self._queue_args())
        self.daemons.append(front)
        wait_answering(front)
        return front

    def worker(self, name: str) -> Daemon:
        """A worker whose temporary directory (its private folder's home) is the farm's."""
        args = ("--model-dir", str(self.checkpoint), *self._queue_args())
        self.temporary.mkdir(exist_ok=True)
        env = daemon_env(self.tmp / name, TMPDIR=str(self.temporary))
        worker = spawn(self.tmp / name, *args, env=env)
        self.daemons.append(worker)
        worker.wait_ready()
        return worker

    def close(self) -> None:
        for daemon in self.daemons:
            if daemon.proc.poll() is None:
                daemon.proc.kill()
                daemon.proc.wait()


@pytest.fixture
def farm(tmp_path: Path, redis_url: str, tiny_checkpoint: Path) -> Iterator[Farm]:
    for name in ("front", "one", "two"):
        (tmp_path / name).mkdir()
    farm = Farm(tmp_path, redis_url, f"test-{tmp_path.name}", tiny_checkpoint)
    yield farm
    farm.close()


def wait_answering(daemon: Daemon, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert daemon.proc.poll() is None, daemon.stderr()
        try:
            if daemon.ask({"command": "ping"})["ok"]:
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"no answer after {timeout} s:\n{daemon.stderr()}")


def worker_name(daemon: Daemon) -> str:
    """A worker daemon's consumer name in the group."""
    return f"{socket.gethostname()}:{daemon.proc.pid}"


def final(lines: list[dict[str, Any]]) -> dict[str, Any]:
    """The one answer among a progress client's lines."""
    answers = [line for line in lines if "progress" not in line]
    assert len(answers) == 1, lines
    return answers[0]


def rest(client: Any) -> list[dict[str, Any]]:
    """The remaining lines of a progress client, to its end."""
    lines = []
    while True:
        try:
            lines.append(read_line(client))
        except AssertionError:
            return lines


def test_jobs_spread_over_two_workers_and_files_land_at_the_clients_paths(farm: Farm) -> None:
    front = farm.front()
    one, two = farm.worker("one"), farm.worker("two")
    deadline = time.monotonic() + 10  # workers publish their status every 2 s
    while not (status := front.status())["loaded"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert {w["daemon"] for w in status["workers"]} == {worker_name(one), worker_name(two)}
    assert status["loaded"] and status["queue"] == farm.url

    out = farm.tmp / "out"
    requests = [
        {"caption": f"job {i}", "duration_s": 5, "output": str(out / f"{i}.flac")} for i in range(6)
    ]
    requests.append(
        {"caption": "takes", "duration_s": 5, "seeds": [7, 8], "output": str(out / "takes.wav")}
    )
    answers: list[dict[str, Any]] = [{}] * len(requests)

    def one_request(i: int) -> None:
        answers[i] = ask(front.socket, requests[i], timeout=300)[0]

    threads = [threading.Thread(target=one_request, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert all(a["ok"] for a in answers), answers
    assert {a["worker"] for a in answers} == {worker_name(one), worker_name(two)}
    for request, answer in zip(requests[:-1], answers[:-1], strict=True):
        assert answer["path"] == request["output"]
        assert soundfile.info(answer["path"]).format == "FLAC"
    takes = answers[-1]["takes"]
    assert [t["path"] for t in takes] == [str(out / "takes-7.wav"), str(out / "takes-8.wav")]
    assert [t["seed"] for t in takes] == [7, 8]
    assert all(soundfile.info(t["path"]).duration > 4 for t in takes)
    assert not list(out.glob(".*")), "a temporary file stayed"
    assert farm.queue.xlen(f"{farm.prefix}:jobs:turbo") == 0  # every entry answered and gone
    assert not farm.queue.hlen(f"{farm.prefix}:front:{front_hash_name(front)}")


def front_hash_name(front: Daemon) -> str:
    """The name of a front's hash of accepted jobs."""
    return f"{socket.gethostname()}:{front.socket}"


def test_a_worker_killed_mid_job_its_job_is_answered_once_by_another(farm: Farm) -> None:
    front = farm.front()
    doomed = farm.worker("one")
    output = farm.tmp / "out" / "survivor.ogg"
    with progress_client(front.socket, {**LONG, "duration_s": 30, "output": str(output)}) as c:
        until_running(c)
        doomed.proc.send_signal(signal.SIGKILL)
        doomed.proc.wait()
        heir = farm.worker("two")
        answer = final(rest(c))
    assert answer["ok"], answer
    assert answer["worker"] == worker_name(heir)
    assert answer["path"] == str(output) and soundfile.info(output).duration > 29
    assert "took over entry" in heir.stderr()
    assert farm.queue.xlen(f"{farm.prefix}:jobs:turbo") == 0
    # the dead worker's private folder went when the heir started; the heir's is there
    folders = [f.name for f in farm.temporary.iterdir()]
    assert len(folders) == 1 and folders[0].startswith(f"acestep-queue-{heir.proc.pid}-")
    assert "left by a worker that died" in heir.stderr()


def test_cancel_through_the_queue_queued_and_running(farm: Farm) -> None:
    front = farm.front()
    worker = farm.worker("one")
    with (
        progress_client(front.socket, LONG) as running,
        progress_client(front.socket, LONG) as waiting,
    ):
        running_id = until_running(running)
        waiting_id = read_line(waiting)["progress"]["id"]
        jobs = front.ask({"command": "jobs"})["jobs"]
        assert [(j["id"], j["state"]) for j in jobs] == [
            (running_id, "running"),
            (waiting_id, "queued"),
        ]
        assert jobs[0]["worker"] == worker_name(worker)

        answer = front.ask({"command": "cancel", "id": waiting_id})
        assert answer == {
            "ok": True,
            "message": f"cancelled job {waiting_id} (queued)",
            "id": waiting_id,
            "was": "queued",
        }
        assert final(rest(waiting))["code"] == "cancelled"

        started = time.monotonic()
        answer = front.ask({"command": "cancel", "id": running_id})
        assert answer["ok"] and answer["was"] == "running", answer
        assert time.monotonic() - started < 30  # at its next step, not at its end
        cancelled = final(rest(running))
        assert cancelled["code"] == "cancelled" and cancelled["worker"] == worker_name(worker)

    again = front.ask({"command": "cancel", "id": running_id})
    assert again["code"] == "already_finished"
    assert front.ask({"command": "cancel", "id": "0123456789ab"})["code"] == "unknown_job"
    assert front.ask({"caption": "after", "duration_s": 5})["ok"]
    assert worker.status()["cancelled"] == 1  # the queued one never reached the worker


def test_bad_jobs_are_answered_and_the_worker_keeps_going(farm: Farm) -> None:
    front = farm.front()
    worker = farm.worker("one")
    jobs = f"{farm.prefix}:jobs:turbo"
    farm.queue.xadd(jobs, {"no": "id"})
    farm.queue.xadd(jobs, {"id": "../escape", "params": "{}", "suffix": "/../../x.wav"})
    farm.queue.xadd(jobs, {"id": "poison1", "params": "{not json"})
    farm.queue.xadd(jobs, {"id": "poison2", "params": json.dumps({"caption": 3})})
    for job_id in ("poison1", "poison2"):
        reply = farm.queue.xread({f"{farm.prefix}:reply:{job_id}": "0"}, block=20_000)
        ((_, events),) = reply
        done = json.loads(events[-1][1][b"data"])
        assert done["code"] == "invalid_request" and done["id"] == job_id, done
    deadline = time.monotonic() + 10
    while farm.queue.xlen(jobs) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert farm.queue.xlen(jobs) == 0  # acknowledged and gone, the one without an id too

    refused = front.ask({"caption": "x", "duraton_s": 5})
    assert refused["code"] == "invalid_request" and "duraton_s" in refused["error"]
    unload = front.ask({"command": "unload"})
    assert not unload["ok"] and "queue front" in unload["error"]
    assert front.ask({"caption": "fine", "duration_s": 5})["ok"]
    assert worker.proc.poll() is None and worker.status()["loaded"]


def test_a_front_killed_and_restarted_still_writes_the_file(farm: Farm) -> None:
    front = farm.front()
    farm.worker("one")
    output = farm.tmp / "out" / "kept.opus"
    with progress_client(front.socket, {**LONG, "duration_s": 20, "output": str(output)}) as c:
        job_id = until_running(c)
        front.proc.send_signal(signal.SIGKILL)
        front.proc.wait()
    assert not output.exists()
    restarted = farm.front()
    deadline = time.monotonic() + 120
    while not output.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert soundfile.info(output).duration > 19
    assert f"following job {job_id} again" in restarted.stderr()
    hash_key = f"{farm.prefix}:front:{front_hash_name(restarted)}"
    deadline = time.monotonic() + 5
    while farm.queue.hlen(hash_key) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not farm.queue.hlen(hash_key)


def test_a_job_with_adapters_goes_to_the_worker_that_holds_them(farm: Farm) -> None:
    lora = str(make_tiny_lora(farm.tmp / "lora", dit_config("turbo")))
    front = farm.front()
    warm = farm.worker("one")
    first = front.ask({"caption": "a", "duration_s": 5, "lora": lora})
    assert first["ok"] and first["worker"] == worker_name(warm)
    cold = farm.worker("two")

    with ExitStack() as stack:  # both workers busy; then a plain job, then one with the LoRA
        busy = [stack.enter_context(progress_client(front.socket, LONG)) for _ in range(2)]
        busy_ids = [until_running(client) for client in busy]
        answers: dict[str, dict[str, Any]] = {}

        def request(name: str, extra: dict[str, Any]) -> None:
            answers[name] = front.ask({"caption": name, "duration_s": 5, **extra}, timeout=300)

        threads = [
            threading.Thread(target=request, args=("plain", {})),
            threading.Thread(target=request, args=("adapted", {"lora": lora})),
        ]
        for thread in threads:
            thread.start()
            until_queued(front, len(busy) + threads.index(thread) + 1)
        # The warm worker frees up first: it takes the LoRA job, queued after the plain one.
        on = {job["id"]: job["worker"] for job in front.ask({"command": "jobs"})["jobs"]}
        busy_ids.sort(key=lambda job_id: on[job_id] != worker_name(warm))
        assert front.ask({"command": "cancel", "id": busy_ids[0]})["ok"]
        until_running_on(front, worker_name(warm))
        assert front.ask({"command": "cancel", "id": busy_ids[1]})["ok"]
        for thread in threads:
            thread.join()
    assert answers["adapted"]["ok"] and answers["plain"]["ok"], answers
    assert answers["adapted"]["worker"] == worker_name(warm)
    assert answers["adapted"]["adapters"] == [{"path": lora, "scale": 1.0, "kind": "lora"}]
    assert answers["plain"]["worker"] == worker_name(cold)


def until_queued(front: Daemon, count: int) -> None:
    """Until the front has `count` jobs."""
    deadline = time.monotonic() + 30
    while len(front.ask({"command": "jobs"})["jobs"]) < count:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def until_running_on(front: Daemon, worker: str) -> None:
    """Until the front has a running job on `worker`."""
    deadline = time.monotonic() + 30
    while not any(
        job["state"] == "running" and job["worker"] == worker
        for job in front.ask({"command": "jobs"})["jobs"]
    ):
        assert time.monotonic() < deadline
        time.sleep(0.05)
