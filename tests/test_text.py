"""Prompt templates, the metas block and the Qwen3 text front-end (upstream `SFT_GEN_PROMPT`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import Qwen3Model

from acestep_daemon.text import (
    CAPTION_MAX_TOKENS,
    COVER_INSTRUCTION,
    INSTRUCTIONS,
    LYRICS_MAX_TOKENS,
    REPAINT_INSTRUCTION,
    TEXT2MUSIC_INSTRUCTION,
    TextEncoder,
    caption_prompt,
    lyrics_prompt,
    metas_for_request,
    render_metas,
)

MODEL_MD_EXAMPLE = (
    "# Instruction\nFill the audio semantic mask based on the given conditions:\n\n"
    "# Caption\njazz piano\n\n# Metas\n- bpm: 120\n- timesignature: 4\n"
    "- keyscale: C major\n- duration: 30 seconds\n<|endoftext|>\n"
)


@pytest.fixture(scope="module")
def encoder(tiny_text_dir: Path) -> TextEncoder:
    return TextEncoder.load(tiny_text_dir, "cpu", torch.float32)


def test_caption_prompt_reproduces_the_model_md_example_exactly() -> None:
    metas = render_metas(120, "4/4", "C major", 30.0)
    assert caption_prompt("jazz piano", metas) == MODEL_MD_EXAMPLE


def test_lyrics_prompt_ends_with_endoftext_and_no_newline() -> None:
    prompt = lyrics_prompt("[verse]\nHello world", "en")
    assert prompt == "# Languages\nen\n\n# Lyric\n[verse]\nHello world<|endoftext|>"


def test_instructions_are_the_upstream_strings() -> None:
    assert TEXT2MUSIC_INSTRUCTION == "Fill the audio semantic mask based on the given conditions:"
    assert REPAINT_INSTRUCTION == "Repaint the mask area based on the given conditions:"
    assert COVER_INSTRUCTION == "Generate audio semantic tokens based on the given conditions:"
    assert INSTRUCTIONS == {
        "text2music": TEXT2MUSIC_INSTRUCTION,
        "repaint": REPAINT_INSTRUCTION,
        "cover": COVER_INSTRUCTION,
    }
    assert caption_prompt("x", "", REPAINT_INSTRUCTION).startswith(
        "# Instruction\nRepaint the mask area based on the given conditions:\n\n# Caption\nx\n"
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            (120, "4", "C major", 30),
            "- bpm: 120\n- timesignature: 4\n- keyscale: C major\n- duration: 30 seconds\n",
        ),
        (
            (None, None, None, None),
            "- bpm: N/A\n- timesignature: N/A\n- keyscale: N/A\n- duration: 30 seconds\n",
        ),
        (
            (0, "6/8", "F# minor", 29.99),
            "- bpm: N/A\n- timesignature: 6\n- keyscale: F# minor\n- duration: 29 seconds\n",
        ),
        (
            (90, "", "  ", 240.0),
            "- bpm: 90\n- timesignature: N/A\n- keyscale: N/A\n- duration: 240 seconds\n",
        ),
    ],
)
def test_render_metas_gives_the_training_block(args: tuple, expected: str) -> None:
    assert render_metas(*args) == expected


def test_structured_metas_fields_win_over_a_free_string() -> None:
    block = metas_for_request("bpm: 90", bpm=128, key="A minor", duration_s=12.5)
    assert block == render_metas(128, None, "A minor", 12.5)


def test_free_metas_string_passes_through_unchanged() -> None:
    free = "  bpm: 90, key: C major, energetic "
    assert metas_for_request(free, duration_s=60.0) == free


def test_no_metas_at_all_gives_the_default_block_with_the_request_duration() -> None:
    expected = "- bpm: N/A\n- timesignature: N/A\n- keyscale: N/A\n- duration: 45 seconds\n"
    assert metas_for_request("  \n", duration_s=45.7) == expected


def test_tokenizer_appends_endoftext_after_the_template_one(encoder: TextEncoder) -> None:
    tokenizer = encoder.tokenizer
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    newline = tokenizer.convert_tokens_to_ids("Ċ")
    assert tokenizer.pad_token_id == eos
    assert tokenizer.eos_token == "<|im_end|>"

    caption_ids = tokenizer(MODEL_MD_EXAMPLE)["input_ids"]
    assert caption_ids[-3:] == [eos, newline, eos]
    assert caption_ids.count(eos) == 2
    assert tokenizer.decode(caption_ids) == MODEL_MD_EXAMPLE + "<|endoftext|>"

    lyric_ids = tokenizer(lyrics_prompt("[verse]\nHello world", "en"))["input_ids"]
    assert lyric_ids[-2:] == [eos, eos]


def test_batches_are_right_padded_with_endoftext_and_masked(encoder: TextEncoder) -> None:
    ids, mask = encoder.tokenize(["a", "a longer prompt"], CAPTION_MAX_TOKENS)
    eos = encoder.tokenizer.pad_token_id
    short = int(mask[0].sum())
    assert mask[1].all()
    assert mask[0, :short].all() and not mask[0, short:].any()
    assert (ids[0, short - 1 :] == eos).all()
    assert ids.dtype == torch.long and ids.shape == mask.shape


def test_prompts_are_truncated_at_256_and_2048_tokens_keeping_the_final_eos(
    encoder: TextEncoder,
) -> None:
    eos = encoder.tokenizer.pad_token_id
    long_text = "jazz piano " * 1500
    caption_hidden, caption_mask = encoder.encode_caption([caption_prompt(long_text, "")])
    assert caption_hidden.shape[1] == CAPTION_MAX_TOKENS == caption_mask.shape[1]
    ids, _ = encoder.tokenize([lyrics_prompt(long_text, "en")], LYRICS_MAX_TOKENS)
    assert ids.shape[1] == LYRICS_MAX_TOKENS
    assert ids[0, -1] == eos


def test_embed_lyrics_returns_the_embedding_table_rows(encoder: TextEncoder) -> None:
    prompts = [lyrics_prompt("[chorus]\nSing it loud", "en"), lyrics_prompt("", "ja")]
    hidden, mask = encoder.embed_lyrics(prompts)
    ids, expected_mask = encoder.tokenize(prompts, LYRICS_MAX_TOKENS)
    table = encoder.model.embed_tokens.weight
    assert torch.equal(mask, expected_mask)
    assert torch.equal(hidden, table[ids])


def test_encode_caption_equals_qwen3_run_directly(
    encoder: TextEncoder, tiny_text_dir: Path
) -> None:
    prompts = [MODEL_MD_EXAMPLE, caption_prompt("lo-fi beat", render_metas(None, None, None, 8))]
    hidden, mask = encoder.encode_caption(prompts)
    reference = Qwen3Model.from_pretrained(tiny_text_dir, dtype=torch.float32).eval()
    for row, prompt in enumerate(prompts):
        ids = encoder.tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            expected = reference(input_ids=ids).last_hidden_state[0]  # [L, D]
        valid = int(mask[row].sum())
        assert valid == ids.shape[1]
        torch.testing.assert_close(hidden[row, :valid], expected, rtol=1e-5, atol=1e-6)
    assert hidden.shape == (2, mask.shape[1], reference.config.hidden_size)


def test_text_encoder_loads_in_the_requested_dtype_and_moves(tiny_text_dir: Path) -> None:
    encoder = TextEncoder.load(tiny_text_dir, "cpu", torch.bfloat16)
    hidden, _ = encoder.encode_caption([MODEL_MD_EXAMPLE])
    assert hidden.dtype == torch.bfloat16 and torch.isfinite(hidden).all()
    encoder.to("cpu", torch.float32)
    assert encoder.dtype == torch.float32
    lyrics, _ = encoder.embed_lyrics([lyrics_prompt("la la", "en")])
    assert lyrics.dtype == torch.float32
