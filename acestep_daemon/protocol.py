"""The wire contract: one JSON request line in, JSON answer lines out.

Every ace-step-rs `generation_daemon` request keeps working unchanged (same
fields, defaults and limits); the fields after `output` are our additions.
Parsing is strict: wrong types, unknown fields, NaN/Infinity and relative
paths are rejected with a message that names the field. Only the server
turns errors into answer lines (`error_answer`).
"""

from __future__ import annotations

import json
import math
from pathlib import PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from acestep_daemon.audio import SUPPORTED_EXTENSIONS
from acestep_daemon.constants import AUDIO_CHANNELS, MAX_DURATION_S, MIN_DURATION_S, SAMPLE_RATE

MAX_LINE_BYTES = 1 << 20
"""A request line (without its newline) may be at most 1 MiB."""

MAX_SEED = 2**64 - 1
"""ace-step-rs clients send the seed as a u64."""

ErrorCode = Literal["invalid_request", "busy", "oom", "cancelled", "internal", "shutting_down"]
Task = Literal["text2music", "repaint", "cover"]
CommandName = Literal["unload", "load", "status", "ping"]

_EXTENSIONS = tuple(ext.lstrip(".").lower() for ext in SUPPORTED_EXTENSIONS)


class ProtocolError(Exception):
    """A request line that cannot be served; `code` is the wire error code."""

    def __init__(self, message: str, code: ErrorCode = "invalid_request") -> None:
        super().__init__(message)
        self.code: ErrorCode = code


def _absolute(value: str | None, name: str) -> str | None:
    """Absolute paths only: the daemon's working directory means nothing to a caller."""
    if value is None:
        return None
    path = PurePosixPath(value)
    if "\0" in value or not value.strip():
        raise ValueError(f"{name} is not a usable path")
    if not path.is_absolute():
        raise ValueError(f"{name} must be an absolute path, got {value!r}")
    if ".." in path.parts:
        raise ValueError(f"{name} must not contain '..'")
    return str(path)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)


class GenerateRequest(_Strict):
    """A generation request; the first eight fields are the ace-step-rs protocol."""

    caption: str
    lyrics: str = ""
    metas: str = ""
    language: str = "en"
    duration_s: float = Field(30.0, ge=MIN_DURATION_S, le=MAX_DURATION_S)
    shift: float = Field(3.0, gt=0, le=100)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    output: str | None = None
    bpm: int | None = Field(None, ge=20, le=400)
    key: str | None = None
    time_signature: str | None = None
    reference_audio: str | None = None
    src_audio: str | None = None
    repaint_start_s: float | None = Field(None, ge=-MAX_DURATION_S, le=MAX_DURATION_S)
    repaint_end_s: float | None = Field(None, ge=-MAX_DURATION_S, le=MAX_DURATION_S)
    task: Task = "text2music"
    progress: bool = False

    @field_validator("caption")
    @classmethod
    def _caption_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("caption is required and must not be empty")
        return value

    @field_validator("output")
    @classmethod
    def _output_path(cls, value: str | None) -> str | None:
        path = _absolute(value, "output")
        if path is not None:
            suffix = PurePosixPath(path).suffix.lstrip(".").lower()
            if suffix not in _EXTENSIONS:
                raise ValueError(
                    f"output must end in one of {', '.join('.' + e for e in _EXTENSIONS)}"
                )
        return path

    @field_validator("reference_audio", "src_audio")
    @classmethod
    def _input_path(cls, value: str | None, info: Any) -> str | None:
        return _absolute(value, info.field_name)

    @model_validator(mode="after")
    def _task_inputs(self) -> GenerateRequest:
        if self.task != "text2music" and self.src_audio is None:
            raise ValueError(f"task {self.task!r} needs src_audio")
        if self.task == "text2music" and self.src_audio is not None:
            raise ValueError("src_audio is only used by the repaint and cover tasks")
        has_range = self.repaint_start_s is not None or self.repaint_end_s is not None
        if has_range and self.task != "repaint":
            raise ValueError("repaint_start_s/repaint_end_s are only used by the repaint task")
        return self


class CommandRequest(_Strict):
    """A control message: `{"command": "unload" | "load" | "status" | "ping"}`."""

    command: CommandName


def describe(error: ValidationError) -> str:
    """One line naming every bad field (never echoing the caller's possibly huge input)."""
    unknown = [str(e["loc"][-1])[:64] for e in error.errors() if e["type"] == "extra_forbidden"]
    parts = []
    if unknown:
        parts.append(f"unknown field(s): {', '.join(unknown)}")
    for e in error.errors():
        if e["type"] == "extra_forbidden":
            continue
        where = ".".join(str(p) for p in e["loc"])
        message = e["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")


def parse_request(line: bytes) -> GenerateRequest | CommandRequest:
    """One request line (newline stripped or not) → a validated request, or ProtocolError."""
    if len(line) > MAX_LINE_BYTES + 1:
        raise ProtocolError(f"request line is longer than {MAX_LINE_BYTES} bytes")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ProtocolError(f"request is not valid UTF-8 (byte {error.start})") from None
    if not text.strip():
        raise ProtocolError("empty request")
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as error:
        raise ProtocolError(f"invalid JSON request: {error}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("request must be a JSON object")
    model = CommandRequest if "command" in obj else GenerateRequest
    try:
        return model.model_validate(obj)
    except ValidationError as error:
        raise ProtocolError(describe(error)) from None


def error_answer(message: str, code: ErrorCode, **extra: Any) -> dict[str, Any]:
    """`{"ok": false, "error": …, "code": …}` (+ extra fields such as `queue_depth`)."""
    return {"ok": False, "error": message, "code": code, **extra}


def success_answer(
    *,
    path: str,
    duration_s: float,
    seed: int,
    timings: dict[str, float],
    device: str,
    **extra: Any,
) -> dict[str, Any]:
    """The ace-step-rs success fields first, then ours."""
    return {
        "ok": True,
        "path": path,
        "duration_s": duration_s,
        "sample_rate": SAMPLE_RATE,
        "channels": AUDIO_CHANNELS,
        "seed": seed,
        "timings": {k: round(v, 4) for k, v in timings.items()},
        "device": device,
        **extra,
    }


def progress_line(stage: str, step: int, of: int) -> dict[str, Any]:
    """`{"progress": {"stage", "step", "of"}}`, sent only when the request asked for it."""
    return {"progress": {"stage": stage, "step": step, "of": of}}


def encode(answer: dict[str, Any]) -> bytes:
    """One answer line; non-finite floats (never expected) become null, never invalid JSON."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        return value

    return json.dumps(clean(answer)).encode() + b"\n"
