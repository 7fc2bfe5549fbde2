#!/usr/bin/env python3
"""The official side of `scripts/benchmark.py --lm SIZE --reference DIR` (run by it; not alone).

Runs in the reference's own virtual environment and imports only torch, transformers and the
official ACE-Step 1.5 code from DIR (a checkout that is never part of this repository). It
loads the benchmark's LM folder through the official `LLMHandler.initialize(..., backend="pt")`
and plans one song with `generate_with_stop_condition(infer_type="llm_dit")`: phase 1 writes
the thought under the official constrained logits processor with classifier-free guidance
(the caption and duration given, as our side gives them), phase 2 the duration·5 audio codes.
After one warm-up (seed 0), one timed plan (seed 1).

Prints one JSON line: the thought's time and token count (one sampled token per step,
counted at the official `_sample_tokens`), the codes' time and count (the official
`time_costs`), load time and peak memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", type=Path, required=True)
    parser.add_argument("--lm", type=Path, required=True, help="the LM folder")
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--caption", required=True)
    parser.add_argument("--lyrics", default="")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, str(args.reference))
    from acestep.llm_inference import LLMHandler

    device = torch.device(args.device)
    start = time.perf_counter()
    handler = LLMHandler()
    status, ok = handler.initialize(
        str(args.lm.parent), args.lm.name, backend="pt", device=args.device,
        dtype=DTYPES[args.dtype],
    )  # fmt: skip
    if not ok or handler.llm_backend != "pt":
        raise SystemExit(f"the official LM did not load with the pt backend: {status}")
    load_s = time.perf_counter() - start

    samples, starts = [0], []
    sample, generate = handler._sample_tokens, handler.generate_from_formatted_prompt

    def counted_sample(*a, **k):
        samples[0] += 1
        return sample(*a, **k)

    def marked_generate(*a, **k):
        starts.append(samples[0])
        return generate(*a, **k)

    handler._sample_tokens = counted_sample
    handler.generate_from_formatted_prompt = marked_generate

    def plan(seed: int) -> dict:
        starts.clear()
        torch.manual_seed(seed)
        result = handler.generate_with_stop_condition(
            args.caption,
            args.lyrics,
            "llm_dit",
            temperature=0.85,
            cfg_scale=2.0,
            negative_prompt="NO USER INPUT",
            top_k=None,
            top_p=0.9,
            repetition_penalty=1.0,
            use_constrained_decoding=True,
            target_duration=args.duration,
            user_metadata={"caption": args.caption, "duration": str(int(args.duration))},
        )
        if not result["success"]:
            raise SystemExit(f"the official plan failed: {result['error']}")
        costs = result["extra_outputs"]["time_costs"]
        return {
            "thought_s": costs["phase1_time"],
            "thought_tokens": starts[1] - starts[0],
            "codes_s": costs["phase2_time"],
            "codes": result["extra_outputs"]["codes_count"],
        }

    plan(0)  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timed = plan(1)
    report = timed | {"load_s": load_s, "peak_gib": peak_memory_gib(device)}
    print(json.dumps(report | {"torch": torch.__version__}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
