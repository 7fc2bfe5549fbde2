"""Text front-end: prompt templates, the metas block, and the Qwen3-Embedding encoder.

The caption goes through the whole Qwen3 model (last hidden state after the final
norm); the lyrics only through its input embedding table. Prompt strings are
reproduced byte for byte from the upstream templates (`SFT_GEN_PROMPT` in
`acestep/constants.py`, `AceStepHandler._prepare_batch` in `acestep/handler.py`).

Token ids come from the checkpoint's own tokenizer files with default settings.
The current Qwen3-Embedding tokenizer's post-processor appends `<|endoftext|>` to
every sequence, so a caption ends `…<|endoftext|>, "\n", <|endoftext|>` and lyrics
end `…<|endoftext|>, <|endoftext|>`; truncation keeps that final token.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, Qwen3Model

from acestep_daemon.params import time_signature_numerator

TEXT2MUSIC_INSTRUCTION = "Fill the audio semantic mask based on the given conditions:"
REPAINT_INSTRUCTION = "Repaint the mask area based on the given conditions:"
COVER_INSTRUCTION = "Generate audio semantic tokens based on the given conditions:"
INSTRUCTIONS = {
    "text2music": TEXT2MUSIC_INSTRUCTION,
    "repaint": REPAINT_INSTRUCTION,
    "cover": COVER_INSTRUCTION,
}
"""Instruction line of the caption prompt, per task the turbo model supports."""

EOS_TEXT = "<|endoftext|>"
CAPTION_MAX_TOKENS = 256
LYRICS_MAX_TOKENS = 2048
DEFAULT_METAS_DURATION_S = 30
"""Duration the metas block shows when none is known (upstream default)."""


def caption_prompt(
    caption: str, metas_block: str, instruction: str = TEXT2MUSIC_INSTRUCTION
) -> str:
    """The caption prompt; it ends with `<|endoftext|>` and then a newline."""
    return (
        f"# Instruction\n{instruction}\n\n"
        f"# Caption\n{caption}\n\n"
        f"# Metas\n{metas_block}{EOS_TEXT}\n"
    )


def lyrics_prompt(lyrics: str, language: str) -> str:
    """The lyric prompt; it ends with `<|endoftext|>` and no newline."""
    return f"# Languages\n{language}\n\n# Lyric\n{lyrics}{EOS_TEXT}"


def render_metas(
    bpm: int | None, time_signature: str | None, key: str | None, duration_s: float | None
) -> str:
    """The four-line metas block of the training data; missing fields render as N/A.

    bpm 0 counts as missing; the duration is truncated to whole seconds and is
    30 when unknown, as upstream.
    """
    bpm_text = str(int(bpm)) if bpm else "N/A"
    ts_text = str(time_signature_numerator(time_signature)) if time_signature else "N/A"
    key_text = key.strip() if key and key.strip() else "N/A"
    seconds = DEFAULT_METAS_DURATION_S if duration_s is None else int(duration_s)
    return (
        f"- bpm: {bpm_text}\n"
        f"- timesignature: {ts_text}\n"
        f"- keyscale: {key_text}\n"
        f"- duration: {seconds} seconds\n"
    )


def metas_for_request(
    metas: str,
    *,
    bpm: int | None = None,
    time_signature: str | None = None,
    key: str | None = None,
    duration_s: float | None = None,
) -> str:
    """The text that goes under `# Metas`.

    Rule: any structured field (bpm, time_signature, key) given -> the rendered
    block; else a non-blank free `metas` string (ace-step-rs clients) verbatim;
    else the default block (all N/A) with the request duration. Requests never
    carry both (`GenerationParams` refuses the combination).
    """
    if bpm is not None or time_signature or key:
        return render_metas(bpm, time_signature, key, duration_s)
    if metas.strip():
        return metas
    return render_metas(None, None, None, duration_s)


class TextEncoder:
    """Tokenizer + Qwen3-Embedding model of a checkpoint's `Qwen3-Embedding-0.6B/` folder."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, model: Qwen3Model) -> None:
        self.tokenizer = tokenizer
        self.model = model

    @classmethod
    def load(cls, text_dir: Path, device: str | torch.device, dtype: torch.dtype) -> TextEncoder:
        """Load the tokenizer and the Qwen3 model from local files only."""
        tokenizer = AutoTokenizer.from_pretrained(text_dir, local_files_only=True)
        tokenizer.padding_side = "right"
        model = Qwen3Model.from_pretrained(
            text_dir, dtype=dtype, local_files_only=True, attn_implementation="sdpa"
        )
        model.eval().requires_grad_(False)
        encoder = cls(tokenizer, model)
        encoder.to(device, dtype)
        return encoder

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> None:
        """Move (and optionally cast) the model in place."""
        self.model.to(device=device, dtype=dtype)

    def tokenize(
        self, prompts: Sequence[str], max_length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and mask, each prompt truncated on the right, batch right-padded.

        Returns ids [B, L] long and mask [B, L] long (1 = token, 0 = padding), on
        the model device. The tokenizer's own post-processor decides whether an
        `<|endoftext|>` is appended.
        """
        batch = self.tokenizer(
            list(prompts),
            truncation=True,
            max_length=max_length,
            padding="longest",
            return_tensors="pt",
        )
        return batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)

    def count_tokens(self, prompt: str) -> int:
        """Tokens in a prompt before any truncation (to tell a caller what was cut)."""
        return len(self.tokenizer(prompt, truncation=False, verbose=False)["input_ids"])

    @torch.no_grad()
    def encode_caption(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Caption prompts -> (hidden [B, L, D] after the final norm, mask [B, L]).

        As upstream, no attention mask is passed to the causal model: right padding
        cannot change the valid positions.
        """
        ids, mask = self.tokenize(prompts, CAPTION_MAX_TOKENS)
        hidden = self.model(input_ids=ids).last_hidden_state  # [B, L, D]
        return hidden, mask

    @torch.no_grad()
    def embed_lyrics(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Lyric prompts -> (embedding-table rows [B, L, D], mask [B, L]); no transformer."""
        ids, mask = self.tokenize(prompts, LYRICS_MAX_TOKENS)
        return self.model.embed_tokens(ids), mask  # [B, L, D]
