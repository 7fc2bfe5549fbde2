"""The planner's prompts and thought text equal the official builders' (fixture from their code)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from acestep_daemon.planner.metas import Metas, format_thought, parse_thought
from acestep_daemon.planner.prompt import (
    codes_prompt,
    codes_unconditional_prompt,
    metas_prompt,
    metas_unconditional_prompt,
)

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "lm_prompts.json").read_text())
CASES = FIXTURE["cases"]


def official_metas(metadata: dict) -> Metas:
    """The official metadata dict (time signature as text, e.g. '3/4') as our Metas."""
    values = dict(metadata)
    if "timesignature" in values:
        values["timesignature"] = int(values["timesignature"].split("/")[0])
    return Metas(**values)


@pytest.fixture(scope="module")
def tokenizer(tiny_lm_dir: Path) -> PreTrainedTokenizerFast:
    return AutoTokenizer.from_pretrained(tiny_lm_dir)


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_prompts_are_byte_equal_to_the_official_builders(
    tokenizer: PreTrainedTokenizerFast, case: dict
) -> None:
    caption, lyrics, negative = case["caption"], case["lyrics"], case["negative"]
    thought = format_thought(official_metas(case["metadata"]))
    assert thought == case["thought"]
    assert metas_prompt(tokenizer, caption, lyrics) == case["metas_prompt"]
    assert (
        metas_unconditional_prompt(tokenizer, lyrics, negative)
        == case["metas_unconditional_prompt"]
    )
    assert codes_prompt(tokenizer, caption, lyrics, thought) == case["codes_prompt"]
    assert (
        codes_unconditional_prompt(tokenizer, caption, lyrics, negative)
        == case["codes_unconditional_prompt"]
    )


def test_fixture_covers_lyrics_partial_metas_negatives_and_yaml_folding() -> None:
    assert {bool(c["lyrics"]) for c in CASES} == {True, False}
    assert len({len(c["metadata"]) for c in CASES}) >= 4
    assert {c["negative"] == "NO USER INPUT" for c in CASES} == {True, False}
    assert any("\n  " in c["thought"] for c in CASES)  # a long caption wrapped by YAML


@pytest.mark.parametrize("item", FIXTURE["parsed"], ids=["codes", "no-end-tag", "bad-bpm"])
def test_thought_is_read_like_the_official_parser(item: dict) -> None:
    official = item["metadata"]
    ours = parse_thought(item["text"]).known()
    expected = {k: v for k, v in official.items() if not (k == "bpm" and isinstance(v, str))}
    if "timesignature" in expected:
        expected["timesignature"] = int(expected["timesignature"])
    assert ours == expected


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_written_thought_reads_back_unchanged(case: dict) -> None:
    metas = official_metas(case["metadata"])
    assert parse_thought(format_thought(metas)) == metas
