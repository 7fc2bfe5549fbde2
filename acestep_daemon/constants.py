"""Audio and latent constants of ACE-Step v1.5, defined once."""

SAMPLE_RATE = 48_000
"""Output and VAE sample rate in Hz."""

AUDIO_CHANNELS = 2
"""The VAE reads and writes stereo."""

LATENT_HOP = 1920
"""Audio samples per latent frame (2·4·4·6·10)."""

LATENT_RATE = SAMPLE_RATE // LATENT_HOP
"""Latent frames per second (25)."""

MIN_LATENT_FRAMES = 128
"""The model always runs on at least this many frames (5.12 s)."""

MAX_DURATION_S = 600.0
MIN_DURATION_S = 1.0

OUTPUT_EXTENSIONS = (".wav", ".flac", ".ogg", ".opus", ".mp3")
"""Audio files the daemon writes; the container and codec follow the extension."""
