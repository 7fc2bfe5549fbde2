"""The `acestep` command line: the daemon, its client, its service units and one-shot runs.

acestep serve            run the daemon (resident model, Unix socket)
acestep request          send one request line to a daemon and print the answer
acestep install-service  write the systemd user units
acestep generate         generate one file in this process (the ace-step-rs `ace-step` CLI)
acestep make-tiny-checkpoint  write a tiny random checkpoint in the real layout
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from types import NoneType
from typing import TYPE_CHECKING, Any, Literal, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined
from tqdm import tqdm

from acestep_daemon import client, paths, units
from acestep_daemon.checkpoint import DEFAULT_LM, LM_SIZES, TINY_LM
from acestep_daemon.family import DEFAULT_MODEL, MODELS
from acestep_daemon.options import CLAIM_IDLE_S, QUANTIZE_SCHEMES, QUEUE_PREFIX, ServerOptions
from acestep_daemon.params import Flag
from acestep_daemon.protocol import GenerateRequest

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("acestep_daemon")

DTYPES = ("auto", "float32", "bfloat16", "float16")


def _torch_dtype(name: str) -> torch.dtype | None:
    """The --dtype flag as a torch dtype; None (auto) means the pipeline's default."""
    import torch

    return None if name == "auto" else getattr(torch, name)


def _socket_mode(text: str) -> int:
    mode = int(text, 8)
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"not a permission mode: {text}")
    return mode


def _device_list(text: str) -> list[str]:
    """`cuda:0,cuda:1` → ["cuda:0", "cuda:1"] (a device may repeat: `cpu,cpu`)."""
    devices = [name.strip() for name in text.split(",")]
    if not all(devices):
        raise argparse.ArgumentTypeError(f"not a comma-separated list of devices: {text}")
    return devices


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text}")
    return value


def _add_serve(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="run the daemon",
        description="Keep one ACE-Step v1.5 pipeline resident and answer one JSON line per "
        "Unix-socket connection.",
    )
    defaults = ServerOptions(socket_path=paths.default_socket_path())
    p.add_argument(
        "--socket", type=Path, default=defaults.socket_path, help="socket path (%(default)s)"
    )
    p.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="checkpoint folder (default: $ACESTEP_MODEL_DIR, else the Hugging Face cache, "
        "downloading what is missing)",
    )
    _add_model(p)
    p.add_argument(
        "--lora",
        type=_lora_option,
        default=None,
        metavar="PATH[:SCALE]",
        help="a LoRA adapter (PEFT folder or .safetensors) for requests that name none",
    )
    devices = p.add_mutually_exclusive_group()
    devices.add_argument(
        "--device",
        default="auto",
        help="auto (the GPU when there is one), cpu, cuda or cuda:N (%(default)s)",
    )
    devices.add_argument(
        "--devices",
        type=_device_list,
        default=None,
        metavar="DEV,DEV,...",
        help="one resident pipeline and worker per device (e.g. cuda:0,cuda:1), "
        "all fed from one queue (off: one worker on --device)",
    )
    _add_dtype(p)
    _add_compile(p, defaults.compile)
    _add_memory(p)
    _add_lm(p)
    p.add_argument(
        "--queue-limit",
        type=_count,
        default=defaults.queue_limit,
        help="waiting requests before 'busy' (%(default)s)",
    )
    p.add_argument(
        "--idle-unload",
        type=client.positive_seconds,
        default=defaults.idle_unload_s,
        metavar="SECONDS",
        help="unload the model after this long without a request; the next one reloads it "
        "(default: never)",
    )
    p.add_argument(
        "--socket-mode",
        type=_socket_mode,
        default=defaults.socket_mode,
        metavar="OCTAL",
        help=f"permissions of the socket file ({defaults.socket_mode:o})",
    )
    p.add_argument(
        "--allow-uid",
        type=int,
        action="append",
        default=[],
        metavar="UID",
        help="also let this user connect (repeatable; default: only the daemon's user and root)",
    )
    p.add_argument(
        "--allow-gid",
        type=int,
        action="append",
        default=[],
        metavar="GID",
        help="also let members of this group connect (repeatable; default: none)",
    )
    seconds = client.positive_seconds
    p.add_argument(
        "--read-timeout",
        type=seconds,
        default=defaults.read_timeout_s,
        metavar="SECONDS",
        help="drop a connection that sends no complete line within this long (%(default)g)",
    )
    p.add_argument(
        "--shutdown-grace",
        type=seconds,
        default=defaults.shutdown_grace_s,
        metavar="SECONDS",
        help="on SIGTERM, let the running request finish for this long (%(default)g)",
    )
    _add_queue(p)
    p.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="least severe log lines written to stderr (%(default)s)",
    )
    p.add_argument(
        "-v",
        "--verbose",
        "--debug",
        action="store_true",
        help="debug logging, with tracebacks for start-up errors",
    )
    p.set_defaults(func=cmd_serve)


def _add_queue(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group(
        "job queue", "several daemons on several machines share one Redis queue (README)"
    )
    group.add_argument(
        "--queue",
        metavar="URL",
        default=None,
        help="also take jobs from this Redis server (redis://HOST:PORT, rediss://, "
        "unix:///PATH) whenever a worker is idle (default: none)",
    )
    group.add_argument(
        "--front",
        action="store_true",
        help="load no model: put the socket's requests on --queue and write the answers' "
        "files here",
    )
    group.add_argument(
        "--queue-name",
        default=QUEUE_PREFIX,
        metavar="PREFIX",
        help="prefix of the queue's keys: daemons with the same one share jobs (%(default)s)",
    )
    group.add_argument(
        "--claim-idle",
        type=client.positive_seconds,
        default=CLAIM_IDLE_S,
        metavar="SECONDS",
        help="a job whose worker has been silent this long goes to another worker (%(default)g)",
    )


def _add_compile(p: argparse.ArgumentParser, default: bool) -> None:
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=default,
        help="compile the DiT with torch.compile, warmed up at load "
        f"({'on' if default else 'off'})",
    )


def _add_memory(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quantize",
        choices=QUANTIZE_SCHEMES,
        default=None,
        help="the network's linear weights in 8 bits with torchao: int8 (weight-only on "
        "CUDA, int8 products on the CPU) or fp8 (weight-only); half of bf16's memory "
        "(default: off)",
    )
    p.add_argument(
        "--offload",
        action="store_true",
        help="the text encoder, the 5 Hz LM and the VAE wait on the CPU and visit the GPU "
        "only for their stage, for small GPUs (default: off)",
    )


def _check_memory_flags(args: argparse.Namespace, devices: list[str]) -> None:
    """Refuse --offload where nothing runs on a GPU, and --quantize without torchao."""
    import importlib.util

    import torch

    def on_cpu(name: str) -> bool:
        return not torch.cuda.is_available() if name == "auto" else torch.device(name).type == "cpu"

    if args.offload and all(on_cpu(name) for name in devices):
        raise StartupProblem(
            "--offload keeps the text encoder, LM and VAE off the GPU between their stages; "
            "this runs on the CPU, where there is nothing to offload"
        )
    if args.quantize and importlib.util.find_spec("torchao") is None:
        raise StartupProblem(
            "--quantize needs torchao: pip install torchao (a release built for your torch)"
        )


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        default="auto",
        help="auto (the GPU when there is one), cpu, cuda or cuda:N (%(default)s)",
    )
    _add_dtype(p)


def _add_dtype(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="auto: bfloat16 on CUDA and on CPUs with native bf16, else float32 (%(default)s)",
    )


def _add_lm(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--lm",
        choices=(*LM_SIZES, "none"),
        default=None,
        help=f"5 Hz LM planner for `thinking` requests, loaded on first use ({DEFAULT_LM}; "
        f"{TINY_LM} with a tiny model, whose checkpoint brings a tiny LM of that layout)",
    )


def _lm_size(args: argparse.Namespace) -> str | None:
    """--lm as a size; None for `none`. Unset: the tiny checkpoint's LM, or DEFAULT_LM."""
    if args.lm is None:
        return TINY_LM if args.model.startswith(TINY_PREFIX) else DEFAULT_LM
    return None if args.lm == "none" else args.lm


class StartupProblem(Exception):
    """Something the user can fix stops the daemon from starting (one short message)."""


class _QuietFormatter(logging.Formatter):
    """Log lines without the tracebacks of expected errors (AceStepError): the message says it."""

    def format(self, record: logging.LogRecord) -> str:
        from acestep_daemon.errors import AceStepError

        if record.exc_info and isinstance(record.exc_info[1], AceStepError):
            record = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None})
        return super().format(record)


def _check_device(name: str) -> None:
    """Refuse a device this machine does not have, before anything loads."""
    import torch

    if name == "auto":
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise StartupProblem(
            f"--device {name}: not a device (use auto, cpu, cuda or cuda:N)"
        ) from None
    if device.type == "cpu":
        return
    if device.type != "cuda":
        raise StartupProblem(f"--device {name}: only auto, cpu, cuda and cuda:N are supported")
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise StartupProblem(
            f"--device {name}: no CUDA device is available (torch {torch.__version__}, {build}); "
            "use --device cpu (or auto)"
        )
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise StartupProblem(
            f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )


def cmd_serve(args: argparse.Namespace) -> int:
    """Check what the user can get wrong, then serve; start-up problems are one short message."""
    handler = logging.StreamHandler(sys.stderr)
    formatter_class = logging.Formatter if args.verbose else _QuietFormatter
    handler.setFormatter(formatter_class("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(
        level="DEBUG" if args.verbose else args.log_level.upper(), handlers=[handler]
    )
    try:
        return _serve(args)
    except StartupProblem as problem:
        if args.verbose:
            logger.exception("cannot start")
        print(f"acestep serve: {problem}", file=sys.stderr)
        return 2


def _serve(args: argparse.Namespace) -> int:
    from acestep_daemon.errors import CheckpointError

    options = ServerOptions(
        socket_path=args.socket,
        socket_mode=args.socket_mode,
        allow_uids=frozenset(args.allow_uid),
        allow_gids=frozenset(args.allow_gid),
        read_timeout_s=args.read_timeout,
        shutdown_grace_s=args.shutdown_grace,
        queue_limit=args.queue_limit,
        idle_unload_s=args.idle_unload,
        model=args.model.removeprefix(TINY_PREFIX),
        compile=args.compile,
    )
    activated = os.environ.get("LISTEN_PID") == str(os.getpid())
    if not activated and paths.daemon_answers(options.socket_path):
        raise StartupProblem(f"a daemon is already listening on {options.socket_path}")
    if args.front and not args.queue:
        raise StartupProblem("--front needs --queue URL: the queue it puts the requests on")
    if args.front:
        return _serve_front(args, options)
    devices = args.devices or [args.device]
    for device in devices:
        _check_device(device)
    _check_memory_flags(args, devices)

    from acestep_daemon import faults, server
    from acestep_daemon.checkpoint import resolve_checkpoint
    from acestep_daemon.manager import GenerationManager
    from acestep_daemon.pipeline import Pipeline

    model_dir = args.model_dir
    model = args.model.removeprefix(TINY_PREFIX)
    if args.model.startswith(TINY_PREFIX):
        model_dir = _tiny_checkpoint(model)
        logger.warning(
            "*** --model %s: serving a TINY checkpoint with RANDOM weights from %s. "
            "It answers the protocol but every file it writes is noise, not music. ***",
            args.model,
            model_dir,
        )
    dtype = _torch_dtype(args.dtype)

    try:
        try:
            checkpoint = resolve_checkpoint(model_dir, model=model)
        except CheckpointError as error:
            raise StartupProblem(
                f"{error}\nTo try the daemon without the weights, start it with --model tiny "
                "(random weights: it answers every request, with noise)."
            ) from error
        injected = faults.plan_from_env()

        def factory(device: str) -> Pipeline:
            pipeline = Pipeline.load(
                checkpoint,
                device=device,
                dtype=dtype,
                model=model,
                lm_size=_lm_size(args),
                lm_model_dir=model_dir,
                compile=options.compile,
                quantize=args.quantize,
                offload=args.offload,
            )
            if args.lora is not None:
                pipeline.adapters.get(args.lora[0], pipeline.model)  # fits, or a clear error
                pipeline.default_lora = args.lora
            return faults.FaultyPipeline(pipeline, injected) if injected else pipeline

        manager = GenerationManager(
            [functools.partial(factory, device) for device in devices],
            queue_limit=options.queue_limit,
            idle_unload_s=options.idle_unload_s,
        )
        puller = None
        if args.queue:
            from acestep_daemon.queue_worker import QueuePuller

            queue, keys = _queue(args)
            puller = QueuePuller(manager, queue, keys, model=model, claim_idle_s=args.claim_idle)
        return server.serve(manager, options, puller)
    except ValueError as error:
        raise StartupProblem(str(error)) from error


def _queue(args: argparse.Namespace) -> tuple[Any, Any]:
    """The queue client and keys of --queue, --queue-name and --model; one short message
    when the server cannot be reached."""
    from acestep_daemon import jobqueue

    keys = jobqueue.Keys(args.queue_name, args.model)
    try:
        return jobqueue.connect(args.queue, keys), keys
    except jobqueue.QueueUnavailable as error:
        raise StartupProblem(str(error)) from error


def _serve_front(args: argparse.Namespace, options: ServerOptions) -> int:
    """`serve --front`: the socket in front of the queue, no model loaded."""
    from acestep_daemon import server
    from acestep_daemon.front import QueueFront, front_name

    queue, keys = _queue(args)
    front = QueueFront(
        queue,
        keys,
        name=front_name(options.socket_path),
        url=args.queue,
        queue_limit=options.queue_limit,
    )
    logger.info("front of %s: requests go to %s", front.url, keys.jobs)
    return server.serve(front, options)


TINY_PREFIX = "tiny-"
MODEL_CHOICES = (*MODELS, *(TINY_PREFIX + name for name in MODELS))


def _tiny_checkpoint(model: str) -> Path:
    """The model folder of `tiny-<model>`: its tiny checkpoint with the tiny 5 Hz LM beside
    the DiT, as in a real model folder; made once, then reused from the user's cache."""
    from acestep_daemon.tiny import cached_tiny_checkpoint

    return cached_tiny_checkpoint(model)


def _model_name(text: str) -> str:
    """`tiny` is kept as the short name of `tiny-turbo`."""
    return f"{TINY_PREFIX}{DEFAULT_MODEL}" if text == "tiny" else text


def _lora_option(text: str) -> tuple[Path, float]:
    """`PATH` or `PATH:SCALE` (scale 0-1, default 1); the path must exist."""
    path, scale = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep:
        try:
            path, scale = head, float(tail)
        except ValueError:
            path = text
    if not 0.0 <= scale <= 1.0:
        raise argparse.ArgumentTypeError(f"LoRA scale {scale} is not in [0, 1]")
    if not Path(path).exists():
        raise argparse.ArgumentTypeError(f"LoRA adapter {path} does not exist")
    return Path(path).absolute(), scale


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        type=_model_name,
        choices=(*MODEL_CHOICES, "tiny"),
        default=DEFAULT_MODEL,
        help=f"the DiT ({DEFAULT_MODEL}); 'tiny-<name>' (or 'tiny', for tiny-{DEFAULT_MODEL}) "
        "serves a tiny checkpoint of that model with RANDOM weights and a tiny 5 Hz LM, made "
        "once into ~/.cache/acestep-daemon (offline protocol tests; it writes noise)",
    )


def _absolute_path(text: str) -> str:
    """Paths go on the wire absolute: the daemon's working directory is not the caller's."""
    return str(Path(text).absolute())


CLI_DEFAULTS = {
    "task": ": repaint with a --repaint-start/end range, cover with --src-audio alone, "
    "else text2music",
    "duration_s": " (30; with --thinking metas or full and no --duration, the planner "
    "chooses the length, up to 600)",
}
"""Help text of the flags whose CLI default is not the request field's own."""


def _cli_default(name: str, default: object) -> str:
    """` (DEFAULT)` for a flag's help; empty where the field has none."""
    if name in CLI_DEFAULTS:
        return CLI_DEFAULTS[name]
    if default in (None, "", PydanticUndefined):
        return ""
    return f" ({default:g})" if isinstance(default, float) else f" ({default})"


def _add_fields(p: argparse.ArgumentParser, model: type[BaseModel], *, skip: set[str]) -> None:
    """One flag per request field that declares a `Flag`; dest = the wire name."""
    for name, info in model.model_fields.items():
        flag = next((m for m in info.metadata if isinstance(m, Flag)), None)
        if flag is None or name in skip:
            continue
        help_text = f"{info.description}{_cli_default(name, info.default)}"
        if get_origin(info.annotation) is Literal:
            p.add_argument(
                *flag.names, dest=name, choices=get_args(info.annotation), help=help_text
            )
            continue
        if flag.parse is not None:
            p.add_argument(
                *flag.names,
                dest=name,
                type=flag.parse,
                action="append",
                metavar=flag.metavar,
                help=help_text,
            )
            continue
        kind = next(a for a in get_args(info.annotation) or [info.annotation] if a is not NoneType)
        if kind is bool:
            p.add_argument(
                *flag.names,
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
        elif get_origin(kind) is Literal:
            p.add_argument(*flag.names, dest=name, choices=get_args(kind), help=help_text)
        elif get_origin(kind) is list:
            (item,) = get_args(kind)
            p.add_argument(
                *flag.names,
                dest=name,
                type=item,
                nargs="+",
                metavar=item.__name__.upper(),
                help=help_text,
            )
        else:
            convert = _absolute_path if flag.path else kind
            p.add_argument(
                *flag.names, dest=name, type=convert, metavar=flag.metavar, help=help_text
            )


def request_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The request object from the flags that were given; the task follows the inputs."""
    request = {
        name: value
        for name in GenerateRequest.model_fields
        if (value := getattr(args, name, None)) is not None
    }
    match request.get("lora"):
        case [str(path)]:
            request["lora"] = path  # one --lora PATH: the single form, --lora-scale applies
        case [*entries]:
            request["lora"] = [e if isinstance(e, dict) else {"path": e} for e in entries]
    if "task" not in request and "src_audio" in request:
        has_range = "repaint_start_s" in request or "repaint_end_s" in request
        request["task"] = "repaint" if has_range else "cover"
    return request


def _add_request(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "request",
        help="send one request to a running daemon",
        description="Send one request; the answer line goes to stdout, progress lines and errors "
        "to stderr. Exit status: 0 ok, 1 daemon error, 2 usage or bad JSON, 3 no daemon or "
        "connection dropped, 124 timeout, 130 Ctrl-C (the job is cancelled).",
    )
    p.add_argument("text", nargs="?", metavar="CAPTION", help="the caption, as -c/--caption")
    p.add_argument(
        "--command",
        choices=client.COMMANDS,
        help='send {"command": NAME} instead of a generation request',
    )
    p.add_argument("--jobs", action="store_true", help="list the queued and running jobs")
    p.add_argument("--cancel", metavar="ID", help="cancel the job with this id")
    p.add_argument("--json", dest="raw", help="send this JSON object as it is")
    p.add_argument(
        "--socket", type=Path, default=None, help=f"default: {client.default_socket_path()}"
    )
    p.add_argument(
        "--timeout",
        type=client.positive_seconds,
        metavar="SECONDS",
        help="give up (and cancel the job) after this long; default: wait",
    )
    _add_fields(p, GenerateRequest, skip=set())
    p.set_defaults(func=cmd_request)


def build_request(args: argparse.Namespace) -> dict[str, Any]:
    """The request object from the flags (only the flags that were given)."""
    if args.raw:
        return client.parse_request(args.raw)
    if args.command:
        return {"command": args.command}
    if args.jobs or args.cancel is not None:
        return client.control_request(jobs=args.jobs, cancel=args.cancel)
    if args.text is not None and args.caption is not None:
        raise client.ClientError("give the caption once (positional or -c)", client.EXIT_USAGE)
    args.caption = args.caption if args.caption is not None else args.text
    if not args.caption:
        raise client.ClientError("give a caption, --command or --json", client.EXIT_USAGE)
    return request_fields(args)


def cmd_request(args: argparse.Namespace) -> int:
    """Send the line and print the answer as `client.py` does (same messages, exit codes)."""
    prog = "acestep request"
    try:
        request = build_request(args)
    except client.ClientError as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return error.status
    path = args.socket or paths.default_socket_path()
    return client.run(request, path, timeout=args.timeout, progress=args.progress, prog=prog)


SKILL_SOURCE = Path(__file__).resolve().parent.parent / "skills" / "generate_music"
"""The spacebot skill in a checkout (it is not part of an installed wheel)."""
SKILL_CLIENT = Path("scripts") / "acestep-request"
"""Where the skill expects its client (`{baseDir}/scripts/acestep-request`)."""
SPACEBOT_SKILL_DIR = "~/.spacebot/agents/main/workspace/skills/generate_music"
"""The skill's folder in the workspace of spacebot's default agent `main`: the workspace is
the only part of $HOME that spacebot's sandbox shows a worker."""


def _add_install_service(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "install-service",
        help="write the systemd user units, or install the spacebot skill",
        description="Write the systemd user units that start this installation (the absolute "
        "path of this interpreter, and this checkout when the interpreter does not import it "
        "by itself). With --skill-dir, install only the spacebot skill (SKILL.md and its "
        "standard-library client) into that folder instead.",
    )
    p.add_argument(
        "--unit-dir",
        type=Path,
        default=Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
        / "systemd"
        / "user",
        help="where the units go (%(default)s)",
    )
    p.add_argument(
        "--socket",
        default=units.DEFAULT_LISTEN,
        help=f"ListenStream= of the socket unit ({units.DEFAULT_LISTEN.replace('%', '%%')}: "
        "the user's runtime "
        f"folder; old clients: {paths.LEGACY_SOCKET})",
    )
    p.add_argument(
        "--skill-dir",
        type=Path,
        default=None,
        help=f"install only the {SKILL_SOURCE.name} skill, into this folder inside the agent's "
        f"workspace, e.g. {SPACEBOT_SKILL_DIR} (spacebot's sandbox shows a worker only its "
        "workspace and the system folders)",
    )
    p.add_argument("--dry-run", action="store_true", help="print what would be written; write none")
    p.add_argument("--enable", action="store_true", help="systemctl --user enable --now the socket")
    p.add_argument("serve_args", nargs=argparse.REMAINDER, help="-- extra `acestep serve` flags")
    p.set_defaults(func=cmd_install_service)


def service_environment(python: str) -> dict[str, str]:
    """`PYTHONPATH` = this checkout when `python`, started as systemd starts it (empty
    environment, working directory /), would not import this very package; else nothing."""
    package = Path(__file__).resolve().parent
    probe = subprocess.run(
        [python, "-c", "import acestep_daemon; print(acestep_daemon.__file__)"],
        cwd="/",
        env={},
        capture_output=True,
        text=True,
        check=False,
    )
    found = Path(probe.stdout.strip()).resolve().parent if probe.returncode == 0 else None
    return {} if found == package else {"PYTHONPATH": str(package.parent)}


def _install_files(args: argparse.Namespace) -> list[tuple[Path, str, int]]:
    """(path, text, mode) of every file install-service writes."""
    if args.skill_dir is not None:
        skill = (SKILL_SOURCE / "SKILL.md").read_text()
        client_text = Path(client.__file__).read_text()
        return [
            (args.skill_dir / "SKILL.md", skill, 0o644),
            (args.skill_dir / SKILL_CLIENT, client_text, 0o755),
        ]
    python = os.path.abspath(sys.executable)
    extra = [a for a in args.serve_args if a != "--"]
    service = units.render_service(units.exec_start(python, extra), service_environment(python))
    return [
        (args.unit_dir / units.SERVICE_NAME, service, 0o644),
        (args.unit_dir / units.SOCKET_UNIT_NAME, units.render_socket(args.socket), 0o644),
    ]


def cmd_install_service(args: argparse.Namespace) -> int:
    prog = "acestep install-service"
    if args.skill_dir is not None and not (SKILL_SOURCE / "SKILL.md").is_file():
        print(
            f"{prog}: no skill at {SKILL_SOURCE}: install it from a checkout of the repository",
            file=sys.stderr,
        )
        return 2
    if args.skill_dir is not None and args.serve_args:
        print(
            f"{prog}: --skill-dir installs only the skill; serve flags go with the units",
            file=sys.stderr,
        )
        return 2
    files = _install_files(args)
    for path, text, mode in files:
        if args.dry_run:
            print(f"would write {path} (mode {mode:o}):\n{text}")
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(mode)
        print(f"wrote {path}")
    if args.skill_dir is not None:
        print(
            f"the skill runs its client as {{baseDir}}/{SKILL_CLIENT}; spacebot's sandbox sees it "
            "only inside the agent's workspace (e.g. its skills/ folder)"
        )
        return 0
    print(
        f"spacebot skill: run again with --skill-dir {SPACEBOT_SKILL_DIR} "
        "(the agent's workspace: spacebot's sandbox shows a worker nothing else of $HOME)"
    )
    commands = [
        ["systemctl", "--user", "daemon-reload"],
        ["systemctl", "--user", "enable", "--now", units.SOCKET_UNIT_NAME],
    ]
    if args.dry_run or not args.enable:
        print("then run:\n" + "\n".join("  " + " ".join(c) for c in commands))
        return 0
    for command in commands:
        if subprocess.run(command, check=False).returncode != 0:
            return 1
    return 0


def _add_generate(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="generate one file without a daemon")
    _add_fields(p, GenerateRequest, skip={"progress"})
    p.add_argument("--float-wav", action="store_true", help="32-bit float WAV")
    p.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="checkpoint folder (default: $ACESTEP_MODEL_DIR, else the Hugging Face cache)",
    )
    _add_model(p)
    _add_device(p)
    _add_compile(p, ServerOptions.compile)
    _add_memory(p)
    _add_lm(p)
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    """Validate like the daemon, generate, write atomically, print the daemon's answer line."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")
    from pydantic import ValidationError

    from acestep_daemon import protocol
    from acestep_daemon.audio import write_audio
    from acestep_daemon.checkpoint import resolve_checkpoint
    from acestep_daemon.errors import AceStepError
    from acestep_daemon.memory import MemoryPolicy
    from acestep_daemon.pipeline import Pipeline

    for flag, value in (("--caption", args.caption), ("--output", args.output)):
        if value is None:
            print(f"acestep generate: {flag} is required", file=sys.stderr)
            return 2
    model, model_dir = args.model.removeprefix(TINY_PREFIX), args.model_dir
    try:
        _check_device(args.device)
        _check_memory_flags(args, [args.device])
    except StartupProblem as problem:
        print(f"acestep generate: {problem}", file=sys.stderr)
        return 2
    try:
        request = protocol.GenerateRequest.model_validate(request_fields(args))
        output = Path(request.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        problem = request.model_problem(MODELS[model])
        if problem is not None:
            print(f"acestep generate: {problem}", file=sys.stderr)
            return 2
        started = time.perf_counter()
        if args.model.startswith(TINY_PREFIX):
            model_dir = _tiny_checkpoint(model)
            print(f"acestep generate: --model {args.model}: RANDOM weights, noise", file=sys.stderr)
        checkpoint = resolve_checkpoint(model_dir, model=model)
        pipeline = Pipeline.load(
            checkpoint,
            device=args.device,
            dtype=_torch_dtype(args.dtype),
            model=model,
            lm_size=_lm_size(args),
            lm_model_dir=model_dir,
            compile=args.compile,
            quantize=args.quantize,
            offload=args.offload,
        )
        loaded = time.perf_counter()
        with _TerminalProgress() as progress:
            # As the daemon runs a job: VAE tile from free memory, retries, the CPU fallback.
            run = MemoryPolicy(pipeline, (pipeline.device, pipeline.dtype)).run(
                request.to_params(), progress
            )
        audio = run.audio
        writing = time.perf_counter()
        takes = []
        if request.seeds is None:
            write_audio(output, audio.samples, audio.sample_rate, float_wav=args.float_wav)
        else:
            for take in audio.takes:
                path = paths.take_path(output, take.seed)
                write_audio(path, take.samples, audio.sample_rate, float_wav=args.float_wav)
                takes.append((path, take.seed))
            output = takes[0][0]
        done = time.perf_counter()
    except ValidationError as error:
        print(f"acestep generate: {protocol.describe(error)}", file=sys.stderr)
        return 2
    except (AceStepError, OSError) as error:
        print(f"acestep generate: {error}", file=sys.stderr)
        return 1
    timings = {
        "load": loaded - started,
        **audio.timings,
        "write": done - writing,
        "total": done - started,
    }
    sys.stdout.write(protocol.encode(run.answer(output, timings, takes)).decode())
    return 0


class _TerminalProgress:
    """A tqdm bar per stage on a terminal; nothing when stderr is not one."""

    def __init__(self) -> None:
        self._bar: tqdm | None = None
        self._enabled = sys.stderr.isatty()

    def __enter__(self) -> _TerminalProgress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._bar is not None:
            self._bar.close()

    def __call__(self, stage: str, step: int, of: int) -> None:
        if not self._enabled:
            return
        if self._bar is None or self._bar.desc != stage:
            if self._bar is not None:
                self._bar.close()
            self._bar = tqdm(total=of, desc=stage, unit="step", file=sys.stderr)
        self._bar.update(step - self._bar.n)


def _add_make_tiny_checkpoint(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "make-tiny-checkpoint",
        help="write a tiny random checkpoint in the real layout",
        description="Write a tiny checkpoint with RANDOM weights in the exact layout of the "
        "real one (with a tiny 5 Hz LM): tests and offline demos. About 7 s.",
    )
    p.add_argument("dest", type=Path, help="folder to create")
    p.add_argument(
        "--seed", type=int, default=0, help="the same seed writes the same files (%(default)s)"
    )
    p.add_argument(
        "--variant",
        choices=tuple(MODELS),
        default=DEFAULT_MODEL,
        help="the DiT of that model, in its layout (%(default)s)",
    )
    p.set_defaults(func=cmd_make_tiny_checkpoint)


def cmd_make_tiny_checkpoint(args: argparse.Namespace) -> int:
    from acestep_daemon.tiny import make_tiny_checkpoint

    print(make_tiny_checkpoint(args.dest, seed=args.seed, variant=args.variant, lm=True))
    return 0


DESCRIPTION = """\
ACE-Step v1.5 music generation: a resident daemon that keeps the model loaded and
answers one JSON line per Unix-socket connection, its client, its systemd units,
and one-shot generation without a daemon. `acestep SUBCOMMAND --help` for each."""


QUIET_LOGGERS = ("torchao", "torch.utils._pytree")
"""Libraries whose import-time warnings say nothing to a user: torchao (imported by
transformers whenever it is installed) on a CPU wheel logs each CUDA kernel library it cannot
load and a missing Triton, and torch's pytree a deprecation meant for torchao's authors."""


def quiet_library_logs() -> None:
    """Silence the `QUIET_LOGGERS` below errors (entry points call it first)."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    quiet_library_logs()
    parser = argparse.ArgumentParser(
        prog="acestep",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
    _add_serve(subparsers)
    _add_request(subparsers)
    _add_install_service(subparsers)
    _add_generate(subparsers)
    _add_make_tiny_checkpoint(subparsers)
    args = parser.parse_args(argv)
    if args.subcommand is None:
        parser.print_help(sys.stderr)
        return 2
    return args.func(args)
