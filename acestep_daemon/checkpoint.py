"""Locate, download and verify the checkpoint folders (the layout of `ACE-Step/Ace-Step1.5`).

A checkpoint is a folder in the layout of the Hugging Face repo
`ACE-Step/Ace-Step1.5`, of which three sub-folders are used: a DiT, the VAE and
the Qwen3-Embedding text encoder. The 2 B turbo DiT is a sub-folder of that
repo; every other DiT of the family (`family.MODELS`) is a repo of its own,
whose files form the DiT folder, and lives in an explicit checkpoint folder as
`<root>/acestep-v15-<name>/` (the layout upstream's downloader writes). The
optional 5 Hz LM planner is found on its own (`resolve_lm`): only the chosen LM
folder is fetched. An explicit folder (`--model-dir` or `ACESTEP_MODEL_DIR`)
wins; otherwise the Hugging Face cache is tried first and only what is missing
is downloaded. Every needed file is checked before anything loads.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants as hf_constants
from huggingface_hub import snapshot_download
from tqdm.auto import tqdm

from acestep_daemon.errors import CheckpointError
from acestep_daemon.family import DEFAULT_MODEL, MODELS, ModelSpec

log = logging.getLogger(__name__)

HF_REPO_ID = "ACE-Step/Ace-Step1.5"
MODEL_DIR_ENV = "ACESTEP_MODEL_DIR"
DIT_FOLDER = "acestep-v15-turbo"
VAE_FOLDER = "vae"
TEXT_FOLDER = "Qwen3-Embedding-0.6B"

REQUIRED_FILES: dict[str, tuple[str, ...]] = {
    DIT_FOLDER: ("config.json", "model.safetensors", "silence_latent.pt"),
    VAE_FOLDER: ("config.json", "diffusion_pytorch_model.safetensors"),
    TEXT_FOLDER: (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
        "merges.txt",
    ),
}
"""Files the loaders read, per sub-folder."""

ALLOW_PATTERNS = [f"{folder}/*" for folder in REQUIRED_FILES]
"""What is fetched from the Hub: the three sub-folders, nothing else."""

SHARED_PATTERNS = [f"{folder}/*" for folder in (VAE_FOLDER, TEXT_FOLDER)]
"""What the other models take from `ACE-Step/Ace-Step1.5`: the VAE and the text encoder."""

DIT_PATTERNS = list(REQUIRED_FILES[DIT_FOLDER])
"""What is fetched from a DiT repo of its own: the files of the DiT folder."""

_OFFLINE_VALUES = {"1", "ON", "YES", "TRUE"}


@dataclass(frozen=True)
class CheckpointPaths:
    """The checkpoint root and its three sub-folders."""

    root: Path
    dit: Path | None = None
    """The DiT folder when it is not `root/acestep-v15-turbo` (another model of the family)."""

    @property
    def dit_dir(self) -> Path:
        return self.dit if self.dit is not None else self.root / DIT_FOLDER

    @property
    def vae_dir(self) -> Path:
        return self.root / VAE_FOLDER

    @property
    def text_dir(self) -> Path:
        return self.root / TEXT_FOLDER

    def missing_files(self) -> list[str]:
        """Required files (relative to root) that are absent, broken links or empty."""
        missing = []
        for folder, names in REQUIRED_FILES.items():
            base = self.dit_dir if folder == DIT_FOLDER else self.root / folder
            for name in names:
                path = base / name
                if not path.is_file() or path.stat().st_size == 0:
                    inside = path.is_relative_to(self.root)
                    missing.append(str(path.relative_to(self.root)) if inside else str(path))
        return missing

    def verify(self) -> CheckpointPaths:
        """Return self when every required file is there; else raise CheckpointError."""
        missing = self.missing_files()
        if missing:
            raise CheckpointError(
                f"incomplete checkpoint in {self.root}: missing {', '.join(missing)}.\n"
                f"{how_to_get_weights()}"
            )
        return self


def how_to_get_weights() -> str:
    """The one paragraph every 'no weights' error ends with."""
    include = " ".join(f"'{pattern}'" for pattern in ALLOW_PATTERNS)
    return (
        "Get the weights in one of these ways:\n"
        f"  - run once with network access: the three needed folders of {HF_REPO_ID} "
        "are downloaded into the Hugging Face cache;\n"
        f"  - download them yourself: hf download {HF_REPO_ID} --include {include};\n"
        f"  - or point --model-dir (or {MODEL_DIR_ENV}) at a folder holding "
        f"{', '.join(f'{f}/' for f in REQUIRED_FILES)}."
    )


def resolve_checkpoint(
    model_dir: Path | None, *, download: bool = True, model: str = DEFAULT_MODEL
) -> CheckpointPaths:
    """Find a complete checkpoint for `model` (a `family.MODELS` name) and verify it.

    `model_dir` (else the `ACESTEP_MODEL_DIR` environment variable) names a folder
    that is used as is. Without one, the Hugging Face cache copy of
    `ACE-Step/Ace-Step1.5` is used when complete; otherwise the three sub-folders
    are downloaded (with a progress bar) unless `download` is False or the Hub
    is offline (`HF_HUB_OFFLINE`). A model other than the 2 B turbo takes the VAE
    and text encoder from there and its DiT from its own repo, cached or
    downloaded the same way. Raises CheckpointError with instructions.
    """
    spec = MODELS[model]
    if model_dir is None and os.environ.get(MODEL_DIR_ENV):
        model_dir = Path(os.environ[MODEL_DIR_ENV])
    if model_dir is not None:
        root = Path(model_dir).expanduser()
        if not root.is_dir():
            raise CheckpointError(f"model directory {root} does not exist.\n{how_to_get_weights()}")
        return CheckpointPaths(root, _own_dit(root, spec)).verify()
    if spec.repo != HF_REPO_ID:
        shared = _from_hub(HF_REPO_ID, SHARED_PATTERNS, download)
        return CheckpointPaths(shared, _from_hub(spec.repo, DIT_PATTERNS, download)).verify()

    cached = _cached_snapshot()
    if cached is not None and not cached.missing_files():
        return cached
    if not download or _hub_offline():
        reason = "downloads are disabled" if not download else "HF_HUB_OFFLINE is set"
        if cached is None:
            raise CheckpointError(
                f"no copy of {HF_REPO_ID} in the Hugging Face cache and {reason}.\n"
                f"{how_to_get_weights()}"
            )
        return cached.verify()
    return _download().verify()


def _own_dit(root: Path, spec: ModelSpec) -> Path | None:
    """The DiT folder of a model that is not the repo's own sub-folder (None for turbo)."""
    return None if spec.folder == DIT_FOLDER else root / spec.folder


def _from_hub(repo: str, patterns: list[str], download: bool) -> Path:
    """The cached snapshot of `repo` (limited to `patterns`), downloaded when incomplete."""
    try:
        path: Path | None = Path(
            snapshot_download(repo, allow_patterns=patterns, local_files_only=True)
        )
    except (OSError, ValueError):
        path = None
    if path is not None and all(any(path.glob(pattern)) for pattern in patterns):
        return path
    if not download or _hub_offline():
        if path is not None:
            return path  # incomplete: verify() names what is missing
        reason = "downloads are disabled" if not download else "HF_HUB_OFFLINE is set"
        raise CheckpointError(
            f"no copy of {repo} in the Hugging Face cache and {reason}.\n{how_to_get_weights()}"
        )
    log.info("downloading %s (%s) into the Hugging Face cache", repo, patterns)
    try:
        return Path(snapshot_download(repo, allow_patterns=patterns, tqdm_class=tqdm))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"could not download {repo}: {exc}\n{how_to_get_weights()}") from exc


def _cached_snapshot() -> CheckpointPaths | None:
    """The cached snapshot of the repo, complete or not; None when there is none."""
    try:
        path = snapshot_download(HF_REPO_ID, allow_patterns=ALLOW_PATTERNS, local_files_only=True)
    except (OSError, ValueError):
        return None
    return CheckpointPaths(Path(path))


def _download() -> CheckpointPaths:
    log.info("downloading %s (%s) into the Hugging Face cache", HF_REPO_ID, ALLOW_PATTERNS)
    try:
        path = snapshot_download(HF_REPO_ID, allow_patterns=ALLOW_PATTERNS, tqdm_class=tqdm)
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"could not download {HF_REPO_ID}: {exc}\n{how_to_get_weights()}"
        ) from exc
    return CheckpointPaths(Path(path))


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE as set now (the library reads it only once, at import)."""
    value = os.environ.get("HF_HUB_OFFLINE", "").upper()
    return value in _OFFLINE_VALUES or bool(hf_constants.HF_HUB_OFFLINE)


LM_SIZES = ("0.6B", "1.7B", "4B")
DEFAULT_LM = "1.7B"
"""The LM the official API defaults to; it ships inside the main repo."""
TINY_LM = "0.6B"
"""The LM whose layout the tiny checkpoint's LM has (and so the size `--model tiny` uses)."""
LM_TOKENIZER_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
)
"""Files the LM loader reads besides the weights (one file or an index with its shards)."""


def lm_folder_name(size: str) -> str:
    """`acestep-5Hz-lm-<size>`: the folder name in the repo and in a --model-dir."""
    return f"acestep-5Hz-lm-{size}"


def lm_source(size: str) -> tuple[str, str | None]:
    """(Hub repo, sub-folder): the 1.7B LM ships inside the main repo, the others alone."""
    if size == "1.7B":
        return HF_REPO_ID, lm_folder_name(size)
    return f"ACE-Step/{lm_folder_name(size)}", None


def missing_lm_files(folder: Path) -> list[str]:
    """Required LM files (relative to folder) that are absent or empty."""

    def present(name: str) -> bool:
        path = folder / name
        return path.is_file() and path.stat().st_size > 0

    missing = [name for name in LM_TOKENIZER_FILES if not present(name)]
    index = folder / "model.safetensors.index.json"
    if present("model.safetensors.index.json"):
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing += [name for name in shards if not present(name)]
    elif not present("model.safetensors"):
        missing.append("model.safetensors")
    return missing


def resolve_lm(size: str, model_dir: Path | None, *, download: bool = True) -> Path:
    """The verified folder of the 5 Hz LM of `size` (0.6B, 1.7B or 4B).

    With a model directory (argument or ACESTEP_MODEL_DIR) the LM is its
    `acestep-5Hz-lm-<size>/` folder. Otherwise the Hugging Face cache copy is used
    when complete, else only that folder is downloaded (unless `download` is False
    or the Hub is offline). Raises CheckpointError saying how to get it.
    """
    if size not in LM_SIZES:
        raise CheckpointError(f"unknown LM size {size!r}; choose one of {', '.join(LM_SIZES)}")
    name = lm_folder_name(size)
    repo, sub = lm_source(size)
    include = f" --include '{sub}/*'" if sub else ""
    how = (
        f"Get the {name} planner weights: run once with network access, or "
        f"hf download {repo}{include}, or put the folder {name}/ under "
        f"--model-dir (or {MODEL_DIR_ENV}); or run without the planner (--lm none)."
    )
    if model_dir is None and os.environ.get(MODEL_DIR_ENV):
        model_dir = Path(os.environ[MODEL_DIR_ENV])
    if model_dir is not None:
        return _verified_lm(Path(model_dir).expanduser() / name, how)
    patterns = [f"{sub}/*"] if sub else None
    try:
        root = Path(snapshot_download(repo, allow_patterns=patterns, local_files_only=True))
    except (OSError, ValueError):
        root = None
    if root is not None and not missing_lm_files(root / (sub or "")):
        return root / (sub or "")
    if not download or _hub_offline():
        reason = "downloads are disabled" if not download else "HF_HUB_OFFLINE is set"
        raise CheckpointError(
            f"no complete copy of {name} in the Hugging Face cache and {reason}.\n{how}"
        )
    log.info("downloading %s (%s) into the Hugging Face cache", repo, patterns or "all files")
    try:
        root = Path(snapshot_download(repo, allow_patterns=patterns, tqdm_class=tqdm))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"could not download {name} from {repo}: {exc}\n{how}") from exc
    return _verified_lm(root / (sub or ""), how)


def _verified_lm(folder: Path, how: str) -> Path:
    if not folder.is_dir():
        raise CheckpointError(f"no LM folder {folder}.\n{how}")
    missing = missing_lm_files(folder)
    if missing:
        raise CheckpointError(
            f"incomplete LM folder {folder}: missing {', '.join(missing)}.\n{how}"
        )
    return folder
