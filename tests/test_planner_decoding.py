"""Constrained decoding, guidance and plans of the 5 Hz LM planner, on random and tiny LMs."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from acestep_daemon.params import KEYSCALES, LANGUAGES
from acestep_daemon.planner import LMRunner, PlanRequest, SamplingOptions, make_plan
from acestep_daemon.planner.constraints import CODEBOOK_SIZE
from acestep_daemon.planner.metas import (
    BPM_RANGE,
    DURATION_RANGE,
    TIME_SIGNATURES,
    Metas,
    format_thought,
)
from acestep_daemon.planner.plan import PLANNED_FIELDS, PhaseProgress
from acestep_daemon.planner.prompt import (
    codes_prompt,
    codes_unconditional_prompt,
    metas_prompt,
    metas_unconditional_prompt,
)

FIXTURES = Path(__file__).parent / "fixtures"
CODES_FIXTURE = json.loads((FIXTURES / "lm_codes.json").read_text())
THOUGHT_FIXTURE = json.loads((FIXTURES / "lm_thoughts.json").read_text())


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer(tiny_lm_dir: Path) -> PreTrainedTokenizerFast:
    return AutoTokenizer.from_pretrained(tiny_lm_dir)


@pytest.fixture(scope="module")
def runner(tiny_lm_dir: Path) -> LMRunner:
    return LMRunner.load(tiny_lm_dir, "cpu", torch.float32)


class RandomLogitsLM:
    """A language model whose next-token logits are random: sharp or flat, with spikes.

    It stands in for any network: the grammar alone must keep every thought valid.
    """

    def __init__(self, vocab_size: int, seed: int) -> None:
        self.config = SimpleNamespace(vocab_size=vocab_size)
        self.device = torch.device("cpu")
        self._generator = torch.Generator().manual_seed(seed)

    def eval(self) -> RandomLogitsLM:
        return self

    def __call__(self, input_ids: torch.Tensor, **_: object) -> SimpleNamespace:
        rows, vocab = input_ids.shape[0], self.config.vocab_size
        scale = 10 ** (3 * torch.rand((), generator=self._generator) - 1)  # 0.1 … 100
        logits = scale * torch.randn(rows, 1, vocab, generator=self._generator)
        spikes = torch.randint(0, vocab, (rows, 1, 8), generator=self._generator)
        logits.scatter_(2, spikes, 1e4)
        return SimpleNamespace(logits=logits, past_key_values=None)


def random_request(rng: random.Random) -> PlanRequest:
    """A caption plus a random subset of the given fields (never all four of phase 1's)."""
    given = {
        "bpm": rng.randint(*BPM_RANGE),
        "keyscale": rng.choice(KEYSCALES),
        "timesignature": rng.choice(TIME_SIGNATURES),
        "language": rng.choice(LANGUAGES),
        "duration_s": rng.choice([rng.uniform(1, 600), float(rng.randint(10, 600))]),
    }
    names = rng.sample(sorted(given), rng.randint(0, 3))
    options = SamplingOptions(
        temperature=rng.choice([0.0, 0.85, 1.5]),
        top_p=rng.choice([0.9, 1.0]),
        top_k=rng.choice([0, 5]),
        cfg_scale=rng.choice([1.0, 2.0]),
    )
    return PlanRequest(
        caption=rng.choice(
            ["jazz piano trio", "Rock anthem: big drums", "夜色温柔的钢琴", "two\nbpm: 999"]
        ),
        lyrics=rng.choice(["", "[verse]\nla la la"]),
        seed=rng.randint(0, 2**31),
        options=options,
        **{k: given[k] for k in names},
    )


def assert_valid(metas: Metas) -> None:
    assert set(metas.known()) == set(PLANNED_FIELDS) | {"caption"}
    assert BPM_RANGE[0] <= metas.bpm <= BPM_RANGE[1]
    assert metas.keyscale in KEYSCALES
    assert metas.language in LANGUAGES
    assert metas.timesignature in TIME_SIGNATURES


def test_two_hundred_sampled_thoughts_always_parse_and_respect_every_range(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    rng = random.Random(2026)
    runner = LMRunner(RandomLogitsLM(len(tokenizer), seed=5), tokenizer)
    over_bound: list[tuple[int, int]] = []
    phases = PhaseProgress(metas=lambda n, of: over_bound.extend([(n, of)] if n > of else []))
    for _ in range(200):
        request = random_request(rng)
        plan = make_plan(runner, request, "metas", phases)
        assert_valid(plan.metas)
        given = request.given().known()
        assert {k: plan.metas.known()[k] for k in given} == given  # the caller's values win
        if "duration" not in given:
            assert DURATION_RANGE[0] <= plan.metas.duration <= DURATION_RANGE[1]
            assert plan.duration_s == plan.metas.duration
        else:
            assert plan.duration_s == request.duration_s  # never overridden
        assert set(plan.inferred) == set(PLANNED_FIELDS) - set(given)
    assert over_bound == []  # the progress bound of the thought holds


def test_thought_is_skipped_when_bpm_key_meter_and_duration_are_given(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    runner = LMRunner(RandomLogitsLM(len(tokenizer), seed=1), tokenizer)
    request = PlanRequest("piano", bpm=90, keyscale="D minor", timesignature=3, duration_s=20.0)
    plan = make_plan(runner, request, "metas")
    assert plan.inferred == ()
    assert plan.metas == request.given()  # no language was planned: phase 1 did not run


def test_caption_only_request_becomes_a_planned_song_on_the_tiny_lm(runner: LMRunner) -> None:
    plan = make_plan(runner, PlanRequest("warm jazz piano trio", seed=3), "metas")
    assert_valid(plan.metas)
    assert plan.metas.caption == "warm jazz piano trio"
    assert plan.inferred == PLANNED_FIELDS
    assert plan.codes is None


def test_full_plan_writes_exactly_duration_times_five_codes_in_the_codebook(
    runner: LMRunner,
) -> None:
    request = PlanRequest("lo-fi beat", lyrics="[Instrumental]", duration_s=10.5, seed=11)
    plan = make_plan(runner, request, "full")
    assert_valid(plan.metas)
    assert plan.metas.duration == 10 and plan.duration_s == 10.5
    assert "duration" not in plan.inferred
    assert len(plan.codes) == 52
    assert all(0 <= code < CODEBOOK_SIZE for code in plan.codes)
    assert plan.thought == format_thought(plan.metas)


def test_a_seed_reproduces_the_plan_and_its_codes(runner: LMRunner) -> None:
    request = PlanRequest("ambient drone", duration_s=10.0, seed=42)
    first, again = make_plan(runner, request, "full"), make_plan(runner, request, "full")
    assert again == first
    other = make_plan(runner, PlanRequest("ambient drone", duration_s=10.0, seed=43), "full")
    assert other.codes != first.codes


def official_case_codes(runner: LMRunner, case: dict, **changes: object) -> list[int]:
    options = SamplingOptions(
        temperature=case["temperature"],
        top_p=case["top_p"],
        cfg_scale=case["cfg_scale"],
        negative=case["negative"],
    )
    options = SamplingOptions(**{**options.__dict__, **changes})
    caption, lyrics = case["caption"], case["lyrics"]
    return runner.write_codes(
        codes_prompt(runner.tokenizer, caption, lyrics, case["thought"]),
        codes_unconditional_prompt(runner.tokenizer, caption, lyrics, options.negative),
        case["duration"] * 5,
        options,
        torch.Generator().manual_seed(case["seed"]),
    )


@pytest.mark.parametrize("fixture", [CODES_FIXTURE, THOUGHT_FIXTURE], ids=["codes", "thoughts"])
def test_fixture_was_made_with_this_tiny_lm(tiny_lm_dir: Path, fixture: dict) -> None:
    import hashlib

    for name, digest in fixture["sha256"].items():
        assert hashlib.sha256((tiny_lm_dir / name).read_bytes()).hexdigest() == digest, name


def official_thought(runner: LMRunner, case: dict, **changes: object) -> str:
    given = dict(case["user"])
    if "timesignature" in given:
        given["timesignature"] = int(given["timesignature"])
    options = SamplingOptions(
        **{"temperature": 0.0, "cfg_scale": case["cfg_scale"], "negative": case["negative"]}
        | changes
    )
    caption, lyrics = case["caption"], case["lyrics"]
    return runner.write_thought(
        metas_prompt(runner.tokenizer, caption, lyrics),
        metas_unconditional_prompt(runner.tokenizer, lyrics, options.negative),
        runner.grammar.decoder(Metas(caption=caption, **given)),
        options,
        torch.Generator(),
    )


@pytest.mark.parametrize(
    "case", THOUGHT_FIXTURE["cases"], ids=[f"case{i}" for i in range(len(THOUGHT_FIXTURE["cases"]))]
)
def test_greedy_thought_equals_the_official_constrained_decoder(
    runner: LMRunner, case: dict
) -> None:
    # the official phase 1 stops with end-of-sequence where our decoder simply ends
    assert official_thought(runner, case) + "<|im_end|>" == case["text"]


@pytest.mark.parametrize("change", [{"cfg_scale": 3.0}, {"negative": "x"}])
def test_thought_fixture_catches_a_changed_guidance(runner: LMRunner, change: dict) -> None:
    case = THOUGHT_FIXTURE["cases"][2]
    assert official_thought(runner, case, **change) + "<|im_end|>" != case["text"]


@pytest.mark.parametrize(
    "case", CODES_FIXTURE["cases"], ids=[f"cfg{c['cfg_scale']}" for c in CODES_FIXTURE["cases"]]
)
@pytest.mark.parametrize("code_rows_only", [True, False], ids=["code-rows", "whole-head"])
def test_codes_equal_the_official_decoder_for_the_same_seed(
    runner: LMRunner, case: dict, code_rows_only: bool
) -> None:
    # the fast path (only the audio-code rows of the output head) changes nothing
    assert runner.codes.rows is not None
    runner.code_rows_only = code_rows_only
    try:
        assert official_case_codes(runner, case) == case["codes"]
    finally:
        runner.code_rows_only = True


@pytest.mark.parametrize(
    "change", [{"cfg_scale": 1.9}, {"top_p": 1.0}, {"temperature": 0.8}, {"negative": "noise"}]
)
def test_codes_fixture_catches_a_changed_guidance_or_sampling_step(
    runner: LMRunner, change: dict
) -> None:
    case = CODES_FIXTURE["cases"][0]
    assert official_case_codes(runner, case, **change) != case["codes"]


def test_progress_callback_can_cancel_between_codes(runner: LMRunner) -> None:
    seen: list[int] = []

    class Stop(Exception):
        pass

    def progress(count: int, of: int) -> None:
        assert of == 50
        seen.append(count)
        if count >= 4:
            raise Stop

    case = CODES_FIXTURE["cases"][2]
    prompt = codes_prompt(runner.tokenizer, case["caption"], case["lyrics"], case["thought"])
    with pytest.raises(Stop):
        runner.write_codes(
            prompt, prompt, 50, SamplingOptions(cfg_scale=1.0), torch.Generator(), progress, 2
        )
    assert seen == [2, 4]


def test_progress_reports_each_phase(runner: LMRunner) -> None:
    metas: list[tuple[int, int]] = []
    codes: list[tuple[int, int]] = []
    request = PlanRequest("folk song", duration_s=10.0, seed=5)
    phases = PhaseProgress(lambda *a: metas.append(a), lambda *a: codes.append(a))
    make_plan(runner, request, "full", phases)
    assert metas == sorted(metas) and len(metas) > 5
    assert len({of for _, of in metas}) == 1 and metas[-1][0] <= metas[-1][1]
    assert codes == [(25, 50), (50, 50)]
