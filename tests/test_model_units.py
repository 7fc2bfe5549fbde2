"""Small behaviours of the port that the parity fixtures exercise only implicitly."""

from __future__ import annotations

from collections import Counter

import torch
from model_fixtures import TINY, load_tiny_model
from safetensors.torch import load_file
from torch.profiler import ProfilerActivity, profile

from acestep_daemon.model.attention import additive_mask
from acestep_daemon.model.encoders import pack_sequences, unpack_references

DIT_INPUTS = ("x", "timestep", "timestep_r", "encoder_hidden", "context")


def test_pack_moves_valid_tokens_first_keeping_their_order() -> None:
    first = torch.tensor([[[1.0], [2.0], [0.0]]])  # third token is padding
    second = torch.tensor([[[3.0], [0.0], [4.0]]])  # middle token is padding
    packed, mask = pack_sequences(
        first, second, torch.tensor([[1, 1, 0]]), torch.tensor([[1, 0, 1]])
    )
    assert packed.flatten().tolist() == [1.0, 2.0, 3.0, 4.0, 0.0, 0.0]
    assert mask.tolist() == [[True, True, True, True, False, False]]


def test_references_are_unpacked_by_item_in_their_original_order() -> None:
    pooled = torch.tensor([[10.0], [20.0], [30.0]])
    timbre, mask = unpack_references(pooled, torch.tensor([1, 0, 1]))
    assert timbre.squeeze(-1).tolist() == [[20.0, 0.0], [10.0, 30.0]]
    assert mask.tolist() == [[1, 0], [1, 1]]


def test_sliding_mask_keeps_band_of_half_width_window_and_padding_masks_keys() -> None:
    mask = additive_mask(6, torch.float32, torch.device("cpu"), window=2)
    kept = (mask[0, 0] == 0).int()
    assert kept[0].tolist() == [1, 1, 1, 0, 0, 0]
    assert kept[3].tolist() == [0, 1, 1, 1, 1, 1]
    padded = additive_mask(
        3, torch.float32, torch.device("cpu"), key_padding=torch.tensor([[1, 1, 0]])
    )
    assert (padded[0, 0] == 0).int().tolist() == [[1, 1, 0]] * 3


def test_context_is_source_then_chunk_mask_and_cover_items_take_the_hints() -> None:
    model = load_tiny_model()
    src = torch.full((2, 4, 64), 5.0)
    hints = torch.full((2, 6, 64), 7.0)  # longer than T: cropped to the first 4 frames
    chunk = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    context = model.build_context(src, chunk, hints, torch.tensor([False, True]))
    assert context.shape == (2, 4, 128)
    assert torch.all(context[0, :, :64] == 5.0) and torch.all(context[1, :, :64] == 7.0)
    assert torch.equal(context[..., 64:], chunk[..., None].expand(-1, -1, 64))


def test_tokenize_pads_a_partial_window_with_the_first_silence_frames() -> None:
    model = load_tiny_model()
    latents = torch.randn(1, 7, 64)
    silence = torch.randn(1, 20, 64)
    padded = torch.cat([latents, silence[:, :3]], dim=1)
    with torch.no_grad():
        ours, _ = model.tokenize(latents, silence)
        manual, _ = model.tokenizer(padded.reshape(1, 2, 5, 64))
    assert ours.shape == (1, 2, 64)
    assert torch.equal(ours, manual)


def test_dit_projections_are_single_matrix_products_with_gradients_off() -> None:
    """The residual stream is a transposed view; with `requires_grad_(False)` an unfolded
    `nn.Linear` would take a batched product (`aten::bmm`) there: slow in bf16 on the CPU and
    rounded unlike the official model, whose weights require grad and so fold to `aten::mm`."""
    cases = load_file(TINY / "cases.safetensors")
    model = load_tiny_model().requires_grad_(False).to(torch.bfloat16)
    inputs = [cases[f"dit_t21.{n}"].bfloat16() for n in DIT_INPUTS]
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as trace:
        model.decoder(*inputs)
    ops = Counter(event.name for event in trace.events())
    assert ops["aten::bmm"] == 0
    assert ops["aten::mm"] == 11 * model.config.num_hidden_layers
