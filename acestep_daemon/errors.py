"""Typed errors raised below the server; only the server turns them into wire errors."""


class AceStepError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidRequest(AceStepError):
    """The caller asked for something impossible (bad field, unreadable input file)."""


class CheckpointError(AceStepError):
    """The weights are missing, incomplete or cannot be downloaded."""


class Cancelled(AceStepError):
    """The job was cancelled (its client hung up, or the daemon is stopping)."""


class OutputError(AceStepError):
    """The output file could not be written (a full disk, an I/O error); names the path."""


class GenerationFailed(AceStepError):
    """The model produced unusable output (NaN/Inf or silence)."""
