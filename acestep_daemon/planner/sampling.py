"""Next-token choice of the 5 Hz LM: classifier-free guidance, top-k, top-p, temperature.

The order and arithmetic follow the official PyTorch path (`LLMHandler._generate_with_cfg_custom`
and its `_apply_top_k_filter`, `_apply_top_p_filter`, `_sample_tokens`): guidance on float32
logits, then the constraint mask, then top-k and top-p on the guided logits, then the
temperature, softmax and one multinomial draw from a seeded generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .prompt import DEFAULT_NEGATIVE


@dataclass(frozen=True)
class SamplingOptions:
    """LM sampling settings; the defaults are the official Python API's."""

    temperature: float = 0.85
    top_p: float = 0.9
    top_k: int = 0  # 0 = off
    cfg_scale: float = 2.0  # <= 1 = no guidance (one stream)
    negative: str = DEFAULT_NEGATIVE

    @property
    def guided(self) -> bool:
        return self.cfg_scale > 1.0


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """uncond + scale · (cond − uncond), in float32. cond, uncond [B, V] -> [B, V]."""
    cond, uncond = cond.float(), uncond.float()
    return uncond + scale * (cond - uncond)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (in place); k <= 0 keeps all."""
    if k > 0:
        kth = torch.topk(logits, min(k, logits.shape[-1]))[0][..., -1, None]
        logits[logits < kth] = float("-inf")
    return logits


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (in place).

    The most likely token always stays; p outside (0, 1) keeps all. logits [B, V].
    """
    if 0.0 < p < 1.0:
        ordered, order = torch.sort(logits, descending=True)
        cumulative = torch.cumsum(torch.softmax(ordered.float(), dim=-1), dim=-1)
        drop = cumulative > p
        drop[..., 1:] = drop[..., :-1].clone()
        drop[..., 0] = False
        logits[drop.scatter(1, order, drop)] = float("-inf")
    return logits


def sample(
    logits: torch.Tensor, options: SamplingOptions, generator: torch.Generator
) -> torch.Tensor:
    """One token per row of logits [B, V] (already guided and masked) -> [B] long."""
    logits = top_p_filter(top_k_filter(logits, options.top_k), options.top_p)
    if options.temperature <= 0:
        return torch.argmax(logits, dim=-1)
    probs = torch.softmax(logits.float() / options.temperature, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
