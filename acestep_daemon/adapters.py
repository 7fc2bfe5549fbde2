"""Adapter files -> `model.lora.LoraAdapter`: PEFT LoRA and DoRA folders, ComfyUI-style LoRA
files and LyCORIS LoKr files.

A PEFT folder holds `adapter_config.json` and `adapter_model.safetensors` with keys such as
`base_model.model.layers.0.self_attn.q_proj.lora_A.weight`, relative to the decoder (upstream
wraps `model.decoder` with PEFT). A DoRA folder (`use_dora` in the config) adds each module's
magnitude, `<module>.lora_magnitude_vector`. A single `.safetensors` file uses the same names
(ComfyUI's layout), optionally with a `<module>.alpha` scalar per module; without one,
alpha = rank.

A LoKr adapter is what upstream trains and loads with LyCORIS
(`acestep/core/generation/handler/lora/lifecycle.py`): a `lokr_weights.safetensors` file (or a
folder holding one, or any `.safetensors` with LoKr keys) with keys such as
`lycoris_layers_0_self_attn_q_proj.lokr_w1`, the decoder's module path with `_` for `.`, and
upstream's `LoKRConfig` as JSON in the `lokr_config` metadata entry. Its scaling is LyCORIS's:
linear_alpha / linear_dim (√linear_dim with rs_lora), and 1 where neither factor is low-rank.
With `weight_decompose` (LyCORIS's DoRA) each module also holds its `dora_scale` magnitudes.

Adapters are cached by path; every problem is an `InvalidRequest`.
"""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from acestep_daemon.errors import InvalidRequest
from acestep_daemon.model.lora import LokrUpdate, LoraAdapter, LoraUpdate, adapter_mismatch

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
LOKR_WEIGHTS = "lokr_weights.safetensors"
LOKR_METADATA = "lokr_config"
LOKR_DEFAULT_DIM, LOKR_DEFAULT_ALPHA = 64, 128
"""Upstream's `LoKRConfig` defaults, used where a LoKr file carries no config."""
LYCORIS_PREFIX = "lycoris_"
ADAPTER_CACHE_SIZE = 8
"""Adapters kept loaded (least recently used dropped first)."""
_LOKR_KEY = re.compile(
    r"^lycoris_(?P<module>\w+?)\.(?P<part>lokr_w1|lokr_w1_a|lokr_w1_b|lokr_w2|lokr_w2_a"
    r"|lokr_w2_b|lokr_t2|alpha|dora_scale)$"
)
_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+?)\."
    r"(?:lora_(?P<part>A|B|magnitude_vector)(?:\.[^.]+)?(?:\.weight)?|alpha)$"
)


def read_adapter(path: Path) -> LoraAdapter:
    """The adapter at `path` (a PEFT folder or a single safetensors file), tensors on the CPU."""
    if path.is_dir() and (path / LOKR_WEIGHTS).is_file():
        return _read_lokr(path / LOKR_WEIGHTS)
    if path.is_dir():
        return _read_peft_folder(path)
    if path.is_file() and path.suffix == ".safetensors":
        if _is_lokr(path):
            return _read_lokr(path)
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
    alpha = float(config.get("lora_alpha", config.get("r", 8)))
    patterns = config.get("alpha_pattern") or {}

    def alpha_of(module: str) -> float:
        for pattern, value in patterns.items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                return float(value)
        return alpha

    rslora, dora = bool(config.get("use_rslora")), bool(config.get("use_dora"))
    return _build(_load(weights_file), alpha_of, rslora, dora, str(folder))


def _read_single_file(file: Path) -> LoraAdapter:
    tensors = _load(file)
    alphas = {
        m.group("module"): float(t)
        for k, t in tensors.items()
        if (m := _KEY.match(k)) and m.group("part") is None
    }
    dora = any(k.endswith(".lora_magnitude_vector") for k in tensors)
    return _build(tensors, alphas.get, False, dora, str(file))


def _is_lokr(file: Path) -> bool:
    """Upstream's test: the LoKr file name or `lokr_config` metadata; or LyCORIS keys."""
    if file.name == LOKR_WEIGHTS:
        return True
    try:
        with safe_open(file, framework="pt") as handle:
            metadata, names = handle.metadata() or {}, handle.keys()
            return LOKR_METADATA in metadata or any(n.startswith(LYCORIS_PREFIX) for n in names)
    except (OSError, SafetensorError) as exc:
        raise InvalidRequest(f"unreadable adapter weights {file}: {exc}") from exc


def _lokr_config(file: Path) -> dict:
    try:
        with safe_open(file, framework="pt") as handle:
            text = (handle.metadata() or {}).get(LOKR_METADATA)
    except (OSError, SafetensorError) as exc:
        raise InvalidRequest(f"unreadable LoKr weights {file}: {exc}") from exc
    if text is None:
        return {}
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"{file}: unreadable {LOKR_METADATA} metadata: {exc}") from exc
    if not isinstance(config, dict):
        raise InvalidRequest(f"{file}: {LOKR_METADATA} metadata is not a JSON object")
    return config


def _read_lokr(file: Path) -> LoraAdapter:
    """A LyCORIS LoKr file; module names stay flat (`decoder.layers_0_self_attn_q_proj`) until
    `AdapterCache` matches them to the model's module paths."""
    config = _lokr_config(file)
    decomposed = bool(config.get("weight_decompose"))
    dim = int(config.get("linear_dim", LOKR_DEFAULT_DIM))
    alpha = float(config.get("linear_alpha", LOKR_DEFAULT_ALPHA)) or float(dim)
    low_rank_scaling = alpha / (math.sqrt(dim) if config.get("rs_lora") else dim)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in _load(file).items():
        match = _LOKR_KEY.match(key)
        if match is None:
            raise InvalidRequest(f"{file}: unexpected tensor {key} (not a LyCORIS LoKr weight)")
        parts.setdefault(match.group("module"), {})[match.group("part")] = tensor.float()
    if not parts:
        raise InvalidRequest(f"{file} holds no LoKr weights")
    adapter: LoraAdapter = {}
    for module, weights in parts.items():
        if "lokr_t2" in weights:
            raise InvalidRequest(f"{file}: {module} uses Tucker LoKr, not supported")
        if decomposed != ("dora_scale" in weights):
            state = "lacks its" if decomposed else "has a"
            raise InvalidRequest(
                f"{file}: {module} {state} dora_scale, but weight_decompose is {decomposed}"
            )
        w1, w2 = _factor(weights, "lokr_w1"), _factor(weights, "lokr_w2")
        if w1 is None or w2 is None:
            raise InvalidRequest(f"{file}: {module} lacks its lokr_w1 or lokr_w2 weights")
        full = "lokr_w1" in weights and "lokr_w2" in weights  # LyCORIS: scale 1
        scaling = 1.0 if full else low_rank_scaling
        adapter[f"decoder.{module}"] = LokrUpdate(w1, w2, scaling, weights.get("dora_scale"))
    return adapter


def _factor(weights: dict[str, torch.Tensor], name: str) -> torch.Tensor | None:
    """A Kronecker factor, stored whole or as a low-rank pair `_a` [m, r] @ `_b` [r, n]."""
    if name in weights:
        return weights[name]
    if f"{name}_a" in weights and f"{name}_b" in weights:
        return weights[f"{name}_a"] @ weights[f"{name}_b"]
    return None


def _load(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(file)
    except (OSError, SafetensorError) as exc:
        raise InvalidRequest(f"unreadable LoRA weights {file}: {exc}") from exc


def _build(
    tensors: dict[str, torch.Tensor], alpha_of, rslora: bool, dora: bool, source: str
) -> LoraAdapter:
    """Pair lora_A / lora_B (and a DoRA magnitude) per module; module paths get the `decoder.`
    prefix."""
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
    expected = {"A", "B", "magnitude_vector"} if dora else {"A", "B"}
    for module, pair in parts.items():
        if missing := sorted(expected - set(pair)):
            lacking = ", ".join(f"lora_{part}" for part in missing)
            raise InvalidRequest(f"{source}: {module} lacks {lacking}")
        if set(pair) != expected:
            raise InvalidRequest(f"{source}: {module} has a DoRA magnitude but no use_dora")
        rank = pair["A"].shape[0]
        alpha = alpha_of(module)
        alpha = float(rank) if alpha is None else alpha
        scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
        name = module if module.startswith("decoder.") else f"decoder.{module}"
        magnitude = pair["magnitude_vector"].float() if dora else None
        adapter[name] = LoraUpdate(pair["A"].float(), pair["B"].float(), scaling, magnitude)
    return adapter


class AdapterCache:
    """Adapters loaded once per file version, checked against the model, on its device; the
    `capacity` most recently used are kept."""

    def __init__(self, capacity: int = ADAPTER_CACHE_SIZE) -> None:
        self.capacity = capacity
        self._adapters: OrderedDict[tuple, LoraAdapter] = OrderedDict()

    def get(self, path: Path, model: nn.Module) -> LoraAdapter:
        """The adapter at `path` on the model's device and dtype; InvalidRequest if unfit."""
        path = path.expanduser().resolve()
        weight = next(model.parameters())
        stamp = max((p.stat().st_mtime_ns for p in _files(path)), default=0)
        key = (path, stamp, weight.device, weight.dtype)
        if key in self._adapters:
            self._adapters.move_to_end(key)
            return self._adapters[key]
        adapter = _with_module_paths(read_adapter(path), model)
        problem = adapter_mismatch(model, adapter)
        if problem is not None:
            raise InvalidRequest(f"adapter {path} does not fit this model: {problem}")
        for old in [k for k in self._adapters if k[0] == path]:
            del self._adapters[old]
        self._adapters[key] = {n: u.to(weight.device, weight.dtype) for n, u in adapter.items()}
        while len(self._adapters) > self.capacity:
            self._adapters.popitem(last=False)
        return self._adapters[key]


def _with_module_paths(adapter: LoraAdapter, model: nn.Module) -> LoraAdapter:
    """LyCORIS's flat module names (`decoder.layers_0_self_attn_q_proj`) as the model's paths."""
    paths = {name.replace(".", "_"): name for name, _ in model.named_modules()}
    return {paths.get(name.replace(".", "_"), name): update for name, update in adapter.items()}


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        names = (PEFT_CONFIG, PEFT_WEIGHTS, LOKR_WEIGHTS)
        return [path / n for n in names if (path / n).is_file()]
    return [path] if path.is_file() else []
