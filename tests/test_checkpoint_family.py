"""Every model of the family: its DiT folder in an explicit checkpoint, or its own Hub repo."""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub.errors import LocalEntryNotFoundError

from acestep_daemon import checkpoint
from acestep_daemon.checkpoint import (
    DIT_PATTERNS,
    HF_REPO_ID,
    SHARED_PATTERNS,
    CheckpointPaths,
    resolve_checkpoint,
)
from acestep_daemon.errors import CheckpointError
from acestep_daemon.tiny import dit_folder, make_tiny_checkpoint


@pytest.fixture(autouse=True)
def no_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ACESTEP_MODEL_DIR", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(checkpoint.hf_constants, "HF_HUB_OFFLINE", False)


def test_explicit_folder_uses_the_models_own_dit_folder(tmp_path: Path) -> None:
    root = make_tiny_checkpoint(tmp_path / "ckpt", variant="xl-sft")
    paths = resolve_checkpoint(root, model="xl-sft")
    assert paths.dit_dir == root / dit_folder("xl-sft") == root / "acestep-v15-xl-sft"
    with pytest.raises(CheckpointError, match=r"acestep-v15-turbo/config\.json"):
        resolve_checkpoint(root)  # the turbo DiT is not there


class TwoRepoHub:
    """snapshot_download for two repos: the shared one and a DiT repo; logs every call."""

    def __init__(self, cache: Path, source: Path) -> None:
        self.cache, self.source = cache, source
        self.calls: list[tuple[str, bool]] = []

    def __call__(self, repo_id: str, **kwargs: object) -> str:
        local = bool(kwargs.get("local_files_only"))
        self.calls.append((repo_id, local))
        target = self.cache / repo_id.replace("/", "--")
        if local and not target.exists():
            raise LocalEntryNotFoundError("not cached")
        if not local:
            patterns = kwargs["allow_patterns"]
            if repo_id == HF_REPO_ID:
                assert patterns == SHARED_PATTERNS
                for folder in ("vae", "Qwen3-Embedding-0.6B"):
                    _copy(self.source / folder, target / folder)
            else:
                assert patterns == DIT_PATTERNS
                _copy(self.source / "acestep-v15-sft", target)
        return str(target)


def _copy(source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        (target / file.name).write_bytes(file.read_bytes())


def test_hub_download_fetches_the_shared_folders_and_the_dit_repo_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = make_tiny_checkpoint(tmp_path / "source", variant="sft")
    hub = TwoRepoHub(tmp_path / "cache", source)
    monkeypatch.setattr(checkpoint, "snapshot_download", hub)
    paths = resolve_checkpoint(None, model="sft")
    assert isinstance(paths, CheckpointPaths)
    assert paths.dit_dir == tmp_path / "cache" / "ACE-Step--acestep-v15-sft"
    assert (paths.vae_dir / "config.json").is_file()
    downloads = [repo for repo, local in hub.calls if not local]
    assert downloads == [HF_REPO_ID, "ACE-Step/acestep-v15-sft"]
    hub.calls.clear()
    resolve_checkpoint(None, model="sft")  # now cached: no download
    assert all(local for _, local in hub.calls)


def test_offline_without_the_dit_repo_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = TwoRepoHub(tmp_path / "cache", tmp_path)
    monkeypatch.setattr(checkpoint, "snapshot_download", hub)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match=r"no copy of ACE-Step/Ace-Step1\.5"):
        resolve_checkpoint(None, model="xl-turbo")
