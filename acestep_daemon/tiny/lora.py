"""Tiny random adapters for a tiny checkpoint: LoRA and DoRA (a PEFT folder or a single file)
and LyCORIS LoKr (upstream's `lokr_weights.safetensors`).

Upstream trains rank-8 PEFT adapters (alpha 16) on the decoder's attention projections
(`q_proj`, `k_proj`, `v_proj`, `o_proj` of every self- and cross-attention); this writes the
same key names and config fields at tiny sizes. Unlike a freshly initialised PEFT adapter
(whose up matrices start at zero), both matrices are random, so the adapter changes the output;
a DoRA adapter's magnitudes are random too (PEFT starts them at the adapted rows' norms).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from acestep_daemon.adapters import LOKR_METADATA, LOKR_WEIGHTS, PEFT_CONFIG, PEFT_WEIGHTS
from acestep_daemon.model import AceStepConfig

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


def _projection_shapes(arch: AceStepConfig) -> dict[str, tuple[int, int]]:
    """(fan in, fan out) of each targeted projection; cross-attention reads the condition after
    condition_embedder, so its keys and values take the hidden size too."""
    q_width = arch.num_attention_heads * arch.head_dim
    kv_width = arch.num_key_value_heads * arch.head_dim
    hidden = arch.hidden_size
    return {
        "q_proj": (hidden, q_width),
        "k_proj": (hidden, kv_width),
        "v_proj": (hidden, kv_width),
        "o_proj": (q_width, hidden),
    }


def make_tiny_lora(
    dest: Path,
    config: dict,
    *,
    rank: int = 4,
    alpha: float = 8.0,
    seed: int = 0,
    single_file: bool = False,
    dora: bool = False,
) -> Path:
    """Write an adapter for the DiT described by `config` (a config.json dict) and return it.

    PEFT: a folder `dest` with adapter_config.json and adapter_model.safetensors.
    single_file: `dest` is one .safetensors file in ComfyUI's layout (PEFT key names plus a
    `<module>.alpha` scalar per module).
    dora: PEFT's DoRA (`use_dora`), a `lora_magnitude_vector` [out] per module as PEFT saves it.
    """
    arch = AceStepConfig.from_dict(config)
    shapes = _projection_shapes(arch)
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(arch.num_hidden_layers):
        for attention in ("self_attn", "cross_attn"):
            for target in TARGET_MODULES:
                fan_in, fan_out = shapes[target]
                name = f"base_model.model.layers.{layer}.{attention}.{target}"
                down = torch.randn(rank, fan_in, generator=generator) / fan_in**0.5
                up = torch.randn(fan_out, rank, generator=generator) / rank**0.5
                tensors[f"{name}.lora_A.weight"] = down
                tensors[f"{name}.lora_B.weight"] = up
                if dora:
                    magnitude = 0.5 + torch.rand(fan_out, generator=generator)
                    tensors[f"{name}.lora_magnitude_vector"] = magnitude
                if single_file:
                    tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
    dest = Path(dest)
    if single_file:
        dest.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(dest))
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dest / PEFT_WEIGHTS), metadata={"format": "pt"})
    peft_config = {
        "peft_type": "LORA",
        "task_type": None,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.1,
        "target_modules": list(TARGET_MODULES),
        "bias": "none",
        "use_rslora": False,
        "use_dora": dora,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    (dest / PEFT_CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n")
    return dest


def _factorization(dim: int) -> tuple[int, int]:
    """LyCORIS's split at factor -1: m <= n, m · n = dim, m the divisor nearest √dim."""
    m = max(d for d in range(1, int(dim**0.5) + 1) if dim % d == 0)
    return m, dim // m


def make_tiny_lokr(
    dest: Path,
    config: dict,
    *,
    dim: int = 2,
    alpha: float = 3.0,
    seed: int = 0,
    weight_decompose: bool = False,
) -> Path:
    """Write a LoKr adapter for the DiT of `config` into the folder `dest` and return the file.

    The layout LyCORIS gives upstream's LoKRConfig at linear_dim `dim` on these sizes: w1
    [out_l, in_m] whole, w2 as the low-rank pair w2_a [out_k, dim] @ w2_b [dim, in_n], an
    `alpha` scalar per module, the config in the `lokr_config` metadata. Every factor is random.
    weight_decompose: LyCORIS's DoRA (upstream's `weight_decompose`), a random `dora_scale`
    [out, 1] per module (LyCORIS starts it at the rows' norms).
    """
    arch = AceStepConfig.from_dict(config)
    shapes = _projection_shapes(arch)
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(arch.num_hidden_layers):
        for attention in ("self_attn", "cross_attn"):
            for target in TARGET_MODULES:
                (in_m, in_n), (out_l, out_k) = map(_factorization, shapes[target])
                name = f"lycoris_layers_{layer}_{attention}_{target}"
                tensors[f"{name}.lokr_w1"] = torch.randn(out_l, in_m, generator=generator)
                tensors[f"{name}.lokr_w2_a"] = torch.randn(out_k, dim, generator=generator)
                tensors[f"{name}.lokr_w2_b"] = torch.randn(dim, in_n, generator=generator) / in_n
                tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
                if weight_decompose:
                    fan_out = out_l * out_k
                    scale = 0.5 + torch.rand(fan_out, 1, generator=generator)
                    tensors[f"{name}.dora_scale"] = scale
    lokr_config = {
        "linear_dim": dim,
        "linear_alpha": alpha,
        "factor": -1,
        "decompose_both": False,
        "use_tucker": False,
        "use_scalar": False,
        "weight_decompose": weight_decompose,
        "target_modules": list(TARGET_MODULES),
        "full_matrix": False,
        "bypass_mode": False,
        "rs_lora": False,
        "unbalanced_factorization": False,
    }
    dest.mkdir(parents=True, exist_ok=True)
    file = dest / LOKR_WEIGHTS
    save_file(tensors, str(file), metadata={LOKR_METADATA: json.dumps(lokr_config)})
    return file
