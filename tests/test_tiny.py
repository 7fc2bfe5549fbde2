"""The tiny random checkpoint has the real on-disk layout and loads through the real code."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, Qwen2TokenizerFast

from acestep_daemon.checkpoint import REQUIRED_FILES, CheckpointPaths, resolve_checkpoint
from acestep_daemon.params import GenerationParams
from acestep_daemon.pipeline import Pipeline
from acestep_daemon.tiny import LATENT_CHANNELS, cache, make_tiny_checkpoint
from tests.daemon_harness import daemon_env, spawn

FIXTURES = Path(__file__).parent / "fixtures"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
)
WEIGHT_FILES = {
    "acestep-v15-turbo": ("acestep-v15-turbo/model.safetensors", "acestep-v15-turbo"),
    "vae": ("vae/diffusion_pytorch_model.safetensors", "vae"),
    "Qwen3-Embedding-0.6B": ("Qwen3-Embedding-0.6B/model.safetensors", "Qwen3-Embedding-0.6B"),
}


def manifest(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.keys.json").read_text())


def config(root: Path, folder: str) -> dict:
    return json.loads((root / folder / "config.json").read_text())


@pytest.fixture(scope="module")
def pipeline(tiny_checkpoint: Path) -> Pipeline:
    """The tiny checkpoint loaded through the real loading path (strict state dicts)."""
    return Pipeline.load(resolve_checkpoint(tiny_checkpoint), device="cpu")


def test_tiny_checkpoint_passes_checkpoint_verification(tiny_checkpoint: Path) -> None:
    assert resolve_checkpoint(tiny_checkpoint) == CheckpointPaths(tiny_checkpoint)
    for name in TOKENIZER_FILES:
        assert (tiny_checkpoint / "Qwen3-Embedding-0.6B" / name).is_file()
    assert sorted(p.name for p in tiny_checkpoint.iterdir()) == sorted(REQUIRED_FILES)


@pytest.mark.parametrize("folder", sorted(WEIGHT_FILES))
def test_tensor_names_equal_the_real_checkpoint_with_tiny_shapes(
    tiny_checkpoint: Path, folder: str
) -> None:
    path, manifest_name = WEIGHT_FILES[folder]
    tiny = load_file(tiny_checkpoint / path)
    real = manifest(manifest_name)["keys"]
    assert set(tiny) == set(real)
    for name, tensor in tiny.items():
        assert tensor.dtype == torch.float32
        assert tensor.dim() == len(real[name]["shape"])
        assert tensor.numel() <= torch.Size(real[name]["shape"]).numel()
        assert torch.isfinite(tensor).all()
    assert sum(t.numel() for t in tiny.values()) < 5_000_000


@pytest.mark.parametrize("folder", ["acestep-v15-turbo", "vae", "Qwen3-Embedding-0.6B"])
def test_configs_carry_every_real_field(tiny_checkpoint: Path, folder: str) -> None:
    assert set(manifest(folder)["config"]) <= set(config(tiny_checkpoint, folder))


def test_configs_keep_the_fixed_audio_geometry(tiny_checkpoint: Path) -> None:
    dit = config(tiny_checkpoint, "acestep-v15-turbo")
    latent = dit["audio_acoustic_hidden_dim"]
    assert dit["in_channels"] == 3 * latent and dit["timbre_hidden_dim"] == latent
    assert dit["pool_window_size"] == 5 and dit["patch_size"] == 2
    assert dit["sliding_window"] == 8
    assert dit["layer_types"] == ["sliding_attention", "full_attention"] * 12
    assert dit["text_hidden_dim"] == config(tiny_checkpoint, "Qwen3-Embedding-0.6B")["hidden_size"]
    vae = config(tiny_checkpoint, "vae")
    assert vae["_class_name"] == "AutoencoderOobleck"
    assert vae["downsampling_ratios"] == [2, 4, 4, 6, 10]
    assert vae["decoder_input_channels"] == latent and vae["encoder_hidden_size"] == 2 * latent
    assert vae["audio_channels"] == 2 and vae["sampling_rate"] == 48000


def test_silence_latent_is_in_the_official_format(tiny_checkpoint: Path) -> None:
    silence = torch.load(
        tiny_checkpoint / "acestep-v15-turbo" / "silence_latent.pt", weights_only=True
    )
    assert silence.dtype == torch.float32 and silence.shape == (1, LATENT_CHANNELS, 15000)
    constant = silence[0, :, 4]
    assert torch.equal(silence[0, :, 4:], constant[:, None].expand(-1, 14996))
    for frame in range(4):
        assert not torch.equal(silence[0, :, frame], constant)
    assert constant.abs().min() > 0


def test_tokenizer_loads_with_autotokenizer_and_fits_the_vocabulary(
    tiny_checkpoint: Path,
) -> None:
    text_dir = tiny_checkpoint / "Qwen3-Embedding-0.6B"
    tokenizer = AutoTokenizer.from_pretrained(text_dir, local_files_only=True)
    assert isinstance(tokenizer, Qwen2TokenizerFast)
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.eos_token == "<|im_end|>"
    assert len(tokenizer) <= config(tiny_checkpoint, "Qwen3-Embedding-0.6B")["vocab_size"]
    post = json.loads((text_dir / "tokenizer.json").read_text())["post_processor"]
    assert post["type"] == "TemplateProcessing"
    assert [next(iter(p.values()))["id"] for p in post["single"]] == ["A", "<|endoftext|>"]
    ids = tokenizer("héllo wörld ♪ 漢字")["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "héllo wörld ♪ 漢字"


def test_models_load_the_tiny_weights_strictly(pipeline: Pipeline) -> None:
    parameters = [*pipeline.model.parameters(), *pipeline.vae.parameters()]
    assert not any(p.is_meta for p in parameters)
    assert pipeline.text.model.config.num_hidden_layers == 28


def test_tiny_checkpoint_makes_finite_audible_audio(pipeline: Pipeline) -> None:
    frames = 128
    params = GenerationParams(
        caption="jazz piano", lyrics="[verse]\nHello", bpm=120, key="C major", duration_s=5, seed=7
    )
    with torch.inference_mode():
        latents = pipeline.diffuse(pipeline.prepare(params))  # [1, T, C]
        audio = pipeline.vae.decode(latents.transpose(1, 2))  # [1, 2, T·1920]
        mean, _ = pipeline.vae.encode(audio[..., : 2 * 1920].clamp(-1, 1))
    assert torch.isfinite(latents).all() and 0.1 < latents.std() < 10
    assert audio.shape == (1, 2, frames * 1920)
    assert torch.isfinite(audio).all() and audio.std() > 1e-3
    assert 0.05 < audio.abs().max() < 5
    assert mean.shape == (1, LATENT_CHANNELS, 2) and 0.05 < mean.std() < 20


def test_same_seed_writes_identical_files(tmp_path: Path) -> None:
    first = make_tiny_checkpoint(tmp_path / "a", seed=3)
    second = make_tiny_checkpoint(tmp_path / "b", seed=3)
    other = make_tiny_checkpoint(tmp_path / "c", seed=4)
    for folder, names in REQUIRED_FILES.items():
        for name in names:
            assert (first / folder / name).read_bytes() == (second / folder / name).read_bytes()
    weights = "acestep-v15-turbo/model.safetensors"
    assert (first / weights).read_bytes() != (other / weights).read_bytes()


def test_script_writes_a_verified_checkpoint(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parents[1] / "scripts" / "make_tiny_checkpoint.py"
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "tiny"), "--seed", "1"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == tmp_path / "tiny"
    assert CheckpointPaths(tmp_path / "tiny").missing_files() == []


def serve_tiny_until_it_answers(tmp: Path, env: dict[str, str]) -> str:
    """Start `acestep serve --model tiny`, check it answers, SIGKILL it; return its log."""
    daemon = spawn(tmp, "--model", "tiny", env=env)
    try:
        daemon.wait_ready()
        assert daemon.ask({"command": "ping"})["ok"] is True
    finally:
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait(60)
    return daemon.stderr()


def test_serve_tiny_keeps_its_checkpoint_in_the_cache_and_sigkill_leaves_no_temp(
    tmp_path: Path,
) -> None:
    tmpdir, cache_home = tmp_path / "tmp", tmp_path / "cache"
    tmpdir.mkdir()
    env = daemon_env(tmp_path, TMPDIR=str(tmpdir), XDG_CACHE_HOME=str(cache_home))
    first_log = serve_tiny_until_it_answers(tmp_path, env)
    assert list(tmpdir.iterdir()) == []
    (made,) = (cache_home / "acestep-daemon" / "tiny").iterdir()  # no partial folder beside it
    assert made.name.startswith("turbo-") and str(made) in first_log
    assert CheckpointPaths(made).missing_files() == []
    stamp = (made / "acestep-v15-turbo" / "model.safetensors").stat().st_mtime_ns
    second_log = serve_tiny_until_it_answers(tmp_path, env)
    assert str(made) in second_log
    assert list((cache_home / "acestep-daemon" / "tiny").iterdir()) == [made]
    assert (made / "acestep-v15-turbo" / "model.safetensors").stat().st_mtime_ns == stamp


def test_cached_checkpoint_is_renamed_into_place_and_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    made = cache.cached_tiny_checkpoint("sft")
    assert made.parent == tmp_path / "acestep-daemon" / "tiny"
    assert made.name == f"sft-{cache.fingerprint()}"
    sft = CheckpointPaths(made, made / "acestep-v15-sft")
    assert sft.missing_files() == [] and (made / "acestep-5Hz-lm-0.6B").is_dir()
    assert json.loads((sft.dit_dir / "config.json").read_text())["is_turbo"] is False
    assert cache.cached_tiny_checkpoint("sft") == made
    assert sorted(p.name for p in made.parent.iterdir()) == [made.name]
