#!/usr/bin/env python3
"""Measure the 5 Hz LM planner's decoding speed; print a Markdown table.

    scripts/benchmark_lm.py --lm 1.7B --durations 30 120      # real LM (HF cache or --model-dir)
    scripts/benchmark_lm.py --model tiny                      # plumbing check on random weights

For each duration, after one warm-up plan, `--repeats` full plans (thought, then
duration·5 codes under guidance) are timed; the table shows the median thought time and
tokens per second, the median codes time and codes per second (each code is one step of
the guided two-row batch).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from acestep_daemon.checkpoint import LM_SIZES, resolve_lm
from acestep_daemon.planner import LMRunner, PlanRequest, make_plan
from acestep_daemon.planner.plan import PhaseProgress
from acestep_daemon.tiny.lm import LM_FOLDER, write_tiny_lm

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def timed_plan(runner: LMRunner, duration: float, seed: int) -> tuple[float, int, float, int]:
    """(thought seconds, thought tokens, codes seconds, codes) of one full plan."""
    marks: dict[str, float] = {}
    counts = {"metas": 0, "codes": 0}

    def note(phase: str):
        def progress(count: int, of: int) -> None:
            counts[phase] = count
            marks[phase] = time.perf_counter()

        return progress

    sync = torch.cuda.synchronize if runner.device.type == "cuda" else lambda: None
    request = PlanRequest("energetic synth pop with bright vocals", duration_s=duration, seed=seed)
    sync()
    start = time.perf_counter()
    make_plan(runner, request, "full", PhaseProgress(note("metas"), note("codes")))
    sync()
    end = time.perf_counter()
    return marks["metas"] - start, counts["metas"], end - marks["metas"], counts["codes"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--lm", choices=LM_SIZES, default="1.7B", help="LM size")
    source.add_argument("--model", choices=["tiny"], help="benchmark a fresh tiny LM")
    parser.add_argument("--model-dir", type=Path, help="folder holding acestep-5Hz-lm-<size>/")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    parser.add_argument("--durations", type=float, nargs="+", default=[30.0, 120.0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = (
        DTYPES[args.dtype]
        if args.dtype
        else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    )
    with tempfile.TemporaryDirectory() as scratch:
        if args.model == "tiny":
            folder = write_tiny_lm(Path(scratch) / LM_FOLDER)
        else:
            folder = resolve_lm(args.lm, args.model_dir)
        runner = LMRunner.load(folder, device, dtype)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        print(f"device: {name}, dtype: {dtype}, LM: {folder.name}")
        print()
        print("| duration (s) | thought (s) | thought tok/s | codes (s) | codes/s |")
        print("|---:|---:|---:|---:|---:|")
        for duration in args.durations:
            timed_plan(runner, duration, seed=0)  # warm-up
            runs = [timed_plan(runner, duration, seed) for seed in range(1, args.repeats + 1)]
            thought = statistics.median(r[0] for r in runs)
            tokens = statistics.median(r[1] for r in runs)
            codes_time = statistics.median(r[2] for r in runs)
            codes = runs[0][3]
            print(
                f"| {duration:g} | {thought:.2f} | {tokens / thought:.1f} "
                f"| {codes_time:.2f} | {codes / codes_time:.1f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
