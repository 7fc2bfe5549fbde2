"""audio.py: five output formats, atomic writes, long Vorbis files, reading and resampling."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from acestep_daemon.audio import SUPPORTED_EXTENSIONS, read_audio, write_audio
from acestep_daemon.errors import InvalidRequest, OutputError

RATE = 48_000
EXPECTED_FORMAT = {
    ".wav": ("WAV", "PCM_16"),
    ".flac": ("FLAC", "PCM_16"),
    ".ogg": ("OGG", "VORBIS"),
    ".opus": ("OGG", "OPUS"),
    ".mp3": ("MP3", "MPEG_LAYER_III"),
}


def two_tones(seconds: float, rate: int = RATE) -> np.ndarray:
    """[2, S] float32: 440 Hz left, 660 Hz right, under full scale."""
    t = np.arange(round(seconds * rate)) / rate
    left = 0.5 * np.sin(2 * np.pi * 440 * t)
    right = 0.4 * np.sin(2 * np.pi * 660 * t + 1.0)
    return np.stack([left, right]).astype(np.float32)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    n = min(a.shape[-1], b.shape[-1])
    return float(np.corrcoef(a[:n], b[:n])[0, 1])


def test_supported_extensions_are_the_five_formats() -> None:
    assert tuple(EXPECTED_FORMAT) == SUPPORTED_EXTENSIONS


@pytest.mark.parametrize("extension", list(EXPECTED_FORMAT))
def test_each_format_is_written_and_reads_back_as_48k_stereo(
    tmp_path: Path, extension: str
) -> None:
    samples = two_tones(1.5)
    target = tmp_path / f"song{extension}"

    assert write_audio(target, torch.from_numpy(samples), RATE) == target

    info = sf.info(target)
    assert (info.format, info.subtype) == EXPECTED_FORMAT[extension]
    assert (info.samplerate, info.channels) == (RATE, 2)
    decoded = read_audio(target).numpy()
    assert decoded.dtype == np.float32
    assert decoded.shape[0] == 2
    assert abs(decoded.shape[1] - samples.shape[1]) <= 2048  # codec padding, if any
    for channel in range(2):
        assert correlation(samples[channel], decoded[channel]) > 0.95
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_float_wav_keeps_the_samples_exactly(tmp_path: Path) -> None:
    samples = two_tones(0.25) * 3.0  # float WAV is the one format that is not clipped
    target = write_audio(tmp_path / "raw.wav", samples, RATE, float_wav=True)

    assert sf.info(target).subtype == "FLOAT"
    stored, rate = sf.read(target, dtype="float32", always_2d=True)
    assert rate == RATE
    np.testing.assert_array_equal(stored.T, samples)


def test_sixty_one_second_vorbis_file_is_written(tmp_path: Path) -> None:
    # A single large Vorbis write segfaults libsndfile 1.2.2; run in a child process so that
    # a crash fails this test instead of killing pytest.
    target = tmp_path / "long.ogg"
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        import numpy as np
        from acestep_daemon.audio import write_audio
        t = np.arange(61 * {RATE}) / {RATE}
        tone = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
        write_audio(Path({str(target)!r}), np.stack([tone, tone]), {RATE})
        """
    )
    root = Path(__file__).resolve().parents[1]
    child = subprocess.run(
        [sys.executable, "-c", script],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == 0, child.stderr
    info = sf.info(target)
    assert (info.format, info.subtype, info.channels) == ("OGG", "VORBIS", 2)
    assert abs(info.frames - 61 * RATE) <= 2048


def test_failure_mid_write_leaves_no_file_and_keeps_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = write_audio(tmp_path / "old.flac", two_tones(0.5), RATE)
    old_bytes = old.read_bytes()
    original_write = sf.SoundFile.write
    blocks_written = []

    def fail_on_second_block(self: sf.SoundFile, data: np.ndarray) -> None:
        if blocks_written:
            raise OSError("disk full")
        blocks_written.append(len(data))
        original_write(self, data)

    monkeypatch.setattr(sf.SoundFile, "write", fail_on_second_block)

    with pytest.raises(OutputError, match=r"could not write .*new\.flac: disk full"):
        write_audio(tmp_path / "new.flac", two_tones(3.0), RATE)
    with pytest.raises(OutputError, match="disk full"):
        blocks_written.clear()
        write_audio(old, two_tones(3.0), RATE)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.flac"]
    assert old.read_bytes() == old_bytes


def test_missing_folder_is_an_invalid_request_and_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="cannot write"):
        write_audio(tmp_path / "absent" / "song.wav", two_tones(0.1), RATE)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_folder_is_an_invalid_request_and_writes_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "locked"
    folder.mkdir(mode=0o500)
    try:
        with pytest.raises(InvalidRequest, match="cannot write"):
            write_audio(folder / "song.wav", two_tones(0.1), RATE)
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o700)


@pytest.mark.parametrize("name", ["song.aac", "song", "song.wav.txt"])
def test_unknown_extension_is_rejected_before_writing(tmp_path: Path, name: str) -> None:
    with pytest.raises(InvalidRequest, match="unsupported output format"):
        write_audio(tmp_path / name, two_tones(0.1), RATE)
    assert list(tmp_path.iterdir()) == []


def test_opus_at_an_unsupported_rate_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="Opus"):
        write_audio(tmp_path / "song.opus", two_tones(0.1, 44_100), 44_100)
    assert list(tmp_path.iterdir()) == []


def test_mono_44k1_is_read_as_48k_stereo(tmp_path: Path) -> None:
    source = tmp_path / "mono.wav"
    t = np.arange(44_100) / 44_100
    sf.write(source, 0.5 * np.sin(2 * np.pi * 1000 * t), 44_100, subtype="FLOAT")

    audio = read_audio(source)

    assert audio.dtype == torch.float32
    assert audio.shape == (2, RATE)
    assert torch.equal(audio[0], audio[1])
    spectrum = np.abs(np.fft.rfft(audio[0].numpy()))
    assert np.argmax(spectrum) == 1000  # 1 s of audio: bin k is k Hz
    assert abs(audio[0, 1000:-1000].abs().max().item() - 0.5) < 0.01


def test_more_than_two_channels_keep_the_first_two_and_loud_input_is_clamped(
    tmp_path: Path,
) -> None:
    source = tmp_path / "quad.wav"
    channels = np.stack([np.full(4800, v, dtype=np.float32) for v in (0.1, -0.2, 0.3, 0.4)])
    channels[0, :10] = 1.7
    sf.write(source, channels.T, RATE, subtype="FLOAT")

    audio = read_audio(source)

    assert audio.shape == (2, 4800)
    assert audio[0, :10].tolist() == [1.0] * 10
    assert torch.allclose(audio[:, 100], torch.tensor([0.1, -0.2]))


@pytest.mark.parametrize("content", [b"", b"not audio at all" * 100])
def test_unreadable_file_is_an_invalid_request_naming_it(tmp_path: Path, content: bytes) -> None:
    source = tmp_path / "broken.wav"
    source.write_bytes(content)
    with pytest.raises(InvalidRequest, match=r"broken\.wav"):
        read_audio(source)


def test_missing_input_file_is_an_invalid_request_naming_it(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match=r"nothing\.mp3"):
        read_audio(tmp_path / "nothing.mp3")
