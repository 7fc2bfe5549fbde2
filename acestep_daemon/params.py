"""One request shape: what a generation asks for, checked before it is queued.

`GenerationParams` is the single declaration of the request fields. The wire
model (`protocol.GenerateRequest`) extends it with the answer-side fields,
the `acestep` command line derives its flags from it (`Flag` metadata), and
the pipeline reads it. Everything that needs no model is checked here, when
the request arrives — field ranges, the task's inputs, the repaint range, the
time signature and key formats, and that input files exist and are readable —
so a bad request never waits in the queue behind a long job.

Torch-free on purpose: the server and the CLI validate without loading torch.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from typing_extensions import Self

from acestep_daemon.constants import MAX_DURATION_S, MIN_DURATION_S
from acestep_daemon.family import (
    BASE,
    GUIDED_MAX_STEPS,
    TURBO_MAX_STEPS,
    DcwMode,
    GuidanceMethod,
    ModelSpec,
    Sampler,
)

Task = Literal["text2music", "repaint", "cover"]
TASKS: tuple[str, ...] = get_args(Task)

Thinking = Literal["off", "metas", "full"]
"""The 5 Hz LM planner: off; metas fills in what the request left out; full adds codes."""

MAX_SEED = 2**64 - 1
"""ace-step-rs clients send the seed as a u64."""

MAX_TAKES = 8
"""Most seeds of one request (upstream's batch limit)."""

_NOTES = ("A", "B", "C", "D", "E", "F", "G")
_ACCIDENTALS = ("", "#", "b", "♯", "♭")
_MODES = ("major", "minor")
KEYSCALES = tuple(f"{n}{a} {m}" for n in _NOTES for a in _ACCIDENTALS for m in _MODES)
"""The 70 keys the model was trained on: note, optional accidental (ASCII or Unicode), mode."""

LANGUAGES = (
    "ar", "az", "bg", "bn", "ca", "cs", "da", "de", "el", "en",
    "es", "fa", "fi", "fr", "he", "hi", "hr", "ht", "hu", "id",
    "is", "it", "ja", "ko", "la", "lt", "ms", "ne", "nl", "no",
    "pa", "pl", "pt", "ro", "ru", "sa", "sk", "sr", "sv", "sw",
    "ta", "te", "th", "tl", "tr", "uk", "ur", "vi", "yue", "zh",
    "unknown",
)  # fmt: skip
"""Vocal languages of ACE-Step v1.5 (upstream `acestep/constants.py`, `VALID_LANGUAGES`);
'unknown' when it cannot tell. The `language` field and the planner take these."""

_TIME_SIGNATURE = re.compile(r"^\s*(\d+)\s*(?:/\s*(\d+)\s*)?$")
_DENOMINATORS = (1, 2, 4, 8, 16, 32)


class Flag:
    """Command-line spelling of a request field (`acestep generate`, `acestep request`).

    `path`: a relative path on the command line is made absolute before it goes
    on the wire, since the daemon's working directory is not the caller's.
    """

    def __init__(
        self,
        *names: str,
        metavar: str | None = None,
        path: bool = False,
        parse: Callable[[str], Any] | None = None,
    ) -> None:
        self.names = names
        self.metavar = metavar
        self.path = path
        self.parse = parse
        """Set: the flag repeats, each value parsed by it into one entry of the field's list."""


def time_signature_numerator(time_signature: str) -> int:
    """The numerator of "N" or "N/D" (D a power of two up to 32); ValueError otherwise."""
    match = _TIME_SIGNATURE.match(time_signature)
    if match is None:
        raise ValueError(f"time_signature {time_signature!r}: expected e.g. '4', '4/4', '6/8'")
    numerator, denominator = int(match.group(1)), match.group(2)
    if not 1 <= numerator <= 32:
        raise ValueError(f"time_signature {time_signature!r}: numerator must be 1..32")
    if denominator is not None and int(denominator) not in _DENOMINATORS:
        raise ValueError(f"time_signature {time_signature!r}: denominator must be 1..32, 2^k")
    return numerator


def time_signature_field(numerator: int) -> str:
    """The request field's form of a beat count: 6 → "6/8", any other N → "N/4"."""
    return f"{numerator}/8" if numerator == 6 else f"{numerator}/4"


CWD = "cwd"
"""Validation-context key: the caller's working directory, which relative paths are
resolved against (the daemon reads it from the peer, /proc/PID/cwd)."""


def absolute_path(value: str, name: str, cwd: str | None = None) -> str:
    """An absolute path; a relative one is resolved against `cwd`, the caller's working
    directory (the daemon's own means nothing to a caller), and refused without it."""
    path = PurePosixPath(value)
    if "\0" in value or not value.strip():
        raise ValueError(f"{name} is not a usable path")
    if not path.is_absolute():
        if cwd is None:
            raise ValueError(
                f"{name} must be an absolute path, got {value!r} (the caller's working "
                f'directory is unknown here; send e.g. "$PWD/{value}")'
            )
        return os.path.normpath(os.path.join(cwd, value))
    if ".." in path.parts:
        raise ValueError(f"{name} must not contain '..'")
    return str(path)


def path_value(value: Any, name: str, context: Any) -> Any:
    """A path field's raw value: a `pathlib.Path` or string as its absolute string
    (resolved against the validation context's `cwd`); anything else unchanged, so that
    the strict type check names the field."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    cwd = context.get(CWD) if isinstance(context, dict) else None
    return absolute_path(value, name, cwd) if isinstance(value, str) else value


class StrictModel(BaseModel):
    """Wire strictness: no coercion, no unknown fields, no NaN/Infinity, immutable."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)


def _existing_adapter(value: Any, info: ValidationInfo) -> Any:
    """An existing adapter folder or file, as an absolute path (a relative one is resolved
    against the validation context's `cwd`)."""
    path = path_value(value, "lora", info.context)
    if isinstance(path, str) and not os.path.exists(path):
        raise ValueError(f"lora {path} does not exist")
    return path


class AdapterChoice(StrictModel):
    """One adapter of a request: a LoRA (PEFT folder, .safetensors) or LoKr file, its scale."""

    path: str
    scale: float = Field(1.0, ge=0.0, le=1.0)

    _path = field_validator("path", mode="before")(_existing_adapter)


def adapter_flag(text: str) -> str | dict[str, Any]:
    """`--lora PATH[:SCALE]`, the path made absolute: PATH alone as a string (the single form,
    which `--lora-scale` may scale), PATH:SCALE as a `{path, scale}` entry."""
    head, sep, tail = text.rpartition(":")
    try:
        path, scale = (head, float(tail)) if sep and head else (text, None)
    except ValueError:
        path, scale = text, None
    path = os.path.abspath(os.path.expanduser(path))
    return path if scale is None else {"path": path, "scale": scale}


class GenerationParams(StrictModel):
    """What one generation asks for; the first seven fields are the ace-step-rs protocol."""

    caption: Annotated[str, Flag("-c", "--caption")] = Field(
        description="style, genre, mood, instruments"
    )
    lyrics: Annotated[str, Flag("-l", "--lyrics")] = Field(
        "", description="lyrics with [verse]/[chorus] tags"
    )
    metas: Annotated[str, Flag("--metas")] = Field(
        "", description="free metadata string, passed verbatim (not with bpm, key, time_signature)"
    )
    language: Annotated[str, Flag("--language")] = Field(
        "en", description="language code of the lyrics"
    )
    duration_s: Annotated[float, Flag("-d", "--duration", metavar="SECONDS")] = Field(
        30.0, ge=MIN_DURATION_S, le=MAX_DURATION_S, description="length of the output"
    )
    shift: Annotated[float | None, Flag("--shift")] = Field(
        None,
        gt=0,
        le=100,
        description="timestep shift; default: the model's (turbo 3, snapped to 1, 2 or 3 "
        "unless steps is given; sft/base 1)",
    )
    seed: Annotated[int | None, Flag("-s", "--seed")] = Field(
        None, ge=0, le=MAX_SEED, description="random when omitted"
    )
    bpm: Annotated[int | None, Flag("--bpm")] = Field(
        None, ge=20, le=400, description="tempo in beats per minute"
    )
    key: Annotated[str | None, Flag("--key")] = Field(
        None, description='key and scale, e.g. "C major", "F# minor"'
    )
    time_signature: Annotated[str | None, Flag("--time-signature")] = Field(
        None, description='e.g. "4/4", "3/4", "6/8"'
    )
    task: Annotated[Task, Flag("--task")] = Field(
        "text2music", description="text2music, or repaint/cover of src_audio (CLI: from the inputs)"
    )
    reference_audio: Annotated[str | None, Flag("--reference-audio", path=True)] = Field(
        None, description="timbre reference clip"
    )
    src_audio: Annotated[str | None, Flag("--src-audio", path=True)] = Field(
        None, description="source of repaint and cover"
    )
    repaint_start_s: Annotated[float | None, Flag("--repaint-start", metavar="SECONDS")] = Field(
        None,
        ge=-MAX_DURATION_S,
        le=MAX_DURATION_S,
        description="start of the repainted range; before 0 adds an intro",
    )
    repaint_end_s: Annotated[float | None, Flag("--repaint-end", metavar="SECONDS")] = Field(
        None,
        ge=-MAX_DURATION_S,
        le=MAX_DURATION_S,
        description="end of the repainted range; past the source adds an outro; <0: the end",
    )

    seeds: Annotated[list[int] | None, Flag("--seeds")] = Field(
        None,
        min_length=1,
        max_length=MAX_TAKES,
        description=f"several takes in one batch (at most {MAX_TAKES}), one file each",
    )
    steps: Annotated[int | None, Flag("--steps")] = Field(
        None,
        ge=1,
        le=GUIDED_MAX_STEPS,
        description=f"diffusion steps; default: the model's (turbo 8, at most {TURBO_MAX_STEPS})",
    )
    guidance_scale: Annotated[float | None, Flag("--guidance-scale")] = Field(
        None, ge=1.0, le=30.0, description="sft/base only: guidance strength (7; 1 = none)"
    )
    guidance: Annotated[GuidanceMethod | None, Flag("--guidance")] = Field(
        None, description="sft/base only: guidance method (apg)"
    )
    guidance_interval: Annotated[list[float] | None, Flag("--guidance-interval")] = Field(
        None,
        min_length=2,
        max_length=2,
        description="sft/base only: [start, end] timesteps within which guidance runs ([0, 1])",
    )
    timesteps: Annotated[list[float] | None, Flag("--timesteps")] = Field(
        None,
        min_length=2,
        max_length=GUIDED_MAX_STEPS + 1,
        description="sft only: the timesteps, decreasing from at most 1 to at least 0",
    )
    dcw: Annotated[bool | None, Flag("--dcw")] = Field(
        None, description="wavelet correction (DCW); default: on for turbo, off for sft/base"
    )
    dcw_mode: Annotated[DcwMode | None, Flag("--dcw-mode")] = Field(
        None, description="DCW bands (double); giving it turns DCW on"
    )
    dcw_scaler: Annotated[float | None, Flag("--dcw-scaler")] = Field(
        None, ge=0.0, le=1.0, description="DCW strength, low band (0.05)"
    )
    dcw_high_scaler: Annotated[float | None, Flag("--dcw-high-scaler")] = Field(
        None, ge=0.0, le=1.0, description="DCW strength, high band of mode double (0.02)"
    )
    sampler: Annotated[Sampler, Flag("--sampler")] = Field(
        "euler",
        description="step rule: euler; heun (two DiT calls a step); sde (re-noises each step "
        "from the first seed)",
    )
    velocity_norm_threshold: Annotated[float, Flag("--velocity-norm-threshold")] = Field(
        0.0, ge=0.0, le=5.0, description="caps each step's |v| at this times |x| (0 = off)"
    )
    velocity_ema_factor: Annotated[float, Flag("--velocity-ema-factor")] = Field(
        0.0, ge=0.0, le=0.5, description="blends each step's v with the last one's (0 = off)"
    )
    retake_seed: Annotated[int | None, Flag("--retake-seed")] = Field(
        None, ge=0, le=MAX_SEED, description="retake: the second seed mixed into the noise"
    )
    retake_variance: Annotated[float | None, Flag("--retake-variance")] = Field(
        None, ge=0.0, le=1.0, description="retake: 0 = the seed's take, 1 = the retake seed's"
    )
    lora: Annotated[
        str | list[AdapterChoice] | None,
        Flag("--lora", metavar="PATH[:SCALE]", parse=adapter_flag),
    ] = Field(
        None,
        description="adapters: a path (LoRA folder or .safetensors, LoKr file), or a list of "
        "{path, scale}; --lora repeats",
    )
    lora_scale: Annotated[float | None, Flag("--lora-scale")] = Field(
        None, ge=0.0, le=1.0, description="strength of the LoRA adapter, or of --lora's (1)"
    )
    thinking: Annotated[Thinking, Flag("--thinking")] = Field(
        "off",
        description="5 Hz LM planner: off; metas: it fills in bpm, key, time signature, "
        "duration and language left out; full: metas plus audio codes that guide the song",
    )

    def replace(self, **changes: Any) -> Self:
        """A copy with some fields changed, validated like a new request."""
        return type(self).model_validate({**self.model_dump(), **changes})

    @field_validator("caption")
    @classmethod
    def _caption_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("caption is required and must not be empty")
        return value

    @field_validator("key")
    @classmethod
    def _key_format(cls, value: str | None) -> str | None:
        if value is not None and value not in KEYSCALES:
            raise ValueError(f'key {value!r}: expected a note and a mode, e.g. "F# minor"')
        return value

    @field_validator("language")
    @classmethod
    def _known_language(cls, value: str) -> str:
        if value not in LANGUAGES:
            raise ValueError(
                f"language {value[:16]!r} is not one the model knows; use a code from: "
                f"{' '.join(LANGUAGES)}"
            )
        return value

    @field_validator("time_signature")
    @classmethod
    def _time_signature_format(cls, value: str | None) -> str | None:
        if value is not None:
            time_signature_numerator(value)
        return value

    @field_validator("reference_audio", "src_audio", mode="before")
    @classmethod
    def _input_file(cls, value: Any, info: Any) -> Any:
        """An absolute path to a readable file (a `pathlib.Path` is taken as its string)."""
        path = path_value(value, info.field_name, info.context)
        if isinstance(path, str) and not (os.path.isfile(path) and os.access(path, os.R_OK)):
            raise ValueError(f"{info.field_name} {path} is not a readable file")
        return path

    @field_validator("lora", mode="before")
    @classmethod
    def _adapter_path(cls, value: Any, info: ValidationInfo) -> Any:
        return value if isinstance(value, list) else _existing_adapter(value, info)

    @property
    def adapters(self) -> list[AdapterChoice]:
        """The adapters named, each with its scale (a single path takes `lora_scale`, or 1)."""
        if isinstance(self.lora, str):
            scale = 1.0 if self.lora_scale is None else self.lora_scale
            return [AdapterChoice(path=self.lora, scale=scale)]
        return list(self.lora or [])

    @field_validator("guidance_interval")
    @classmethod
    def _interval(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and not 0.0 <= value[0] <= value[1] <= 1.0:
            raise ValueError("guidance_interval must be [start, end] with 0 <= start <= end <= 1")
        return value

    @field_validator("timesteps")
    @classmethod
    def _timesteps(cls, value: list[float] | None) -> list[float] | None:
        if value is None:
            return None
        if not all(0.0 <= t <= 1.0 for t in value):
            raise ValueError("timesteps must lie in [0, 1]")
        if any(a <= b for a, b in itertools.pairwise(value)):
            raise ValueError("timesteps must be strictly decreasing")
        return value

    @field_validator("seeds")
    @classmethod
    def _seed_range(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and not all(0 <= seed <= MAX_SEED for seed in value):
            raise ValueError(f"seeds must lie in 0..{MAX_SEED}")
        return value

    @model_validator(mode="after")
    def _pairs(self) -> GenerationParams:
        if self.seed is not None and self.seeds is not None:
            raise ValueError("give seed or seeds, not both")
        if (self.retake_seed is None) != (self.retake_variance is None):
            raise ValueError("retake_seed and retake_variance go together")
        if isinstance(self.lora, list) and self.lora_scale is not None:
            raise ValueError("lora_scale goes with a single lora path; a list gives each a scale")
        if self.dcw is False and self.dcw_settings_given:
            raise ValueError("dcw_mode/dcw_scaler/dcw_high_scaler given with dcw false")
        return self

    @property
    def dcw_settings_given(self) -> bool:
        return any(v is not None for v in (self.dcw_mode, self.dcw_scaler, self.dcw_high_scaler))

    def model_problem(self, spec: ModelSpec) -> str | None:
        """Why these parameters do not suit the model `spec` (or None): guidance fields on a
        guidance-distilled turbo model, custom timesteps on base (upstream's base
        `generate_audio` takes none), more steps than it takes."""
        if not spec.guided:
            given = [
                name
                for name in ("guidance_scale", "guidance", "guidance_interval", "timesteps")
                if getattr(self, name) is not None
            ]
            if given:
                return (
                    f"{', '.join(given)}: model {spec.name} is guidance-distilled and takes no "
                    "guidance; use an sft or base model"
                )
        if spec.kind == BASE and self.timesteps is not None:
            return (
                f"timesteps: model {spec.name} samples upstream's shifted schedule only; "
                "use steps and shift, or an sft model"
            )
        if self.steps is not None and self.steps > spec.max_steps:
            return f"steps: model {spec.name} takes at most {spec.max_steps} steps"
        return None

    @model_validator(mode="after")
    def _task_inputs(self) -> GenerationParams:
        if self.task != "text2music" and self.src_audio is None:
            raise ValueError(f"task {self.task!r} needs src_audio")
        if self.task == "text2music" and self.src_audio is not None:
            raise ValueError("src_audio is only used by the repaint and cover tasks")
        start, end = self.repaint_start_s, self.repaint_end_s
        if (start is not None or end is not None) and self.task != "repaint":
            raise ValueError("repaint_start_s/repaint_end_s are only used by the repaint task")
        if end is not None and 0 <= end <= (start or 0.0):
            raise ValueError("repaint_end_s must be after repaint_start_s")
        if self.thinking != "off" and self.task != "text2music":
            raise ValueError("thinking plans text2music songs; repaint and cover keep their source")
        structured = [name for name in ("bpm", "key", "time_signature") if getattr(self, name)]
        if structured and self.metas.strip():
            raise ValueError(
                f"metas cannot be combined with {', '.join(structured)}: the model reads one "
                "metas block, so give either the free metas string or the structured fields"
            )
        return self
