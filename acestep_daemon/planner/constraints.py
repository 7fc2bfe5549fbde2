"""Constrained decoding for the 5 Hz LM: a finite-state grammar for the thought, a mask for codes.

Phase 1 (the thought) follows the official `MetadataConstrainedLogitsProcessor`
(`acestep/constrained_logits_processor.py`) in what it allows: `<think>`, then one line per
field in the order bpm, caption, duration, keyscale, language, timesignature; bpm in 30–300,
duration in 10–600, a key from the 70 keys, a language code (the most likely first token is
taken greedily, then the code is completed), a time signature in {2, 3, 4, 6}. A value the
caller gave is written for the LM instead of sampled. Values are matched as token sequences,
tokenized in context (`"bpm: 120"` minus `"bpm:"`), so multi-digit or merged tokens work.

Two choices differ from the official processor, for robustness: fixed text (field names,
given values) is forced as its canonical token sequence, and the caption is always the
caller's (written on one line, not sampled), so every thought parses and has every field.

Phase 2 (codes): only the audio-code tokens `<|audio_code_0|>` … `<|audio_code_63999|>`
(the FSQ codebook) are allowed, exactly duration·5 of them (the official processor blocks
end-of-sequence until that count and then forces it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from acestep_daemon.params import KEYSCALES, LANGUAGES

from .metas import BPM_RANGE, DURATION_RANGE, TIME_SIGNATURES, Metas

CODEBOOK_SIZE = 64_000
"""FSQ codebook of the tokenizer (levels 8·8·8·5·5·5); audio codes 0–63,999."""

CODES_PER_SECOND = 5


def audio_code_token(code: int) -> str:
    """The vocabulary entry of one audio code."""
    return f"<|audio_code_{code}|>"


class TextTokenizer(Protocol):
    """What the grammar needs of a tokenizer (transformers' fast tokenizer)."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def convert_tokens_to_ids(self, tokens: list[str]) -> list[int]: ...

    def __len__(self) -> int: ...


Tree = dict[tuple[int, ...], frozenset[int]]
"""Value prefix (token ids so far) -> allowed next tokens; the newline ends a complete value."""


@dataclass(frozen=True)
class _Field:
    name: str
    tree: Tree
    greedy_first: bool  # language: the most likely first token, as the official processor
    stop_when_complete: bool  # keyscale, language: a complete value ends at once


class ThoughtGrammar:
    """The token-level grammar of the thought for one tokenizer (built once, reused)."""

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self._tokenizer = tokenizer
        self.newline = self._encode("\n")[-1]
        self.think = self._encode("<think>")
        numbers = {
            "bpm": [str(v) for v in range(BPM_RANGE[0], BPM_RANGE[1] + 1)],
            "duration": [str(v) for v in range(DURATION_RANGE[0], DURATION_RANGE[1] + 1)],
            "timesignature": [str(v) for v in TIME_SIGNATURES],
        }
        self.fields = {
            name: _Field(name, self._tree(name, values), False, False)
            for name, values in numbers.items()
        }
        self.fields["keyscale"] = _Field("keyscale", self._tree("keyscale", KEYSCALES), False, True)
        self.fields["language"] = _Field("language", self._tree("language", LANGUAGES), True, True)

    def _encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False)

    def name_tokens(self, name: str) -> list[int]:
        """Tokens of `name:` (no space: the value's tokens carry it)."""
        return self._encode(f"{name}:")

    def value_tokens(self, name: str, value: str) -> list[int]:
        """Tokens of ` value` as they follow `name:` in `name: value` (no newline)."""
        prefix = self.name_tokens(name)
        full = self._encode(f"{name}: {value}")
        if full[: len(prefix)] != prefix:
            return self._encode(f" {value}")
        return full[len(prefix) :]

    def _tree(self, name: str, values: Sequence[str]) -> Tree:
        nodes: dict[tuple[int, ...], set[int]] = {}
        for value in values:
            tokens = self.value_tokens(name, value)
            for i in range(len(tokens) + 1):
                follow = tokens[i] if i < len(tokens) else self.newline
                nodes.setdefault(tuple(tokens[:i]), set()).add(follow)
        return {prefix: frozenset(follow) for prefix, follow in nodes.items()}

    def decoder(self, given: Metas) -> ThoughtDecoder:
        """A fresh decoder for one thought; `given.caption` must be set."""
        if given.caption is None:
            raise ValueError("the thought's caption is the caller's; none was given")
        steps: list[list[int] | _Field] = [[*self.think, self.newline]]
        values = given.known()
        values["caption"] = " ".join(given.caption.split())  # one line in the thought
        for name in ("bpm", "caption", "duration", "keyscale", "language", "timesignature"):
            steps.append(self.name_tokens(name))
            if name in values:
                steps.append([*self.value_tokens(name, str(values[name])), self.newline])
            else:
                steps.append(self.fields[name])
        return ThoughtDecoder(steps, self.newline)


class ThoughtDecoder:
    """State of one thought being written: forced runs and constrained choices in turn.

    Use: while not done: take `forced()` tokens if any (feed them), else pick one of
    `candidates()` (greedily when `greedy()`), then `advance` with every token taken.
    """

    def __init__(self, steps: list[list[int] | _Field], newline: int) -> None:
        self._steps = steps
        self._newline = newline
        self._index = 0
        self._prefix: tuple[int, ...] = ()
        self._pending: list[int] = []
        self.tokens: list[int] = []
        self._enter()

    @property
    def max_tokens(self) -> int:
        """An upper bound of the thought's length in tokens (forced runs + longest values)."""
        return sum(
            len(step) if isinstance(step, list) else 1 + max(map(len, step.tree))
            for step in self._steps
        )

    @property
    def done(self) -> bool:
        return self._index >= len(self._steps)

    def _enter(self) -> None:
        """Load the forced run of the current step (if it is one)."""
        while not self.done and not self._pending:
            step = self._steps[self._index]
            if isinstance(step, _Field):
                return
            self._pending = list(step)
            if not self._pending:
                self._index += 1

    def forced(self) -> list[int]:
        """The tokens that must come next (empty when a choice is due)."""
        return list(self._pending)

    def _field(self) -> _Field:
        step = self._steps[self._index]
        assert isinstance(step, _Field) and not self._pending, "no choice is due"
        return step

    def greedy(self) -> bool:
        """True when the choice is the most likely candidate, not a sample."""
        field = self._field()
        return field.greedy_first and not self._prefix

    def candidates(self) -> list[int]:
        """Sorted token ids allowed at this choice."""
        field = self._field()
        follow = field.tree.get(self._prefix, frozenset({self._newline}))
        if field.stop_when_complete and self._newline in follow:
            return [self._newline]
        return sorted(follow)

    def advance(self, token: int) -> None:
        """Record one token taken (forced or chosen)."""
        self.tokens.append(token)
        if self._pending:
            if token != self._pending[0]:
                raise ValueError(f"token {token} breaks the forced run {self._pending}")
            self._pending.pop(0)
            if not self._pending:
                self._index += 1
                self._enter()
            return
        if token not in self.candidates():
            raise ValueError(f"token {token} is not allowed here")
        if token == self._newline:
            self._index += 1
            self._prefix = ()
            self._enter()
        else:
            self._prefix = (*self._prefix, token)


class CodeVocabulary:
    """Token ids of the audio codes 0–63,999 and the mask that allows only them."""

    def __init__(self, tokenizer: TextTokenizer, vocab_size: int) -> None:
        names = [audio_code_token(i) for i in range(CODEBOOK_SIZE)]
        ids = tokenizer.convert_tokens_to_ids(names)
        if any(i is None or i < 0 or i >= vocab_size for i in ids) or len(set(ids)) != len(ids):
            raise ValueError("the LM tokenizer lacks the audio-code tokens <|audio_code_N|>")
        self.token_ids = torch.tensor(ids, dtype=torch.long)  # [64000], code -> token id
        self.mask = torch.full((vocab_size,), float("-inf"))  # [V]
        self.mask[self.token_ids] = 0.0
        self._code_of = torch.full((vocab_size,), -1, dtype=torch.long)  # [V], token -> code
        self._code_of[self.token_ids] = torch.arange(CODEBOOK_SIZE)

    @property
    def rows(self) -> slice | None:
        """The code tokens as one contiguous id range (as in the real tokenizer), else None."""
        first = int(self.token_ids[0])
        if torch.equal(self.token_ids, torch.arange(first, first + CODEBOOK_SIZE)):
            return slice(first, first + CODEBOOK_SIZE)
        return None

    def codes_of(self, tokens: torch.Tensor) -> torch.Tensor:
        """Audio codes of allowed tokens [N] (any device) -> [N] long on the CPU."""
        return self._code_of[tokens.cpu()]
