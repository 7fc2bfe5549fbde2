"""Real daemons serving tiny checkpoints of other family members: XL turbo and SFT."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import soundfile

from acestep_daemon.tiny import dit_config, make_tiny_lora
from tests.daemon_harness import REPO, Daemon, ask, daemon_env, running

DURATION_S = 1.0
FP32 = ("--dtype", "float32")
"""These daemons' answers are compared by value (a take alone and in a batch, LoRA scale 0 and
none), so they run fp32 whatever the CPU's default dtype."""


@pytest.fixture(scope="module")
def xl_turbo(tmp_path_factory: pytest.TempPathFactory):
    with running(tmp_path_factory.mktemp("xl"), "--model", "tiny-xl-turbo", *FP32) as daemon:
        yield daemon


@pytest.fixture(scope="module")
def sft(tmp_path_factory: pytest.TempPathFactory):
    with running(tmp_path_factory.mktemp("sft"), "--model", "tiny-sft", *FP32) as daemon:
        yield daemon


def generate(daemon: Daemon, tmp_path: Path, **fields: object) -> list[dict]:
    request = {
        "caption": "warm synth pad",
        "duration_s": DURATION_S,
        "seed": 5,
        "output": str(tmp_path / "take.wav"),
        "progress": True,
        **fields,
    }
    return ask(daemon.socket, {k: v for k, v in request.items() if v is not None})


def diffusion_steps(answers: list[dict]) -> int:
    """The `of` of the diffusion progress lines, checked to be one per step."""
    steps = [a["progress"] for a in answers[:-1] if a["progress"]["stage"] == "diffusion"]
    assert [s["step"] for s in steps] == list(range(len(steps)))
    return steps[0]["of"]


def assert_audio(answer: dict) -> None:
    assert answer["ok"] is True, answer
    info = soundfile.info(answer["path"])
    assert (info.samplerate, info.channels) == (48000, 2)
    assert info.frames == pytest.approx(DURATION_S * 48000, abs=1920)


def test_status_reports_the_served_model(xl_turbo: Daemon, sft: Daemon) -> None:
    assert xl_turbo.status()["model"] == "xl-turbo"
    assert sft.status()["model"] == "sft"


def test_xl_turbo_defaults_to_eight_steps_and_takes_up_to_twenty(
    xl_turbo: Daemon, tmp_path: Path
) -> None:
    answers = generate(xl_turbo, tmp_path)
    assert_audio(answers[-1])
    assert diffusion_steps(answers) == 8
    answers = generate(xl_turbo, tmp_path, steps=3, shift=2.5, dcw=False)
    assert_audio(answers[-1])
    assert diffusion_steps(answers) == 3


def test_retake_gives_a_variation_of_the_take(xl_turbo: Daemon, tmp_path: Path) -> None:
    plain = generate(xl_turbo, tmp_path / "a")[-1]
    again = generate(xl_turbo, tmp_path / "b")[-1]
    retake = generate(xl_turbo, tmp_path / "c", retake_seed=9, retake_variance=0.2)[-1]
    read = [soundfile.read(a["path"])[0] for a in (plain, again, retake)]
    assert (read[0] == read[1]).all()
    assert not (read[0] == read[2]).all()
    assert retake["seed"] == 5


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"guidance_scale": 5.0}, "guidance-distilled"),
        ({"timesteps": [1.0, 0.5, 0.0]}, "guidance-distilled"),
        ({"steps": 21}, "at most 20 steps"),
    ],
)
def test_turbo_refuses_what_it_does_not_take(
    xl_turbo: Daemon, tmp_path: Path, fields: dict, message: str
) -> None:
    (answer,) = generate(xl_turbo, tmp_path, **fields)
    assert answer["ok"] is False and answer["code"] == "invalid_request"
    assert message in answer["error"]


def test_sft_defaults_to_fifty_guided_steps(sft: Daemon, tmp_path: Path) -> None:
    answers = generate(sft, tmp_path)
    assert_audio(answers[-1])
    assert diffusion_steps(answers) == 50


@pytest.mark.parametrize(
    "fields",
    [
        {"steps": 4, "guidance": "cfg", "guidance_scale": 3.0},
        {"steps": 4, "guidance": "adg", "guidance_interval": [0.3, 0.9], "shift": 3.0},
        {"timesteps": [1.0, 0.8, 0.5, 0.0], "dcw": True},
        {"steps": 4, "sampler": "heun", "velocity_norm_threshold": 2.0},
        {"steps": 4, "sampler": "sde", "velocity_ema_factor": 0.1},
    ],
)
def test_sft_takes_guidance_fields(sft: Daemon, tmp_path: Path, fields: dict) -> None:
    answers = generate(sft, tmp_path, **fields)
    assert_audio(answers[-1])
    expected = len(fields["timesteps"]) - 1 if "timesteps" in fields else fields["steps"]
    assert diffusion_steps(answers) == expected
    assert answers[-1]["sampler"] == fields.get("sampler", "euler")


def test_base_refuses_custom_timesteps_and_answers_report_the_dcw_run(
    tmp_path: Path, xl_turbo: Daemon
) -> None:
    with running(tmp_path, "--model", "tiny-base", *FP32) as base:
        (refused,) = generate(base, tmp_path, timesteps=[1.0, 0.5, 0.0])
        assert refused["code"] == "invalid_request"
        assert "timesteps" in refused["error"] and "steps and shift" in refused["error"]
        plain = generate(base, tmp_path / "a", steps=2)
        assert_audio(plain[-1])
        assert diffusion_steps(plain) == 2 and plain[-1]["dcw"] is None
        asked = generate(base, tmp_path / "b", steps=2, dcw_mode="low")[-1]
        assert asked["dcw"] == {"mode": "low", "scaler": 0.05, "high_scaler": 0.02}
    turbo = generate(xl_turbo, tmp_path / "c", steps=2)[-1]
    assert turbo["dcw"] == {"mode": "double", "scaler": 0.05, "high_scaler": 0.02}
    off = generate(xl_turbo, tmp_path / "d", steps=2, dcw=False)[-1]
    assert off["ok"] is True and off["dcw"] is None


def test_lora_request_loads_the_adapter_and_a_mismatched_one_is_refused(
    sft: Daemon, tmp_path: Path
) -> None:
    adapter = make_tiny_lora(tmp_path / "lora", dit_config("sft"))
    plain = generate(sft, tmp_path / "a", steps=3)[-1]
    tuned = generate(sft, tmp_path / "b", steps=3, lora=str(adapter), lora_scale=0.8)[-1]
    assert_audio(tuned)
    assert not (soundfile.read(plain["path"])[0] == soundfile.read(tuned["path"])[0]).all()
    zero = generate(sft, tmp_path / "c", steps=3, lora=str(adapter), lora_scale=0.0)[-1]
    assert (soundfile.read(plain["path"])[0] == soundfile.read(zero["path"])[0]).all()
    xl_adapter = make_tiny_lora(tmp_path / "xl", dit_config("xl-sft"))
    answer = generate(sft, tmp_path / "d", steps=3, lora=str(xl_adapter))[-1]
    assert answer["code"] == "invalid_request" and "does not fit" in answer["error"]
    assert sft.status()["loaded"] is True


def test_several_seeds_make_one_file_per_take(xl_turbo: Daemon, tmp_path: Path) -> None:
    single = generate(xl_turbo, tmp_path / "one", seed=3)[-1]
    assert "takes" not in single and single["path"] == str(tmp_path / "one" / "take.wav")
    answers = generate(xl_turbo, tmp_path / "many", seed=None, seeds=[3, 4])
    answer = answers[-1]
    assert answer["ok"] is True, answer
    folder = tmp_path / "many"
    assert answer["takes"] == [
        {"path": str(folder / "take-3.wav"), "seed": 3},
        {"path": str(folder / "take-4.wav"), "seed": 4},
    ]
    assert (answer["path"], answer["seed"]) == (str(folder / "take-3.wav"), 3)
    first, second = (soundfile.read(t["path"])[0] for t in answer["takes"])
    alone = soundfile.read(single["path"])[0]
    assert abs(first - alone).max() < 1e-3  # the same take, computed in a batch of two
    assert abs(first - second).max() > 1e-2
    assert diffusion_steps(answers) == 8  # one batch, not one run per seed


def test_lora_given_at_start_serves_requests_that_name_none(tmp_path: Path) -> None:
    adapter = make_tiny_lora(tmp_path / "lora", dit_config("sft"))
    with running(tmp_path, "--model", "tiny-sft", "--lora", f"{adapter}:0.5") as daemon:
        default = generate(daemon, tmp_path / "a", steps=2)[-1]
        named = generate(daemon, tmp_path / "b", steps=2, lora=str(adapter), lora_scale=0.5)[-1]
        base = generate(daemon, tmp_path / "c", steps=2, lora_scale=0.0)[-1]
        read = [soundfile.read(a["path"])[0] for a in (default, named, base)]
        assert (read[0] == read[1]).all()
        assert not (read[0] == read[2]).all()


def test_missing_lora_at_start_is_refused_before_serving(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "acestep_daemon", "serve", "--lora", str(tmp_path / "nope")],
        cwd=REPO,
        env=daemon_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2 and "does not exist" in result.stderr
