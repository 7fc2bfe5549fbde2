"""`acestep generate`: the one-shot CLI writes real files from the tiny checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file, save_file

from acestep_daemon.audio import SUPPORTED_EXTENSIONS
from acestep_daemon.constants import SAMPLE_RATE
from acestep_daemon.model.vae import DECODE_CHUNK_FRAMES
from acestep_daemon.pipeline import latent_frames


def generate(checkpoint: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "acestep_daemon", "generate", "--model-dir", str(checkpoint)]
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, timeout=300, check=False
    )


def summary(result: subprocess.CompletedProcess[str]) -> dict:
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    return json.loads(lines[0])


@pytest.mark.parametrize("extension", SUPPORTED_EXTENSIONS)
def test_generate_writes_each_format(tiny_checkpoint, tmp_path, extension):
    output = tmp_path / "nested" / f"song{extension}"
    result = generate(tiny_checkpoint, "-c", "warm jazz", "-d", "3", "-s", "1", "-o", str(output))
    answer = summary(result)
    assert answer["ok"] is True
    assert answer["path"] == str(output)
    assert answer["sample_rate"] == SAMPLE_RATE and answer["channels"] == 2
    assert answer["seed"] == 1 and answer["duration_s"] == pytest.approx(3.0)
    info = sf.info(output)
    assert info.samplerate == SAMPLE_RATE and info.channels == 2
    assert info.duration == pytest.approx(3.0, abs=0.1)  # lossy codecs pad a little
    data, _ = sf.read(output, dtype="float32")
    assert abs(data).max() > 0.001
    assert [p.name for p in output.parent.iterdir()] == [output.name]


def test_generate_writes_a_minute_of_vorbis(tiny_checkpoint, tmp_path):
    output = tmp_path / "long.ogg"
    answer = summary(
        generate(tiny_checkpoint, "-c", "ambient drone", "-d", "62", "-o", str(output))
    )
    info = sf.info(output)
    assert info.format == "OGG" and info.subtype == "VORBIS"
    assert info.duration == pytest.approx(62.0, abs=0.1)
    assert answer["duration_s"] == pytest.approx(62.0)


def test_same_seed_is_bit_identical_across_processes(tiny_checkpoint, tmp_path):
    outputs = [tmp_path / "a.wav", tmp_path / "b.wav", tmp_path / "c.wav"]
    for output, seed in zip(outputs, ("42", "42", "43"), strict=True):
        summary(
            generate(
                tiny_checkpoint,
                "-c",
                "rock",
                "-d",
                "2",
                "-s",
                seed,
                "--float-wav",
                "-o",
                str(output),
            )
        )
    first, second, other = (sf.read(path, dtype="float32")[0] for path in outputs)
    assert sf.info(outputs[0]).subtype == "FLOAT"
    assert (first == second).all()
    assert not (first == other).all()


def test_unwritable_output_fails_without_a_partial_file(tiny_checkpoint, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where a folder should be")
    result = generate(tiny_checkpoint, "-c", "x", "-d", "2", "-o", str(blocker / "out.wav"))
    assert result.returncode != 0
    assert result.stdout == ""
    assert "not-a-folder" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-a-folder"]


def test_unknown_extension_is_rejected(tiny_checkpoint, tmp_path):
    result = generate(tiny_checkpoint, "-c", "x", "-d", "2", "-o", str(tmp_path / "out.aac"))
    assert result.returncode != 0
    assert "output must end in one of .wav" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_nan_output_is_an_error_and_no_file(tiny_checkpoint, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    weights_path = broken / "acestep-v15-turbo" / "model.safetensors"
    weights = load_file(weights_path)
    weights["decoder.proj_out.1.bias"] = torch.full_like(
        weights["decoder.proj_out.1.bias"], float("nan")
    )
    save_file(weights, weights_path)
    output = tmp_path / "out.wav"
    result = generate(broken, "-c", "x", "-d", "2", "-o", str(output))
    assert result.returncode != 0
    assert "NaN" in result.stderr
    assert not output.exists()


def test_missing_checkpoint_file_is_named(tiny_checkpoint, tmp_path):
    incomplete = tmp_path / "incomplete"
    shutil.copytree(tiny_checkpoint, incomplete)
    (incomplete / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    result = generate(incomplete, "-c", "x", "-d", "2", "-o", str(tmp_path / "out.wav"))
    assert result.returncode != 0
    assert "vae/diffusion_pytorch_model.safetensors" in result.stderr
    assert not (tmp_path / "out.wav").exists()


def test_generate_with_thinking_reports_what_the_planner_chose(tiny_checkpoint_with_lm, tmp_path):
    output = tmp_path / "planned.wav"
    flags = ("--thinking", "metas", "--lm", "0.6B", "--bpm", "100", "-d", "2", "-s", "3")
    answer = summary(
        generate(tiny_checkpoint_with_lm, "-c", "warm jazz", *flags, "-o", str(output))
    )
    assert answer["ok"] is True and output.is_file()
    assert answer["thinking"]["mode"] == "metas"
    assert set(answer["thinking"]["inferred"]) == {"key", "time_signature", "language"}


def test_generate_model_tiny_thinks_without_a_model_folder(tmp_path):
    output = tmp_path / "tiny.wav"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACESTEP_")}
    command = [sys.executable, "-m", "acestep_daemon", "generate", "--model", "tiny"]
    flags = ("--thinking", "metas", "-c", "lofi", "-d", "2", "-o", str(output))
    result = subprocess.run(
        [*command, *flags],
        env=env | {"HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    answer = summary(result)
    assert answer["ok"] is True and output.is_file()
    assert answer["thinking"]["mode"] == "metas"
    assert set(answer["thinking"]["inferred"]) == {"bpm", "key", "time_signature", "language"}
    assert "RANDOM weights" in result.stderr


def test_generate_runs_through_the_memory_policy_as_the_daemon_does(tiny_checkpoint, tmp_path):
    """On the CPU a decode that fits in RAM is one call: 21 s is 525 latent frames, more than
    the 512-frame tile a bare `pipeline.generate` uses; the answer says what really ran."""
    output = tmp_path / "one-call.wav"
    answer = summary(
        generate(tiny_checkpoint, "-c", "pads", "-d", "21", "--dtype", "float32", "-o", str(output))
    )
    assert answer["vae_chunk_frames"] == latent_frames(21.0) > DECODE_CHUNK_FRAMES
    assert (answer["device"], answer["dtype"], answer["fallback"]) == ("cpu", "float32", None)


def test_generate_sde_sampler_is_reproducible_and_reported(tiny_checkpoint, tmp_path):
    """SDE re-noises each step from the first seed: same seed, same file; the answer says
    which sampler ran."""
    flags = ("-c", "pads", "-d", "2", "-s", "3", "--dtype", "float32", "--sampler", "sde")
    flags += ("--velocity-ema-factor", "0.1")
    takes = [tmp_path / "a.wav", tmp_path / "b.wav"]
    answers = [summary(generate(tiny_checkpoint, *flags, "-o", str(take))) for take in takes]
    assert [a["sampler"] for a in answers] == ["sde", "sde"]
    first, second = (sf.read(str(take))[0] for take in takes)
    assert (first == second).all()


def test_float16_song_with_lyrics_is_finite_where_the_lyric_encoder_overflows(
    tiny_checkpoint, tmp_path
):
    """GPUs without bf16 run float16; on the real checkpoints the lyric encoder's last down
    projection overflows it (NaN for every song with lyrics, upstream #1243). Here that weight
    is scaled as far as float16 holds it, so its output overflows too: the song still comes
    out, finite (with that projection in float16 it is NaN)."""
    loud = tmp_path / "loud"
    shutil.copytree(tiny_checkpoint, loud)
    weights_path = loud / "acestep-v15-turbo" / "model.safetensors"
    weights = load_file(weights_path)
    last = max(
        int(k.split(".")[3]) for k in weights if k.startswith("encoder.lyric_encoder.layers.")
    )
    name = f"encoder.lyric_encoder.layers.{last}.mlp.down_proj.weight"
    weights[name] *= 6e4 / weights[name].abs().max()
    save_file(weights, weights_path)
    output = tmp_path / "song.wav"

    lyrics = "[verse]\nla la la, the night is long\n[chorus]\nsing it loud"
    flags = ("-c", "lofi piano", "-l", lyrics, "-d", "4", "--dtype", "float16")
    answer = summary(generate(loud, *flags, "-o", str(output)))

    assert answer["dtype"] == "float16"
    samples, _ = sf.read(str(output))
    assert np.isfinite(samples).all() and np.abs(samples).max() > 0
