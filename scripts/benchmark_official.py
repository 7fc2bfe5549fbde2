#!/usr/bin/env python3
"""The official side of `scripts/benchmark.py --reference DIR` (run by it; not on its own).

Runs in the reference's own virtual environment and imports only torch, safetensors,
diffusers and the official ACE-Step 1.5 code from DIR (a checkout that is never part of
this repository). It loads the official turbo model and diffusers' `AutoencoderOobleck`
from the benchmark's checkpoint, takes the inputs our run saved (text and lyric states,
masks, reference latents, seed, our final latents), and times, after one warm-up:

- condition: the official `prepare_condition` (inside `generate_audio`; in fp32 with the
  audio tokenizer and detokenizer it always runs, in half precision without them, see below);
- diffusion: the 8-step loop of `generate_audio` (its own `time_costs`);
- vae: one `AutoencoderOobleck.decode` call of our latents (so the outputs compare stage by
  stage).

Prints one JSON line: the stage times and the peak memory; saves the official latents and
audio to --out.
"""

from __future__ import annotations

import argparse
import inspect
import json
import resource
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", type=Path, required=True)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--inputs", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, str(args.reference))
    from acestep.models.turbo.modeling_acestep_v15_turbo import (
        AceStepConditionGenerationModel,
    )
    from diffusers import AutoencoderOobleck

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    start = time.perf_counter()
    model = AceStepConditionGenerationModel.from_pretrained(
        args.checkpoint / "acestep-v15-turbo", dtype=dtype, attn_implementation="sdpa"
    ).to(device)
    model.eval()
    vae = AutoencoderOobleck.from_pretrained(args.checkpoint / "vae", torch_dtype=dtype)
    vae = vae.to(device).eval()
    silence = torch.load(
        args.checkpoint / "acestep-v15-turbo" / "silence_latent.pt", weights_only=True
    )
    silence = silence.transpose(1, 2).to(device, dtype)  # [1, 15000, 64]
    load_s = time.perf_counter() - start

    given = {k: t.to(device) for k, t in load_file(args.inputs).items()}
    frames = given["latents"].shape[1]
    kwargs = {
        "text_hidden_states": given["text_hidden"].to(dtype),
        "text_attention_mask": given["text_mask"],
        "lyric_hidden_states": given["lyric_hidden"].to(dtype),
        "lyric_attention_mask": given["lyric_mask"],
        "refer_audio_acoustic_hidden_states_packed": given["refer_latents"].to(dtype),
        "refer_audio_order_mask": given["refer_order"],
        "src_latents": silence[:, :frames],
        "chunk_masks": torch.ones(1, frames, silence.shape[-1], device=device, dtype=dtype),
        "is_covers": torch.zeros(1, dtype=torch.long, device=device),
        "silence_latent": silence,
        "seed": [int(given["seed"])],
        "shift": 3.0,
    }
    if dtype != torch.float32:
        # The official tokenizer path fails in half precision on the CPU (its FSQ works in
        # float32 and feeds a bf16 projection); text2music discards its output (is_covers =
        # 0), so give the official code the hints it would compute and skip that path.
        kwargs["precomputed_lm_hints_25Hz"] = silence[:, :frames]
    if "dcw_enabled" in inspect.signature(model.generate_audio).parameters:
        kwargs["dcw_enabled"] = False  # newer upstream: plain Euler, as our turbo sampler

    def run() -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            result = model.generate_audio(**kwargs)
            synchronize(device)
            begin = time.perf_counter()
            audio = vae.decode(given["latents"].transpose(1, 2).to(dtype)).sample
            synchronize(device)
            decode_s = time.perf_counter() - begin
        costs = result["time_costs"]
        stages = {
            "condition": costs["encoder_time_cost"],
            "diffusion": costs["diffusion_time_cost"],
            "vae": decode_s,
        }
        return stages, result["target_latents"], audio

    run()  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stages, latents, audio = run()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {"latents": latents.float().cpu().contiguous(), "audio": audio.float().cpu().contiguous()},
        args.out,
    )
    report = {
        "stages": stages,
        "load_s": load_s,
        "peak_gib": peak_memory_gib(device),
        "torch": torch.__version__,
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
