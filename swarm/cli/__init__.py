"""The `swarm` command. The only package that touches argv, signals and the terminal.

Each subcommand lives in its own module exposing ``add_parser(subparsers)`` (which
sets ``func`` on its parser) so that ``swarm plan`` never imports torch and
``swarm chat`` is not slowed by the planner's benchmarks. Modules are imported
lazily: only the chosen subcommand's module is loaded.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import NoReturn

# subcommand -> (module, one-line help). Order is the order shown in --help.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "chat": ("swarm.cli.chat", "chat with a model split across the swarm"),
    "generate": ("swarm.cli.generate", "generate a completion for one or more prompts"),
    "serve": ("swarm.cli.serve", "serve the swarm as an OpenAI-compatible HTTP API"),
    "join": ("swarm.cli.join", "profile this device, serve shards and announce it"),
    "peers": ("swarm.cli.peers", "list the peers announced on the network"),
    "top": ("swarm.cli.top", "live topology view of the swarm"),
    "plan": ("swarm.cli.plan", "plan device selection and partition for a problem file"),
    "profile": ("swarm.cli.profile", "measure this device for a model"),
    "bench": ("swarm.cli.bench", "benchmark the pipeline against the single-process path"),
    "serve-shard": ("swarm.cli.shard", "serve one shard server (tests, benchmarks)"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swarm", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if a in SUBCOMMANDS), None)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_parser(sub)
        else:
            # A placeholder keeps `swarm --help` complete without importing every module.
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
        format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


def run() -> NoReturn:
    """`swarm` and `python -m swarm`: ``main()``, then exit without the interpreter's teardown.

    When ``main()`` returns, every socket, process and file it opened is closed; what is
    left is Python freeing torch's and transformers' modules an object at a time: 0.4 s
    after importing torch, 1.0 s after transformers' Llama modules (measured here). Every
    peer that leaves and every command that ends would wait for it."""
    try:
        code = main()
    except SystemExit as exc:  # argparse's errors, SystemExit("error: ...")
        code = exc.code
        if code is not None and not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it
            pass
    os._exit(code or 0)


if __name__ == "__main__":
    run()
