"""Weight quantization of the ACE-Step network with torchao (`acestep serve --quantize`).

As upstream (`quantize_(self.model, ...)` in ACE-Step-1.5's `acestep/handler.py`), every
linear layer of the network (the DiT, the condition encoder, the audio tokenizer and
detokenizer) keeps its weight as 8-bit numbers with one scale per output row; norms,
convolutions, embeddings and biases stay in the pipeline's dtype. The text encoder, the
5 Hz LM and the VAE are not quantized.

| scheme | on CUDA                                 | on the CPU                                  |
|--------|-----------------------------------------|---------------------------------------------|
| int8   | int8 weights, bf16 products             | int8 weights and per-token int8 activations |
| fp8    | float8 (e4m3) weights, bf16 products    | the same (slower than the CPU's own dtype)  |

On the CPU int8 takes dynamic activations because weight-only int8 is slower there than
plain float32 (the weights are widened for every product), while int8 × int8 products are
about twice as fast as float32 ones (`scripts/benchmark.py --memory` measures both).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Quantization:
    """What `--quantize` ran on a device: the scheme and how its products are done."""

    scheme: str  # "int8" or "fp8"
    kind: str  # "int8-weight-only", "int8-dynamic" or "fp8-weight-only"

    @classmethod
    def on(cls, scheme: str, device: torch.device) -> Quantization:
        if scheme == "fp8":
            return cls(scheme, "fp8-weight-only")
        if scheme == "int8":
            return cls(scheme, "int8-dynamic" if device.type == "cpu" else "int8-weight-only")
        raise ValueError(f"quantize: int8 or fp8, not {scheme!r}")


def _torchao_config(kind: str) -> object:
    """The torchao config of `kind`."""
    try:
        from torchao.quantization import (
            Float8WeightOnlyConfig,
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
        )
    except ImportError as error:
        raise RuntimeError(
            "--quantize needs torchao: pip install torchao (a release built for your torch)"
        ) from error
    return {
        "int8-weight-only": Int8WeightOnlyConfig,
        "int8-dynamic": Int8DynamicActivationInt8WeightConfig,
        "fp8-weight-only": Float8WeightOnlyConfig,
    }[kind]()


def quantize_linears(model: nn.Module, quantization: Quantization) -> int:
    """Quantize every `nn.Linear` weight of `model` in place; returns how many."""
    config = _torchao_config(quantization.kind)
    from torchao.quantization import quantize_

    count = sum(isinstance(module, nn.Linear) for module in model.modules())
    quantize_(model, config)
    return count
