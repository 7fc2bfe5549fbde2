"""The song blueprint the 5 Hz LM writes in its thought: fields, value domains, YAML text.

The thought is `<think>\\n{yaml}\\n</think>` with the keys bpm, caption, duration, keyscale,
language and timesignature in sorted order (the format the LM was trained on, as
`LLMHandler._format_metadata_as_cot` of the official `acestep/llm_inference.py` writes it:
PyYAML, sorted keys, unicode kept, digit strings as integers, "3/4" written as 3).
`parse_thought` reads the LM's text back the way the official `parse_lm_output` does
(a key at the start of a line, indented lines continue the value).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import yaml

BPM_RANGE = (30, 300)
DURATION_RANGE = (10, 600)
"""Inclusive ranges the constrained decoder allows, in beats per minute and seconds."""

TIME_SIGNATURES = (2, 3, 4, 6)
"""Beats per bar (2/4, 3/4, 4/4, 6/8), written as the numerator."""


FIELD_ORDER = ("bpm", "caption", "duration", "keyscale", "language", "timesignature")
"""Keys of the thought, in the order they are written (sorted)."""


@dataclass(frozen=True)
class Metas:
    """One blueprint; None means 'not known' (not given, not yet planned)."""

    bpm: int | None = None
    caption: str | None = None
    duration: int | None = None
    keyscale: str | None = None
    language: str | None = None
    timesignature: int | None = None

    def known(self) -> dict[str, int | str]:
        """The fields that have a value, in thought order."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: values[k] for k in FIELD_ORDER if values[k] is not None}

    def filled_from(self, other: Metas) -> Metas:
        """self where it has a value, else other's value."""
        return replace(other, **self.known())


def format_thought(metas: Metas) -> str:
    """`<think>\\n{yaml}\\n</think>` of the known fields (the phase-2 prompt's thought)."""
    items = {
        k: int(v) if isinstance(v, str) and v.isdigit() else v for k, v in metas.known().items()
    }
    body = yaml.dump(items, allow_unicode=True, sort_keys=True).strip() if items else ""
    return f"<think>\n{body}\n</think>"


def parse_thought(text: str) -> Metas:
    """Read the fields out of the LM's thought text; unknown keys and bad numbers are dropped.

    A value runs from its `key:` line through the indented lines after it; the caption is
    read as a YAML scalar (folded lines joined with single spaces, quotes removed).
    """
    values: dict[str, list[str]] = {}
    key = None
    body = text.split("<think>")[-1].split("</think>")[0]
    for line in body.split("\n"):
        if line.strip().startswith("<"):
            continue
        if line and not line[0].isspace() and ":" in line:
            name, first = line.split(":", 1)
            key = name.strip().lower()
            values[key] = [first] if first.strip() else []
        elif line[:1] in (" ", "\t") and key is not None:
            values[key].append(line)
    text_of = {k: "\n".join(v) for k, v in values.items() if v}
    return Metas(
        bpm=_int(text_of.get("bpm")),
        caption=_folded(text_of.get("caption")),
        duration=_int(text_of.get("duration")),
        keyscale=_stripped(text_of.get("keyscale")),
        language=_stripped(text_of.get("language")),
        timesignature=_int((text_of.get("timesignature") or "").split("/")[0] or None),
    )


def _int(value: str | None) -> int | None:
    try:
        return int(value.strip()) if value is not None else None
    except ValueError:
        return None


def _stripped(value: str | None) -> str | None:
    return value.strip() or None if value is not None else None


def _folded(value: str | None) -> str | None:
    """A YAML scalar (plain, folded over lines, or quoted) as one line of text."""
    if value is None:
        return None
    try:
        loaded = yaml.safe_load(f"value:{value}")["value"]
    except (yaml.YAMLError, TypeError):
        loaded = None
    if isinstance(loaded, str):
        return loaded.strip() or None
    return " ".join(line.strip() for line in value.split("\n") if line.strip()) or None
