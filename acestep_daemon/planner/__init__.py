"""The 5 Hz LM planner ("thinking"): metas, duration and audio codes from a caption."""

from .metas import Metas
from .plan import Mode, Plan, PlanRequest, make_plan
from .runner import LMRunner
from .sampling import SamplingOptions

__all__ = ["LMRunner", "Metas", "Mode", "Plan", "PlanRequest", "SamplingOptions", "make_plan"]
