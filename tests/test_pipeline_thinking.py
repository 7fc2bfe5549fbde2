"""`thinking` in the pipeline: the 5 Hz LM fills in what was left out and guides the DiT.

Real code on tiny random weights: the tiny checkpoint, and the tiny LM beside it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from acestep_daemon.checkpoint import resolve_checkpoint
from acestep_daemon.errors import CheckpointError, InvalidRequest
from acestep_daemon.params import KEYSCALES, LANGUAGES, GenerationParams, time_signature_field
from acestep_daemon.pipeline import Pipeline
from acestep_daemon.planner.hints import codes_to_hints
from acestep_daemon.planner.metas import TIME_SIGNATURES

CHANNELS = 8  # latent width of the tiny checkpoint


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipeline(tiny_checkpoint: Path, tiny_lm_dir: Path) -> Pipeline:
    return Pipeline.load(
        resolve_checkpoint(tiny_checkpoint),
        device="cpu",
        lm_size="0.6B",
        lm_model_dir=tiny_lm_dir.parent,
    )


def request(**fields: object) -> GenerationParams:
    """Parameters as a request gives them: only these fields count as given."""
    return GenerationParams.model_validate({"caption": "warm jazz piano", **fields})


def test_metas_fills_only_what_was_left_out_and_reports_it(pipeline: Pipeline) -> None:
    params = request(bpm=97, language="de", thinking="metas", seed=4)
    planned = pipeline.plan(params)
    assert set(planned.inferred) == {"key", "time_signature", "duration_s"}
    filled = planned.params
    assert (filled.bpm, filled.language, filled.seed, filled.caption) == (
        97,
        "de",
        4,
        params.caption,
    )
    assert filled.key in KEYSCALES
    assert filled.time_signature in [time_signature_field(n) for n in TIME_SIGNATURES]
    assert 10 <= filled.duration_s <= 600 and filled.duration_s == planned.inferred["duration_s"]
    assert planned.codes is None
    notes = pipeline.prepare(params, planned=planned).notes
    planned_s = f"{filled.duration_s:g}"
    assert f"duration {planned_s} s chosen by the planner; set duration_s to fix it" in notes


def test_a_given_duration_is_never_changed(pipeline: Pipeline) -> None:
    params = request(duration_s=2.5, thinking="metas", seed=1)
    audio = pipeline.generate(params)
    assert "duration_s" not in audio.thinking["inferred"]
    assert set(audio.thinking["inferred"]) == {"bpm", "key", "time_signature", "language"}
    assert audio.duration_s == pytest.approx(2.5)
    assert audio.samples.shape[1] == 2.5 * 48000
    assert "plan" in audio.timings


def test_full_puts_the_planned_codes_into_the_context_as_hints(pipeline: Pipeline) -> None:
    params = request(duration_s=2.0, thinking="full", seed=9)
    planned = pipeline.plan(params)
    assert len(planned.codes) == 10
    cond = pipeline.prepare(params, None, planned)
    frames = cond.frames
    hints = codes_to_hints(
        pipeline.model, torch.tensor(planned.codes), pipeline.silence_latent, frames
    )
    assert torch.equal(cond.context[..., :CHANNELS], hints)
    off = pipeline.prepare(params.replace(thinking="off"), None, None)
    assert torch.equal(off.context[..., :CHANNELS], pipeline.silence_latent[:, :frames])
    audio = pipeline.decode(cond, pipeline.diffuse(cond))
    assert audio.thinking == {"mode": "full", "inferred": planned.inferred, "codes": 10}
    assert audio.seed == 9 and torch.isfinite(audio.samples).all()


def test_same_seed_same_plan(pipeline: Pipeline) -> None:
    params = request(duration_s=2.0, thinking="full", seed=12)
    first, again = pipeline.plan(params), pipeline.plan(params)
    assert (again.params, again.codes) == (first.params, first.codes)


def test_thinking_without_an_lm_is_a_clear_error(tiny_checkpoint: Path) -> None:
    pipeline = Pipeline.load(resolve_checkpoint(tiny_checkpoint), device="cpu")
    with pytest.raises(InvalidRequest, match="--lm none"):
        pipeline.plan(request(thinking="metas"))
    assert pipeline.plan(request()) is None


@pytest.mark.parametrize("task", ["cover", "repaint"])
def test_thinking_plans_text2music_only(task: str, tmp_path: Path) -> None:
    source = tmp_path / "src.wav"
    source.write_bytes(b"")
    with pytest.raises(ValidationError, match="thinking"):
        request(thinking="full", task=task, src_audio=str(source))


def test_unknown_thinking_mode_is_refused() -> None:
    with pytest.raises(ValidationError, match="thinking"):
        request(thinking="deep")


def test_planned_language_is_a_known_code(pipeline: Pipeline) -> None:
    planned = pipeline.plan(request(thinking="metas", duration_s=20.0, seed=2))
    assert planned.params.language in LANGUAGES


def test_a_missing_lm_folder_is_a_clear_error_naming_it(
    tiny_checkpoint: Path, tiny_lm_dir: Path
) -> None:
    pipeline = Pipeline.load(
        resolve_checkpoint(tiny_checkpoint),
        device="cpu",
        lm_size="4B",
        lm_model_dir=tiny_lm_dir.parent,
    )
    with pytest.raises(CheckpointError, match="acestep-5Hz-lm-4B") as info:
        pipeline.plan(request(thinking="metas"))
    assert "--lm none" in str(info.value)
