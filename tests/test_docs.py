"""SKILL.md is checked against protocol.py: its fields, codes and example are the real ones."""

from __future__ import annotations

import re
import typing

from acestep_daemon.protocol import ErrorCode, GenerateRequest, parse_request
from tests.daemon_harness import REPO

SKILL = REPO / "skills" / "generate_music" / "SKILL.md"


def _first_column_names(text: str) -> set[str]:
    """Backticked names in the first column of every markdown table row."""
    rows = re.findall(r"^\| (.+?) \|", text, re.M)
    return {name for row in rows for name in re.findall(r"`(\w+)`", row)}


def test_skill_fields_and_codes_exist_in_the_protocol():
    names = _first_column_names(SKILL.read_text())
    codes = set(typing.get_args(ErrorCode))
    fields = set(GenerateRequest.model_fields)
    assert names - codes <= fields, names - codes - fields
    assert codes <= names


def test_skill_socat_example_is_a_valid_request():
    example = re.search(r"echo '(\{.*?\})'", SKILL.read_text())
    assert example is not None
    request = parse_request(example.group(1).encode())
    assert isinstance(request, GenerateRequest) and request.output
