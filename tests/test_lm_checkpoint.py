"""Finding, downloading (up to the network boundary) and verifying the 5 Hz LM folder."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from fake_hub import FakeHub, no_env_overrides  # noqa: F401 (an autouse fixture)

from acestep_daemon.checkpoint import LM_TOKENIZER_FILES, lm_source, resolve_lm
from acestep_daemon.errors import CheckpointError

REPO_ROOT = Path(__file__).resolve().parents[1]


def write_lm(folder: Path, skip: str | None = None, shards: int = 0) -> Path:
    """Placeholder LM files (one weights file, or an index with `shards` shards)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(LM_TOKENIZER_FILES)
    if shards:
        shard_names = [f"model-{i:05d}-of-{shards:05d}.safetensors" for i in range(1, shards + 1)]
        weight_map = {f"w{i}": name for i, name in enumerate(shard_names)}
        index = folder / "model.safetensors.index.json"
        index.write_text(json.dumps({"weight_map": weight_map}))
        names += shard_names
    else:
        names.append("model.safetensors")
    for name in names:
        if name != skip:
            (folder / name).write_text("x")
    return folder


def use_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, size: str, cached: bool) -> FakeHub:
    """A hub whose snapshot holds the LM of `size` (in its sub-folder, if it has one)."""
    sub = lm_source(size)[1] or ""
    hub = FakeHub(tmp_path / "snapshot", lambda root: write_lm(root / sub), cached=cached)
    return hub.install(monkeypatch)


def test_model_dir_holds_the_lm_folder(tmp_path: Path) -> None:
    folder = write_lm(tmp_path / "acestep-5Hz-lm-4B", shards=2)
    assert resolve_lm("4B", tmp_path) == folder


@pytest.mark.parametrize("missing", ["tokenizer.json", "model.safetensors"])
def test_missing_lm_file_is_named(tmp_path: Path, missing: str) -> None:
    write_lm(tmp_path / "acestep-5Hz-lm-0.6B", skip=missing)
    with pytest.raises(CheckpointError, match=re.escape(missing)) as info:
        resolve_lm("0.6B", tmp_path)
    assert "--lm none" in str(info.value)


def test_missing_shard_of_an_index_is_named(tmp_path: Path) -> None:
    write_lm(tmp_path / "acestep-5Hz-lm-4B", skip="model-00002-of-00002.safetensors", shards=2)
    with pytest.raises(CheckpointError, match=re.escape("model-00002-of-00002.safetensors")):
        resolve_lm("4B", tmp_path)


def test_model_dir_without_the_lm_folder_says_so(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"no LM folder .*acestep-5Hz-lm-1\.7B"):
        resolve_lm("1.7B", tmp_path)


def test_unknown_size_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=re.escape("0.6B, 1.7B, 4B")):
        resolve_lm("7B", tmp_path)


@pytest.mark.parametrize(
    ("size", "repo", "patterns"),
    [
        ("1.7B", "ACE-Step/Ace-Step1.5", ["acestep-5Hz-lm-1.7B/*"]),
        ("0.6B", "ACE-Step/acestep-5Hz-lm-0.6B", None),
        ("4B", "ACE-Step/acestep-5Hz-lm-4B", None),
    ],
)
def test_uncached_lm_downloads_only_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: str, repo: str, patterns: list | None
) -> None:
    hub = use_hub(monkeypatch, tmp_path, size, cached=False)
    folder = resolve_lm(size, None)
    assert [(c["repo_id"], c["allow_patterns"]) for c in hub.downloads] == [(repo, patterns)]
    assert folder == hub.snapshot / (patterns[0][:-2] if patterns else "")


def test_cached_lm_is_used_without_downloading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = use_hub(monkeypatch, tmp_path, "1.7B", cached=True)
    assert resolve_lm("1.7B", None) == hub.snapshot / "acestep-5Hz-lm-1.7B"
    assert hub.downloads == []


def test_offline_hub_never_downloads_the_lm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = use_hub(monkeypatch, tmp_path, "0.6B", cached=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE"):
        resolve_lm("0.6B", None)
    assert hub.downloads == []


def test_offline_with_an_empty_cache_says_how_to_get_the_lm(tmp_path: Path) -> None:
    """resolve_lm in a fresh process with the real huggingface_hub, offline, empty cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "ACESTEP_"))}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    code = (
        "from acestep_daemon.checkpoint import resolve_lm\n"
        "from acestep_daemon.errors import CheckpointError\n"
        "try:\n    print(resolve_lm('0.6B', None))\n"
        "except CheckpointError as exc:\n    print(exc)\n    raise SystemExit(3)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 3, result.stderr
    assert "no complete copy of acestep-5Hz-lm-0.6B" in result.stdout
    assert "hf download ACE-Step/acestep-5Hz-lm-0.6B" in result.stdout
    assert "--lm none" in result.stdout
    assert "Traceback" not in result.stderr
