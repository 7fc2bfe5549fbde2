"""Tiny random checkpoints in the exact on-disk layout of the real ones (tests, CI, demos)."""

from .cache import cached_tiny_checkpoint
from .checkpoint import LATENT_CHANNELS, VARIANTS, dit_config, dit_folder, make_tiny_checkpoint
from .lora import make_tiny_lokr, make_tiny_lora

__all__ = [
    "LATENT_CHANNELS",
    "VARIANTS",
    "cached_tiny_checkpoint",
    "dit_config",
    "dit_folder",
    "make_tiny_checkpoint",
    "make_tiny_lokr",
    "make_tiny_lora",
]
