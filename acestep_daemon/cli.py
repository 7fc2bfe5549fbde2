"""The `acestep` command: one function per subcommand.

acestep serve            run the daemon (resident model, Unix socket)
acestep request          send one request line to a daemon and print the answer
acestep install-service  write the systemd user units
acestep generate         generate one file in this process (the ace-step-rs `ace-step` CLI)
acestep make-tiny-checkpoint  write a tiny random checkpoint in the real layout
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from types import NoneType
from typing import TYPE_CHECKING, Any, Literal, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined
from tqdm import tqdm

from acestep_daemon import paths, units
from acestep_daemon.checkpoint import DEFAULT_LM, LM_SIZES
from acestep_daemon.options import ServerOptions
from acestep_daemon.params import Flag
from acestep_daemon.protocol import CommandName, GenerateRequest

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


def _add_serve(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="run the daemon")
    defaults = ServerOptions(socket_path=paths.default_socket_path())
    p.add_argument("--socket", type=Path, default=defaults.socket_path, help="%(default)s")
    p.add_argument("--model-dir", type=Path, default=None, help="checkpoint folder")
    p.add_argument(
        "--model",
        choices=("turbo", "tiny"),
        default="turbo",
        help="'tiny' serves a freshly made tiny checkpoint with RANDOM weights (protocol tests)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=DTYPES, default="auto")
    _add_lm(p)
    p.add_argument(
        "--queue-limit",
        type=int,
        default=defaults.queue_limit,
        help="waiting requests before 'busy' (%(default)s)",
    )
    p.add_argument("--idle-unload", type=float, default=defaults.idle_unload_s, metavar="SECONDS")
    p.add_argument(
        "--socket-mode", type=_socket_mode, default=defaults.socket_mode, metavar="OCTAL"
    )
    p.add_argument("--allow-uid", type=int, action="append", default=[], metavar="UID")
    p.add_argument("--allow-gid", type=int, action="append", default=[], metavar="GID")
    p.add_argument("--read-timeout", type=float, default=defaults.read_timeout_s, metavar="SECONDS")
    p.add_argument(
        "--shutdown-grace", type=float, default=defaults.shutdown_grace_s, metavar="SECONDS"
    )
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(func=cmd_serve)


def _add_lm(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--lm",
        choices=(*LM_SIZES, "none"),
        default=DEFAULT_LM,
        help="5 Hz LM planner for `thinking` requests, loaded on first use (%(default)s)",
    )


def _lm_size(args: argparse.Namespace) -> str | None:
    return None if args.lm == "none" else args.lm


def cmd_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    options = ServerOptions(
        socket_path=args.socket,
        socket_mode=args.socket_mode,
        allow_uids=frozenset(args.allow_uid),
        allow_gids=frozenset(args.allow_gid),
        read_timeout_s=args.read_timeout,
        shutdown_grace_s=args.shutdown_grace,
        queue_limit=args.queue_limit,
        idle_unload_s=args.idle_unload,
    )
    activated = os.environ.get("LISTEN_PID") == str(os.getpid())
    if not activated and paths.daemon_answers(options.socket_path):
        logger.error("a daemon is already listening on %s", options.socket_path)
        return 1

    from acestep_daemon import faults, server
    from acestep_daemon.checkpoint import resolve_checkpoint
    from acestep_daemon.manager import GenerationManager
    from acestep_daemon.pipeline import Pipeline

    tiny_dir: Path | None = None
    model_dir = args.model_dir
    if args.model == "tiny":
        from acestep_daemon.tiny import make_tiny_checkpoint

        tiny_dir = Path(tempfile.mkdtemp(prefix="acestep-tiny-"))
        model_dir = make_tiny_checkpoint(tiny_dir / "checkpoint")
        logger.warning(
            "*** --model tiny: serving a TINY checkpoint with RANDOM weights from %s. "
            "It answers the protocol but every file it writes is noise, not music. ***",
            model_dir,
        )
    dtype = _torch_dtype(args.dtype)

    try:
        injected = faults.plan_from_env()

        def factory() -> Pipeline:
            pipeline = Pipeline.load(
                resolve_checkpoint(model_dir),
                device=args.device,
                dtype=dtype,
                lm_size=_lm_size(args),
                lm_model_dir=model_dir,
            )
            return faults.FaultyPipeline(pipeline, injected) if injected else pipeline

        manager = GenerationManager(
            factory, queue_limit=options.queue_limit, idle_unload_s=options.idle_unload_s
        )
        return server.serve(manager, options)
    except ValueError as error:
        logger.error("%s", error)
        return 2
    finally:
        if tiny_dir is not None:
            shutil.rmtree(tiny_dir, ignore_errors=True)


def _absolute_path(text: str) -> str:
    """Paths go on the wire absolute: the daemon's working directory is not the caller's."""
    return str(Path(text).absolute())


def _add_fields(p: argparse.ArgumentParser, model: type[BaseModel], *, skip: set[str]) -> None:
    """One flag per request field that declares a `Flag`; dest = the wire name."""
    for name, info in model.model_fields.items():
        flag = next((m for m in info.metadata if isinstance(m, Flag)), None)
        if flag is None or name in skip:
            continue
        default = "" if info.default in (None, "", PydanticUndefined) else f" ({info.default})"
        help_text = f"{info.description}{default}"
        if get_origin(info.annotation) is Literal:
            p.add_argument(
                *flag.names, dest=name, choices=get_args(info.annotation), help=help_text
            )
            continue
        kind = next(a for a in get_args(info.annotation) or [info.annotation] if a is not NoneType)
        if kind is bool:
            p.add_argument(
                *flag.names, dest=name, action="store_true", default=None, help=help_text
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
    if "task" not in request and "src_audio" in request:
        has_range = "repaint_start_s" in request or "repaint_end_s" in request
        request["task"] = "repaint" if has_range else "cover"
    return request


def _add_request(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("request", help="send one request to a running daemon")
    p.add_argument("text", nargs="?", metavar="CAPTION", help="the caption, as -c/--caption")
    p.add_argument("--command", choices=get_args(CommandName))
    p.add_argument("--json", dest="raw", help="send this JSON object as it is")
    p.add_argument("--socket", type=Path, default=None)
    _add_fields(p, GenerateRequest, skip=set())
    p.set_defaults(func=cmd_request)


def build_request(args: argparse.Namespace) -> dict[str, Any]:
    """The request object from the flags (only the flags that were given)."""
    if args.raw:
        return json.loads(args.raw)
    if args.command:
        return {"command": args.command}
    if args.text is not None and args.caption is not None:
        raise SystemExit("acestep request: give the caption once (positional or -c)")
    args.caption = args.caption if args.caption is not None else args.text
    if not args.caption:
        raise SystemExit("acestep request: give a caption, --command or --json")
    return request_fields(args)


def cmd_request(args: argparse.Namespace) -> int:
    """Send the line, half-close like socat, print every answer line; 0 when the last is ok."""
    line = json.dumps(build_request(args)).encode() + b"\n"
    path = args.socket or paths.default_socket_path()
    last: dict[str, Any] = {}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except OSError as error:
            print(f"acestep request: cannot connect to {path}: {error}", file=sys.stderr)
            return 1
        sock.sendall(line)
        sock.shutdown(socket.SHUT_WR)
        with sock.makefile("rb") as answers:
            for raw in answers:
                print(raw.decode().rstrip("\n"), flush=True)
                last = json.loads(raw)
    return 0 if last.get("ok") else 1


def _add_install_service(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("install-service", help="write the systemd user units")
    p.add_argument(
        "--unit-dir",
        type=Path,
        default=Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
        / "systemd"
        / "user",
    )
    p.add_argument(
        "--socket",
        default=units.DEFAULT_LISTEN,
        help=f"ListenStream= of the socket unit (old clients: {paths.LEGACY_SOCKET})",
    )
    p.add_argument("--enable", action="store_true", help="systemctl --user enable --now the socket")
    p.add_argument("serve_args", nargs=argparse.REMAINDER, help="-- extra `acestep serve` flags")
    p.set_defaults(func=cmd_install_service)


def cmd_install_service(args: argparse.Namespace) -> int:
    extra = [a for a in args.serve_args if a != "--"]
    exec_start = units.exec_start(sys.executable, extra)
    args.unit_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (
        (units.SERVICE_NAME, units.render_service(exec_start)),
        (units.SOCKET_UNIT_NAME, units.render_socket(args.socket)),
    ):
        (args.unit_dir / name).write_text(text)
        print(f"wrote {args.unit_dir / name}")
    commands = [
        ["systemctl", "--user", "daemon-reload"],
        ["systemctl", "--user", "enable", "--now", units.SOCKET_UNIT_NAME],
    ]
    if not args.enable:
        print("now run:\n" + "\n".join("  " + " ".join(c) for c in commands))
        return 0
    for command in commands:
        if subprocess.run(command, check=False).returncode != 0:
            return 1
    return 0


def _add_generate(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="generate one file without a daemon")
    _add_fields(p, GenerateRequest, skip={"progress"})
    p.add_argument("--float-wav", action="store_true", help="32-bit float WAV")
    p.add_argument("--model-dir", type=Path, default=None, help="checkpoint folder")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=DTYPES, default="auto")
    _add_lm(p)
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    """Validate like the daemon, generate, write atomically, print one JSON line."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")
    from pydantic import ValidationError

    from acestep_daemon import protocol
    from acestep_daemon.audio import write_audio
    from acestep_daemon.checkpoint import resolve_checkpoint
    from acestep_daemon.errors import AceStepError
    from acestep_daemon.pipeline import Pipeline

    for flag, value in (("--caption", args.caption), ("--output", args.output)):
        if value is None:
            print(f"acestep generate: {flag} is required", file=sys.stderr)
            return 2
    try:
        request = protocol.GenerateRequest.model_validate(request_fields(args))
        output = Path(request.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        checkpoint = resolve_checkpoint(args.model_dir)
        pipeline = Pipeline.load(
            checkpoint,
            device=args.device,
            dtype=_torch_dtype(args.dtype),
            lm_size=_lm_size(args),
            lm_model_dir=args.model_dir,
        )
        with _TerminalProgress() as progress:
            audio = pipeline.generate(request.to_params(), progress=progress)
        write_audio(output, audio.samples, audio.sample_rate, float_wav=args.float_wav)
    except ValidationError as error:
        print(f"acestep generate: {protocol.describe(error)}", file=sys.stderr)
        return 2
    except (AceStepError, OSError) as error:
        print(f"acestep generate: {error}", file=sys.stderr)
        return 1
    answer = protocol.success_answer(
        path=str(output),
        duration_s=audio.duration_s,
        seed=audio.seed,
        timings=audio.timings,
        device=str(pipeline.device),
        **({"thinking": audio.thinking} if audio.thinking is not None else {}),
    )
    sys.stdout.write(protocol.encode(answer).decode())
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
        self._bar.update(step + 1 - self._bar.n)


def _add_make_tiny_checkpoint(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "make-tiny-checkpoint", help="write a tiny random checkpoint in the real layout"
    )
    p.add_argument("dest", type=Path, help="folder to create")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_tiny_checkpoint)


def cmd_make_tiny_checkpoint(args: argparse.Namespace) -> int:
    from acestep_daemon.tiny import make_tiny_checkpoint

    print(make_tiny_checkpoint(args.dest, seed=args.seed))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="acestep", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="subcommand", required=True)
    _add_serve(subparsers)
    _add_request(subparsers)
    _add_install_service(subparsers)
    _add_generate(subparsers)
    _add_make_tiny_checkpoint(subparsers)
    args = parser.parse_args(argv)
    return args.func(args)
