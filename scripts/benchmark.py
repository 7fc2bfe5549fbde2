#!/usr/bin/env python3
"""Time the pipeline's stages and measure its peak memory; print a Markdown table.

    scripts/benchmark.py --model-dir CHECKPOINT --durations 10 30 240
    scripts/benchmark.py --model tiny            # plumbing check on random weights

Each duration is generated `--repeats` times after one warm-up run; the table
shows the median time of each stage, the real-time factor and the peak memory
(CUDA allocator peak on a GPU, process RSS high-water mark on the CPU).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from acestep_daemon.checkpoint import resolve_checkpoint
from acestep_daemon.model.vae import DECODE_CHUNK_FRAMES
from acestep_daemon.params import GenerationParams
from acestep_daemon.pipeline import Pipeline
from acestep_daemon.tiny import make_tiny_checkpoint

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model-dir", type=Path, help="checkpoint folder (default: HF cache)")
    source.add_argument("--model", choices=["tiny"], help="benchmark a fresh tiny checkpoint")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    parser.add_argument("--durations", type=float, nargs="+", default=[10.0, 30.0, 240.0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--vae-chunk", type=int, default=DECODE_CHUNK_FRAMES, help="VAE chunk in latent frames"
    )
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as scratch:
        if args.model == "tiny":
            checkpoint = resolve_checkpoint(make_tiny_checkpoint(Path(scratch) / "tiny"))
        else:
            checkpoint = resolve_checkpoint(args.model_dir)
        dtype = DTYPES[args.dtype] if args.dtype else None
        pipeline = Pipeline.load(checkpoint, device=args.device, dtype=dtype)
        device = pipeline.device
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        print(f"device: {name}, dtype: {pipeline.dtype}, checkpoint: {checkpoint.root.name}")
        print()
        print(
            "| duration (s) | text (s) | diffusion (s) | VAE (s) | total (s) | × real time "
            "| peak memory (GiB) |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for duration in args.durations:
            params = GenerationParams(
                caption="benchmark: upbeat jazz trio",
                duration_s=duration,
                lyrics="[Instrumental]",
                seed=0,
            )
            pipeline.generate(params, vae_chunk_frames=args.vae_chunk)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            runs = [
                pipeline.generate(params, vae_chunk_frames=args.vae_chunk).timings
                for _ in range(args.repeats)
            ]
            stage = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
            total = sum(stage.values())
            print(
                f"| {duration:g} | {stage['text']:.3f} | {stage['diffusion']:.3f} "
                f"| {stage['vae']:.3f} | {total:.3f} | {duration / total:.1f} "
                f"| {peak_memory_gib(device):.2f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
