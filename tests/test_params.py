"""The one request shape: every check that needs no model happens when params are built."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from pydantic import ValidationError

from acestep_daemon.constants import SAMPLE_RATE
from acestep_daemon.params import (
    CWD,
    GenerationParams,
    time_signature_field,
    time_signature_numerator,
)


@pytest.fixture
def clip(tmp_path: Path) -> Path:
    path = tmp_path / "clip.wav"
    sf.write(path, np.zeros((SAMPLE_RATE, 2)), SAMPLE_RATE)
    return path


@pytest.mark.parametrize(
    ("given", "numerator"),
    [("4", 4), ("4/4", 4), ("3/4", 3), ("6/8", 6), ("2/4", 2), (" 12 / 8 ", 12)],
)
def test_time_signature_renders_as_its_numerator(given: str, numerator: int) -> None:
    assert time_signature_numerator(given) == numerator


@pytest.mark.parametrize("bad", ["four", "4/3", "0/4", "4/", "/4", "3:4"])
def test_bad_time_signature_is_refused_naming_the_field(bad: str) -> None:
    with pytest.raises(ValidationError, match="time_signature"):
        GenerationParams(caption="x", time_signature=bad)


def test_negative_bpm_is_refused() -> None:
    with pytest.raises(ValidationError, match="bpm"):
        GenerationParams(caption="x", bpm=-5)


@pytest.mark.parametrize("key", ["C major", "F# minor", "Bb major", "E♭ minor", "G♯ major"])
def test_keys_in_the_training_format_are_accepted(key: str) -> None:
    assert GenerationParams(caption="x", key=key).key == key


@pytest.mark.parametrize("key", ["H major", "C", "c major", "C dorian", "C  major", ""])
def test_other_keys_are_refused(key: str) -> None:
    with pytest.raises(ValidationError, match="key"):
        GenerationParams(caption="x", key=key)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"caption": "  "}, "caption"),
        ({"duration_s": 0.5}, "duration_s"),
        ({"duration_s": 601}, "duration_s"),
        ({"task": "extract"}, "task"),
        ({"task": "repaint"}, "src_audio"),
        ({"shift": float("nan")}, "shift"),
    ],
)
def test_invalid_parameters_are_rejected_with_the_field_named(changes, message):
    with pytest.raises(ValidationError, match=message):
        GenerationParams(**{"caption": "x", "duration_s": 2, **changes})


def test_missing_source_file_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"nope\.wav"):
        GenerationParams(caption="x", task="cover", src_audio=tmp_path / "nope.wav")


def test_unreadable_reference_is_refused(tmp_path: Path, clip: Path) -> None:
    with pytest.raises(ValidationError, match="reference_audio"):
        GenerationParams(caption="x", reference_audio=tmp_path)  # a folder


def test_a_path_object_is_kept_as_its_absolute_string(clip: Path) -> None:
    params = GenerationParams(caption="x", task="cover", src_audio=clip)
    assert params.src_audio == str(clip)


@pytest.mark.parametrize(
    ("start", "end"),
    [(3.0, 2.0), (2.0, 2.0), (None, 0.0), (0.0, 0.0)],
)
def test_empty_or_reversed_repaint_range_is_refused(clip: Path, start, end) -> None:
    with pytest.raises(ValidationError, match="repaint_end_s must be after repaint_start_s"):
        GenerationParams(
            caption="x", task="repaint", src_audio=clip, repaint_start_s=start, repaint_end_s=end
        )


@pytest.mark.parametrize(("start", "end"), [(-2.0, 0.0), (1.0, None), (1.0, -1.0), (4.0, 8.0)])
def test_outpainting_and_open_ranges_are_accepted(clip: Path, start, end) -> None:
    params = GenerationParams(
        caption="x", task="repaint", src_audio=clip, repaint_start_s=start, repaint_end_s=end
    )
    assert (params.repaint_start_s, params.repaint_end_s) == (start, end)


def test_language_must_be_one_upstream_knows() -> None:
    assert GenerationParams(caption="x", language="yue").language == "yue"
    with pytest.raises(ValidationError, match="language 'klingon' is not one the model knows"):
        GenerationParams(caption="x", language="klingon")


@pytest.mark.parametrize(("numerator", "field"), [(2, "2/4"), (3, "3/4"), (4, "4/4"), (6, "6/8")])
def test_a_planned_beat_count_is_written_as_the_request_field_takes_it(numerator, field) -> None:
    assert time_signature_field(numerator) == field
    assert time_signature_numerator(field) == numerator


def test_relative_paths_resolve_against_the_callers_directory(clip: Path) -> None:
    relative = {"caption": "x", "reference_audio": clip.name}
    params = GenerationParams.model_validate(relative, context={CWD: str(clip.parent)})
    assert params.reference_audio == str(clip)
    with pytest.raises(ValidationError, match=r"must be an absolute path.*\$PWD/"):
        GenerationParams.model_validate(relative)
