"""The daemon's options and their defaults, in one place: `acestep serve` and the server read them.

Torch-free, so that building the command line costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from acestep_daemon.family import DEFAULT_MODEL

QUEUE_LIMIT = 16
"""Waiting requests before the daemon answers "busy"."""

QUEUE_PREFIX = "acestep"
"""The prefix of the job queue's keys (`--queue-name`)."""

CLAIM_IDLE_S = 30.0
"""A queue job whose worker has not re-claimed it for this long goes to another worker."""

QUANTIZE_SCHEMES = ("int8", "fp8")
"""What `--quantize` takes; `model.quantize.quantization_kind` says what each runs as."""


@dataclass(frozen=True)
class ServerOptions:
    """How the daemon listens, whom it serves, and how long it waits."""

    socket_path: Path
    socket_mode: int = 0o600
    """Only the owner may connect unless asked otherwise."""
    allow_uids: frozenset[int] = field(default_factory=frozenset)
    """Users besides the owner (and root) who may send requests."""
    allow_gids: frozenset[int] = field(default_factory=frozenset)
    read_timeout_s: float = 30.0
    """A connection that sends no complete request line in this time is answered and closed."""
    shutdown_grace_s: float = 60.0
    """On SIGTERM/SIGINT the running request may finish within this time."""
    queue_limit: int = QUEUE_LIMIT
    idle_unload_s: float | None = None
    """Unload the pipeline after this long without requests (None: never)."""
    model: str = DEFAULT_MODEL
    """The DiT served (a `family.MODELS` name): requests are checked against it."""
    compile: bool = False
    """Compile the DiT's layers with `torch.compile`, warmed up at load. Off by default until
    an idle-machine benchmark shows it pays (README, Performance)."""
