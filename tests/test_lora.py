"""LoRA adapters (PEFT folders, ComfyUI-style single files) on the decoder of a tiny checkpoint."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from model_fixtures import relative_error
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from acestep_daemon.adapters import AdapterCache, read_adapter
from acestep_daemon.errors import InvalidRequest
from acestep_daemon.model import AceStepModel
from acestep_daemon.model.lora import LokrUpdate, LoraUpdate, adapter_kind, adapters_applied
from acestep_daemon.tiny import dit_config, make_tiny_lokr, make_tiny_lora


def tiny_model(variant: str = "turbo") -> AceStepModel:
    torch.manual_seed(0)
    model = AceStepModel.from_config(dit_config(variant)).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return model


@pytest.fixture(scope="module")
def model() -> AceStepModel:
    return tiny_model()


@pytest.fixture(scope="module")
def peft_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_lora(tmp_path_factory.mktemp("lora") / "peft", dit_config("turbo"))


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(3)
    return (
        torch.randn(2, 9, 8, generator=g),
        torch.tensor([0.7, 0.4]),
        torch.tensor([0.7, 0.4]),
        torch.randn(2, 5, 32, generator=g),
        torch.randn(2, 9, 16, generator=g),
    )


@torch.no_grad()
def velocity(model: AceStepModel, inputs: tuple, adapter=None, scale: float = 1.0):
    if adapter is None:
        return model.decoder(*inputs)
    with adapters_applied(model, [(adapter, scale)]):
        return model.decoder(*inputs)


def test_peft_adapter_has_upstream_key_names_and_config(peft_folder: Path) -> None:
    config = json.loads((peft_folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["target_modules"] == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
    ]
    keys = load_file(peft_folder / "adapter_model.safetensors")
    assert "base_model.model.layers.0.cross_attn.k_proj.lora_A.weight" in keys
    assert len(keys) == 24 * 2 * 4 * 2


def test_adapter_changes_the_output_and_scale_zero_is_the_base_exactly(
    model: AceStepModel, peft_folder: Path, inputs: tuple
) -> None:
    adapter = AdapterCache().get(peft_folder, model)
    base = velocity(model, inputs)
    assert torch.equal(velocity(model, inputs, adapter, 0.0), base)
    changed = velocity(model, inputs, adapter, 1.0)
    assert (changed - base).abs().max() > 1e-2 * base.abs().max()
    assert torch.equal(velocity(model, inputs), base)  # hooks are gone after the block


def test_applied_adapter_equals_the_merged_weights(
    model: AceStepModel, peft_folder: Path, inputs: tuple
) -> None:
    """PEFT's update: W + scale · (alpha / r) · B A, here merged by hand into a copy."""
    adapter = read_adapter(peft_folder)
    merged = copy.deepcopy(model)
    modules = dict(merged.named_modules())
    with torch.no_grad():
        for name, update in adapter.items():
            modules[name].weight += 0.5 * update.scaling * update.up @ update.down
    assert next(iter(adapter.values())).scaling == 2.0  # alpha 8 / rank 4
    ours = velocity(model, inputs, adapter, 0.5)
    assert torch.allclose(ours, velocity(merged, inputs), atol=1e-5, rtol=1e-4)


def test_comfyui_single_file_loads_like_the_peft_folder(
    model: AceStepModel, peft_folder: Path, inputs: tuple, tmp_path: Path
) -> None:
    single = make_tiny_lora(tmp_path / "comfy.safetensors", dit_config("turbo"), single_file=True)
    from_file = velocity(model, inputs, read_adapter(single))
    assert torch.equal(from_file, velocity(model, inputs, read_adapter(peft_folder)))


def test_cache_loads_once_per_file_version(model: AceStepModel, tmp_path: Path) -> None:
    folder = make_tiny_lora(tmp_path / "a", dit_config("turbo"))
    cache = AdapterCache()
    first = cache.get(folder, model)
    assert cache.get(folder, model) is first
    weights = folder / "adapter_model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert cache.get(folder, model) is not first


def test_xl_adapter_on_the_2b_model_is_a_clear_invalid_request(
    model: AceStepModel, tmp_path: Path
) -> None:
    xl = make_tiny_lora(tmp_path / "xl", dit_config("xl-turbo"))
    with pytest.raises(InvalidRequest, match="does not fit this model"):
        AdapterCache().get(xl, model)


@pytest.mark.parametrize(
    "problem",
    [
        "missing",
        "no_config",
        "dora_without_magnitudes",
        "magnitudes_without_dora",
        "lokr",
        "stray_key",
    ],
)
def test_broken_adapters_are_invalid_requests(
    model: AceStepModel, peft_folder: Path, tmp_path: Path, problem: str
) -> None:
    folder = tmp_path / problem
    folder.mkdir()
    weights = load_file(peft_folder / "adapter_model.safetensors")
    config = json.loads((peft_folder / "adapter_config.json").read_text())
    if problem == "dora_without_magnitudes":
        config["use_dora"] = True
    if problem == "magnitudes_without_dora":
        weights["base_model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(32)
    if problem == "lokr":
        config["peft_type"] = "LOKR"
    if problem == "stray_key":
        weights["base_model.model.layers.0.self_attn.q_proj.hada_w1_a"] = torch.zeros(2)
    save_file(weights, str(folder / "adapter_model.safetensors"))
    if problem != "no_config":
        (folder / "adapter_config.json").write_text(json.dumps(config))
    path = tmp_path / "nowhere" if problem == "missing" else folder
    with pytest.raises(InvalidRequest):
        AdapterCache().get(path, model)


FIXTURES = Path(__file__).parent / "fixtures" / "adapters"
"""`lokr_weights.safetensors`: `make_tiny_lokr(..., dit_config("turbo"))`, every factor random.
`lokr_merged_0.5.safetensors`: layer 0's effective projection weights with it loaded the way
upstream loads LoKr (`lifecycle._load_lokr_adapter`: LyCORIS 4.1.3 `create_lycoris` from the
file's `lokr_config`, `apply_to`, `load_weights`) at multiplier 0.5, read off LyCORIS's forward
on an identity input, over `tiny_model()`'s weights, fp32."""


def effective_weights(model: AceStepModel, adapter, scale: float, names) -> dict:
    """Each projection's [out, in] weight as its forward sees it: the forward of an identity."""
    modules = dict(model.named_modules())
    out = {}
    with torch.no_grad(), adapters_applied(model, [(adapter, scale)]):
        for name in names:
            module = modules["decoder." + name.removesuffix(".weight")]
            bias = 0.0 if module.bias is None else module.bias
            eye = torch.eye(module.in_features, device=module.weight.device)
            out[name] = (module(eye.to(module.weight.dtype)) - bias).T.float().cpu()
    return out


@pytest.mark.parametrize("mistake", ["alpha_ignored", "scale_twice", "factors_swapped"])
def test_lokr_fixture_catches_porting_mistakes(model: AceStepModel, mistake: str) -> None:
    """LyCORIS's own `get_diff_weight` applies the scale twice; alpha / dim is easy to drop."""
    adapter = AdapterCache().get(FIXTURES, model)
    wrong = {
        name: {
            "alpha_ignored": lambda u: dataclasses.replace(u, scaling=1.0),
            "scale_twice": lambda u: dataclasses.replace(u, scaling=u.scaling**2),
            "factors_swapped": lambda u: dataclasses.replace(u, w1=u.w1.T, w2=u.w2.T),
        }[mistake](update)
        for name, update in adapter.items()
    }
    reference = load_file(FIXTURES / "lokr_merged_0.5.safetensors")
    square = [n for n, w in reference.items() if w.shape[0] == w.shape[1]]
    ours = effective_weights(model, wrong, 0.5, square)
    assert not any(torch.equal(ours[n], reference[n]) for n in square)


def test_lokr_file_alone_and_its_folder_are_the_same_adapter(model: AceStepModel) -> None:
    from_file = read_adapter(FIXTURES / "lokr_weights.safetensors")
    assert set(from_file) == set(read_adapter(FIXTURES))
    assert next(iter(from_file.values())).scaling == 1.5  # linear_alpha 3 / linear_dim 2


def test_two_adapters_add_their_updates(model: AceStepModel, peft_folder: Path, inputs) -> None:
    lora, lokr = AdapterCache().get(peft_folder, model), AdapterCache().get(FIXTURES, model)
    base = velocity(model, inputs)
    with torch.no_grad(), adapters_applied(model, [(lora, 0.5), (lokr, 0.0)]):
        lora_alone = model.decoder(*inputs)
    assert torch.equal(lora_alone, velocity(model, inputs, lora, 0.5))
    with torch.no_grad(), adapters_applied(model, [(lora, 0.5), (lokr, 0.5)]):
        both = model.decoder(*inputs)
    assert (both - lora_alone).abs().max() > 1e-2 * base.abs().max()


def test_cache_keeps_the_most_recently_used(model: AceStepModel, tmp_path: Path) -> None:
    folders = [make_tiny_lora(tmp_path / str(i), dit_config("turbo"), seed=i) for i in range(3)]
    cache = AdapterCache(capacity=2)
    first = cache.get(folders[0], model)
    cache.get(folders[1], model)
    assert cache.get(folders[0], model) is first  # used again: now the most recent
    cache.get(folders[2], model)  # drops folders[1]
    assert cache.get(folders[0], model) is first
    assert len(cache._adapters) == 2


@pytest.mark.parametrize("mistake", ["alpha_ignored", "transposed_pair"])
def test_lora_fixture_catches_porting_mistakes(
    model: AceStepModel, peft_folder: Path, mistake: str
) -> None:
    adapter = AdapterCache().get(peft_folder, model)
    wrong = {
        name: dataclasses.replace(u, scaling=1.0)
        if mistake == "alpha_ignored"
        else dataclasses.replace(u, down=u.up.T, up=u.down.T)
        for name, u in adapter.items()
    }
    reference = load_file(FIXTURES / "lora_merged_0.5.safetensors")
    square = [n for n, w in reference.items() if w.shape[0] == w.shape[1]]
    ours = effective_weights(model, wrong, 0.5, square)
    assert not any(torch.equal(ours[n], reference[n]) for n in square)


@pytest.fixture(scope="module")
def dora_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_lora(tmp_path_factory.mktemp("dora") / "peft", dit_config("turbo"), dora=True)


@pytest.mark.parametrize("mistake", ["magnitude_ignored", "norm_without_update", "norm_per_column"])
def test_dora_fixture_catches_porting_mistakes(
    model: AceStepModel, dora_folder: Path, mistake: str
) -> None:
    """Plain LoRA in place of DoRA; g = m / ‖W‖ (the update left out of the norm); the norm over
    the input dimension. The last two are made by rescaling m so that our norm cancels."""
    adapter = AdapterCache().get(dora_folder, model)
    reference = load_file(FIXTURES / "dora_0.5.safetensors")
    square = [n for n, w in reference.items() if w.shape[0] == w.shape[1]]
    modules = dict(model.named_modules())
    mistaken: dict[str, LoraUpdate] = {}
    for name in square:
        path = "decoder." + name.removesuffix(".weight")
        update = adapter[path]
        if mistake == "magnitude_ignored":
            mistaken[path] = dataclasses.replace(update, magnitude=None)
            continue
        weight = modules[path].weight.detach()
        adapted = weight + 0.5 * update.scaling * update.up @ update.down  # [out, in]
        wrong_norm = weight.norm(dim=1) if mistake == "norm_without_update" else adapted.norm(dim=0)
        magnitude = update.magnitude * adapted.norm(dim=1) / wrong_norm
        mistaken[path] = dataclasses.replace(update, magnitude=magnitude)
    ours = effective_weights(model, mistaken, 0.5, square)
    for name in square:
        error = (ours[name] - reference[name]).abs().max()
        assert error > 1e-3 * reference[name].abs().max(), name


def test_dora_scale_zero_is_the_base_model(
    model: AceStepModel, dora_folder: Path, inputs: tuple
) -> None:
    adapter = AdapterCache().get(dora_folder, model)
    assert torch.equal(velocity(model, inputs, adapter, 0.0), velocity(model, inputs))
    assert not torch.allclose(velocity(model, inputs, adapter, 1.0), velocity(model, inputs))


@pytest.fixture(scope="module")
def decomposed_lokr(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("lokr") / "decomposed"
    return make_tiny_lokr(folder, dit_config("turbo"), weight_decompose=True)


@pytest.mark.parametrize("mistake", ["magnitude_ignored", "scale_on_the_update", "norm_per_column"])
def test_weight_decomposed_lokr_fixture_catches_porting_mistakes(
    model: AceStepModel, decomposed_lokr: Path, mistake: str
) -> None:
    """Plain LoKr; the scale applied to Δ (as plain LoKr does) rather than to the rescaling;
    the norm over the input dimension."""
    adapter = AdapterCache().get(decomposed_lokr, model)
    reference = load_file(FIXTURES / "lokr_dora_0.5.safetensors")
    square = [n for n, w in reference.items() if w.shape[0] == w.shape[1]]
    mistaken: dict[str, LokrUpdate] = {}
    for name in square:
        path = "decoder." + name.removesuffix(".weight")
        update = adapter[path]
        if mistake == "magnitude_ignored":
            mistaken[path] = dataclasses.replace(update, magnitude=None)
        elif mistake == "scale_on_the_update":
            mistaken[path] = dataclasses.replace(update, scaling=update.scaling * 0.5)
        else:
            mistaken[path] = dataclasses.replace(update, magnitude=update.magnitude.T)
    scale = 1.0 if mistake == "scale_on_the_update" else 0.5
    ours = effective_weights(model, mistaken, scale, square)
    for name in square:
        error = (ours[name] - reference[name]).abs().max()
        assert error > 1e-3 * reference[name].abs().max(), name


def test_lokr_whose_config_and_weights_disagree_on_decomposition_is_invalid(
    model: AceStepModel, decomposed_lokr: Path, tmp_path: Path
) -> None:
    with safe_open(decomposed_lokr, framework="pt") as handle:
        metadata = handle.metadata()
        weights = {k: handle.get_tensor(k) for k in handle.keys() if not k.endswith("dora_scale")}  # noqa: SIM118
    save_file(weights, str(tmp_path / "lokr_weights.safetensors"), metadata=metadata)
    with pytest.raises(InvalidRequest, match="lacks its dora_scale"):
        AdapterCache().get(tmp_path, model)


BF16_BUDGET = 2e-2
"""How far a bf16 run of an adapted projection may land from the fp32 fixture: bf16 keeps 8
significant bits (2^-9 ≈ 0.2 % per rounding), and the weights, the update and each product
round; correct runs land at 0.7-0.8 %, a dropped magnitude at 23-65 %."""


def adapter_case(kind: str, folder: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """An adapter of `kind` (written into `folder` where it is made here) and its fixture."""
    turbo = dit_config("turbo")
    if kind == "lora":
        return make_tiny_lora(folder, turbo), load_file(FIXTURES / "lora_merged_0.5.safetensors")
    if kind == "dora":
        path = make_tiny_lora(folder, turbo, dora=True)
        return path, load_file(FIXTURES / "dora_0.5.safetensors")
    if kind == "lokr":
        return FIXTURES, load_file(FIXTURES / "lokr_merged_0.5.safetensors")
    path = make_tiny_lokr(folder, turbo, weight_decompose=True)
    return path, load_file(FIXTURES / "lokr_dora_0.5.safetensors")


ADAPTER_KINDS = ["lora", "dora", "lokr", "decomposed lokr"]


@pytest.mark.parametrize("kind", ADAPTER_KINDS)
def test_adapters_equal_their_reference_bit_for_bit(
    model: AceStepModel, kind: str, tmp_path: Path
) -> None:
    """Each kind as upstream loads it, at scale 0.5, fp32 (recipes in the fixtures README):
    PEFT (`PeftModel.from_pretrained`, its scaling × 0.5; LoRA merged, DoRA's unmerged forward
    on an identity), LyCORIS (`create_lycoris`, multiplier 0.5; its forward on an identity)."""
    path, reference = adapter_case(kind, tmp_path / "adapter")
    adapter = AdapterCache().get(path, model)
    assert adapter_kind(adapter) == kind.removeprefix("decomposed ")
    ours = effective_weights(model, adapter, 0.5, reference)
    for name, weight in reference.items():
        assert torch.equal(ours[name], weight), name


def bf16_error(kind: str, folder: Path, device: torch.device | str = "cpu") -> float:
    """The largest relative error of the bf16 adapted projections on `device` against the
    fp32 fixture, at scale 0.5."""
    path, reference = adapter_case(kind, folder)
    model = tiny_model().to(device, torch.bfloat16)
    ours = effective_weights(model, AdapterCache().get(path, model), 0.5, reference)
    return max(relative_error(ours[name], weight) for name, weight in reference.items())


@pytest.mark.parametrize("kind", ADAPTER_KINDS)
def test_adapters_in_bf16_stay_within_bf16s_error_of_the_fp32_fixtures(
    kind: str, tmp_path: Path
) -> None:
    assert bf16_error(kind, tmp_path / "adapter") < BF16_BUDGET
