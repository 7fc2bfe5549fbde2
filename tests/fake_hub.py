"""A stand-in for `huggingface_hub.snapshot_download`, shared by the checkpoint tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from huggingface_hub.errors import LocalEntryNotFoundError

from acestep_daemon import checkpoint


class FakeHub:
    """One repo snapshot folder and a log of the calls made to fetch it.

    `fill(folder)` writes the repo's files into a folder: the snapshot holds them from the
    start when `cached`, else after the first download. A download raises `fail_download`
    when one is set.
    """

    def __init__(self, snapshot: Path, fill: Callable[[Path], object], *, cached: bool) -> None:
        self.snapshot, self.fill = snapshot, fill
        self.calls: list[dict] = []
        self.fail_download: Exception | None = None
        if cached:
            fill(snapshot)

    def __call__(self, repo_id: str, **kwargs: object) -> str:
        self.calls.append({"repo_id": repo_id, **kwargs})
        if kwargs.get("local_files_only"):
            if not self.snapshot.is_dir():
                raise LocalEntryNotFoundError("no cached snapshot")
            return str(self.snapshot)
        if self.fail_download is not None:
            raise self.fail_download
        self.fill(self.snapshot)
        return str(self.snapshot)

    @property
    def downloads(self) -> list[dict]:
        return [call for call in self.calls if not call.get("local_files_only")]

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
        """Make `acestep_daemon.checkpoint` download through this hub; returns it."""
        monkeypatch.setattr(checkpoint, "snapshot_download", self)
        return self


@pytest.fixture(autouse=True)
def no_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    """Autouse in the modules that import it: no model folder or offline switch from the
    environment reaches the checkpoint resolution under test."""
    monkeypatch.delenv("ACESTEP_MODEL_DIR", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(checkpoint.hf_constants, "HF_HUB_OFFLINE", False)
