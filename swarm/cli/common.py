"""Terminal helpers shared by several subcommands (their shared options: swarm.cli.options)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from rich.console import Console

def check_device(device: str) -> None:
    import torch

    kind = device.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda asked for, but torch sees no CUDA device")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise SystemExit("error: --device mps asked for, but torch sees no Apple MPS device")
    if kind not in ("cpu", "cuda", "mps"):
        raise SystemExit(f"error: unknown device {device!r} (cpu, cuda, cuda:N, mps)")


def resolve_model_with_status(model: str | None, console: Console) -> Path:
    """The model folder or GGUF file (the default model is the wheel's GGUF file, read in place).

    Raises swarm.model.store.ModelNotFoundError; each command words it its own way."""
    from swarm.model.store import resolve_model

    return resolve_model(model)


def resolve_model_or_exit(model: str | None, console: Console) -> Path:
    from swarm.model.store import ModelNotFoundError

    try:
        return resolve_model_with_status(model, console)
    except ModelNotFoundError as err:
        raise SystemExit(f"error: {err}") from None


@contextlib.contextmanager
def unit_progress(console: Console, description: str):
    """A progress bar fed by on_unit(index, total, name) callbacks."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[unit]}"),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task(description, total=None, unit="")

        def on_unit(index: int, total: int, name: str) -> None:
            progress.update(task, completed=index, total=total, unit=name)

        yield on_unit


# ---------------------------------------------------------------- the swarm secret

INSECURE_WARNING = ("warning: --insecure: nothing is encrypted or authenticated. Anyone on this network can read "
                    "prompts from the hidden states on the wire, join this swarm and drive its peers.")


def add_secret_arguments(parser: argparse.ArgumentParser) -> None:
    """--join-code and --insecure, for every command that talks to a swarm."""
    parser.add_argument("--join-code", metavar="CODE", default=None,
                        help="the swarm's join code (printed by the first `swarm join`); `swarm join` stores it. "
                             "Default: $SWARM_SECRET, else the stored secret")
    parser.add_argument("--insecure", action="store_true",
                        help="no encryption and no authentication: only on a network you trust completely")


def use_swarm_secret(args: argparse.Namespace, *, store: bool = False) -> None:
    """Settle which swarm this process (and the peers it starts) belongs to, before any socket exists.

    ``store`` (`swarm join`): a given code is kept for next time, and the first device creates the
    swarm's secret. ``--local N`` makes a fresh secret for the peers it starts (they inherit it
    through SWARM_SECRET). Without a secret the command exits saying how to get one.
    """
    import os
    import sys

    from swarm import secret

    # SWARM_INSECURE=1: a peer started by `swarm chat --local N --insecure` is insecure too.
    if args.insecure or (os.environ.get(secret.INSECURE_VARIABLE) == "1" and not args.join_code):
        print(INSECURE_WARNING, file=sys.stderr, flush=True)
        os.environ[secret.INSECURE_VARIABLE] = "1"  # and for the peers this process starts
        secret.use(secret.INSECURE)
        return
    os.environ.pop(secret.INSECURE_VARIABLE, None)
    if getattr(args, "local", None) and not args.join_code:
        chosen = secret.SwarmSecret.new()
    else:
        try:
            chosen = secret.resolve(args.join_code)
        except secret.SecretError as err:
            raise SystemExit(f"error: {err}") from None
        if store and args.join_code and chosen != secret.load_stored():
            path = secret.store(chosen)
            print(f"joined swarm {chosen.swarm_id}: its join code is stored in {path}", file=sys.stderr, flush=True)
        elif store and chosen is None:
            chosen = secret.SwarmSecret.new()
            path = secret.store(chosen)
            print(f"created a new swarm ({chosen.swarm_id}); its secret is stored in {path}.\n"
                  f"To add another device to it, run there:\n\n    swarm join --join-code {chosen.join_code}\n",
                  file=sys.stderr, flush=True)
        if chosen is None:
            raise SystemExit(f"error: {secret.HOW_TO_GET_ONE}")
    os.environ[secret.ENV_VARIABLE] = chosen.join_code  # peers this process starts join the same swarm
    secret.use(chosen)
