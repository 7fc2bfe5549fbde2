"""SKILL.md and README are checked against protocol.py: their fields, codes, examples are real."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

from acestep_daemon.protocol import ErrorCode, GenerateRequest, parse_request
from tests.daemon_harness import REPO

SKILL = REPO / "skills" / "generate_music" / "SKILL.md"
README = REPO / "README.md"
DOCS = (SKILL, README)
HOME = "/home/agent"
"""What `$HOME` stands for when an example is read as the shell would expand it."""


def _first_column_names(text: str) -> set[str]:
    """Backticked names in the first column of every markdown table row."""
    rows = re.findall(r"^\| (.+?) \|", text, re.M)
    return {name for row in rows for name in re.findall(r"`(\w+)`", row)}


def front_matter(text: str) -> dict[str, Any]:
    match = re.match(r"---\n(.*?)\n---\n", text, re.S)
    assert match, "SKILL.md starts with a YAML front matter block"
    return yaml.safe_load(match.group(1))


def json_examples(text: str) -> list[dict[str, Any]]:
    """Every JSON object written in the text (`{"…` onwards), with `$HOME` expanded."""
    text = text.replace("$HOME", HOME)
    decoder = json.JSONDecoder()
    found = []
    position = 0
    while (start := text.find('{"', position)) != -1:
        try:
            obj, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError as error:
            line = text[start : text.find("\n", start)]
            raise AssertionError(f"not valid JSON: {line!r} ({error})") from None
        found.append(obj)
        position = end
    return found


def test_skill_front_matter_is_yaml_for_spacebot():
    meta = front_matter(SKILL.read_text())
    assert meta["name"] == SKILL.parent.name
    assert meta["platforms"] == ["linux"]
    description = meta["description"]
    assert description.startswith("Use when ")
    assert len(description) <= 160, len(description)


def test_skill_fields_and_codes_exist_in_the_protocol():
    names = _first_column_names(SKILL.read_text())
    codes = set(typing.get_args(ErrorCode))
    fields = set(GenerateRequest.model_fields)
    assert names - codes <= fields, names - codes - fields
    assert codes <= names


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_json_example_is_a_valid_request_or_answer(doc: Path):
    examples = json_examples(doc.read_text())
    requests = [e for e in examples if "ok" not in e and "progress" not in e]
    assert requests
    for example in requests:
        parse_request(json.dumps(example).encode())
    for answer in (e for e in examples if "ok" in e):
        assert isinstance(answer["ok"], bool)
        if not answer["ok"]:
            assert answer["code"] in typing.get_args(ErrorCode), answer


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_no_example_writes_to_tmp(doc: Path):
    text = doc.read_text()
    for example in json_examples(text):
        for field in ("output", "path"):
            assert not str(example.get(field, "")).startswith("/tmp"), example
    assert not re.search(r"(-o|--output) /tmp", text)


def test_skill_outputs_are_absolute_paths_under_home_in_small_formats():
    requests = [e for e in json_examples(SKILL.read_text()) if "caption" in e]
    assert requests
    for request in requests:
        assert request["output"].startswith(HOME + "/")
        assert Path(request["output"]).suffix in {".ogg", ".opus", ".mp3"}


def test_skill_says_what_the_sandbox_needs():
    text = SKILL.read_text()
    for needed in ("timeout_seconds", "send_file", "{baseDir}/scripts/acestep-request"):
        assert needed in text
    assert "/run/user/<uid>/ace-step-gen.sock" in text
    assert "UNIX-CONNECT" not in text and "acestep request" not in text  # not in the sandbox
    assert (SKILL.parent / "scripts" / "acestep-request").is_file()


def readme_command_lines() -> list[str]:
    """Every line of README's bash/sh code blocks, comments cut."""
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", README.read_text(), re.S)
    return [line.split(" #")[0].rstrip() for block in blocks for line in block.splitlines()]


def test_readme_commands_exist_in_a_fresh_clone():
    """A command is a file of the checkout (executable) or a system tool, never a bare
    `acestep`, which a fresh clone does not have on PATH (`scripts/acestep` is its own)."""
    programs = {line.split()[0] for line in readme_command_lines() if line.strip()}
    local = {p for p in programs if re.fullmatch(r"[\w-]+(/[\w.-]+)+", p)}
    assert {"scripts/serve", "scripts/acestep", "scripts/test"} <= local
    for program in local:
        assert os.access(REPO / program, os.X_OK), f"{program} is not an executable file"
    assert "acestep" not in programs
    python3 = [line for line in readme_command_lines() if line.startswith("python3 ")]
    for line in python3:
        assert (REPO / line.split()[1]).is_file(), line


def _help(command: str) -> str:
    """`scripts/acestep SUB --help` or `scripts/serve --help`, run as README runs them."""
    argv = ["scripts/serve"] if command == "serve-script" else ["scripts/acestep", command]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACESTEP_")}
    env["ACESTEP_VENV"] = sys.prefix
    return subprocess.run(
        [str(REPO / argv[0]), *argv[1:], "--help"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout


def test_readme_commands_use_flags_that_help_lists():
    """Every `scripts/acestep SUB …` / `scripts/serve …` line in README's code blocks,
    against the --help of that very command."""
    helps: dict[str, str] = {}
    checked = 0
    for line in readme_command_lines():
        match = re.match(r"(?:scripts/acestep (\S+)|scripts/(serve))\b(.*)", line)
        if not match:
            continue
        subcommand = match.group(1) or "serve-script"
        own, _, serve_flags = match.group(3).partition(" -- ")
        for name, text in ((subcommand, own), ("serve", serve_flags)):
            for flag in re.findall(r"(?<!\S)(--?[a-z][\w-]*)", text):
                helps.setdefault(name, _help(name))
                assert re.search(rf"(?<![\w-]){flag}\b", helps[name]), (line, flag)
                checked += 1
    assert checked > 10
