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
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from acestep_daemon.constants import AUDIO_CHANNELS, OUTPUT_EXTENSIONS, SAMPLE_RATE
from acestep_daemon.params import CWD, Flag, GenerationParams, StrictModel, path_value

MAX_LINE_BYTES = 1 << 20
"""A request line (without its newline) may be at most 1 MiB."""

ErrorCode = Literal[
    "invalid_request",
    "busy",
    "oom",
    "cancelled",
    "io",
    "internal",
    "shutting_down",
    "already_finished",
    "unknown_job",
]
CommandName = Literal["unload", "load", "status", "ping", "jobs", "cancel"]
HangupPolicy = Literal["finish", "cancel"]

JOB_ID_MAX_CHARS = 64

_EXTENSIONS = tuple(ext.lstrip(".") for ext in OUTPUT_EXTENSIONS)


class ProtocolError(Exception):
    """A request line that cannot be served; `code` is the wire error code."""

    def __init__(self, message: str, code: ErrorCode = "invalid_request") -> None:
        super().__init__(message)
        self.code: ErrorCode = code


class IncompleteLine(ProtocolError):
    """The line ended inside the JSON: a request spread over several lines."""


class GenerateRequest(GenerationParams):
    """A generation request: the generation's parameters plus where and how to answer."""

    output: Annotated[str | None, Flag("-o", "--output", path=True)] = Field(
        None, description="file to write; the format follows the extension (default: spool .ogg)"
    )
    progress: Annotated[bool, Flag("--progress")] = Field(
        False, description="also send progress lines before the answer"
    )
    on_hangup: HangupPolicy | None = Field(
        None,
        description="a client that closes before its answer: finish (write the file anyway) "
        "or cancel its job; default finish when output is named, else cancel",
    )

    @property
    def hangup_policy(self) -> HangupPolicy:
        """What a hang-up does: a named file is still wanted (socat without -t closes
        0.5 s after sending); a spool file nobody will learn the name of is not."""
        if self.on_hangup is not None:
            return self.on_hangup
        return "finish" if self.output is not None else "cancel"

    @field_validator("output", mode="before")
    @classmethod
    def _output_path(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:
            return None
        path = path_value(value, "output", info.context)
        if not isinstance(path, str):
            return path
        suffix = PurePosixPath(path).suffix.lstrip(".").lower()
        if suffix not in _EXTENSIONS:
            raise ValueError(f"output must end in one of {', '.join('.' + e for e in _EXTENSIONS)}")
        return path

    def to_params(self) -> GenerationParams:
        """The generation's parameters alone (already validated); the fields the caller
        gave stay marked as given (`model_fields_set`): the planner keeps exactly those."""
        return GenerationParams.model_construct(
            self.model_fields_set & set(GenerationParams.model_fields),
            **{name: getattr(self, name) for name in GenerationParams.model_fields},
        )


class CommandRequest(StrictModel):
    """A control message: `{"command": "unload" | "load" | "status" | "ping" | "jobs"}`, or
    `{"command": "cancel", "id": …}` with the id of a job (its queued line, its answer)."""

    command: CommandName
    id: str | None = Field(None, min_length=1, max_length=JOB_ID_MAX_CHARS)

    @model_validator(mode="after")
    def _id_with_cancel(self) -> CommandRequest:
        if self.command == "cancel" and self.id is None:
            raise ValueError("id: cancel needs the id of the job to cancel")
        if self.command != "cancel" and self.id is not None:
            raise ValueError(f"id: only cancel takes an id, not {self.command}")
        return self


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


def parse_request(line: bytes, cwd: str | None = None) -> GenerateRequest | CommandRequest:
    """One request line (newline stripped or not) → a validated request, or ProtocolError.

    `cwd`, the caller's working directory, resolves relative paths; without it they are
    refused."""
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
    except json.JSONDecodeError as error:
        if error.pos >= len(text.rstrip()):  # the line ended inside the JSON
            raise IncompleteLine(
                "the request must be ONE line of JSON ending in a newline; this line ends "
                f"inside the JSON ({error.msg}): put the whole object on one line"
            ) from None
        raise ProtocolError(f"invalid JSON request: {error}") from None
    except (ValueError, RecursionError) as error:
        raise ProtocolError(f"invalid JSON request: {error}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("request must be a JSON object")
    model = CommandRequest if "command" in obj else GenerateRequest
    try:
        return model.model_validate(obj, context={CWD: cwd})
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
    dtype: str,
    fallback: str | None,
    oom_retries: int,
    vae_chunk_frames: int,
    notes: list[str],
    dcw: dict[str, Any] | None = None,
    thinking: dict[str, Any] | None = None,
    sampler: str = "euler",
    adapters: list[dict[str, Any]] | None = None,
    takes: list[tuple[str, int]] | None = None,
    quantize: str | None = None,
    offload: bool = False,
) -> dict[str, Any]:
    """The answer of a written file (the daemon's, and `acestep generate`'s line).

    The ace-step-rs success fields come first, then ours. `dtype` may carry torch's
    `torch.` prefix (`str(torch.bfloat16)`); the answer names it without. `sampler` is the
    step rule that ran (euler, heun or sde). `thinking` (what the planner did), `adapters`
    ({path, scale, kind} of each adapter that ran), `takes` ((file, seed) of every take
    of a `seeds` request), `quantize` (the 8-bit weights' kind, e.g. "int8-dynamic") and
    `offload` (true: the text encoder, LM and VAE waited on the CPU) appear only when given;
    `dcw` (the wavelet correction the diffusion ran, None when off) always.
    """
    answer = {
        "ok": True,
        "path": path,
        "duration_s": duration_s,
        "sample_rate": SAMPLE_RATE,
        "channels": AUDIO_CHANNELS,
        "seed": seed,
        "timings": {k: round(v, 4) for k, v in timings.items()},
        "device": device,
        "dtype": dtype.removeprefix("torch."),
        "fallback": fallback,
        "oom_retries": oom_retries,
        "vae_chunk_frames": vae_chunk_frames,
        "sampler": sampler,
        "notes": notes,
        "dcw": dcw,
    }
    if thinking is not None:
        answer["thinking"] = thinking
    if adapters:
        answer["adapters"] = adapters
    if takes:
        answer["takes"] = [{"path": take_path, "seed": take_seed} for take_path, take_seed in takes]
    if quantize is not None:
        answer["quantize"] = quantize
    if offload:
        answer["offload"] = True
    return answer


def progress_line(stage: str, step: int, of: int) -> dict[str, Any]:
    """`{"progress": {"stage", "step", "of"}}`, sent only when the request asked for it.

    `step` units of `of` are done; each stage ends with `step == of`.
    """
    return {"progress": {"stage": stage, "step": step, "of": of}}


def queued_line(position: int, job_id: str) -> dict[str, Any]:
    """The first progress line of an accepted job: its id, and how many jobs are ahead of it.

    `position` counts the jobs that must end before this one can start (with one worker:
    the running job and the queued ones before it); 0 means it starts now.
    """
    return {"progress": {"stage": "queued", "position": position, "id": job_id}}


def encode(answer: dict[str, Any]) -> bytes:
    """One answer line in UTF-8 (non-ASCII text as is; only a lone surrogate, which UTF-8
    cannot hold, keeps its JSON `\\uXXXX` escape); non-finite floats (never expected)
    become null, never invalid JSON."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        return value

    text = json.dumps(clean(answer), ensure_ascii=False)
    return text.encode("utf-8", "backslashreplace") + b"\n"
