"""acestep-daemon: a resident ACE-Step v1.5 music-generation service."""

__version__ = "0.1.0"
