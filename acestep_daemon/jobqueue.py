"""The job queue of several machines, on Redis Streams: its keys and its messages.

One stream per served model, `{prefix}:jobs:{model}`, holds its jobs without adapters;
jobs with adapters go to a stream per set of adapter files, `{prefix}:jobs:{model}@{digest}`
(listed in the set `{prefix}:streams:{model}`), so that a worker can look first where the
adapters it holds are asked for. Each stream's consumer group `workers` gives each entry to
one worker, which acknowledges it only after it has
posted the answer: the entry of a worker that died stays pending and another worker
claims it once it has been idle for `claim_idle_s` (XAUTOCLAIM). A worker keeps the
entries it runs fresh by re-claiming them every few seconds.

Per job `{id}`:
  `{prefix}:reply:{id}`   a stream of events from the worker to the front: `taken`,
                          `progress`, `done` (the wire answer and the encoded audio)
  `{prefix}:cancel:{id}`  set by a front: the worker stops the job at its next step
  `{prefix}:done:{id}`    set with the answer: a redelivered entry that was already
                          answered (its worker died before acknowledging) is dropped
A front keeps the jobs it accepted in the hash `{prefix}:front:{name}` until it has
written their files, and follows them again after a restart. Workers publish their
status in the hash `{prefix}:workers:{model}` every `STATUS_EVERY_S`.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis

from acestep_daemon.errors import AceStepError
from acestep_daemon.options import CLAIM_IDLE_S

__all__ = ["CLAIM_IDLE_S", "GROUP", "Keys", "QueueUnavailable", "connect"]

GROUP = "workers"
"""The consumer group of the workers on every jobs stream."""

REPLY_TTL_S = 24 * 3600
"""How long a job's reply stream and marks outlive their last event."""

STATUS_EVERY_S = 2.0
"""How often a worker publishes its status; a front ignores one older than five times this."""

INPUT_FILES = ("src_audio", "reference_audio")
"""Request fields naming a file on the front's machine: their bytes travel in the entry."""


class QueueUnavailable(AceStepError):
    """The queue's server cannot be reached or refused a command."""


@dataclass(frozen=True)
class Keys:
    """The Redis keys of one model's queue under `prefix`."""

    prefix: str
    model: str

    @property
    def jobs(self) -> str:
        return f"{self.prefix}:jobs:{self.model}"

    @property
    def streams(self) -> str:
        """The set of this model's adapter streams."""
        return f"{self.prefix}:streams:{self.model}"

    def jobs_for(self, adapters: Sequence[str]) -> str:
        """The stream of jobs with these adapter files (the model's own without any)."""
        if not adapters:
            return self.jobs
        digest = hashlib.sha1("\n".join(sorted(adapters)).encode()).hexdigest()[:12]
        return f"{self.jobs}@{digest}"

    @property
    def workers(self) -> str:
        return f"{self.prefix}:workers:{self.model}"

    def reply(self, job_id: str) -> str:
        return f"{self.prefix}:reply:{job_id}"

    def cancel(self, job_id: str) -> str:
        return f"{self.prefix}:cancel:{job_id}"

    def done(self, job_id: str) -> str:
        return f"{self.prefix}:done:{job_id}"

    def front(self, name: str) -> str:
        return f"{self.prefix}:front:{name}"


def connect(url: str, keys: Keys) -> redis.Redis:
    """A client of the queue at `url` (redis://, rediss://, unix://), its group created."""
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=5.0, health_check_interval=30)
        client.ping()
        create_group(client, keys.jobs)
    except (redis.RedisError, ValueError) as error:
        raise QueueUnavailable(f"cannot reach the queue {redacted(url)}: {error}") from error
    return client


def create_group(client: redis.Redis, stream: str) -> None:
    """The workers' group on `stream` (and the stream), unless they exist already."""
    try:
        client.xgroup_create(stream, GROUP, id="0", mkstream=True)
    except redis.ResponseError as error:
        if "BUSYGROUP" not in str(error):
            raise


def redacted(url: str) -> str:
    """`url` without its password, for logs and answers."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + netloc))


def consumer_name() -> str:
    """This process in the group: `host:pid` (a restarted worker is a new consumer)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def event(kind: str, data: dict[str, Any], audio: list[bytes] = ()) -> dict[str, Any]:
    """The fields of one reply-stream entry: its kind, JSON data, encoded files in order."""
    fields: dict[str, Any] = {"event": kind, "data": json.dumps(data, ensure_ascii=False)}
    fields.update({f"audio:{i}": blob for i, blob in enumerate(audio)})
    return fields


def parse_event(fields: dict[bytes, bytes]) -> tuple[str, dict[str, Any], list[bytes]]:
    """A reply-stream entry → (kind, data, encoded files in order)."""
    kind = fields[b"event"].decode()
    data = json.loads(fields[b"data"])
    audio = [fields[f"audio:{i}".encode()] for i in range(len(fields) - 2)]
    return kind, data, audio


def text(fields: dict[bytes, bytes], name: str) -> str | None:
    """A field of an entry as text; None when it is missing."""
    value = fields.get(name.encode())
    return None if value is None else value.decode("utf-8", "replace")
