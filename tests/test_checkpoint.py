"""Finding, downloading (up to the network boundary) and verifying the checkpoint folders."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from fake_hub import FakeHub, no_env_overrides  # noqa: F401 (an autouse fixture)

from acestep_daemon.checkpoint import (
    ALLOW_PATTERNS,
    HF_REPO_ID,
    REQUIRED_FILES,
    CheckpointPaths,
    resolve_checkpoint,
)
from acestep_daemon.errors import CheckpointError

REPO_ROOT = Path(__file__).resolve().parents[1]
ALL_FILES = [f"{folder}/{name}" for folder, names in REQUIRED_FILES.items() for name in names]


def write_layout(root: Path, skip: str | None = None) -> Path:
    """Every required file with placeholder content, except `skip`."""
    for relative in ALL_FILES:
        if relative != skip:
            (root / relative).parent.mkdir(parents=True, exist_ok=True)
            (root / relative).write_text("x")
    return root


def checkpoint_hub(cache: Path, cached: bool) -> FakeHub:
    """The hub's cache of the checkpoint repo, holding the whole layout when `cached`."""
    return FakeHub(cache / "snapshots" / "0123abcd", write_layout, cached=cached)


def test_checkpoint_paths_name_the_three_folders(tmp_path: Path) -> None:
    paths = CheckpointPaths(tmp_path)
    assert paths.dit_dir == tmp_path / "acestep-v15-turbo"
    assert paths.vae_dir == tmp_path / "vae"
    assert paths.text_dir == tmp_path / "Qwen3-Embedding-0.6B"


def test_explicit_model_dir_is_verified_and_used_without_the_hub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = checkpoint_hub(tmp_path / "cache", cached=True).install(monkeypatch)
    root = write_layout(tmp_path / "weights")
    assert resolve_checkpoint(root) == CheckpointPaths(root)
    assert hub.calls == []


def test_model_dir_env_variable_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = checkpoint_hub(tmp_path / "cache", cached=False).install(monkeypatch)
    root = write_layout(tmp_path / "weights")
    monkeypatch.setenv("ACESTEP_MODEL_DIR", str(root))
    assert resolve_checkpoint(None).root == root
    assert hub.calls == []


@pytest.mark.parametrize("missing", ALL_FILES)
def test_missing_file_is_a_clear_error_naming_it(tmp_path: Path, missing: str) -> None:
    root = write_layout(tmp_path, skip=missing)
    with pytest.raises(CheckpointError, match=re.escape(missing)) as info:
        resolve_checkpoint(root)
    assert "--model-dir" in str(info.value)


def test_empty_file_counts_as_missing(tmp_path: Path) -> None:
    root = write_layout(tmp_path)
    (root / "vae/diffusion_pytorch_model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=re.escape("vae/diffusion_pytorch_model.safetensors")):
        resolve_checkpoint(root)


def test_model_dir_that_does_not_exist_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nowhere")


def test_complete_cached_snapshot_is_used_without_downloading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = checkpoint_hub(tmp_path, cached=True).install(monkeypatch)
    assert resolve_checkpoint(None).root == hub.snapshot
    assert hub.downloads == []
    assert hub.calls[0]["allow_patterns"] == ALLOW_PATTERNS


def test_uncached_checkpoint_downloads_only_the_three_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = checkpoint_hub(tmp_path, cached=False).install(monkeypatch)
    paths = resolve_checkpoint(None)
    assert paths.root == hub.snapshot and paths.missing_files() == []
    assert [call["local_files_only"] for call in hub.calls[:1]] == [True]
    (download,) = hub.downloads
    assert download["repo_id"] == HF_REPO_ID == "ACE-Step/Ace-Step1.5"
    assert sorted(download["allow_patterns"]) == [
        "Qwen3-Embedding-0.6B/*",
        "acestep-v15-turbo/*",
        "vae/*",
    ]
    assert download["tqdm_class"] is not None


def test_incomplete_cached_snapshot_is_completed_by_a_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = checkpoint_hub(tmp_path, cached=False).install(monkeypatch)
    write_layout(hub.snapshot, skip="acestep-v15-turbo/silence_latent.pt")
    assert resolve_checkpoint(None).missing_files() == []
    assert len(hub.downloads) == 1


def test_incomplete_cached_snapshot_without_downloads_names_the_missing_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = checkpoint_hub(tmp_path, cached=False).install(monkeypatch)
    write_layout(hub.snapshot, skip="Qwen3-Embedding-0.6B/tokenizer.json")
    with pytest.raises(CheckpointError, match=re.escape("Qwen3-Embedding-0.6B/tokenizer.json")):
        resolve_checkpoint(None, download=False)
    assert hub.downloads == []


def test_offline_hub_never_downloads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = checkpoint_hub(tmp_path, cached=False).install(monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE"):
        resolve_checkpoint(None)
    assert hub.downloads == []


def test_failed_download_is_a_checkpoint_error_saying_how_to_get_the_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = checkpoint_hub(tmp_path, cached=False).install(monkeypatch)
    hub.fail_download = ConnectionError("Name or service not known")
    with pytest.raises(CheckpointError, match="could not download") as info:
        resolve_checkpoint(None)
    assert "hf download ACE-Step/Ace-Step1.5 --include" in str(info.value)


def run_resolve(hf_home: Path) -> subprocess.CompletedProcess[str]:
    """resolve_checkpoint(None) in a fresh process with the real huggingface_hub, offline."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "ACESTEP_"))}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    code = (
        "from acestep_daemon.checkpoint import resolve_checkpoint\n"
        "from acestep_daemon.errors import CheckpointError\n"
        "try:\n    print(resolve_checkpoint(None).root)\n"
        "except CheckpointError as exc:\n    print(exc)\n    raise SystemExit(3)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )


def test_offline_with_an_empty_cache_says_how_to_get_the_weights(tmp_path: Path) -> None:
    result = run_resolve(tmp_path / "empty-hf-home")
    assert result.returncode == 3, result.stderr
    message = result.stdout
    assert "no copy of ACE-Step/Ace-Step1.5 in the Hugging Face cache" in message
    assert "HF_HUB_OFFLINE" in message
    assert (
        "hf download ACE-Step/Ace-Step1.5 --include "
        "'acestep-v15-turbo/*' 'vae/*' 'Qwen3-Embedding-0.6B/*'" in message
    )
    assert "--model-dir" in message and "ACESTEP_MODEL_DIR" in message
    assert "Traceback" not in result.stderr


def test_offline_with_a_cached_snapshot_uses_it(tmp_path: Path) -> None:
    repo_cache = tmp_path / "hub" / "models--ACE-Step--Ace-Step1.5"
    commit = "19671f406d603126926c1b7e2adc169acbcade22"
    (repo_cache / "refs").mkdir(parents=True)
    (repo_cache / "refs" / "main").write_text(commit)
    snapshot = write_layout(repo_cache / "snapshots" / commit)
    result = run_resolve(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert Path(result.stdout.strip()) == snapshot

    (snapshot / "vae" / "config.json").unlink()
    result = run_resolve(tmp_path)
    assert result.returncode == 3
    assert "missing vae/config.json" in result.stdout


def test_required_files_match_the_model_md_layout() -> None:
    assert REQUIRED_FILES == {
        "acestep-v15-turbo": ("config.json", "model.safetensors", "silence_latent.pt"),
        "vae": ("config.json", "diffusion_pytorch_model.safetensors"),
        "Qwen3-Embedding-0.6B": (
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "vocab.json",
            "merges.txt",
        ),
    }
