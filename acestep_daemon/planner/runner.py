"""The 5 Hz LM runner: a transformers causal LM decoding the thought and the audio codes.

Both prompts of classifier-free guidance (conditional, unconditional) run as one batch of
two left-padded rows sharing one KV cache; each step feeds the same chosen token(s) to both
rows, as the official PyTorch path does. Forced runs of the thought (field names, given
values) are fed in one forward instead of one token at a time. In the code phase only the
audio-code rows of the output head are computed (`LMRunner.code_rows_only`): the other
logits would be masked anyway, and the head is a third of the 0.6B LM's weights. A progress
callback is called as tokens come; an exception raised in it stops decoding (cancellation).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_fast import PreTrainedTokenizerFast

from .constraints import CodeVocabulary, ThoughtDecoder, ThoughtGrammar
from .sampling import SamplingOptions, guide, sample

Progress = Callable[[int, int], None]
"""(written, of): tokens of the thought (of = the grammar's upper bound) or codes so far."""


class _Streams:
    """The conditional row (and the unconditional one under guidance) with their KV cache."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerFast,
        prompts: list[str],
        rows: slice | None = None,
    ) -> None:
        self._model = model
        self._rows = rows  # output-head rows to compute; None: all
        device = model.device
        batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
        self._mask = batch["attention_mask"].to(device)  # [S, T]
        self._cache = None
        self.logits = self._forward(batch["input_ids"].to(device))  # [S, V]

    @torch.inference_mode()
    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [S, k] appended to the cache -> logits of the last position [S, V] (or of
        the head rows [S, R])."""
        inputs = {"input_ids": ids, "attention_mask": self._mask, "past_key_values": self._cache}
        if self._rows is None:
            out = self._model(**inputs, use_cache=True, logits_to_keep=1)
            self._cache = out.past_key_values
            return out.logits[:, -1]
        out = self._model.model(**inputs, use_cache=True)
        self._cache = out.past_key_values
        head = self._model.lm_head
        bias = None if head.bias is None else head.bias[self._rows]
        return F.linear(out.last_hidden_state[:, -1], head.weight[self._rows], bias)  # [S, R]

    def feed(self, tokens: list[int] | torch.Tensor) -> None:
        """Append the same tokens (a list, or a [k] tensor on the device) to every row."""
        rows = self._mask.shape[0]
        ids = torch.as_tensor(tokens, device=self._mask.device).view(1, -1).expand(rows, -1)
        self._mask = torch.cat([self._mask, torch.ones_like(ids)], dim=1)  # ids [S, k]
        self.logits = self._forward(ids)

    def guided(self, options: SamplingOptions) -> torch.Tensor:
        """Next-token logits of the conditional row under guidance, float32 [1, V]."""
        if self.logits.shape[0] == 1:
            return self.logits.float()
        return guide(self.logits[0:1], self.logits[1:2], options.cfg_scale)


class LMRunner:
    """A loaded 5 Hz LM with its tokenizer, thought grammar and audio-code vocabulary."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.grammar = ThoughtGrammar(tokenizer)
        self.codes = CodeVocabulary(tokenizer, model.config.vocab_size)
        self.code_rows_only = True  # fast path: the code phase computes the code rows alone

    @classmethod
    def load(cls, folder: Path, device: torch.device | str, dtype: torch.dtype) -> LMRunner:
        """Load an LM folder (config.json, model.safetensors, tokenizer files)."""
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        return cls(model.to(device), tokenizer)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def to(self, device: torch.device | str, dtype: torch.dtype) -> LMRunner:
        """Move the network (e.g. to the CPU when the GPU runs out of memory)."""
        self.model.to(device, dtype)
        return self

    def _streams(
        self, cond: str, uncond: str, options: SamplingOptions, rows: slice | None = None
    ) -> _Streams:
        prompts = [cond, uncond] if options.guided else [cond]
        return _Streams(self.model, self.tokenizer, prompts, rows)

    def write_thought(
        self,
        cond_prompt: str,
        uncond_prompt: str,
        decoder: ThoughtDecoder,
        options: SamplingOptions,
        generator: torch.Generator,
        progress: Progress | None = None,
    ) -> str:
        """Phase 1: decode the thought under `decoder`'s grammar; returns its text."""
        streams = self._streams(cond_prompt, uncond_prompt, options)
        while True:
            tokens = decoder.forced()
            if not tokens:
                candidates = decoder.candidates()
                logits = streams.guided(options)[:, candidates]  # [1, k]
                if decoder.greedy():
                    pick = int(torch.argmax(logits, dim=-1)[0])
                else:
                    pick = int(sample(logits, options, generator)[0])
                tokens = [candidates[pick]]
            for token in tokens:
                decoder.advance(token)
            if progress is not None:
                progress(len(decoder.tokens), decoder.max_tokens)
            if decoder.done:
                return self.tokenizer.decode(decoder.tokens)
            streams.feed(tokens)

    def write_codes(
        self,
        cond_prompt: str,
        uncond_prompt: str,
        count: int,
        options: SamplingOptions,
        generator: torch.Generator,
        progress: Progress | None = None,
        every: int = 25,
    ) -> list[int]:
        """Phase 2: exactly `count` audio codes (0–63,999) after the prompt's thought.

        `progress` is called every `every` codes and after the last.
        """
        rows = self.codes.rows if self.code_rows_only else None
        streams = self._streams(cond_prompt, uncond_prompt, options, rows)
        mask = self.codes.mask.to(self.device)  # [V]: 0 at the codes, -inf elsewhere
        tokens = torch.empty(count, dtype=torch.long, device=self.device)  # stays on the device
        for i in range(count):
            if rows is None:
                logits = streams.guided(options) + mask  # [1, V]
            else:  # the same values: the code rows, -inf elsewhere
                logits = mask.unsqueeze(0).clone()  # [1, V]
                logits[:, rows] = streams.guided(options)
            tokens[i : i + 1] = sample(logits, options, generator)
            if progress is not None and ((i + 1) % every == 0 or i + 1 == count):
                progress(i + 1, count)
            if i + 1 < count:
                streams.feed(tokens[i : i + 1])
        return self.codes.codes_of(tokens).tolist()
