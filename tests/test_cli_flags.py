"""`acestep generate` and `acestep request` take the same flags, derived from the request shape."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from acestep_daemon import cli, client
from acestep_daemon.params import GenerationParams
from acestep_daemon.protocol import GenerateRequest


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser()
    subparsers = root.add_subparsers(dest="subcommand", required=True)
    cli._add_request(subparsers)
    cli._add_generate(subparsers)
    return root


def dests(subcommand: str) -> set[str]:
    sub = parser()._subparsers._group_actions[0].choices[subcommand]  # type: ignore[union-attr]
    return {action.dest for action in sub._actions}


@pytest.mark.parametrize("subcommand", ["generate", "request"])
def test_every_generation_field_has_a_flag(subcommand: str) -> None:
    assert set(GenerationParams.model_fields) | {"output"} <= dests(subcommand)


def test_request_also_takes_progress() -> None:
    assert "progress" in dests("request") and "progress" not in dests("generate")


def test_caption_is_a_flag_on_both_and_positional_on_request() -> None:
    flags = ["-d", "2", "-s", "7", "--bpm", "90", "--key", "F# minor"]
    by_flag = cli.build_request(parser().parse_args(["request", "-c", "lofi", *flags]))
    positional = cli.build_request(parser().parse_args(["request", "lofi", *flags]))
    generate = cli.request_fields(parser().parse_args(["generate", "-c", "lofi", *flags]))
    expected = {"caption": "lofi", "duration_s": 2.0, "seed": 7, "bpm": 90, "key": "F# minor"}
    assert by_flag == positional == generate == expected
    GenerateRequest.model_validate(by_flag)


def test_caption_given_twice_is_refused() -> None:
    with pytest.raises(client.ClientError, match="once") as refused:
        cli.build_request(parser().parse_args(["request", "a", "-c", "b"]))
    assert refused.value.status == client.EXIT_USAGE


def test_relative_paths_go_on_the_wire_absolute(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = parser().parse_args(["generate", "-c", "x", "-o", "out.ogg", "--src-audio", "in.wav"])
    fields = cli.request_fields(args)
    assert fields["output"] == str(tmp_path / "out.ogg")
    assert fields["src_audio"] == str(tmp_path / "in.wav")
    assert fields["task"] == "cover"  # a source without a range


def test_task_follows_the_inputs_unless_given() -> None:
    repaint = ["request", "x", "--src-audio", "/a.wav", "--repaint-start", "1"]
    assert cli.build_request(parser().parse_args(repaint))["task"] == "repaint"
    explicit = ["request", "x", "--src-audio", "/a.wav", "--task", "cover", "--repaint-end", "3"]
    assert cli.build_request(parser().parse_args(explicit))["task"] == "cover"


SUBCOMMANDS = ("serve", "request", "install-service", "generate", "make-tiny-checkpoint")


@pytest.mark.parametrize("subcommand", SUBCOMMANDS)
def test_every_option_of_every_subcommand_has_help(subcommand: str, capsys) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main([subcommand, "--help"])
    assert done.value.code == 0
    root = argparse.ArgumentParser()
    subparsers = root.add_subparsers()
    {
        "serve": cli._add_serve,
        "request": cli._add_request,
        "install-service": cli._add_install_service,
        "generate": cli._add_generate,
        "make-tiny-checkpoint": cli._add_make_tiny_checkpoint,
    }[subcommand](subparsers)
    (sub,) = subparsers.choices.values()
    undocumented = [a.option_strings or a.dest for a in sub._actions if not a.help]
    assert undocumented == []


def test_serve_help_names_tiny_and_one_default_per_option(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    text = capsys.readouterr().out
    assert ",tiny}" in text and "one function per subcommand" not in text


def test_task_help_states_one_default(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["request", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    task = text[text.index("--task {text2music,repaint,cover} ") :].split(" --reference-audio")[0]
    assert "(text2music)" not in task and "else text2music" in task
    duration = text[text.index("-d SECONDS, --duration SECONDS") :].split(" --shift")[0]
    assert "(30;" in duration and "planner chooses" in duration


def test_bare_acestep_prints_the_help(capsys) -> None:
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert "ACE-Step v1.5" in err and "install-service" in err and "error:" not in err


@pytest.mark.parametrize("subcommand", ["generate", "request"])
def test_lora_flag_repeats_with_a_scale_each(subcommand: str, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    two = parser().parse_args([subcommand, "-c", "x", "--lora", str(a), "--lora", f"{b}:0.4"])
    assert cli.request_fields(two)["lora"] == [{"path": str(a)}, {"path": str(b), "scale": 0.4}]
    one = parser().parse_args([subcommand, "-c", "x", "--lora", str(a), "--lora-scale", "0.3"])
    fields = cli.request_fields(one)
    assert (fields["lora"], fields["lora_scale"]) == (str(a), 0.3)
