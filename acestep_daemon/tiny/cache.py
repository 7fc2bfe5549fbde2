"""The tiny checkpoints that `--model tiny-<name>` serves, made once and kept in the user's cache.

`$XDG_CACHE_HOME/acestep-daemon/tiny/<variant>-<fingerprint>/` (XDG default `~/.cache`).
A checkpoint is written into a hidden sibling folder and renamed into place, so a
process killed while writing leaves no half checkpoint that a later start would load.
The fingerprint covers the code that shapes a checkpoint (`tiny/` and `model/`) and
the torch and transformers versions, so a checkout with other model code, or another
torch, makes its own. Old ones are left in place (about 40 MB each): a daemon of
another checkout may still load its LM from one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import torch
import transformers

from acestep_daemon.tiny.checkpoint import make_tiny_checkpoint

PACKAGE = Path(__file__).resolve().parent.parent
SHAPING = ("tiny", "model")
"""The package folders whose code decides what a tiny checkpoint holds."""


def cache_dir() -> Path:
    """`$XDG_CACHE_HOME/acestep-daemon/tiny` (XDG default `~/.cache`)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "acestep-daemon" / "tiny"


def fingerprint() -> str:
    """12 hex digits of the source in `SHAPING` and the torch and transformers versions."""
    digest = hashlib.sha256(f"{torch.__version__} {transformers.__version__}".encode())
    for path in sorted(p for folder in SHAPING for p in (PACKAGE / folder).rglob("*.py")):
        digest.update(str(path.relative_to(PACKAGE)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def cached_tiny_checkpoint(variant: str) -> Path:
    """The tiny checkpoint of `variant` with its tiny 5 Hz LM (seed 0): made on first use."""
    root = cache_dir()
    final = root / f"{variant}-{fingerprint()}"
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}-"))
    try:
        make_tiny_checkpoint(partial, variant=variant, lm=True)
        os.rename(partial, final)
    except OSError:
        if not final.is_dir():  # not another process that finished first
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return final
