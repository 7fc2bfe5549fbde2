"""A tiny random checkpoint in the exact on-disk layout of `ACE-Step/Ace-Step1.5`.

Same folder and file names, same config fields, the same state-dict key names
(every layer of every stack is there, only the widths are tiny), a
`silence_latent.pt` in the official format and a small working byte-level BPE
tokenizer. The real loading code loads it unchanged; tests, CI and offline demos
use it. Written in well under a second, plus about 2.5 s for the tiny LM's tokenizer
(`lm=True`: its 64,000 audio-code tokens).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from acestep_daemon.checkpoint import CheckpointPaths
from acestep_daemon.constants import SAMPLE_RATE
from acestep_daemon.model import AceStepModel
from acestep_daemon.model.vae import OobleckVAE
from acestep_daemon.tiny.lm import LM_FOLDER, write_tiny_lm
from acestep_daemon.tiny.text_encoder import TEXT_HIDDEN, write_tiny_text_encoder
from acestep_daemon.tiny.weights import random_weights, save_weights

SILENCE_FRAMES = 15_000
"""600 s of 25 Hz latents, as the real `silence_latent.pt`."""

SILENCE_HEAD_FRAMES = 4
"""Leading silence frames that differ from the constant rest (VAE edge effects)."""

LATENT_CHANNELS = 8
"""Latent width of the tiny checkpoint (the real one has 64).

The VAE encoder runs at its full width on every audio sample and must emit
mean ‖ scale (2 × the latent width), so 64 latent channels would make every
tiny encode of source or reference audio cost seconds per second of audio.
"""

_DIT_LAYERS = 24
DIT_CONFIG: dict = {
    "architectures": ["AceStepConditionGenerationModel"],
    "model_type": "acestep",
    "model_version": "turbo",
    "is_turbo": True,
    "dtype": "float32",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": _DIT_LAYERS,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000,
    "rope_scaling": None,
    "max_position_embeddings": 32768,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "use_sliding_window": True,
    "sliding_window": 8,
    "layer_types": [
        "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(_DIT_LAYERS)
    ],
    "in_channels": 3 * LATENT_CHANNELS,
    "audio_acoustic_hidden_dim": LATENT_CHANNELS,
    "patch_size": 2,
    "text_hidden_dim": TEXT_HIDDEN,
    "timbre_hidden_dim": LATENT_CHANNELS,
    "num_lyric_encoder_hidden_layers": 8,
    "num_timbre_encoder_hidden_layers": 4,
    "num_attention_pooler_hidden_layers": 2,
    "num_audio_decoder_hidden_layers": _DIT_LAYERS,
    "pool_window_size": 5,
    "fsq_dim": 32,
    "fsq_input_levels": [8, 8, 8, 5, 5, 5],
    "fsq_input_num_quantizers": 1,
    "timbre_fix_frame": 750,
    "vocab_size": 64003,
    "timestep_mu": -0.4,
    "timestep_sigma": 1.0,
    "data_proportion": 0.5,
    "tie_word_embeddings": True,
    "use_cache": True,
    "initializer_range": 0.02,
}
"""Every field of the real turbo config.json; tiny widths, the real depths."""

_XL_DIT_LAYERS = 32
XL_DIT_WIDTHS: dict = {
    "hidden_size": 48,
    "intermediate_size": 96,
    "num_hidden_layers": _XL_DIT_LAYERS,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "num_audio_decoder_hidden_layers": _XL_DIT_LAYERS,
    "layer_types": [
        "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(_XL_DIT_LAYERS)
    ],
    "encoder_hidden_size": DIT_CONFIG["hidden_size"],
    "encoder_intermediate_size": DIT_CONFIG["intermediate_size"],
    "encoder_num_attention_heads": DIT_CONFIG["num_attention_heads"],
    "encoder_num_key_value_heads": DIT_CONFIG["num_key_value_heads"],
}
"""What an XL config.json changes: a wider, deeper decoder (4:1 heads, 32 layers) and the four
`encoder_*` fields, which keep the encoder side at the 2 B widths (tiny here)."""

_KIND_FIELDS: dict[str, dict] = {
    "turbo": {"model_version": "turbo", "is_turbo": True},
    "sft": {"model_version": "sft", "is_turbo": False},
    "base": {"model_version": "base", "is_turbo": False},
}

VARIANTS: tuple[str, ...] = ("turbo", "sft", "base", "xl-turbo", "xl-sft", "xl-base")
"""The DiT checkpoints of the family; the tiny DiT folder is named `acestep-v15-<variant>`."""


def dit_config(variant: str = "turbo") -> dict:
    """The tiny config.json of one variant (the turbo one is `DIT_CONFIG` itself)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; one of {', '.join(VARIANTS)}")
    kind = variant.removeprefix("xl-")
    config = DIT_CONFIG | _KIND_FIELDS[kind]
    return config | XL_DIT_WIDTHS if variant.startswith("xl-") else config


def dit_folder(variant: str = "turbo") -> str:
    """Folder name of a variant's DiT, as its Hugging Face repository names it."""
    return f"acestep-v15-{variant}"


VAE_CONFIG: dict = {
    "_class_name": "AutoencoderOobleck",
    "_diffusers_version": "0.34.0",
    "audio_channels": 2,
    "channel_multiples": [1, 1, 1, 1, 1],
    "decoder_channels": 4,
    "decoder_input_channels": LATENT_CHANNELS,
    "downsampling_ratios": [2, 4, 4, 6, 10],
    "encoder_hidden_size": 2 * LATENT_CHANNELS,
    "sampling_rate": SAMPLE_RATE,
}
"""The real VAE config fields with tiny widths; the hop stays 1920 samples.

`encoder_hidden_size` is tied to the latent width: the encoder emits mean ‖ scale,
so it is 2 × LATENT_CHANNELS. Flat `channel_multiples` keep every stage at that
width (encoder) or at 4 channels (decoder).
"""

VAE_RESIDUAL_GAIN = 0.1
VAE_OUTPUT_GAIN = 0.2


def make_tiny_checkpoint(
    dest: Path, *, seed: int = 0, variant: str = "turbo", lm: bool = False
) -> Path:
    """Write the tiny checkpoint of `variant` (see `VARIANTS`) under `dest` and return `dest`.

    The same seed and variant write byte-identical weights. One generator draws the text
    encoder, the DiT and the VAE in that order, so the text encoder is the same for every
    variant and the turbo checkpoint is the one written before variants existed. With `lm`,
    the tiny 5 Hz LM (its own generator, the same seed) goes beside them as
    `acestep-5Hz-lm-0.6B/`, where a real model folder keeps its LM.
    """
    config = dit_config(variant)
    paths = CheckpointPaths(Path(dest))
    dit_dir = paths.root / dit_folder(variant)
    for folder in (dit_dir, paths.vae_dir, paths.text_dir):
        folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    write_tiny_text_encoder(paths.text_dir, generator)
    _write_dit(dit_dir, config, generator)
    _write_vae(paths.vae_dir, generator)
    if lm:
        write_tiny_lm(paths.root / LM_FOLDER, seed=seed)
    return paths.root


def _write_dit(folder: Path, config: dict, generator: torch.Generator) -> None:
    """config.json, model.safetensors and silence_latent.pt."""
    _write_json(folder / "config.json", config)
    with torch.device("meta"):
        shapes = AceStepModel.from_config(config).state_dict()
    save_weights(random_weights(shapes, generator), folder / "model.safetensors")
    torch.save(_silence_latent(generator), folder / "silence_latent.pt")


def _write_vae(folder: Path, generator: torch.Generator) -> None:
    """VAE config.json and diffusion_pytorch_model.safetensors at audio-like levels.

    Residual branches start small, so the 15 stacked residual units of each side
    do not amplify by ~100x: noise audio then encodes to latents of std ~1, and
    the scaled output convolution decodes unit-noise latents to peaks ~0.5.
    """
    _write_json(folder / "config.json", VAE_CONFIG)
    with torch.device("meta"):
        shapes = OobleckVAE.from_config(VAE_CONFIG).state_dict()
    weights = random_weights(shapes, generator)
    for name, tensor in weights.items():
        if ".res_unit" in name and name.endswith(".conv2.weight_g"):
            tensor.mul_(VAE_RESIDUAL_GAIN)
    weights["decoder.conv2.weight_g"].mul_(VAE_OUTPUT_GAIN)
    save_weights(weights, folder / "diffusion_pytorch_model.safetensors")


def _silence_latent(generator: torch.Generator) -> torch.Tensor:
    """[1, C, 15000] float32, channels first: distinct head frames, then one constant frame."""
    head = 0.5 * torch.randn(LATENT_CHANNELS, SILENCE_HEAD_FRAMES, generator=generator)
    rest = 0.5 * torch.randn(LATENT_CHANNELS, 1, generator=generator)
    frames = torch.cat([head, rest.expand(-1, SILENCE_FRAMES - SILENCE_HEAD_FRAMES)], dim=1)
    return frames.unsqueeze(0).contiguous()  # [1, C, 15000]


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
