"""Shared fixtures: the tiny random checkpoint (written once per test session)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_text_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Only the tiny `Qwen3-Embedding-0.6B/` folder (tokenizer + tiny Qwen3)."""
    from acestep_daemon.tiny.text_encoder import write_tiny_text_encoder

    folder = tmp_path_factory.mktemp("tiny-text") / "Qwen3-Embedding-0.6B"
    write_tiny_text_encoder(folder, torch.Generator().manual_seed(0))
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of a complete tiny checkpoint (seed 0); treat it as read-only."""
    from acestep_daemon.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-checkpoint"))


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random 5 Hz LM folder (seed 0, `acestep-5Hz-lm-0.6B` layout); read-only."""
    from acestep_daemon.tiny.lm import LM_FOLDER, write_tiny_lm

    return write_tiny_lm(tmp_path_factory.mktemp("tiny-lm") / LM_FOLDER)


@pytest.fixture(scope="session")
def tiny_checkpoint_with_lm(
    tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path, tiny_lm_dir: Path
) -> Path:
    """A model folder holding the tiny checkpoint's folders and the tiny LM's (links)."""
    root = tmp_path_factory.mktemp("with-lm")
    for folder in (*tiny_checkpoint.iterdir(), tiny_lm_dir):
        (root / folder.name).symlink_to(folder, target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch CPU thread for a whole module (`pytest.mark.usefixtures("one_thread")`): the
    planner's official fixtures were made so, and tiny layers run faster so."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
