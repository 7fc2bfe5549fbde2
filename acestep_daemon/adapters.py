"""LoRA adapter files -> `model.lora.LoraAdapter`: PEFT folders and ComfyUI-style single files.

A PEFT folder holds `adapter_config.json` and `adapter_model.safetensors` with keys such as
`base_model.model.layers.0.self_attn.q_proj.lora_A.weight`, relative to the decoder (upstream
wraps `model.decoder` with PEFT). A single `.safetensors` file uses the same names (ComfyUI's
layout), optionally with a `<module>.alpha` scalar per module; without one, alpha = rank.
Adapters are cached by path; every problem is an `InvalidRequest`.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from acestep_daemon.errors import InvalidRequest
from acestep_daemon.model.lora import LoraAdapter, LoraUpdate, adapter_mismatch

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+?)\.(?:lora_(?P<part>[AB])(?:\.[^.]+)?\.weight|alpha)$"
)


def read_adapter(path: Path) -> LoraAdapter:
    """The adapter at `path` (a PEFT folder or a single safetensors file), tensors on the CPU."""
    if path.is_dir():
        return _read_peft_folder(path)
    if path.is_file() and path.suffix == ".safetensors":
        return _read_single_file(path)
    if not path.exists():
        raise InvalidRequest(f"LoRA adapter not found: {path}")
    raise InvalidRequest(
        f"LoRA adapter {path} is neither a PEFT folder ({PEFT_CONFIG} + {PEFT_WEIGHTS}) "
        "nor a .safetensors file"
    )


def _read_peft_folder(folder: Path) -> LoraAdapter:
    config_file, weights_file = folder / PEFT_CONFIG, folder / PEFT_WEIGHTS
    if not config_file.is_file() or not weights_file.is_file():
        raise InvalidRequest(f"LoRA folder {folder} lacks {PEFT_CONFIG} or {PEFT_WEIGHTS}")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidRequest(f"unreadable {config_file}: {exc}") from exc
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise InvalidRequest(f"{config_file}: only LoRA adapters (peft_type LORA) are supported")
    if config.get("use_dora"):
        raise InvalidRequest(f"{config_file}: DoRA adapters are not supported")
    alpha = float(config.get("lora_alpha", config.get("r", 8)))
    patterns = config.get("alpha_pattern") or {}

    def alpha_of(module: str) -> float:
        for pattern, value in patterns.items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                return float(value)
        return alpha

    rslora = bool(config.get("use_rslora"))
    return _build(_load(weights_file), alpha_of, rslora, str(folder))


def _read_single_file(file: Path) -> LoraAdapter:
    tensors = _load(file)
    alphas = {
        m.group("module"): float(t)
        for k, t in tensors.items()
        if (m := _KEY.match(k)) and m.group("part") is None
    }
    return _build(tensors, alphas.get, False, str(file))


def _load(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(file)
    except (OSError, SafetensorError) as exc:
        raise InvalidRequest(f"unreadable LoRA weights {file}: {exc}") from exc


def _build(tensors: dict[str, torch.Tensor], alpha_of, rslora: bool, source: str) -> LoraAdapter:
    """Pair lora_A / lora_B per module; module paths get the `decoder.` prefix."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise InvalidRequest(f"{source}: unexpected tensor {key} (not a LoRA A/B weight)")
        if match.group("part") is not None:
            parts.setdefault(match.group("module"), {})[match.group("part")] = tensor
    if not parts:
        raise InvalidRequest(f"{source} holds no LoRA weights")
    adapter: LoraAdapter = {}
    for module, pair in parts.items():
        if set(pair) != {"A", "B"}:
            raise InvalidRequest(f"{source}: {module} lacks its lora_A or lora_B weight")
        rank = pair["A"].shape[0]
        alpha = alpha_of(module)
        alpha = float(rank) if alpha is None else alpha
        scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
        name = module if module.startswith("decoder.") else f"decoder.{module}"
        adapter[name] = LoraUpdate(pair["A"].float(), pair["B"].float(), scaling)
    return adapter


class AdapterCache:
    """Adapters loaded once per file version, checked against the model, on its device."""

    def __init__(self) -> None:
        self._adapters: dict[tuple, LoraAdapter] = {}

    def get(self, path: Path, model: nn.Module) -> LoraAdapter:
        """The adapter at `path` on the model's device and dtype; InvalidRequest if unfit."""
        path = path.expanduser().resolve()
        weight = next(model.parameters())
        stamp = max((p.stat().st_mtime_ns for p in _files(path)), default=0)
        key = (path, stamp, weight.device, weight.dtype)
        if key not in self._adapters:
            adapter = read_adapter(path)
            problem = adapter_mismatch(model, adapter)
            if problem is not None:
                raise InvalidRequest(f"LoRA adapter {path} does not fit this model: {problem}")
            self._adapters = {k: v for k, v in self._adapters.items() if k[0] != path}
            self._adapters[key] = {n: u.to(weight.device, weight.dtype) for n, u in adapter.items()}
        return self._adapters[key]


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        return [p for p in (path / PEFT_CONFIG, path / PEFT_WEIGHTS) if p.is_file()]
    return [path] if path.is_file() else []
