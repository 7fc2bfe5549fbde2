#!/usr/bin/env python3
"""Time the pipeline stage by stage, optionally beside the official ACE-Step 1.5 code.

    scripts/benchmark.py --model-dir CHECKPOINT                 # 10 30 60 240 600 s
    scripts/benchmark.py --model tiny --durations 1 --repeats 1  # plumbing check (CI)
    scripts/benchmark.py --random-full --durations 10 --dtype bf16 \\
        --reference UPSTREAM_CHECKOUT --reference-python UPSTREAM_VENV/bin/python
    scripts/benchmark.py --random-full --lm 0.6B --lm-only --durations 10 \\
        --reference UPSTREAM_CHECKOUT --reference-python UPSTREAM_VENV/bin/python

Per duration: one warm-up generation, then `--repeats` timed ones; the table shows the
median of each stage (text encoding, condition encoding, diffusion, VAE decode, WAV write),
the total, the real-time factor and the peak memory (CUDA allocator peak on a GPU, the
process's RSS high-water mark on the CPU, load included).

`--random-full` writes full-size random weights in the real checkpoint layout to a temporary
folder (the tokenizer is the tiny checkpoint's). `--reference DIR` (a checkout of the
official code, never part of this repository) runs the official turbo model and diffusers'
`AutoencoderOobleck` on the same weights and inputs through `scripts/benchmark_official.py`
in the reference's Python (`--reference-python`); our side then also runs in a fresh
process, the two alternate, one model in memory at a time, and the table adds official/ours
per stage and an output check (max |official - ours| / max |official| for the final latents
and for the decode of our latents).

The 5 Hz LM planner (`--lm SIZE`; on `--model tiny` its tiny LM by default, `--lm none` skips
it): per duration, in fresh processes, one warm-up plan and then one timed plan per repeat
(the caption's thought under guidance, then duration·5 audio codes); medians of the thought's
tokens per second and the codes per second, and the peak memory. `--random-full` also writes a
full-size random LM of that size (the real config, a tokenizer of the real length with the
audio codes last). With `--reference DIR` the official PyTorch LM path
(`scripts/benchmark_official_lm.py`, the official constrained decoding and guidance) plans
the same request on the same weights, alternating with ours. `--lm-only` measures the planner
alone.

Also measured, with the tiny checkpoint: daemon overhead per request (socket round trip
minus the answer's `timings.total`, the job's whole time in the worker, the file write
included) and `status` requests per second. With the checkpoint under test: throughput
(`--throughput JOBS` requests of `--throughput-duration` seconds sent at once, in jobs per
minute) and overhead per request of 1 and 2 workers (on `--device`, twice) behind one
daemon's socket and behind a queue front with a `redis-server` of its own.

`--quantize int8|fp8` and `--offload` measure the pipeline so loaded. `--memory SECONDS`
(off by default; 240 is a 4-minute song) adds a table of one song of that length in every
memory setup (plain, int8, fp8 and, on a GPU, offload and int8 + offload), each in a fresh
process: the peak memory of loading and of generating, the time, and how far the final
latents land from the plain run's (same seed and noise; max |Δ| / max |plain|). `--json`
prints everything as one JSON object instead of tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from acestep_daemon.cli import quiet_library_logs  # noqa: E402

quiet_library_logs()  # before transformers imports torchao (cli.QUIET_LOGGERS)

from acestep_daemon.audio import write_audio  # noqa: E402
from acestep_daemon.checkpoint import (  # noqa: E402
    LM_SIZES,
    TINY_LM,
    CheckpointPaths,
    lm_folder_name,
    resolve_checkpoint,
    resolve_lm,
)
from acestep_daemon.memory import MemoryPolicy, free_memory, trim_heap  # noqa: E402
from acestep_daemon.model import AceStepModel  # noqa: E402
from acestep_daemon.model.vae import OobleckVAE  # noqa: E402
from acestep_daemon.options import QUANTIZE_SCHEMES  # noqa: E402
from acestep_daemon.params import GenerationParams  # noqa: E402
from acestep_daemon.pipeline import Pipeline, default_dtype  # noqa: E402
from acestep_daemon.planner import LMRunner, PlanRequest, make_plan  # noqa: E402
from acestep_daemon.planner.plan import PhaseProgress  # noqa: E402
from acestep_daemon.tiny import make_tiny_checkpoint  # noqa: E402
from acestep_daemon.tiny.checkpoint import DIT_CONFIG, VAE_CONFIG  # noqa: E402
from acestep_daemon.tiny.lm import LM_FOLDER, write_tiny_lm_tokenizer  # noqa: E402
from acestep_daemon.tiny.weights import random_tensor  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
STAGES = ("text", "condition", "diffusion", "vae", "write")
OFFICIAL_STAGES = ("condition", "diffusion", "vae")
DEFAULT_DURATIONS = (10.0, 30.0, 60.0, 240.0, 600.0)
CAPTION = "benchmark: upbeat jazz trio, brushed drums, walking bass"
LYRICS = "[Instrumental]"
FIXTURES = REPO / "tests" / "fixtures"
DAEMON_REQUESTS = 20
THROUGHPUT_JOBS = 8
THROUGHPUT_DURATION_S = 10.0
STATUS_SECONDS = 2.0
MEMORY_SETUPS = {
    "plain": [],
    "int8": ["--quantize", "int8"],
    "fp8": ["--quantize", "fp8"],
    "offload": ["--offload"],
    "int8 + offload": ["--quantize", "int8", "--offload"],
}
"""The `--memory` table's rows and their flags; the offload rows only on a GPU."""


# -- full-size random weights ---------------------------------------------------------------


def write_safetensors(
    path: Path, shapes: dict[str, torch.Size], draw: Callable[[str, torch.Size], torch.Tensor]
) -> None:
    """A float32 safetensors file written tensor by tensor (peak: one tensor in memory)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in sorted(shapes):
        size = 4 * shapes[name].numel()
        header[name] = {
            "dtype": "F32",
            "shape": list(shapes[name]),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with path.open("wb") as out:
        out.write(struct.pack("<Q", len(encoded)) + encoded)
        for name in sorted(shapes):
            tensor = draw(name, shapes[name]).to(torch.float32).contiguous()
            out.write(tensor.numpy().tobytes())


def write_random_full_checkpoint(dest: Path, seed: int = 0) -> Path:
    """Full-size random DiT, VAE and Qwen3 text encoder in the real layout under `dest`.

    Starts from the tiny checkpoint (tokenizer files, every config field) and replaces the
    configs by the real ones (from the key manifests in tests/fixtures) and the weights by
    random ones at those sizes; the VAE's residual branches and output start small, as in
    the tiny checkpoint, so random latents decode to finite audio.
    """
    from transformers import Qwen3Config, Qwen3Model

    paths = CheckpointPaths(make_tiny_checkpoint(dest, seed=seed))
    generator = torch.Generator().manual_seed(seed)

    def manifest(name: str) -> dict:
        return json.loads((FIXTURES / f"{name}.keys.json").read_text())["config"]

    def draw(name: str, shape: torch.Size) -> torch.Tensor:
        tensor = random_tensor(name, shape, generator)
        if name.startswith(("encoder.", "decoder.")) and name.endswith("conv2.weight_g"):
            tensor = tensor * (0.2 if name == "decoder.conv2.weight_g" else 0.1)
        return tensor

    dit_config = DIT_CONFIG | manifest("acestep-v15-turbo")
    (paths.dit_dir / "config.json").write_text(json.dumps(dit_config, indent=2) + "\n")
    with torch.device("meta"):
        shapes = {k: t.shape for k, t in AceStepModel.from_config(dit_config).state_dict().items()}
    write_safetensors(paths.dit_dir / "model.safetensors", shapes, draw)
    channels = dit_config["audio_acoustic_hidden_dim"]
    silence = 0.5 * torch.randn(1, channels, 1, generator=generator).expand(-1, -1, 15_000)
    torch.save(silence.contiguous(), paths.dit_dir / "silence_latent.pt")

    vae_config = VAE_CONFIG | manifest("vae")
    (paths.vae_dir / "config.json").write_text(json.dumps(vae_config, indent=2) + "\n")
    with torch.device("meta"):
        shapes = {k: t.shape for k, t in OobleckVAE.from_config(vae_config).state_dict().items()}
    write_safetensors(paths.vae_dir / "diffusion_pytorch_model.safetensors", shapes, draw)

    text_config = Qwen3Config.from_json_file(paths.text_dir / "config.json")
    for key, value in manifest("Qwen3-Embedding-0.6B").items():
        setattr(text_config, key, value)
    text_config.max_window_layers = text_config.num_hidden_layers
    text_config.to_json_file(paths.text_dir / "config.json")
    with torch.device("meta"):
        shapes = {k: t.shape for k, t in Qwen3Model(text_config).state_dict().items()}
    write_safetensors(paths.text_dir / "model.safetensors", shapes, draw)
    return paths.root


# -- our pipeline ---------------------------------------------------------------------------


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def resident_gib(device: torch.device) -> float:
    """Memory held now: the CUDA allocator's, or the process's resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**30
    with open("/proc/self/status") as status:
        rss_kib = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return rss_kib / 2**20


def set_fast_paths(pipeline: Pipeline, enabled: bool) -> None:
    """Switch every fast path of the model code on or off (results stay within tolerance)."""
    pipeline.model.decoder.reuse_step_constants = enabled
    pipeline.model.decoder.mask_free_attention = enabled
    pipeline.model.decoder.banded_attention = enabled
    pipeline.vae.fold_weight_norm = enabled


class Recorder:
    """Wraps the pipeline's model calls on the instance: condition-encoding time, its
    inputs, the final latents and the raw VAE decode (for the output check)."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.condition_s = 0.0
        self.saved: dict[str, torch.Tensor] = {}
        model, vae = pipeline.model, pipeline.vae
        encode, diffuse, decode = model.encode_condition, pipeline.diffuse, vae.tiled_decode
        device = pipeline.device

        def timed_encode(*args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            start = time.perf_counter()
            out = encode(*args)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.condition_s = time.perf_counter() - start
            names = ("text_hidden", "text_mask", "lyric_hidden", "lyric_mask", "refer_latents")
            self.saved.update(zip(names, args, strict=False))
            self.saved["refer_order"] = args[-1]
            return out

        def kept_diffuse(*args: Any, **kwargs: Any) -> torch.Tensor:
            self.saved["latents"] = latents = diffuse(*args, **kwargs)
            return latents

        def kept_decode(*args: Any, **kwargs: Any) -> torch.Tensor:
            self.saved["audio"] = audio = decode(*args, **kwargs)
            return audio

        model.encode_condition = timed_encode
        pipeline.diffuse = kept_diffuse
        vae.tiled_decode = kept_decode


def run_ours(
    pipeline: Pipeline, duration: float, repeats: int, scratch: Path
) -> tuple[dict[str, float], Recorder]:
    """Warm-up, then `repeats` timed generations; median seconds per stage.

    Each runs as the daemon runs it (`MemoryPolicy`: the VAE tile from free memory).
    """
    recorder = Recorder(pipeline)
    # Plain Euler (DCW off), as the official turbo model file's `generate_audio` samples: the
    # output check compares the two sides' final latents.
    params = GenerationParams(
        caption=CAPTION, lyrics="[Instrumental]", duration_s=duration, seed=0, dcw=False
    )

    def generate() -> Any:
        home = (pipeline.device, pipeline.dtype)
        return MemoryPolicy(pipeline, home).run(params, lambda *_: None).audio

    generate()
    if pipeline.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(pipeline.device)
    runs = []
    for _ in range(repeats):
        audio = generate()
        start = time.perf_counter()
        write_audio(scratch / "benchmark.wav", audio.samples, audio.sample_rate)
        stages = {
            "text": audio.timings["text"] - recorder.condition_s,
            "condition": recorder.condition_s,
            "diffusion": audio.timings["diffusion"],
            "vae": audio.timings["vae"],
            "write": time.perf_counter() - start,
        }
        runs.append(stages | {"total": sum(stages.values())})
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}, recorder


def load_pipeline(args: argparse.Namespace, checkpoint: Path) -> Pipeline:
    """The pipeline under test, as the command line asks for it."""
    return Pipeline.load(
        CheckpointPaths(checkpoint),
        args.device,
        DTYPES[args.dtype],
        compile=args.compile,
        quantize=args.quantize,
        offload=args.offload,
    )


def ours_worker(args: argparse.Namespace) -> int:
    """`--worker`: one duration in this fresh process; prints JSON, saves the check tensors.

    `load_peak_gib` is the peak up to the end of loading; `peak_gib` that of the timed
    generation on a GPU (its allocator's peak is reset after the warm-up), of the whole
    process on the CPU (the RSS high-water mark, which the checkpoint files' pages read at
    load dominate); `resident_gib` what is held after the timed generation (the C heap
    trimmed, as the daemon does after each job).
    """
    from safetensors.torch import save_file

    start = time.perf_counter()
    pipeline = load_pipeline(args, args.model_dir)
    load_s = time.perf_counter() - start
    load_peak = peak_memory_gib(pipeline.device)
    set_fast_paths(pipeline, not args.no_fast_paths)
    with tempfile.TemporaryDirectory() as scratch:
        stages, recorder = run_ours(pipeline, args.durations[0], 1, Path(scratch))
    saved = {k: t.cpu().contiguous() for k, t in recorder.saved.items()}
    saved["seed"] = torch.tensor(0)
    save_file(saved, args.worker)
    memory = {"load_peak_gib": load_peak, "peak_gib": peak_memory_gib(pipeline.device)}
    trim_heap()  # as the daemon does after each job
    memory["resident_gib"] = resident_gib(pipeline.device)
    print(json.dumps({"stages": stages, "load_s": load_s, **memory}))
    return 0


def subprocess_json(command: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{command[1]} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def relative_error(ours: torch.Tensor, official: torch.Tensor) -> float:
    ours, official = ours.float().reshape(official.shape), official.float()
    return float((ours - official).abs().max() / official.abs().max())


def worker_command(
    args: argparse.Namespace, checkpoint: Path, duration: float, saved: Path, memory: list[str]
) -> list[str]:
    """`ours_worker` in a fresh process for one duration, saving its check tensors to `saved`,
    with this run's fast-path and compile flags and the memory flags `memory`."""
    command = [sys.executable, __file__, "--worker", str(saved), "--model-dir", str(checkpoint)]
    command += ["--device", args.device, "--dtype", args.dtype, "--durations", str(duration)]
    command += ["--no-fast-paths"] * args.no_fast_paths + ["--compile"] * args.compile
    return command + memory


def memory_flags(args: argparse.Namespace) -> list[str]:
    """This run's `--quantize` and `--offload`, as a worker's flags."""
    return ["--quantize", args.quantize] * bool(args.quantize) + ["--offload"] * args.offload


def compare_with_official(
    args: argparse.Namespace, checkpoint: Path, duration: float, scratch: Path
) -> dict[str, Any]:
    """Ours and the official code in alternating fresh processes, `--repeats` rounds each."""
    from safetensors.torch import load_file

    env = dict(os.environ, PYTHONPATH=str(REPO))
    ours_runs, official_runs = [], []
    inputs, official_out = scratch / "ours.safetensors", scratch / "official.safetensors"
    for _ in range(args.repeats):
        command = worker_command(args, checkpoint, duration, inputs, memory_flags(args))
        ours_runs.append(subprocess_json(command, env))
        command = [args.reference_python, str(REPO / "scripts" / "benchmark_official.py")]
        command += ["--reference", str(args.reference), "--checkpoint", str(checkpoint)]
        command += ["--inputs", str(inputs), "--out", str(official_out)]
        command += ["--device", args.device, "--dtype", args.dtype]
        official_runs.append(subprocess_json(command))
    ours, official = load_file(inputs), load_file(official_out)
    samples = min(ours["audio"].shape[-1], official["audio"].shape[-1])

    def median(runs: list[dict], key: str) -> float:
        return statistics.median(run["stages"][key] for run in runs)

    return {
        "ours": {key: median(ours_runs, key) for key in (*STAGES, "total")},
        "official": {key: median(official_runs, key) for key in OFFICIAL_STAGES},
        "ours_load_s": statistics.median(run["load_s"] for run in ours_runs),
        "official_load_s": statistics.median(run["load_s"] for run in official_runs),
        "ours_peak_gib": max(run["peak_gib"] for run in ours_runs),
        "official_peak_gib": max(run["peak_gib"] for run in official_runs),
        "latents_error": relative_error(ours["latents"], official["latents"]),
        "decode_error": relative_error(
            ours["audio"][..., :samples], official["audio"][..., :samples]
        ),
    }


def measure_memory(
    args: argparse.Namespace, checkpoint: Path, duration: float, scratch: Path
) -> list[dict[str, Any]]:
    """One song of `duration` in each memory setup, each in a fresh process (`ours_worker`);
    the latents error is against the plain setup's latents (the first row)."""
    from safetensors.torch import load_file

    env = dict(os.environ, PYTHONPATH=str(REPO))
    on_gpu = torch.device(args.device).type != "cpu"
    rows: list[dict[str, Any]] = []
    plain = None
    for name, flags in MEMORY_SETUPS.items():
        if "--offload" in flags and not on_gpu:
            continue
        saved = scratch / "memory.safetensors"
        run = subprocess_json(worker_command(args, checkpoint, duration, saved, flags), env)
        latents = load_file(saved)["latents"]
        plain = latents if plain is None else plain
        rows.append(
            {
                "setup": name,
                "load_peak_gib": run["load_peak_gib"],
                "peak_gib": run["peak_gib"],
                "resident_gib": run["resident_gib"],
                "load_s": run["load_s"],
                "diffusion_s": run["stages"]["diffusion"],
                "total_s": run["stages"]["total"],
                "latents_error": relative_error(latents, plain),
            }
        )
    return rows


def memory_markdown(report: dict[str, Any]) -> list[str]:
    on_cpu = report["device"].startswith("CPU")
    kind = (
        "RSS: its high-water mark, load included, and what is resident after the song "
        "with the C heap trimmed"
    )
    kind = kind if on_cpu else "the CUDA allocator's peaks and what it holds after the song"
    lines = [
        "",
        f"Memory: one {report['memory_duration_s']:g} s song per setup, each in a fresh process "
        f"({kind}; latents error: max |Δ| / max |plain| of the final latents, same noise):",
        "",
        "| setup | load peak (GiB) | generation peak (GiB) | held after (GiB) | load (s) "
        "| diffusion (s) | total (s) | latents error |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {row['setup']} | {row['load_peak_gib']:.2f} | {row['peak_gib']:.2f} "
        f"| {row['resident_gib']:.2f} "
        f"| {row['load_s']:.1f} | {row['diffusion_s']:.2f} | {row['total_s']:.2f} "
        f"| {row['latents_error']:.1e} |"
        for row in report["memory"]
    ]
    return lines


# -- the 5 Hz LM planner --------------------------------------------------------------------

LM_WIDTHS: dict[str, dict[str, int]] = {
    "0.6B": {},
    "1.7B": {"hidden_size": 2048, "intermediate_size": 6144},
    "4B": {
        "hidden_size": 2560,
        "intermediate_size": 9728,
        "num_attention_heads": 32,
        "num_hidden_layers": 36,
        "max_window_layers": 36,
    },
}
"""How the real 1.7B and 4B configs differ from the 0.6B one (the Qwen3 sizes)."""
OFFICIAL_LM = "benchmark_official_lm.py"
LM_STATS = ("thought_s", "thought_tokens", "thought_tok_s", "codes_s", "codes", "codes_per_s")


def write_random_full_lm(dest: Path, size: str, seed: int = 0) -> Path:
    """A full-size random 5 Hz LM of `size` in the real layout: dest/acestep-5Hz-lm-<size>/.

    The config is the real 0.6B one (tests/fixtures) with the widths of `size`; the tokenizer
    is the tiny LM's, padded to the real 217,204 tokens so that the audio codes sit last, as
    in the real one (and the official constrained decoding, which sizes its masks by the
    tokenizer, runs on it); weights drawn like the tiny checkpoint's, in float32.
    """
    from transformers import Qwen3Config, Qwen3ForCausalLM

    folder = dest / lm_folder_name(size)
    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads((FIXTURES / "acestep-5Hz-lm-0.6B.config.json").read_text())
    config |= LM_WIDTHS[size]
    config["layer_types"] = ["full_attention"] * config["num_hidden_layers"]
    tokenizer = write_tiny_lm_tokenizer(folder, vocab_size=config["vocab_size"])
    pad = tokenizer.token_to_id("<|endoftext|>")
    config |= {"bos_token_id": pad, "pad_token_id": pad}
    config["eos_token_id"] = tokenizer.token_to_id("<|im_end|>")
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    with torch.device("meta"):
        model = Qwen3ForCausalLM(Qwen3Config.from_dict(config))
        shapes = {k: t.shape for k, t in model.state_dict().items() if k != "lm_head.weight"}
    generator = torch.Generator().manual_seed(seed)
    write_safetensors(
        folder / "model.safetensors", shapes, lambda n, s: random_tensor(n, s, generator)
    )
    return folder


def add_lm_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--lm",
        nargs="?",
        const=TINY_LM,
        choices=(*LM_SIZES, "none"),
        help=f"measure the 5 Hz LM planner of this size (alone: {TINY_LM}; on --model tiny "
        "its tiny LM is measured unless --lm none)",
    )
    parser.add_argument("--lm-only", action="store_true", help="measure the planner alone")
    parser.add_argument("--lm-worker", type=Path, help=argparse.SUPPRESS)


def lm_under_test(args: argparse.Namespace, tiny: Path, scratch: Path) -> Path | None:
    """The LM folder `--lm` names for this source of weights, or None: no planner run."""
    if args.lm == "none" or (args.lm is None and args.model != "tiny"):
        return None
    size = args.lm or TINY_LM
    if args.model == "tiny":
        if size != TINY_LM:
            raise SystemExit(f"--model tiny brings a tiny LM in the {TINY_LM} layout only")
        return tiny / LM_FOLDER
    if args.random_full:
        root = scratch / "random-full" if args.random_full is True else Path(args.random_full)
        done = root / lm_folder_name(size) / "complete"
        folder = done.parent if done.exists() else write_random_full_lm(root, size)
        done.touch()
        return folder
    return resolve_lm(size, args.model_dir)


def timed_plan(runner: LMRunner, duration: float, seed: int) -> dict[str, float]:
    """One full plan (the thought, then the codes) of the benchmark caption, timed per phase."""
    marks: dict[str, float] = {}
    counts = {"metas": 0, "codes": 0}

    def note(phase: str) -> Callable[[int, int], None]:
        def progress(count: int, of: int) -> None:
            counts[phase] = count
            marks[phase] = time.perf_counter()

        return progress

    sync = torch.cuda.synchronize if runner.device.type == "cuda" else lambda: None
    request = PlanRequest(CAPTION, lyrics=LYRICS, duration_s=duration, seed=seed)
    sync()
    start = time.perf_counter()
    make_plan(runner, request, "full", PhaseProgress(note("metas"), note("codes")))
    sync()
    return {
        "thought_s": marks["metas"] - start,
        "thought_tokens": counts["metas"],
        "codes_s": time.perf_counter() - marks["metas"],
        "codes": counts["codes"],
    }


def lm_worker(args: argparse.Namespace) -> int:
    """`--lm-worker FOLDER`: load the LM in this fresh process, warm up, time one plan."""
    device = torch.device(args.device)
    start = time.perf_counter()
    runner = LMRunner.load(args.lm_worker, device, DTYPES[args.dtype])
    load_s = time.perf_counter() - start
    runner.code_rows_only = not args.no_fast_paths
    timed_plan(runner, args.durations[0], seed=0)  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timed = timed_plan(runner, args.durations[0], seed=1)
    print(json.dumps(timed | {"load_s": load_s, "peak_gib": peak_memory_gib(device)}))
    return 0


def lm_medians(runs: list[dict[str, float]]) -> dict[str, float]:
    """Medians over rounds of times, counts and rates; the largest peak and the load time."""
    runs = [
        run
        | {
            "thought_tok_s": run["thought_tokens"] / run["thought_s"],
            "codes_per_s": run["codes"] / run["codes_s"],
        }
        for run in runs
    ]
    medians = {key: statistics.median(run[key] for run in runs) for key in LM_STATS}
    return medians | {
        "load_s": statistics.median(run["load_s"] for run in runs),
        "peak_gib": max(run["peak_gib"] for run in runs),
    }


def measure_lm(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """Our planner (and the official one with --reference) per duration, `--repeats` rounds
    of alternating fresh processes."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    rows = []
    for duration in args.durations:
        ours, official = [], []
        for _ in range(args.repeats):
            command = [sys.executable, __file__, "--lm-worker", str(folder), "--device"]
            command += [args.device, "--dtype", args.dtype, "--durations", str(duration)]
            command += ["--no-fast-paths"] * args.no_fast_paths
            ours.append(subprocess_json([*command, "--threads", str(args.threads)], env))
            if args.reference:
                command = [args.reference_python, str(REPO / "scripts" / OFFICIAL_LM)]
                command += ["--reference", str(args.reference), "--lm", str(folder)]
                command += ["--duration", str(duration), "--caption", CAPTION, "--lyrics", LYRICS]
                command += ["--device", args.device, "--dtype", args.dtype]
                official.append(subprocess_json([*command, "--threads", str(args.threads)]))
        row = {"duration_s": duration, "ours": lm_medians(ours)}
        if official:
            row["official"] = lm_medians(official)
        rows.append(row)
    return {"folder": folder.name, "durations": rows}


def lm_markdown(lm: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"5 Hz LM planner ({lm['folder']}; thought under guidance, then duration·5 codes):",
        "",
        "| duration (s) | thought tokens | thought (s) | thought tok/s | codes | codes (s) "
        "| codes/s | load (s) | peak memory (GiB) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in lm["durations"]:
        o = row["ours"]
        lines.append(
            f"| {row['duration_s']:g} | {o['thought_tokens']:.0f} | {o['thought_s']:.2f} "
            f"| {o['thought_tok_s']:.1f} | {o['codes']:.0f} | {o['codes_s']:.2f} "
            f"| {o['codes_per_s']:.2f} | {o['load_s']:.1f} | {o['peak_gib']:.2f} |"
        )
    rows = [row for row in lm["durations"] if "official" in row]
    if rows:
        lines += [
            "",
            "Official PyTorch LM path / ours (same weights and request, alternating processes):",
            "",
            "| duration (s) | thought tok/s: official → ours | codes/s: official → ours "
            "| official thought tokens | official peak (GiB) |",
            "|---:|---:|---:|---:|---:|",
        ]
        for row in rows:
            o, s = row["official"], row["ours"]
            cells = [
                f"{o[k]:.2f} → {s[k]:.2f} ({s[k] / o[k]:.2f}×)"
                for k in ("thought_tok_s", "codes_per_s")
            ]
            lines.append(
                f"| {row['duration_s']:g} | {' | '.join(cells)} | {o['thought_tokens']:.0f} "
                f"| {o['peak_gib']:.2f} |"
            )
    return lines


# -- the daemon -----------------------------------------------------------------------------


def ask(path: Path, request: dict[str, Any]) -> list[dict[str, Any]]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(120)
        sock.connect(str(path))
        sock.sendall(json.dumps(request).encode() + b"\n")
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(1 << 16):
            chunks.append(chunk)
    return [json.loads(line) for line in b"".join(chunks).splitlines()]


def spawn_daemon(
    scratch: Path, name: str, *args: str, threads: int | None = None
) -> tuple[subprocess.Popen, Path]:
    """`acestep serve --socket scratch/NAME.sock ARGS` with its log in scratch/NAME.log
    (`threads`: its CPU threads, OMP_NUM_THREADS)."""
    sock = scratch / f"{name}.sock"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACESTEP_", "LISTEN_"))}
    env.pop("NOTIFY_SOCKET", None)
    env |= {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "XDG_RUNTIME_DIR": str(scratch)}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [sys.executable, "-m", "acestep_daemon", "serve", "--socket", str(sock), *args]
    with (scratch / f"{name}.log").open("wb") as log:
        daemon = subprocess.Popen(command, cwd=scratch, env=env, stdout=log, stderr=log)
    return daemon, sock


def wait_loaded(daemon: subprocess.Popen, sock: Path, workers: int = 1) -> None:
    """Until `status` says loaded (on a front: `workers` workers published it)."""
    while True:
        if daemon.poll() is not None:
            log = sock.with_suffix(".log").read_text()[-4000:]
            raise SystemExit(f"daemon exited:\n{log}")
        try:
            status = ask(sock, {"command": "status"})[0]
            if status.get("loaded") and len(status.get("workers", ())) >= workers:
                return
        except OSError:
            pass
        time.sleep(0.05)


def stop_daemons(daemons: list[subprocess.Popen]) -> None:
    for daemon in daemons:
        daemon.terminate()
    for daemon in daemons:
        daemon.wait(60)


def generate(sock: Path, index: int, duration: float, scratch: Path) -> tuple[float, dict]:
    """One request's (round trip, answer)."""
    request = {"caption": CAPTION, "duration_s": duration, "seed": index}
    request["output"] = str(scratch / f"daemon-{index}.wav")
    begin = time.perf_counter()
    answer = ask(sock, request)[-1]
    if not answer.get("ok"):
        raise SystemExit(f"daemon request failed: {answer}")
    return time.perf_counter() - begin, answer


def overhead_ms(sock: Path, requests: int, duration: float, scratch: Path) -> float:
    """Median of round trip − the job's time in the worker, one request at a time."""
    results = [generate(sock, index, duration, scratch) for index in range(requests)]
    return 1000 * statistics.median(trip - answer["timings"]["total"] for trip, answer in results)


def measure_daemon(checkpoint: Path, scratch: Path, requests: int) -> dict[str, float]:
    """Load time, per-request overhead and `status` rate of a real daemon (tiny checkpoint)."""
    start = time.perf_counter()
    daemon, sock = spawn_daemon(scratch, "daemon", "--model-dir", str(checkpoint))
    try:
        wait_loaded(daemon, sock)
        ready_s = time.perf_counter() - start
        generate(sock, 0, 1.0, scratch)  # the warm-up
        overhead = overhead_ms(sock, requests, 1.0, scratch)
        count, begin = 0, time.perf_counter()
        while time.perf_counter() - begin < STATUS_SECONDS:
            ask(sock, {"command": "status"})
            count += 1
        status_rate = count / (time.perf_counter() - begin)
    finally:
        stop_daemons([daemon])
    return {"ready_s": ready_s, "overhead_ms": overhead, "status_per_s": status_rate}


def start_setup(
    path: str, workers: int, checkpoint: Path, scratch: Path, device: str
) -> tuple[list[subprocess.Popen], Path]:
    """`workers` workers behind one daemon's socket, or behind a queue's front (with a
    `redis-server` of its own on a Unix socket): the processes, the socket to send to."""
    model = ("--model-dir", str(checkpoint))
    name = f"{path}{workers}"
    if path == "socket":
        daemon, sock = spawn_daemon(
            scratch, name, *model, "--devices", ",".join([device] * workers)
        )
        wait_loaded(daemon, sock)
        return [daemon], sock
    redis_sock = scratch / f"{name}-redis.sock"
    daemons = [
        subprocess.Popen(
            [
                "redis-server",
                "--port",
                "0",
                "--unixsocket",
                str(redis_sock),
                "--unixsocketperm",
                "700",
                "--save",
                "",
                "--dir",
                str(scratch),
            ],
            stdout=subprocess.DEVNULL,
        )
    ]
    while not redis_sock.exists():
        time.sleep(0.01)
    queue = ("--queue", f"unix://{redis_sock}")
    # Worker processes on one CPU share its cores, as the threads of one daemon do.
    threads = max(1, torch.get_num_threads() // workers) if device == "cpu" else None
    for index in range(workers):
        worker, worker_sock = spawn_daemon(
            scratch, f"{name}-worker{index}", *model, "--device", device, *queue, threads=threads
        )
        daemons.append(worker)
        wait_loaded(worker, worker_sock)
    front, sock = spawn_daemon(scratch, f"{name}-front", "--front", *queue)
    daemons.append(front)
    wait_loaded(front, sock, workers)
    return daemons, sock


def measure_throughput(
    checkpoint: Path, scratch: Path, jobs: int, duration: float, device: str
) -> list[dict[str, Any]]:
    """Jobs per minute (`jobs` requests sent at once) and per-request overhead (one at a
    time) of 1 and 2 workers, through a daemon's socket and through the queue (those rows
    only where `redis-server` is installed)."""
    setups = [("socket", 1), ("socket", 2)]
    if shutil.which("redis-server"):
        setups += [("queue", 1), ("queue", 2)]
    rows = []
    for path, workers in setups:
        daemons, sock = start_setup(path, workers, checkpoint, scratch, device)
        try:

            def one(index: int, sock: Path = sock) -> tuple[float, dict]:
                return generate(sock, index, duration, scratch)

            with ThreadPoolExecutor(jobs) as pool:
                list(pool.map(one, range(workers)))  # the warm-up of every worker
                begin = time.perf_counter()
                list(pool.map(one, range(jobs)))
                elapsed = time.perf_counter() - begin
            overhead = overhead_ms(sock, max(jobs // 2, 1), duration, scratch)
        finally:
            stop_daemons(daemons[::-1])  # the front first, the queue's server last
        rows.append(
            {
                "path": path,
                "workers": workers,
                "jobs": jobs,
                "jobs_per_min": 60 * jobs / elapsed,
                "overhead_ms": overhead,
            }
        )
    return rows


# -- output ---------------------------------------------------------------------------------


def markdown(report: dict[str, Any]) -> str:
    load = f", load: {report['load_s']:.1f} s" if "load_s" in report else ""
    lines = [
        f"device: {report['device']}, dtype: {report['dtype']}, torch {report['torch']}, "
        f"threads: {report['threads']}, fast paths: {'on' if report['fast_paths'] else 'off'}, "
        f"compile: {'on' if report['compile'] else 'off'}, "
        f"quantize: {report['quantize'] or 'off'}, "
        f"offload: {'on' if report['offload'] else 'off'}, model: {report['model']}{load}",
    ]
    if report["durations"]:  # none with --lm-only
        lines += [
            "",
            "| duration (s) | text (s) | condition (s) | diffusion (s) | VAE decode (s) "
            "| write (s) | total (s) | × real time | peak memory (GiB) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
    for row in report["durations"]:
        s = row["ours"]
        cells = [f"{s[key]:.3f}" for key in (*STAGES, "total")]
        lines.append(
            f"| {row['duration_s']:g} | {' | '.join(cells)} | {row['duration_s'] / s['total']:.2f} "
            f"| {row['ours_peak_gib']:.2f} |"
        )
    rows = [row for row in report["durations"] if "official" in row]
    if rows:
        lines += [
            "",
            "Official / ours (same weights and inputs, alternating processes):",
            "",
            "| duration (s) | condition | diffusion | VAE decode | DiT + VAE | official peak (GiB) "
            "| latents error | decode error |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in rows:
            o, s = row["official"], row["ours"]
            ratios = [f"{o[k]:.2f} / {s[k]:.2f} = {o[k] / s[k]:.2f}×" for k in OFFICIAL_STAGES]
            both_o, both_s = o["diffusion"] + o["vae"], s["diffusion"] + s["vae"]
            ratios.append(f"{both_o:.2f} / {both_s:.2f} = {both_o / both_s:.2f}×")
            lines.append(
                f"| {row['duration_s']:g} | {' | '.join(ratios)} | {row['official_peak_gib']:.2f} "
                f"| {row['latents_error']:.1e} | {row['decode_error']:.1e} |"
            )
    if "daemon" in report:
        d = report["daemon"]
        lines += [
            "",
            f"daemon (tiny checkpoint): ready {d['ready_s']:.2f} s after start, overhead "
            f"{d['overhead_ms']:.1f} ms per request (round trip − the job's time in the worker), "
            f"`status` {d['status_per_s']:.0f} requests/s",
        ]
    if "throughput" in report:
        rows = report["throughput"]
        lines += [
            "",
            f"Throughput ({rows[0]['jobs']} jobs of {report['throughput_duration_s']:g} s sent at "
            "once; overhead: round trip − the job's time in the worker, one request at a time):",
            "",
            "| path | workers | jobs/min | overhead (ms) |",
            "|---|---:|---:|---:|",
        ]
        lines += [
            f"| {row['path']} | {row['workers']} | {row['jobs_per_min']:.1f} "
            f"| {row['overhead_ms']:.1f} |"
            for row in rows
        ]
        if not any(row["path"] == "queue" for row in rows):
            lines.append("(no redis-server here: the queue rows are left out)")
    if "memory" in report:
        lines += memory_markdown(report)
    if "lm" in report:
        lines += lm_markdown(report["lm"])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model-dir", type=Path, help="checkpoint folder (default: HF cache)")
    source.add_argument("--model", choices=["tiny"], help="a fresh tiny checkpoint")
    source.add_argument(
        "--random-full",
        nargs="?",
        const=True,
        metavar="DIR",
        help="full-size random weights (in DIR, written there once and reused, if given)",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    parser.add_argument(
        "--durations",
        type=float,
        nargs="*",
        default=list(DEFAULT_DURATIONS),
        help="song lengths of the stage table (none: no stage table)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--no-fast-paths", action="store_true", help="switch fast paths off")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the DiT (load time includes it)"
    )
    parser.add_argument("--reference", type=Path, help="official ACE-Step 1.5 checkout")
    parser.add_argument("--reference-python", default=sys.executable)
    parser.add_argument("--daemon-requests", type=int, default=DAEMON_REQUESTS)
    parser.add_argument(
        "--throughput",
        type=int,
        default=THROUGHPUT_JOBS,
        metavar="JOBS",
        help="jobs sent at once for the throughput table (0: none)",
    )
    parser.add_argument(
        "--throughput-duration", type=float, default=THROUGHPUT_DURATION_S, metavar="SECONDS"
    )
    parser.add_argument("--quantize", choices=QUANTIZE_SCHEMES, help="8-bit linear weights")
    parser.add_argument("--offload", action="store_true", help="text encoder, LM, VAE wait on CPU")
    parser.add_argument(
        "--memory",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="the memory table: one song this long per memory setup (0: none; 240: 4 minutes)",
    )
    add_lm_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        return ours_worker(args)
    if args.lm_worker:
        return lm_worker(args)

    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        tiny = make_tiny_checkpoint(scratch / "tiny", lm=True)
        if args.model == "tiny" or args.lm_only:  # the DiT checkpoint is not needed then
            checkpoint = tiny
        elif args.random_full:
            folder = scratch / "random-full" if args.random_full is True else Path(args.random_full)
            done = folder / "complete"
            checkpoint = folder if done.exists() else write_random_full_checkpoint(folder)
            done.touch()
        else:
            checkpoint = resolve_checkpoint(args.model_dir).root
        device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu")
            if args.device == "auto"
            else args.device
        )
        args.device = str(device)
        args.dtype = args.dtype or next(k for k, v in DTYPES.items() if v == default_dtype(device))
        report: dict[str, Any] = {
            "device": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
            "dtype": args.dtype,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "fast_paths": not args.no_fast_paths,
            "compile": args.compile,
            "quantize": args.quantize,
            "offload": args.offload,
            "model": "tiny" if args.model else "random-full" if args.random_full else "checkpoint",
            "durations": [],
        }
        pipeline = None
        dit_durations = [] if args.lm_only else args.durations
        if not args.reference and dit_durations:  # with it, each side loads in its own process
            start = time.perf_counter()
            pipeline = load_pipeline(args, checkpoint)
            report["load_s"] = time.perf_counter() - start
            set_fast_paths(pipeline, not args.no_fast_paths)
        for duration in dit_durations:
            if pipeline is None:
                row = compare_with_official(args, checkpoint, duration, scratch)
                report.setdefault("load_s", row["ours_load_s"])
            else:
                stages, _ = run_ours(pipeline, duration, args.repeats, scratch)
                row = {"ours": stages, "ours_peak_gib": peak_memory_gib(device)}
            report["durations"].append({"duration_s": duration, **row})
        if args.daemon_requests > 0 and not args.lm_only:
            report["daemon"] = measure_daemon(tiny, scratch, args.daemon_requests)
        if args.throughput > 0 and not args.lm_only:
            pipeline = None  # the workers load their own
            free_memory()  # the recorder's hooks tie the weights in reference cycles
            report["throughput_duration_s"] = args.throughput_duration
            report["throughput"] = measure_throughput(
                checkpoint, scratch, args.throughput, args.throughput_duration, args.device
            )
        if args.memory > 0 and not args.lm_only:
            pipeline = None  # each setup loads in its own process
            free_memory()
            report["memory_duration_s"] = args.memory
            report["memory"] = measure_memory(args, checkpoint, args.memory, scratch)
        lm = lm_under_test(args, tiny, scratch)
        if lm is not None:
            pipeline = None  # one model in memory at a time
            free_memory()
            report["lm"] = measure_lm(args, lm)
    print(json.dumps(report, indent=2) if args.json else markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
