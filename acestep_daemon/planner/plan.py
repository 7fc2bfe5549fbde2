"""Planning one song: the thought (metas) and, in full mode, the audio codes.

What the caller gave always wins: given values are written into the thought for the LM,
never sampled, and a given duration is never changed. Phase 1 is skipped when bpm, key,
time signature and duration are all given (as the official `generate_with_stop_condition`
does). The plan says which fields the LM chose.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from .constraints import CODES_PER_SECOND
from .metas import Metas, format_thought, parse_thought
from .prompt import (
    codes_prompt,
    codes_unconditional_prompt,
    metas_prompt,
    metas_unconditional_prompt,
)
from .runner import LMRunner, Progress
from .sampling import SamplingOptions

Mode = Literal["metas", "full"]
PLANNED_FIELDS = ("bpm", "duration", "keyscale", "language", "timesignature")
"""Fields the LM may fill in (the caption is always the caller's)."""


@dataclass(frozen=True)
class PlanRequest:
    """What the caller gave. `duration_s` may be fractional; the thought holds whole seconds."""

    caption: str
    lyrics: str = ""
    bpm: int | None = None
    keyscale: str | None = None
    timesignature: int | None = None
    language: str | None = None
    duration_s: float | None = None
    seed: int = 0
    options: SamplingOptions = field(default_factory=SamplingOptions)

    def given(self) -> Metas:
        duration = None if self.duration_s is None else int(self.duration_s)
        return Metas(
            bpm=self.bpm,
            caption=self.caption,
            duration=duration,
            keyscale=self.keyscale,
            language=self.language,
            timesignature=self.timesignature,
        )


@dataclass(frozen=True)
class Plan:
    """The planned song: complete metas, which of them the LM chose, and the audio codes."""

    metas: Metas
    inferred: tuple[str, ...]
    duration_s: float
    codes: list[int] | None = None
    thought: str = ""


@dataclass(frozen=True)
class PhaseProgress:
    """Progress callbacks per phase (each may raise to cancel)."""

    metas: Progress | None = None
    codes: Progress | None = None


def needs_thought(request: PlanRequest) -> bool:
    """False when bpm, key, time signature and duration are all given."""
    given = request.given().known()
    return not all(k in given for k in ("bpm", "keyscale", "timesignature", "duration"))


def make_plan(
    runner: LMRunner,
    request: PlanRequest,
    mode: Mode,
    progress: PhaseProgress | None = None,
) -> Plan:
    """Plan one song. Same request and seed, same plan and codes (on the same device)."""
    progress = progress or PhaseProgress()
    options = request.options
    generator = torch.Generator(device=runner.device).manual_seed(request.seed)
    given = request.given()
    metas = given
    if needs_thought(request):
        text = runner.write_thought(
            metas_prompt(runner.tokenizer, request.caption, request.lyrics),
            metas_unconditional_prompt(runner.tokenizer, request.lyrics, options.negative),
            runner.grammar.decoder(given),
            options,
            generator,
            progress.metas,
        )
        metas = given.filled_from(parse_thought(text))
    inferred = tuple(k for k in PLANNED_FIELDS if k not in given.known() and k in metas.known())
    duration_s = request.duration_s if request.duration_s is not None else float(metas.duration)
    thought = format_thought(metas)
    if mode == "metas":
        return Plan(metas=metas, inferred=inferred, duration_s=duration_s, thought=thought)
    codes = runner.write_codes(
        codes_prompt(runner.tokenizer, request.caption, request.lyrics, thought),
        codes_unconditional_prompt(
            runner.tokenizer, request.caption, request.lyrics, options.negative
        ),
        int(duration_s * CODES_PER_SECOND),
        options,
        generator,
        progress.codes,
    )
    return Plan(metas=metas, inferred=inferred, duration_s=duration_s, codes=codes, thought=thought)
