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


class RemoteError(AceStepError):
    """A job failed on a worker behind the queue: `answer` is that worker's wire answer."""

    def __init__(self, answer: dict) -> None:
        super().__init__(answer.get("error", "the worker gave no reason"))
        self.answer = answer


class RemoteCancelled(RemoteError, Cancelled):
    """A job was cancelled on a worker behind the queue."""


def remote_error(answer: dict) -> RemoteError:
    """The error of a worker's failure answer, cancelled or not."""
    return (RemoteCancelled if answer.get("code") == "cancelled" else RemoteError)(answer)
