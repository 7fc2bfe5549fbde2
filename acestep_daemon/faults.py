"""Injected out-of-memory errors, to drive the memory policy in tests without a GPU.

`ACESTEP_INJECT_OOM="vae:1,diffusion:99"` makes the pipeline raise a real
`torch.cuda.OutOfMemoryError` at the start of that stage, that many times, while
the pipeline is where it was loaded (its home) — never in the CPU fallback; "plan"
(the 5 Hz LM) fires only while the LM is home.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from acestep_daemon.params import GenerationParams
from acestep_daemon.pipeline import Audio, Conditioning, Pipeline, Planned, ProgressFn

STAGES = ("plan", "text", "diffusion", "vae")
"""The pipeline's stages, as progress lines and the memory policy name them."""

ENV_VAR = "ACESTEP_INJECT_OOM"


def parse_plan(spec: str | None) -> dict[str, int]:
    """`"vae:1,diffusion:99"` → {"vae": 1, "diffusion": 99}."""
    plan: dict[str, int] = {}
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        stage, _, count = item.strip().partition(":")
        if stage not in STAGES:
            raise ValueError(f"{ENV_VAR}: unknown stage {stage!r} (use {', '.join(STAGES)})")
        plan[stage] = int(count) if count else 1
    return plan


def plan_from_env() -> dict[str, int]:
    return parse_plan(os.environ.get(ENV_VAR))


class FaultyPipeline(Pipeline):
    """A Pipeline whose stages first raise the planned out-of-memory errors."""

    def __init__(self, pipeline: Pipeline, plan: dict[str, int]) -> None:
        self.__dict__.update(vars(pipeline))
        self._plan = dict(plan)
        self._home = (pipeline.device, pipeline.dtype)

    def _maybe_fail(self, stage: str) -> None:
        if (self.device, self.dtype) == self._home and self._plan.get(stage, 0) > 0:
            self._plan[stage] -= 1
            raise torch.cuda.OutOfMemoryError(f"injected out-of-memory at stage {stage!r}")

    def plan(self, params: GenerationParams, progress: ProgressFn | None = None) -> Planned | None:
        if params.thinking != "off" and self.lm_at == self._home:  # only while the LM is home
            self._maybe_fail("plan")
        return super().plan(params, progress)

    def prepare(
        self,
        params: GenerationParams,
        progress: ProgressFn | None = None,
        planned: Planned | None = None,
    ) -> Conditioning:
        self._maybe_fail("text")
        return super().prepare(params, progress, planned)

    def diffuse(self, cond: Conditioning, progress: ProgressFn | None = None) -> torch.Tensor:
        self._maybe_fail("diffusion")
        return super().diffuse(cond, progress)

    def decode(self, cond: Conditioning, latents: torch.Tensor, *args: Any, **kw: Any) -> Audio:
        self._maybe_fail("vae")
        return super().decode(cond, latents, *args, **kw)
