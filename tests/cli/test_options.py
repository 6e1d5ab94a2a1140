"""The CLI's shared options: one declaration, the same on every subcommand."""

from __future__ import annotations

import argparse

import pytest

from swarm.cli import build_parser
from swarm.cli.options import parse_bytes


@pytest.mark.parametrize("text, expected", [
    ("1000000", 1_000_000), ("4G", 4 << 30), ("512M", 512 << 20), ("512 MB", 512 << 20), ("1.5GiB", 3 << 29),
    ("2g", 2 << 30), (".5G", 1 << 29), ("64k", 64 << 10), ("1T", 1 << 40),
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "G", "4X", "-1G", "4 G B", "1.2.3M", "four"])
def test_parse_bytes_refuses_what_is_not_a_size(text):
    with pytest.raises(argparse.ArgumentTypeError, match="not a size"):
        parse_bytes(text)


def subcommand_options(command: str) -> dict[str, argparse.Action]:
    parser = build_parser([command])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return {opt: action for action in sub._actions for opt in action.option_strings}


SHARED = {  # option -> the subcommands that take it
    "--model": ["chat", "generate", "top", "join", "profile", "bench"],
    "--threads": ["chat", "generate", "top", "join", "profile"],
    "--mem": ["chat", "generate", "top", "join", "profile"],
    "--interface": ["chat", "generate", "top", "join", "peers"],
    "--peer": ["chat", "generate", "top", "join", "peers"],
    "--no-mdns": ["chat", "generate", "top", "join", "peers"],
    "--dtype": ["generate", "profile"],
    "--device": ["generate", "profile"],
}


@pytest.mark.parametrize("option", SHARED)
def test_a_shared_option_means_the_same_everywhere(option):
    actions = [subcommand_options(command)[option] for command in SHARED[option]]
    first = actions[0]
    for action in actions[1:]:
        assert (action.dest, action.default, action.type, action.choices, action.nargs) == \
               (first.dest, first.default, first.type, first.choices, first.nargs)


def test_sizes_parse_the_same_on_every_command():
    for command in SHARED["--mem"]:
        assert subcommand_options(command)["--mem"].type is parse_bytes
