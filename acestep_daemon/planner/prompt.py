"""The 5 Hz LM's prompts, rendered with the LM folder's own chat template.

Four prompts, as the official `LLMHandler` builds them (`build_formatted_prompt`,
`build_formatted_prompt_with_cot`, `_build_unconditional_prompt`):
- metas (phase 1), conditional: system instruction, user "# Caption / # Lyric", then the
  assistant turn opens; the LM writes the thought.
- metas, unconditional (for CFG): the user message keeps only the lyrics, or uses the
  negative prompt as the caption when one other than the default is given.
- codes (phase 2), conditional: the same conversation with the thought as the assistant's
  message; the LM continues after it with audio codes.
- codes, unconditional: an empty thought, and the negative prompt (when not the default)
  in place of the caption.
"""

from __future__ import annotations

from typing import Protocol

INSTRUCTION = "Generate audio semantic tokens based on the given conditions:"
DEFAULT_NEGATIVE = "NO USER INPUT"
"""The negative prompt that means 'none': the unconditional prompts then drop the caption
(metas) or keep it (codes)."""

EMPTY_THOUGHT = "<think>\n</think>"


class ChatTemplate(Protocol):
    """What the prompts need of a tokenizer (transformers' `apply_chat_template`)."""

    def apply_chat_template(self, conversation: list[dict[str, str]], **kwargs: object) -> str: ...


def _user(caption: str | None, lyrics: str) -> str:
    if caption is None:
        return f"# Lyric\n{lyrics}\n"
    return f"# Caption\n{caption}\n\n# Lyric\n{lyrics}\n"


def _conversation(user: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": f"# Instruction\n{INSTRUCTION}\n\n"},
        {"role": "user", "content": user},
    ]


def _has_negative(negative: str) -> bool:
    return bool(negative.strip()) and negative.strip() != DEFAULT_NEGATIVE


def metas_prompt(tokenizer: ChatTemplate, caption: str, lyrics: str) -> str:
    """Phase-1 conditional prompt: ends where the assistant's turn begins."""
    return tokenizer.apply_chat_template(
        _conversation(_user(caption, lyrics)), tokenize=False, add_generation_prompt=True
    )


def metas_unconditional_prompt(tokenizer: ChatTemplate, lyrics: str, negative: str) -> str:
    """Phase-1 unconditional prompt: lyrics only, or the negative prompt as the caption."""
    caption = negative if _has_negative(negative) else None
    return tokenizer.apply_chat_template(
        _conversation(_user(caption, lyrics)), tokenize=False, add_generation_prompt=True
    )


def codes_prompt(tokenizer: ChatTemplate, caption: str, lyrics: str, thought: str) -> str:
    """Phase-2 conditional prompt: the thought is the assistant's message, codes follow."""
    return _with_thought(tokenizer, _user(caption, lyrics), thought)


def codes_unconditional_prompt(
    tokenizer: ChatTemplate, caption: str, lyrics: str, negative: str
) -> str:
    """Phase-2 unconditional prompt: an empty thought; the negative prompt replaces the
    caption when one other than the default is given."""
    caption = negative if _has_negative(negative) else caption
    return _with_thought(tokenizer, _user(caption, lyrics), EMPTY_THOUGHT)


def _with_thought(tokenizer: ChatTemplate, user: str, thought: str) -> str:
    conversation = [*_conversation(user), {"role": "assistant", "content": thought}]
    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=False)
    return text if text.endswith("\n") else text + "\n"
