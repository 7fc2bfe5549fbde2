"""Request fields of the model family, checked when a request arrives (no model needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from acestep_daemon.family import MODELS
from acestep_daemon.params import GenerationParams


def params(**fields: object) -> GenerationParams:
    return GenerationParams(caption="x", **fields)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"seed": 1, "seeds": [2, 3]}, "seed or seeds"),
        ({"seeds": list(range(9))}, "seeds"),
        ({"seeds": []}, "seeds"),
        ({"retake_seed": 4}, "go together"),
        ({"retake_variance": 0.2}, "go together"),
        ({"retake_seed": 4, "retake_variance": 1.5}, "retake_variance"),
        ({"dcw": False, "dcw_mode": "low"}, "dcw false"),
        ({"dcw_mode": "band"}, "dcw_mode"),
        ({"lora": "relative/adapter"}, "absolute"),
        ({"lora": "/nonexistent/adapter"}, "does not exist"),
        ({"timesteps": [1.0, 0.5, 0.5, 0.0]}, "strictly decreasing"),
        ({"timesteps": [1.2, 0.5, 0.0]}, r"\[0, 1\]"),
        ({"guidance_interval": [0.8, 0.2]}, "start <= end"),
        ({"guidance": "pag"}, "guidance"),
        ({"steps": 0}, "steps"),
        ({"steps": 201}, "steps"),
    ],
)
def test_bad_family_fields_are_refused_naming_them(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        params(**fields)


def test_good_family_fields_pass(tmp_path: Path) -> None:
    got = params(
        seeds=[1, 2],
        steps=40,
        guidance="adg",
        guidance_interval=[0.1, 0.9],
        dcw=True,
        dcw_mode="low",
        retake_seed=3,
        retake_variance=0.25,
        lora=str(tmp_path),
        lora_scale=0.5,
    )
    assert got.seeds == [1, 2] and got.lora == str(tmp_path)


@pytest.mark.parametrize(
    ("fields", "model", "problem"),
    [
        ({"guidance_scale": 3.0}, "turbo", "guidance-distilled"),
        ({"guidance": "cfg"}, "xl-turbo", "guidance-distilled"),
        ({"timesteps": [1.0, 0.0]}, "turbo", "guidance-distilled"),
        ({"steps": 21}, "turbo", "at most 20"),
        ({"steps": 21, "guidance_scale": 3.0}, "sft", None),
        ({"steps": 8, "dcw": True}, "base", None),
        ({"timesteps": [1.0, 0.5, 0.0]}, "base", "shifted schedule only"),
        ({"timesteps": [1.0, 0.5, 0.0]}, "xl-base", "shifted schedule only"),
        ({"timesteps": [1.0, 0.5, 0.0]}, "sft", None),
    ],
)
def test_fields_are_checked_against_the_served_model(
    fields: dict, model: str, problem: str | None
) -> None:
    found = params(**fields).model_problem(MODELS[model])
    assert (found is None) if problem is None else (problem in found)
