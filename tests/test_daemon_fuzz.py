"""Hostile request lines against a real daemon: always exactly one error line, daemon alive."""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from acestep_daemon.protocol import CommandRequest, GenerateRequest
from tests.daemon_harness import Daemon, running, send

FIELDS = (*GenerateRequest.model_fields, *CommandRequest.model_fields)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)

bad_paths = st.sampled_from(
    ["out.exe", "../out", "/tmp/../etc/passwd.wav", "/tmp/a/../b.ogg", "", " ", "/", "/tmp/x.exe"]
)
"""Outputs refused whatever the caller's directory (a relative `out.wav` is a fine one)."""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path):
    tmp = tmp_path_factory.mktemp("fuzz")
    with running(tmp, "--model-dir", str(tiny_checkpoint), "--read-timeout", "2") as d:
        yield d


def dumps(obj: object) -> bytes:
    return json.dumps(obj, allow_nan=True).encode()


def invalid_request_lines() -> st.SearchStrategy[bytes]:
    """Lines that must be rejected before any job runs."""
    wrong_field = st.fixed_dictionaries(
        {"caption": st.just("x")},
        optional={name: json_values for name in FIELDS if name != "caption"},
    ).filter(_definitely_invalid)
    return st.one_of(
        st.binary(max_size=300).filter(lambda b: not b.strip().startswith(b"{")),
        st.binary(min_size=1, max_size=60).map(lambda b: b"{" + b + b"\xff\xfe}"),
        wrong_field.map(dumps),
        st.dictionaries(st.text(min_size=1, max_size=8), json_values, min_size=1, max_size=3)
        .filter(lambda d: not set(d) <= set(FIELDS))
        .map(lambda d: dumps({"caption": "x", **d})),
        bad_paths.map(lambda p: dumps({"caption": "x", "output": p})),
        st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "1" * 400]).map(
            lambda n: b'{"caption": "x", "duration_s": ' + n.encode() + b"}"
        ),
        st.integers(min_value=2**64).map(lambda n: dumps({"caption": "x", "seed": n})),
    )


TEXT = {"lyrics", "metas", "language"}
OPTIONAL_TEXT = {"key", "time_signature"}
NUMBERS = {"duration_s"}
OPTIONAL_NUMBERS = {"shift", "repaint_start_s", "repaint_end_s"}
OPTIONAL_INTEGERS = {"seed", "bpm"}
PATHS = {"output", "reference_audio", "src_audio"}


def _wrong(name: str, value: object) -> bool:
    """True only when the value's JSON type can never be valid for the field."""
    if name in TEXT:
        return not isinstance(value, str)
    if name in OPTIONAL_TEXT or name in PATHS:
        return value is not None and not isinstance(value, str)
    if name in NUMBERS or name in OPTIONAL_NUMBERS:
        if value is None:
            return name in NUMBERS
        if isinstance(value, bool) or not isinstance(value, int | float):
            return True
        return isinstance(value, float) and not math.isfinite(value)
    if name in OPTIONAL_INTEGERS:
        return value is not None and (isinstance(value, bool) or not isinstance(value, int))
    if name == "progress":
        return not isinstance(value, bool)
    if name == "task":
        return value not in ("text2music", "repaint", "cover")
    return name == "command"


def _definitely_invalid(request: dict) -> bool:
    return any(_wrong(name, value) for name, value in request.items())


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(line=invalid_request_lines(), newline=st.booleans())
def test_hostile_line_gets_exactly_one_error_line(daemon: Daemon, line: bytes, newline: bool):
    answers = send(daemon.socket, line + (b"\n" if newline else b""), timeout=30)
    assert len(answers) == 1, answers
    answer = json.loads(answers[0])
    assert answer["ok"] is False and answer["code"] == "invalid_request", (line, answer)
    assert isinstance(answer["error"], str) and answer["error"]


def test_two_mebibyte_line_gets_one_error_line(daemon: Daemon):
    line = b'{"caption": "' + b"a" * (2 << 20) + b'"}\n'
    answers = send(daemon.socket, line, timeout=60)
    assert len(answers) == 1
    answer = json.loads(answers[0])
    assert answer["code"] == "invalid_request" and "longer than" in answer["error"]


def test_directory_as_output_is_rejected(daemon: Daemon, tmp_path: Path):
    folder = tmp_path / "folder.wav"
    folder.mkdir()
    answers = send(daemon.socket, dumps({"caption": "x", "output": str(folder)}) + b"\n")
    answer = json.loads(answers[0])
    assert len(answers) == 1 and answer["code"] == "invalid_request"
    assert "directory" in answer["error"]


def test_empty_request_gets_one_error_line(daemon: Daemon):
    answers = send(daemon.socket, b"", timeout=30)
    assert [json.loads(a)["code"] for a in answers] == ["invalid_request"]


def test_client_that_never_sends_times_out_with_one_error_line(daemon: Daemon):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(daemon.socket))
        answer = sock.makefile("rb").readlines()
    assert len(answer) == 1 and "timed out" in json.loads(answer[0])["error"]


def test_daemon_is_alive_and_ran_nothing_after_the_fuzz(daemon: Daemon):
    status = daemon.status()
    assert status["ok"] and status["loaded"]
    assert status["generated"] == 0 and status["failed"] == 0
    assert daemon.proc.poll() is None
