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

On the CPU int8 takes dynamic activations: weight-only int8 was slower there than plain
float32 (the weights are widened for every product), int8 × int8 products twice as fast
(a [1500, 2048] × [2048, 6144] product on a 2-core AMX Xeon: fp32 0.22 s, weight-only int8
0.26 s, int8 × int8 0.12 s, native bf16 0.04 s). `scripts/benchmark.py --memory` measures
whole songs.
"""

from __future__ import annotations

import torch
from torch import nn


def quantization_kind(scheme: str, device: torch.device) -> str:
    """What `--quantize SCHEME` runs as on `device`: "int8-weight-only", "int8-dynamic" (the
    CPU) or "fp8-weight-only" (the answers' `quantize`)."""
    if scheme == "fp8":
        return "fp8-weight-only"
    if scheme == "int8":
        return "int8-dynamic" if device.type == "cpu" else "int8-weight-only"
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


def quantize_linears(model: nn.Module, kind: str) -> int:
    """Quantize every `nn.Linear` weight of `model` in place as `kind`; returns how many."""
    config = _torchao_config(kind)
    from torchao.quantization import quantize_

    count = sum(isinstance(module, nn.Linear) for module in model.modules())
    quantize_(model, config)
    return count
