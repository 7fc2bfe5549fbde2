"""End-to-end generation: caption, lyrics and audio inputs in, a stereo waveform out.

This is the only module that wires the text encoder, the ACE-Step network, the
VAE and a device together (upstream: `AceStepHandler` in `acestep/handler.py`).
A request runs in up to four stages, each a method, so that the daemon's
out-of-memory policy can retry one stage:

    plan     ("lm-thought", "lm-codes")  only with `thinking`: the 5 Hz LM fills in
                            what the request left out, and in full mode writes audio codes
    prepare  ("text")       prompts → Qwen3 → condition encoder; audio inputs → VAE
                            latents; planned codes → context hints; seeds (and retake
                            seed) → noise
    diffuse  ("diffusion")  the model's sampler: turbo (1-20 steps, DCW) or the guided
                            sft/base sampler, Euler, Heun or SDE steps; with the
                            request's LoRA adapter applied
    decode   ("vae")        tiled VAE decode, anti-clipping, crop to the request

`generate` runs them all.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from acestep_daemon.adapters import AdapterCache
from acestep_daemon.audio import read_audio
from acestep_daemon.checkpoint import CheckpointPaths, resolve_lm
from acestep_daemon.constants import (
    LATENT_HOP,
    MAX_DURATION_S,
    MIN_LATENT_FRAMES,
    SAMPLE_RATE,
)
from acestep_daemon.errors import GenerationFailed, InvalidRequest
from acestep_daemon.family import DEFAULT_MODEL, MODELS, ModelSpec
from acestep_daemon.model import AceStepModel, DcwSettings, SamplerSettings, sample_guided
from acestep_daemon.model.lora import adapter_kind, adapters_applied
from acestep_daemon.model.quantize import quantization_kind, quantize_linears
from acestep_daemon.model.sampler import (
    RepaintInputs,
    draw_noise,
    mix_retake,
    sample_turbo,
    snap_shift,
)
from acestep_daemon.model.vae import DECODE_CHUNK_FRAMES, OobleckVAE
from acestep_daemon.params import (
    GenerationParams,
    time_signature_field,
    time_signature_numerator,
)
from acestep_daemon.planner import LMRunner, PlanRequest, make_plan
from acestep_daemon.planner.hints import codes_to_hints
from acestep_daemon.planner.plan import PhaseProgress
from acestep_daemon.text import (
    CAPTION_MAX_TOKENS,
    INSTRUCTIONS,
    LYRICS_MAX_TOKENS,
    TextEncoder,
    caption_prompt,
    lyrics_prompt,
    metas_for_request,
)

logger = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]
"""(stage, step, of): `step` units of `of` are done; called before each unit and once
more when the stage is complete (step == of). It may raise to cancel."""

CPU = torch.device("cpu")

REFERENCE_FRAMES = 750
"""Timbre reference length in latent frames (30 s), as upstream."""

REFERENCE_SEGMENT_S = 10.0
"""Upstream builds the 30 s timbre reference from three 10 s segments."""

SILENT_PEAK = 1e-6
"""A waveform whose peak stays below this is treated as failed output."""


REQUEST_FIELD_OF = {
    "bpm": "bpm",
    "keyscale": "key",
    "timesignature": "time_signature",
    "language": "language",
    "duration": "duration_s",
}
"""The planner's fields and the request fields they fill in."""


@dataclass
class Take:
    """One seed's waveform."""

    seed: int
    samples: torch.Tensor  # [2, S] float32 on the CPU


@dataclass
class Audio:
    """The generated stereo waveforms of one request (one per seed) and how they were made."""

    takes: list[Take]
    sample_rate: int
    duration_s: float
    timings: dict[str, float]
    thinking: dict[str, Any] | None = None  # what the planner did (mode, inferred, codes)
    sampler: str = "euler"  # the step rule that ran
    notes: list[str] = field(default_factory=list)
    """What the request asked for that was changed or cut, in words (shift snapped, text cut)."""
    adapters: list[dict[str, Any]] = field(default_factory=list)
    """The adapters that ran: {path, scale, kind ("lora" or "lokr")} each."""
    dcw: dict[str, Any] | None = None
    """The wavelet correction the diffusion ran (mode, scaler, high_scaler); None: off."""

    @property
    def samples(self) -> torch.Tensor:
        """The first take's waveform [2, S] (the only one unless `seeds` asked for more)."""
        return self.takes[0].samples

    @property
    def seed(self) -> int:
        return self.takes[0].seed


@dataclass(frozen=True)
class Planned:
    """A request after the planner: its parameters with the planned values filled in."""

    params: GenerationParams  # the caller's values kept, the rest planned, the seed fixed
    inferred: dict[str, Any]  # request field -> value the LM chose
    codes: list[int] | None  # 5 Hz audio codes (full mode)
    seconds: float

    def report(self) -> dict[str, Any]:
        codes = None if self.codes is None else len(self.codes)
        return {"mode": self.params.thinking, "inferred": self.inferred, "codes": codes}


@dataclass
class Conditioning:
    """Everything the diffusion and decode stages need, on the pipeline's device."""

    params: GenerationParams
    seeds: list[int]  # one take per seed
    duration_s: float  # length of the output audio
    encoder_hidden: torch.Tensor  # [B, S, D]
    context: torch.Tensor  # [B, T, 128]
    noise: torch.Tensor  # [B, T, 64]
    repaint: RepaintInputs | None = None
    timings: dict[str, float] = field(default_factory=dict)
    planned: Planned | None = None
    notes: list[str] = field(default_factory=list)
    adapters: list[dict[str, Any]] = field(default_factory=list)  # what diffusion applied
    dcw: DcwSettings | None = None  # set by the diffusion stage: the correction it ran

    @property
    def frames(self) -> int:
        return self.noise.shape[1]


@dataclass
class TaskInputs:
    """What a task gives the DiT's context, and the length of its output."""

    src_latents: torch.Tensor  # [1, T, 64] silence, or the (repaint: partly silenced) source
    chunk_mask: torch.Tensor  # [1, T] 1 = generate, 0 = keep the source
    hints: torch.Tensor | None  # [1, T, 64] cover hints (cover, planned codes), or None
    duration_s: float  # length of the output audio
    repaint: RepaintInputs | None = None


def _shared_by_takes(
    takes: int,
    encoder_hidden: torch.Tensor,
    context: torch.Tensor,
    repaint: RepaintInputs | None,
) -> tuple[torch.Tensor, torch.Tensor, RepaintInputs | None]:
    """One batch of `takes` rows: every take shares the condition, context and repaint."""
    if takes == 1:
        return encoder_hidden, context, repaint
    if repaint is not None:
        repaint = RepaintInputs(
            mask=repaint.mask.expand(takes, -1),
            clean_latents=repaint.clean_latents.expand(takes, -1, -1),
        )
    return encoder_hidden.expand(takes, -1, -1), context.expand(takes, -1, -1), repaint


def latent_frames(duration_s: float) -> int:
    """Latent length for a duration as upstream computes it (`AceStepHandler._prepare_batch`)."""
    samples = int(max(0.1, round(duration_s, 1)) * SAMPLE_RATE)
    return max(samples // LATENT_HOP, MIN_LATENT_FRAMES)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_multiplies_bf16() -> bool:
    """Whether this CPU has native bf16 matrix instructions (AVX512-BF16 or AMX tiles)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def default_dtype(device: torch.device) -> torch.dtype:
    """The dtype a pipeline runs in on `device` unless told otherwise (`--dtype`).

    CUDA: bf16, as upstream. The CPU: bf16 where it multiplies bf16 matrices natively
    (`cpu_multiplies_bf16`): there our bf16 DiT and VAE run about twice as fast as fp32 and
    in half the memory, within bf16's rounding. Without those instructions torch emulates
    bf16 products through fp32 conversions, slower than fp32 itself, so fp32 stays.
    This is also the dtype of the out-of-memory CPU fallback.
    """
    if device.type == "cuda" or (device.type == "cpu" and cpu_multiplies_bf16()):
        return torch.bfloat16
    return torch.float32


def load_module(
    module: nn.Module, weights: Path, device: torch.device, dtype: torch.dtype
) -> nn.Module:
    """Load a meta-constructed module from safetensors straight onto `device` in `dtype`.

    Tensors are converted one by one, so the peak is the model plus one tensor. Each is
    copied out of the memory-mapped file: tensors there sit at arbitrary byte offsets, and on
    such unaligned matrices the CPU matrix kernels run slower and round differently from the
    official model's (whose parameters are freshly allocated).
    """
    with safe_open(weights, framework="pt", device=str(device)) as tensors:
        state = {name: tensors.get_tensor(name).to(dtype, copy=True) for name in tensors.keys()}  # noqa: SIM118
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def repaint_window(
    start_s: float | None, end_s: float | None, source_samples: int
) -> tuple[int, int, int, int]:
    """(left pad, right pad, start frame, end frame) of a repaint, in padded coordinates.

    A start before 0 or an end after the source pads it with silence (outpainting);
    no end, or a negative one, means the end of the source (upstream repaint semantics).
    """
    start = round((start_s or 0.0) * SAMPLE_RATE)
    end = source_samples if end_s is None or end_s < 0 else round(end_s * SAMPLE_RATE)
    left, right = max(0, -start), max(0, end - source_samples)
    return left, right, (start + left) // LATENT_HOP, (end + left) // LATENT_HOP


def dcw_settings(params: GenerationParams, spec: ModelSpec) -> DcwSettings | None:
    """The request's wavelet correction: on by the model's default (turbo) or when asked for,
    with upstream's mode and strengths wherever the request names none."""
    enabled = params.dcw if params.dcw is not None else spec.dcw or params.dcw_settings_given
    if not enabled:
        return None
    defaults = DcwSettings()
    return DcwSettings(
        mode=params.dcw_mode or defaults.mode,
        scaler=params.dcw_scaler if params.dcw_scaler is not None else defaults.scaler,
        high_scaler=(
            params.dcw_high_scaler if params.dcw_high_scaler is not None else defaults.high_scaler
        ),
    )


def _checked(waveform: torch.Tensor) -> torch.Tensor:
    """A decoded waveform [2, S], refused when not finite or silent, scaled down to peak 1."""
    if not torch.isfinite(waveform).all():
        raise GenerationFailed("the model produced NaN or Inf samples")
    peak = waveform.abs().max().item()
    if peak < SILENT_PEAK:
        raise GenerationFailed("the model produced silence")
    return waveform / peak if peak > 1.0 else waveform


def read_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def _duration_notes(
    params: GenerationParams, planned: Planned | None, duration_s: float
) -> list[str]:
    """Where the output's length came from when it was not the request's `duration_s`:
    the planner chose it, or the source's length (repaint, cover) overrode it."""
    if planned is not None and "duration_s" in planned.inferred:
        return [f"duration {duration_s:g} s chosen by the planner; set duration_s to fix it"]
    if params.task != "text2music" and "duration_s" in params.model_fields_set:
        return [
            f"duration_s {params.duration_s:g} ignored: a {params.task} is as long as its "
            f"source ({duration_s:.1f} s)"
        ]
    return []


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Pipeline:
    """The resident ACE-Step v1.5 turbo pipeline: load once, generate many times."""

    def __init__(
        self,
        checkpoint: CheckpointPaths,
        text: TextEncoder,
        model: AceStepModel,
        vae: OobleckVAE,
        silence_latent: torch.Tensor,
        device: torch.device,
        dtype: torch.dtype,
        lm_size: str | None = None,
        lm_model_dir: Path | None = None,
        spec: ModelSpec = MODELS[DEFAULT_MODEL],
        quantization: str | None = None,
        offload: bool = False,
    ) -> None:
        self.checkpoint = checkpoint
        self.text = text
        self.model = model
        self.vae = vae
        self.silence_latent = silence_latent  # [1, 15000, 64]
        self.device = device
        self.dtype = dtype
        self.lm_size = lm_size  # 5 Hz LM size, loaded on first use; None: no planner
        self.lm_model_dir = lm_model_dir  # explicit model folder, else the HF cache
        self.lm: LMRunner | None = None
        self.lm_at = (device, dtype)  # where the LM runs (the CPU after running out of memory)
        self.spec = spec
        self.adapters = AdapterCache()
        self.default_lora: tuple[Path, float] | None = None
        """The adapter of `acestep serve --lora` and its scale, for requests naming none."""
        self.quantization = quantization
        """How the network's linear weights are kept in 8 bits (`quantization_kind`, from
        `--quantize`); None: in the pipeline's dtype."""
        self.offload = offload
        """`--offload`: the text encoder, the LM and the VAE wait on the CPU between their
        stages, off a GPU's memory (on the CPU there is nothing to offload)."""

    @classmethod
    def load(
        cls,
        checkpoint: CheckpointPaths,
        device: str | torch.device = "auto",
        dtype: torch.dtype | None = None,
        *,
        model: str = DEFAULT_MODEL,
        lm_size: str | None = None,
        lm_model_dir: Path | None = None,
        compile: bool = False,
        quantize: str | None = None,
        offload: bool = False,
    ) -> Pipeline:
        """Load the DiT, VAE and text encoder; the LM of `lm_size` loads on first use.

        The DiT's config.json decides its architecture; `model` (a `family.MODELS` name) its
        sampler and defaults. `compile`: see `compile_dit`. `quantize` ("int8" or "fp8"):
        the network's linear weights in 8 bits (`model.quantize`). `offload`: the text
        encoder, the LM and the VAE wait on the CPU and visit the GPU for their stage.
        """
        device = default_device() if str(device) == "auto" else torch.device(device)
        dtype = dtype or default_dtype(device)
        parts_at = CPU if offload else device
        with torch.device("meta"):
            dit = AceStepModel.from_config(read_config(checkpoint.dit_dir))
            vae = OobleckVAE.from_config(read_config(checkpoint.vae_dir))
        dit = load_module(dit, checkpoint.dit_dir / "model.safetensors", device, dtype)
        quantization = None
        if quantize is not None:
            quantization = quantization_kind(quantize, device)
            count = quantize_linears(dit, quantization)
            logger.info("%d linear layers quantized (%s)", count, quantization)
        vae = load_module(
            vae, checkpoint.vae_dir / "diffusion_pytorch_model.safetensors", parts_at, dtype
        )
        text = TextEncoder.load(checkpoint.text_dir, parts_at, dtype)
        silence = torch.load(
            checkpoint.dit_dir / "silence_latent.pt", map_location="cpu", weights_only=True
        )
        silence = silence.transpose(1, 2).to(device, dtype)  # [1, 64, F] -> [1, F, 64]
        logger.info(
            "pipeline %s loaded on %s (%s) from %s", model, device, dtype, checkpoint.dit_dir
        )
        spec = MODELS[model]
        pipeline = cls(
            checkpoint,
            text,
            dit,
            vae,
            silence,
            device,
            dtype,
            lm_size,
            lm_model_dir,
            spec,
            quantization,
            offload,
        )
        if compile:
            pipeline.compile_dit()
        return pipeline

    @torch.inference_mode()
    def compile_dit(self) -> None:
        """Compile the DiT's layers with `torch.compile` and warm them up at load.

        One DiT call at the shortest length, and one at the first length whose sliding
        layers need a mask, so that requests do not pay for the compilation (lengths over
        `dit.BAND_MIN_WINDOWS` windows compile their banded layers on first use).
        """
        start = time.perf_counter()
        decoder, config = self.model.decoder, self.model.config
        decoder.compile_layers()
        masked = config.patch_size * (config.sliding_window + 2)
        channels = config.audio_acoustic_hidden_dim
        hidden = torch.zeros(1, 16, config.encoder_width, device=self.device, dtype=self.dtype)
        t = torch.ones(1, device=self.device, dtype=self.dtype)
        for frames in sorted({MIN_LATENT_FRAMES, max(MIN_LATENT_FRAMES, masked)}):
            x = torch.randn(1, frames, channels, device=self.device, dtype=self.dtype)
            context = x.new_zeros(1, frames, config.in_channels - channels)
            decoder(x, t, t, hidden, context)
        logger.info("DiT compiled and warmed up in %.1f s", time.perf_counter() - start)

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> None:
        """Move every resident weight, e.g. to the CPU after running out of GPU memory.

        A quantized network keeps its dtype (its 8-bit weights dequantize to it), and so
        does the rest of the pipeline with it.
        """
        device = torch.device(device)
        dtype = self.dtype if self.quantization else dtype or default_dtype(device)
        self.model.to(device, dtype)
        self.vae.to(self._resting_place(device), dtype)
        self.text.to(self._resting_place(device), dtype)
        self.silence_latent = self.silence_latent.to(device, dtype)
        self.device, self.dtype = device, dtype
        self.move_lm(device, dtype)

    def move_lm(self, device: torch.device, dtype: torch.dtype) -> None:
        """Move the LM alone (the DiT stays), e.g. to the CPU after running out of memory."""
        if self.lm is not None:
            self.lm.to(self._resting_place(device), dtype)
        self.lm_at = (device, dtype)

    def offloads_on(self, device: torch.device) -> bool:
        """Whether the offloaded parts wait on the CPU while the pipeline runs on `device`."""
        return self.offload and device.type != "cpu"

    def _resting_place(self, device: torch.device) -> torch.device:
        """Where the text encoder, the LM and the VAE wait between their stages."""
        return CPU if self.offloads_on(device) else device

    @contextmanager
    def _visiting(self, module: nn.Module, device: torch.device) -> Iterator[None]:
        """`module` on `device` for the block; offloaded, it comes from the CPU and goes back,
        and the GPU's cache lets go of its memory."""
        if not self.offloads_on(device):
            yield
            return
        module.to(device)
        try:
            yield
        finally:
            module.to(CPU)
            if device.type == "cuda":
                torch.cuda.empty_cache()

    def planner(self) -> LMRunner:
        """The 5 Hz LM, loaded on first use where `lm_at` says."""
        if self.lm_size is None:
            raise InvalidRequest("thinking needs the 5 Hz LM, and this daemon runs with --lm none")
        if self.lm is None:
            folder = resolve_lm(self.lm_size, self.lm_model_dir)
            device, dtype = self.lm_at
            self.lm = LMRunner.load(folder, self._resting_place(device), dtype)
            logger.info("5 Hz LM loaded on %s (%s) from %s", device, dtype, folder)
        return self.lm

    def generate(
        self,
        params: GenerationParams,
        *,
        progress: ProgressFn | None = None,
        vae_chunk_frames: int = DECODE_CHUNK_FRAMES,
    ) -> Audio:
        """text2music (planned or not), repaint or cover for one request."""
        cond = self.prepare(params, progress, self.plan(params, progress))
        latents = self.diffuse(cond, progress)
        return self.decode(cond, latents, progress, vae_chunk_frames=vae_chunk_frames)

    # -- stage 0: the planner -------------------------------------------------------

    def plan(self, params: GenerationParams, progress: ProgressFn | None = None) -> Planned | None:
        """Run the 5 Hz LM when the request asks for thinking; None when it does not.

        Values the caller gave (`model_fields_set`) are kept; the LM plans the rest. The
        seed is fixed here, so the plan and the song come from one seed.
        """
        if params.thinking == "off":
            return None
        start = time.perf_counter()
        given = params.model_fields_set
        seed = params.seed if params.seed is not None else secrets.randbelow(2**32)
        if params.seeds is not None:
            seed = params.seeds[0]
        meter = params.time_signature
        request = PlanRequest(
            caption=params.caption,
            lyrics=params.lyrics,
            bpm=params.bpm,
            keyscale=params.key,
            timesignature=None if meter is None else time_signature_numerator(meter),
            language=params.language if "language" in given else None,
            duration_s=params.duration_s if "duration_s" in given else None,
            seed=seed,
        )
        phases = PhaseProgress()
        if progress is not None:
            phases = PhaseProgress(
                metas=lambda n, of: progress("lm-thought", n, of),
                codes=lambda n, of: progress("lm-codes", n, of),
            )
        runner = self.planner()
        with self._visiting(runner.model, self.lm_at[0]):
            plan = make_plan(runner, request, params.thinking, phases)
        planned = plan.metas.known() | {"duration": plan.duration_s}
        planned["timesignature"] = time_signature_field(planned["timesignature"])
        inferred = {REQUEST_FIELD_OF[name]: planned[name] for name in plan.inferred}
        return Planned(
            params=params.replace(**({} if params.seeds else {"seed": seed}), **inferred),
            inferred=inferred,
            codes=plan.codes,
            seconds=time.perf_counter() - start,
        )

    # -- stage 1: conditioning ------------------------------------------------------

    @torch.inference_mode()
    def prepare(
        self,
        params: GenerationParams,
        progress: ProgressFn | None = None,
        planned: Planned | None = None,
    ) -> Conditioning:
        """Prompts, text encoder, audio inputs, condition encoder and noise ("text" stage).

        With a plan, its parameters replace `params`, and its codes (full mode) become
        the context hints, as cover latents would (the instruction stays text2music's).
        """
        self._refuse_unfit(params)
        if progress:
            progress("text", 0, 1)
        start = time.perf_counter()
        if planned is not None:
            params = planned.params
        seeds = params.seeds or [
            params.seed if params.seed is not None else secrets.randbelow(2**32)
        ]
        task = self._task_inputs(params, planned)
        caption_text, lyrics_text = self._prompts(params, task.duration_s)
        notes = self._notes(params, caption_text, lyrics_text)
        notes += _duration_notes(params, planned, task.duration_s)
        encoder_hidden = self._condition(caption_text, lyrics_text, params, seeds[0])
        context = self.model.build_context(task.src_latents, task.chunk_mask, task.hints)
        frames, channels = task.src_latents.shape[1:]
        noise = self._noise(params, seeds, frames, channels)
        encoder_hidden, context, repaint = _shared_by_takes(
            len(seeds), encoder_hidden, context, task.repaint
        )
        _synchronize(self.device)
        timings = {"text": time.perf_counter() - start}
        if planned is not None:
            timings = {"plan": planned.seconds, **timings}
        if progress:
            progress("text", 1, 1)
        return Conditioning(
            params=params,
            seeds=seeds,
            duration_s=task.duration_s,
            encoder_hidden=encoder_hidden,
            context=context,
            noise=noise,
            repaint=repaint,
            timings=timings,
            planned=planned,
            notes=notes,
        )

    def _refuse_unfit(self, params: GenerationParams) -> None:
        """InvalidRequest for what this model cannot do (also checked before queueing; this
        guards Python callers) and for a LoRA scale without an adapter."""
        problem = params.model_problem(self.spec)
        if problem is not None:
            raise InvalidRequest(problem)
        if params.lora_scale is not None and params.lora is None and self.default_lora is None:
            raise InvalidRequest("lora_scale: no LoRA adapter named, and none loaded at start")

    def _task_inputs(self, params: GenerationParams, planned: Planned | None) -> TaskInputs:
        """The DiT's context inputs for the request's task."""
        if params.task == "text2music":
            return self._text2music_inputs(params.duration_s, planned)
        return self._source_inputs(params)

    def _text2music_inputs(self, duration_s: float, planned: Planned | None) -> TaskInputs:
        """Silence to generate over; the plan's audio codes (full mode) as hints."""
        frames = latent_frames(duration_s)
        hints = None
        if planned is not None and planned.codes is not None:
            codes = torch.tensor(planned.codes, device=self.device)  # [T5]
            hints = codes_to_hints(self.model, codes, self.silence_latent, frames)
        return TaskInputs(
            src_latents=self.silence_latent[:, :frames],
            chunk_mask=torch.ones(1, frames, device=self.device, dtype=self.dtype),
            hints=hints,
            duration_s=min(duration_s, frames * LATENT_HOP / SAMPLE_RATE),
        )

    def _source_inputs(self, params: GenerationParams) -> TaskInputs:
        """The source audio's latents: repaint silences the range to regenerate (padding
        the source for outpainting); cover keeps it and adds its own tokenized latents as
        hints. The output is as long as the (padded) source."""
        source = self._read_source(Path(params.src_audio), "src_audio")  # [2, S]
        if params.task == "repaint":
            left, right, start_f, end_f = repaint_window(
                params.repaint_start_s, params.repaint_end_s, source.shape[1]
            )
            source = torch.nn.functional.pad(source, (left, right))
        duration_s = source.shape[1] / SAMPLE_RATE
        if duration_s > MAX_DURATION_S:
            raise InvalidRequest(
                f"source audio is {duration_s:.1f} s long; at most {MAX_DURATION_S:.0f} s"
            )
        clean = self._encode_audio(source.to(self.device))  # [1, T, C]
        if params.task == "repaint":
            src_latents, chunk_mask, repaint = self._repaint_inputs(clean, start_f, end_f)
            return TaskInputs(src_latents, chunk_mask, None, duration_s, repaint)
        frames = clean.shape[1]
        quantized, _ = self.model.tokenize(clean, self.silence_latent)
        return TaskInputs(
            src_latents=clean,
            chunk_mask=torch.ones(1, frames, device=self.device, dtype=self.dtype),
            hints=self.model.detokenize(quantized)[:, :frames],
            duration_s=duration_s,
        )

    @staticmethod
    def _prompts(params: GenerationParams, duration_s: float) -> tuple[str, str]:
        """The caption prompt (instruction, caption, metas block) and the lyrics prompt."""
        metas = metas_for_request(
            params.metas,
            bpm=params.bpm,
            time_signature=params.time_signature,
            key=params.key,
            duration_s=duration_s,
        )
        caption_text = caption_prompt(params.caption, metas, INSTRUCTIONS[params.task])
        return caption_text, lyrics_prompt(params.lyrics, params.language)

    def _condition(
        self, caption_text: str, lyrics_text: str, params: GenerationParams, seed: int
    ) -> torch.Tensor:
        """Text encoder, lyric embedding and timbre reference -> condition encoder: the DiT's
        cross-attention sequence [1, S, D]."""
        with self._visiting(self.text.model, self.device):
            text_hidden, text_mask = self.text.encode_caption([caption_text])
            lyric_hidden, lyric_mask = self.text.embed_lyrics([lyrics_text])
        reference = self._reference_latents(params.reference_audio, seed)
        encoder_hidden, _ = self.model.encode_condition(
            text_hidden.to(self.dtype),
            text_mask,
            lyric_hidden.to(self.dtype),
            lyric_mask,
            reference,
            torch.zeros(1, dtype=torch.long, device=self.device),
        )
        return encoder_hidden

    def _noise(
        self, params: GenerationParams, seeds: list[int], frames: int, channels: int
    ) -> torch.Tensor:
        """Initial noise [B, T, C], one row per seed, blended with the retake seed's noise
        when the request asks for a retake."""
        noise = draw_noise(seeds, frames, channels, self.device, self.dtype)  # [B, T, C]
        if params.retake_seed is not None and params.retake_variance is not None:
            retake = [params.retake_seed] * len(seeds)
            retake_noise = draw_noise(retake, frames, channels, self.device, self.dtype)
            noise = mix_retake(noise, retake_noise, params.retake_variance)
        return noise

    def _notes(self, params: GenerationParams, caption_text: str, lyrics_text: str) -> list[str]:
        """What of the request the model will not see as asked: a snapped shift, cut prompts."""
        notes = []
        snapped = params.shift is not None and not self.spec.guided and params.steps is None
        shift = snap_shift(params.shift) if snapped else params.shift
        if shift != params.shift:
            notes.append(
                f"shift {params.shift:g} was snapped to {shift:g} "
                "(the turbo schedule has shifts 1, 2 and 3)"
            )
        for name, text, limit in (
            ("caption", caption_text, CAPTION_MAX_TOKENS),
            ("lyrics", lyrics_text, LYRICS_MAX_TOKENS),
        ):
            tokens = self.text.count_tokens(text)
            if tokens > limit:
                notes.append(
                    f"{name} truncated to {limit} tokens: the {name} prompt has {tokens}, "
                    "the rest was not used"
                )
        return notes

    @staticmethod
    def _read_source(path: Path, field: str) -> torch.Tensor:
        """An input audio file as [2, S]; clips shorter than one latent frame are refused."""
        audio = read_audio(path, SAMPLE_RATE)  # [2, S]
        if audio.shape[1] < LATENT_HOP:
            raise InvalidRequest(f"{field} {path} is shorter than {LATENT_HOP} samples")
        return audio

    def _vae_mean(self, audio: torch.Tensor) -> torch.Tensor:
        """Waveform [2, S] → VAE posterior mean as latents [1, S // 1920, 64]."""
        with self._visiting(self.vae, self.device):
            latents = self.vae.tiled_encode(audio[None].to(self.device, self.dtype))
        return latents.transpose(1, 2)

    def _encode_audio(self, audio: torch.Tensor) -> torch.Tensor:
        """Waveform [2, S] → latents [1, T, 64] (T ≥ 128, silence-padded), VAE mean."""
        latents = self._vae_mean(audio)  # [1, T, 64]
        frames = latents.shape[1]
        if frames < MIN_LATENT_FRAMES:
            pad = self.silence_latent[:, frames:MIN_LATENT_FRAMES]
            latents = torch.cat([latents, pad], dim=1)
        return latents

    def _repaint_inputs(
        self, clean: torch.Tensor, start_f: int, end_f: int
    ) -> tuple[torch.Tensor, torch.Tensor, RepaintInputs]:
        """Source latents with a silenced hole, the chunk mask and the injection inputs."""
        frames = clean.shape[1]
        start_f = min(max(start_f, 0), frames - 1)
        end_f = min(max(end_f, start_f + 1), frames)
        inside = torch.zeros(1, frames, dtype=torch.bool, device=self.device)
        inside[:, start_f:end_f] = True
        src_latents = torch.where(inside[..., None], self.silence_latent[:, :frames], clean)
        return src_latents, inside.to(self.dtype), RepaintInputs(mask=inside, clean_latents=clean)

    def _reference_latents(self, path: str | None, seed: int) -> torch.Tensor:
        """Timbre reference [1, 750, 64]: silence without a reference (`infer_refer_latent`).

        Upstream picks one random 10 s segment from each third of the (tiled) clip;
        we pick them with a generator seeded by the request seed, so a seed
        reproduces the whole request.
        """
        if path is None:
            return self.silence_latent[:, :REFERENCE_FRAMES]
        audio = self._read_source(Path(path), "reference_audio")  # [2, S]
        if audio.abs().max() < SILENT_PEAK:
            return self.silence_latent[:, :REFERENCE_FRAMES]
        segment = int(REFERENCE_SEGMENT_S * SAMPLE_RATE)
        target = 3 * segment
        if audio.shape[1] < target:
            audio = audio.repeat(1, math.ceil(target / audio.shape[1]))
        third = audio.shape[1] // 3
        rng = random.Random(seed)
        pieces = []
        for i in range(3):
            offset = i * third + rng.randint(0, max(third - segment, 0))
            pieces.append(audio[:, offset : offset + segment])
        clip = torch.cat(pieces, dim=1)  # [2, 1_440_000]
        return self._vae_mean(clip)[:, :REFERENCE_FRAMES]  # [1, 750, 64]

    # -- stage 2: diffusion -----------------------------------------------------------

    @torch.inference_mode()
    def diffuse(self, cond: Conditioning, progress: ProgressFn | None = None) -> torch.Tensor:
        """Run the model's sampler; returns latents [B, T, 64] ("diffusion" stage)."""
        start = time.perf_counter()
        params, spec = cond.params, self.spec

        steps = 0

        def on_step(step: int, total: int) -> None:
            nonlocal steps
            steps = total
            if progress:
                progress("diffusion", step, total)

        chosen = [(Path(a.path), a.scale) for a in params.adapters]
        if not chosen and self.default_lora is not None:
            path, scale = self.default_lora
            chosen = [(path, scale if params.lora_scale is None else params.lora_scale)]
        adapters = [(self.adapters.get(path, self.model), scale) for path, scale in chosen]
        cond.adapters = [
            {"path": str(path), "scale": scale, "kind": adapter_kind(adapter)}
            for (path, scale), (adapter, _) in zip(chosen, adapters, strict=True)
        ]
        shift = params.shift if params.shift is not None else spec.shift
        cond.dcw = dcw_settings(params, spec)
        inputs = (self.model, cond.noise, cond.encoder_hidden, cond.context)
        sampler = SamplerSettings(
            params.sampler,
            params.velocity_norm_threshold,
            params.velocity_ema_factor,
            seed=cond.seeds[0],
        )
        with adapters_applied(self.model, adapters):
            if not spec.guided:
                latents = sample_turbo(
                    *inputs,
                    shift,
                    steps=params.steps,
                    sampler=sampler,
                    dcw=cond.dcw,
                    repaint=cond.repaint,
                    on_step=on_step,
                )
            else:
                latents = sample_guided(
                    *inputs,
                    steps=params.steps or spec.steps,
                    shift=shift,
                    guidance_scale=params.guidance_scale or spec.guidance_scale or 1.0,
                    method=params.guidance or "apg",
                    interval=tuple(params.guidance_interval or (0.0, 1.0)),
                    timesteps=params.timesteps,
                    sampler=sampler,
                    dcw=cond.dcw,
                    repaint=cond.repaint,
                    on_step=on_step,
                )
        _synchronize(self.device)
        if progress:
            progress("diffusion", steps, steps)
        cond.timings["diffusion"] = time.perf_counter() - start
        return latents

    # -- stage 3: decode --------------------------------------------------------------

    @torch.inference_mode()
    def decode(
        self,
        cond: Conditioning,
        latents: torch.Tensor,
        progress: ProgressFn | None = None,
        *,
        vae_chunk_frames: int = DECODE_CHUNK_FRAMES,
    ) -> Audio:
        """Tiled VAE decode of each take, checks, anti-clipping and crop ("vae" stage)."""
        start = time.perf_counter()
        latents = latents.transpose(1, 2).to(self.device, self.dtype)  # [B, 64, T]
        count = latents.shape[0]
        chunks = 0

        takes = []
        with self._visiting(self.vae, self.device):
            for index, seed in enumerate(cond.seeds):

                def on_chunk(chunk: int, total: int, index: int = index) -> None:
                    nonlocal chunks
                    chunks = count * total
                    if progress:
                        progress("vae", index * total + chunk, count * total)

                waveform = self.vae.tiled_decode(
                    latents[index : index + 1],
                    chunk_frames=vae_chunk_frames,
                    on_chunk=on_chunk,
                )
                takes.append(Take(seed, _checked(waveform[0].float().cpu())))  # [2, T·1920]
        samples = min(takes[0].samples.shape[1], round(cond.duration_s * SAMPLE_RATE))
        for take in takes:
            take.samples = take.samples[:, :samples].contiguous()
        if progress:
            progress("vae", chunks, chunks)
        cond.timings["vae"] = time.perf_counter() - start
        return Audio(
            takes=takes,
            sample_rate=SAMPLE_RATE,
            duration_s=samples / SAMPLE_RATE,
            timings=dict(cond.timings),
            thinking=None if cond.planned is None else cond.planned.report(),
            sampler=cond.params.sampler,
            notes=list(cond.notes),
            adapters=list(cond.adapters),
            dcw=None if cond.dcw is None else dataclasses.asdict(cond.dcw),
        )
