"""Audio files in and out: atomic writes of WAV/FLAC/OGG/Opus/MP3, reads resampled to stereo.

Everything goes through ``soundfile`` (libsndfile). The container and codec follow the file
extension (:data:`SUPPORTED_EXTENSIONS`). Writes are atomic: the audio is encoded into a
hidden temporary file in the target folder, flushed to disk, and renamed over the target,
so a reader never sees a partial file and a failure leaves nothing behind.
"""

from __future__ import annotations

import errno
import math
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from scipy.signal import resample_poly

from acestep_daemon.constants import OUTPUT_EXTENSIONS, SAMPLE_RATE
from acestep_daemon.errors import InvalidRequest, OutputError

_FORMATS: dict[str, tuple[str, str]] = {
    ".wav": ("WAV", "PCM_16"),
    ".flac": ("FLAC", "PCM_16"),
    ".ogg": ("OGG", "VORBIS"),
    ".opus": ("OGG", "OPUS"),
    ".mp3": ("MP3", "MPEG_LAYER_III"),
}
SUPPORTED_EXTENSIONS = OUTPUT_EXTENSIONS
"""Output extensions ``write_audio`` understands (lower case; matching ignores case)."""

OPUS_SAMPLE_RATES = (8_000, 12_000, 16_000, 24_000, 48_000)
"""The only rates libsndfile's Opus encoder accepts."""

_BLOCK_SECONDS = 1
"""Encode in blocks of this length: libsndfile 1.2.2 crashes on one large Vorbis write."""

_SFE_SYSTEM = 2
"""libsndfile's "System error": a failed write(2), whose errno libsndfile does not keep."""
_FULL_BYTES = 1 << 20
"""A folder with less free space than this, right after a failed write, is taken as full."""


def write_audio(
    path: Path,
    samples: np.ndarray | torch.Tensor,
    sample_rate: int,
    *,
    float_wav: bool = False,
) -> Path:
    """Write ``samples`` [C, S] (float, nominally in [-1, 1]) to ``path`` atomically.

    The extension picks the format: ``.wav`` (16-bit PCM, or 32-bit float with
    ``float_wav``), ``.flac`` (16-bit), ``.ogg`` (Vorbis), ``.opus`` (Opus in OGG, only at
    8/12/16/24/48 kHz) and ``.mp3`` (MPEG layer III). Samples are clipped to [-1, 1]
    except for float WAV. Raises :class:`InvalidRequest` for an unknown extension, an
    unsupported Opus rate or a folder that cannot be written, before anything is written;
    :class:`OutputError` naming ``path`` when writing fails (a full disk, an I/O error);
    any other failure is re-raised. The temporary file never stays. Returns ``path``.
    """
    path = Path(path)
    extension = path.suffix.lower()
    if extension not in _FORMATS:
        supported = ", ".join(SUPPORTED_EXTENSIONS)
        raise InvalidRequest(f"unsupported output format {path.name!r} (use {supported})")
    container, subtype = _FORMATS[extension]
    if extension == ".wav" and float_wav:
        subtype = "FLOAT"
    if extension == ".opus" and sample_rate not in OPUS_SAMPLE_RATES:
        raise InvalidRequest(f"Opus supports only {OPUS_SAMPLE_RATES} Hz, not {sample_rate}")

    frames = _as_frames(samples)  # [S, C] float32
    if subtype != "FLOAT":
        frames = np.clip(frames, -1.0, 1.0)

    def encode(temporary: Path) -> None:
        with sf.SoundFile(
            temporary,
            "w",
            samplerate=sample_rate,
            channels=frames.shape[1],
            format=container,
            subtype=subtype,
        ) as output:
            block = _BLOCK_SECONDS * sample_rate
            for start in range(0, frames.shape[0], block):
                output.write(frames[start : start + block])

    return _write_atomically(path, encode)


def write_encoded(path: Path, data: bytes) -> Path:
    """Write an already encoded file (a worker's, through the queue) to ``path`` atomically,
    with the errors of :func:`write_audio`. Returns ``path``."""
    return _write_atomically(Path(path), lambda temporary: temporary.write_bytes(data))


def _write_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """Let ``write`` fill a hidden temporary file beside ``path``, flush it, rename it over
    ``path``; the temporary file never stays."""
    extension = path.suffix.lower()
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp{extension}")
    try:
        temporary.open("xb").close()  # reserve the name (plain permissions, honours umask)
    except OSError as error:
        raise InvalidRequest(f"cannot write to {path.parent}: {error.strerror}") from error
    try:
        write(temporary)
        _fsync(temporary)
        os.replace(temporary, path)
    except (OSError, sf.LibsndfileError) as error:
        reason = _write_failure(error, path.parent)  # before the temporary file frees space
        temporary.unlink(missing_ok=True)
        raise OutputError(f"could not write {path}: {reason}") from error
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync(path.parent)
    return path


def _write_failure(error: OSError | sf.LibsndfileError, folder: Path) -> str:
    """Why a write failed, in words; libsndfile's bare "System error" on a full disk included."""
    if isinstance(error, OSError):
        return os.strerror(error.errno) if error.errno else str(error)
    if error.code == _SFE_SYSTEM and shutil.disk_usage(folder).free < _FULL_BYTES:
        return os.strerror(errno.ENOSPC)
    return str(error)


def read_audio(path: Path, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Read any file libsndfile decodes as stereo float32 [2, S] at ``sample_rate``.

    Mono is duplicated, only the first two of more channels are kept, other rates are
    resampled with a polyphase filter (``scipy.signal.resample_poly``), and the result is
    clamped to [-1, 1]. Raises :class:`InvalidRequest` naming the file if it cannot be read.
    """
    try:
        frames, file_rate = sf.read(path, dtype="float32", always_2d=True)  # [S, C]
    except (sf.LibsndfileError, RuntimeError, OSError) as error:
        raise InvalidRequest(f"cannot read audio file {str(path)!r}: {error}") from error
    if frames.shape[1] == 1:
        frames = np.repeat(frames, 2, axis=1)
    frames = frames[:, :2]
    if file_rate != sample_rate:
        divisor = math.gcd(file_rate, sample_rate)
        frames = resample_poly(frames, sample_rate // divisor, file_rate // divisor, axis=0)
    stereo = torch.from_numpy(np.ascontiguousarray(frames.T, dtype=np.float32))  # [2, S]
    return stereo.clamp_(-1.0, 1.0)


def _as_frames(samples: np.ndarray | torch.Tensor) -> np.ndarray:
    """[C, S] tensor or array -> contiguous float32 numpy [S, C], the layout soundfile wants."""
    if isinstance(samples, torch.Tensor):
        samples = samples.detach().to("cpu", torch.float32).numpy()
    if samples.ndim != 2:
        raise ValueError(f"expected samples of shape [channels, samples], got {samples.shape}")
    return np.ascontiguousarray(samples.T, dtype=np.float32)


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's entry to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
