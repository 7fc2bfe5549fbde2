"""The wire contract on its own: ace-step-rs requests parse unchanged, bad lines are named."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from acestep_daemon.family import DEFAULT_MODEL, MODELS
from acestep_daemon.params import MAX_SEED
from acestep_daemon.protocol import (
    CommandRequest,
    GenerateRequest,
    ProtocolError,
    encode,
    parse_request,
    success_answer,
)


def parse(obj: object) -> GenerateRequest | CommandRequest:
    return parse_request(json.dumps(obj).encode() + b"\n")


def test_ace_step_rs_request_keeps_its_defaults():
    request = parse({"caption": "upbeat jazz"})
    assert isinstance(request, GenerateRequest)
    assert (request.lyrics, request.metas, request.language) == ("", "", "en")
    assert (request.duration_s, request.shift) == (30.0, None)  # None: the model's shift
    assert MODELS[DEFAULT_MODEL].shift == 3.0
    assert request.seed is None and request.output is None
    assert request.progress is False and request.task == "text2music"


def test_full_ace_step_rs_request_parses():
    line = {
        "caption": "upbeat jazz, 120 BPM",
        "lyrics": "[verse]\nSome words",
        "metas": "bpm: 120, key: C",
        "language": "en",
        "duration_s": 20,
        "shift": 3.0,
        "seed": MAX_SEED,
        "output": "/tmp/music.ogg",
    }
    request = parse(line)
    assert request.seed == MAX_SEED and request.duration_s == 20.0


def test_null_seed_and_output_mean_random_and_spool():
    request = parse({"caption": "x", "seed": None, "output": None})
    assert request.seed is None and request.output is None


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"caption": ""}, "caption"),
        ({"caption": "   "}, "caption"),
        ({}, "caption"),
        ({"caption": "x", "duration_s": 0.5}, "duration_s"),
        ({"caption": "x", "duration_s": 601}, "duration_s"),
        ({"caption": "x", "duration_s": "30"}, "duration_s"),
        ({"caption": "x", "seed": -1}, "seed"),
        ({"caption": "x", "seed": MAX_SEED + 1}, "seed"),
        ({"caption": "x", "seed": 1.5}, "seed"),
        ({"caption": "x", "output": "out.wav"}, "absolute"),
        ({"caption": "x", "output": "/tmp/../etc/out.wav"}, ".."),
        ({"caption": "x", "output": "/tmp/out.xyz"}, "output"),
        ({"caption": "x", "task": "remix"}, "task"),
        ({"caption": "x", "task": "cover"}, "src_audio"),
        ({"caption": "x", "src_audio": "/a.wav"}, "src_audio"),
        ({"caption": "x", "repaint_start_s": 1.0}, "repaint"),
        ({"caption": "x", "progress": "yes"}, "progress"),
        ({"caption": "x", "volume": 11, "tempo": 3}, "unknown field(s): volume, tempo"),
        ({"command": "reboot"}, "command"),
        ({"command": "status", "caption": "x"}, "caption"),
    ],
)
def test_bad_request_is_rejected_naming_the_field(fields, named):
    with pytest.raises(ProtocolError) as caught:
        parse(fields)
    assert named in str(caught.value)
    assert caught.value.code == "invalid_request"


@pytest.mark.parametrize(
    "line",
    [b"", b"\n", b"not json\n", b"[1, 2]\n", b'"caption"\n', b"\xff\xfe{}\n", b"[" * 100_000],
)
def test_garbage_is_a_protocol_error(line):
    with pytest.raises(ProtocolError):
        parse_request(line)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_numbers_are_rejected(constant):
    with pytest.raises(ProtocolError):
        parse_request(b'{"caption": "x", "duration_s": ' + constant.encode() + b"}")


def test_commands_parse():
    for name in ("unload", "load", "status", "ping"):
        assert parse({"command": name}) == CommandRequest(command=name)


def test_answers_are_one_line_of_strict_json():
    line = encode({"ok": False, "error": "a\nb \ud800", "code": "internal", "x": float("nan")})
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line, parse_constant=lambda c: pytest.fail(c))["x"] is None


def test_success_answer_puts_ace_step_rs_fields_first_and_optional_ones_only_when_given():
    how = {"device": "cuda:0", "fallback": None, "oom_retries": 0, "vae_chunk_frames": 256}
    fields = {"path": "/o/a.wav", "duration_s": 2.0, "seed": 7, "timings": {"text": 0.123456}}
    single = success_answer(**fields, **how, dtype="torch.bfloat16", notes=[])
    first = ["ok", "path", "duration_s", "sample_rate", "channels", "seed", "timings", "device"]
    assert list(single)[:8] == first
    assert single["dtype"] == "bfloat16" and single["timings"] == {"text": 0.1235}
    assert "thinking" not in single and "takes" not in single and single["dcw"] is None
    takes = [("/o/a-7.wav", 7), ("/o/a-8.wav", 8)]
    thinking = {"mode": "metas", "inferred": {}, "codes": None}
    several = success_answer(
        **fields, **how, dtype="float32", notes=[], thinking=thinking, takes=takes
    )
    assert several["thinking"] == thinking
    assert several["takes"] == [
        {"path": "/o/a-7.wav", "seed": 7},
        {"path": "/o/a-8.wav", "seed": 8},
    ]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_any_bytes_parse_or_raise_protocol_error(data):
    with contextlib.suppress(ProtocolError):
        parse_request(data)


def test_a_relative_output_is_resolved_against_the_callers_directory():
    line = json.dumps({"caption": "x", "output": "sub/../music.ogg"}).encode()
    assert parse_request(line, cwd="/home/me/songs").output == "/home/me/songs/music.ogg"
    with pytest.raises(ProtocolError, match=r'output must be an absolute path.*"\$PWD/music.ogg"'):
        parse_request(json.dumps({"caption": "x", "output": "music.ogg"}).encode())


def test_a_request_spread_over_lines_is_told_to_send_one_line():
    first_line = json.dumps({"caption": "x"}, indent=2).encode().split(b"\n")[0] + b"\n"
    with pytest.raises(ProtocolError, match="the request must be ONE line of JSON"):
        parse_request(first_line)
    with pytest.raises(ProtocolError, match="invalid JSON request"):
        parse_request(b"{oops}\n")


@pytest.mark.parametrize(
    ("fields", "policy"),
    [
        ({"output": "/o/a.ogg"}, "finish"),
        ({}, "cancel"),
        ({"output": "/o/a.ogg", "on_hangup": "cancel"}, "cancel"),
        ({"on_hangup": "finish"}, "finish"),
    ],
)
def test_a_hang_up_finishes_a_named_file_and_cancels_a_spooled_one(fields, policy):
    assert parse({"caption": "x", **fields}).hangup_policy == policy


def test_answers_keep_non_ascii_text_as_utf8():
    line = encode({"ok": True, "path": "/tmp/café ♪.ogg"})
    assert "/tmp/café ♪.ogg".encode() in line and b"\\u" not in line


def test_cancel_needs_an_id_and_only_cancel_takes_one():
    assert parse({"command": "cancel", "id": "ab12"}) == CommandRequest(command="cancel", id="ab12")
    assert parse({"command": "jobs"}) == CommandRequest(command="jobs")
    for bad in ({"command": "cancel"}, {"command": "status", "id": "ab12"}):
        with pytest.raises(ProtocolError, match="id"):
            parse(bad)
