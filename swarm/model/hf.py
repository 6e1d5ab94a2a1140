"""Everything swarm needs from transformers, in one module.

The rest of swarm never imports transformers: it asks this module for a config,
for the library's own unit modules (embedding, decoder layers, norm, head, rotary
embedding) and for a tokenizer. Keeping the dependency here means a transformers
upgrade touches one file, and the planner, runtime and view stay light.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn

import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from swarm.model.unitfiles import MANIFEST
from swarm.model.units import SUPPORTED_MODEL_TYPES, UnsupportedModelError

log = logging.getLogger(__name__)


def _is_gguf(path: Path) -> bool:
    return Path(path).is_file()  # a checkpoint that is one file is a GGUF file


def load_config(model_dir: Path) -> PretrainedConfig:
    """The config of a Hugging Face folder, or the one transformers derives from a GGUF file.

    A GGUF file's comes from swarm's own header reader (what transformers derives, checked
    in tests/model/test_gguf.py): transformers decodes the whole vocabulary for it, 4 s
    for the default model, and every shard load and every profiled unit asks."""
    model_dir = Path(model_dir)
    if _is_gguf(model_dir):
        from swarm.model import gguf

        return config_from_dict(gguf.open_file(model_dir).config, model_dir)
    if (model_dir / MANIFEST).is_file():  # unit files fetched from a holder: the manifest has the config
        return config_from_dict(json.loads((model_dir / MANIFEST).read_text())["config"], model_dir)
    return _checked(AutoConfig.from_pretrained(model_dir), model_dir)


def config_from_dict(config_dict: dict, source: Path | str = "checkpoint") -> PretrainedConfig:
    """A config from a config.json-style dict (``Checkpoint.config_dict()``)."""
    config_dict = dict(config_dict)
    model_type = config_dict.pop("model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"{source}: model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    return _checked(AutoConfig.for_model(model_type, **config_dict), source)


def _checked(config: PretrainedConfig, source) -> PretrainedConfig:
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"{source}: model_type {config.model_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    # sdpa is exact for float32 and the fastest portable kernel; pin it so a
    # checkpoint asking for flash attention still loads on a CPU peer.
    config._attn_implementation = "sdpa"
    return config


def build_rotary(config: PretrainedConfig, device: torch.device) -> nn.Module:
    """The family's own rotary embedding (it holds the rope scaling: Llama 3's, Qwen2's)."""
    module = importlib.import_module(f"transformers.models.{config.model_type}.modeling_{config.model_type}")
    rotary = next(getattr(module, name) for name in dir(module) if name.endswith("RotaryEmbedding"))
    with torch.device(device):
        return rotary(config=config)


def tied_embeddings(config: PretrainedConfig) -> bool:
    return bool(getattr(config, "tie_word_embeddings", False))


def load_tokenizer(model_dir: Path):
    """The tokenizer (with its chat template) of a Hugging Face folder or a GGUF file.

    Building one from a GGUF file's vocabulary takes seconds (5 s for SmolLM2's), so the
    result is saved once under the cache, keyed by the file's path, size and mtime.
    """
    model_dir = Path(model_dir)
    if not _is_gguf(model_dir):
        return AutoTokenizer.from_pretrained(model_dir)
    from swarm.model.store import cache_root

    st = model_dir.resolve().stat()
    key = hashlib.sha256(f"{model_dir.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:32]
    saved = cache_root() / "tokenizers" / key
    if (saved / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(saved)
    tokenizer = AutoTokenizer.from_pretrained(model_dir.parent, gguf_file=model_dir.name)
    saved.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=saved.parent))
    try:
        tokenizer.save_pretrained(staging)
        os.replace(staging, saved)  # atomic publish; a peer saving it too keeps the first
    except OSError:
        pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return tokenizer


def generation_eos_ids(model_path: Path) -> tuple[int, ...]:
    """The end ids of a model folder's generation_config.json (none for a GGUF file, whose
    tokenizer carries its end of sequence); feed them to ``stopping.stop_token_ids``."""
    path = Path(model_path) / "generation_config.json"
    if _is_gguf(Path(model_path)) or not path.exists():
        return ()
    eos = json.loads(path.read_text()).get("eos_token_id")
    return tuple(eos if isinstance(eos, list) else [eos] if eos is not None else [])


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_token_ids(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a conversation rendered with the model's own chat template."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    if isinstance(out, dict) or hasattr(out, "keys"):  # BatchEncoding in transformers 5
        out = out["input_ids"]
    return list(out)


def save_tiny_llama(out_dir: Path, seed: int = 0, model_type: str = "llama") -> Path:
    """A tiny random model (no download) for fast tests: 4 layers, hidden 64.

    Weights are drawn with a larger spread than the library default so that
    logits are well separated and greedy decoding is not decided by rounding.
    """
    common = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        initializer_range=0.2,
    )
    config_cls = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "mistral": transformers.MistralConfig,
    }[model_type]
    config = config_cls(**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out_dir)
    return Path(out_dir)


def reference_model(model_dir: Path, dtype: torch.dtype = torch.float32):
    """The whole model as transformers loads it: the reference for exactness checks.

    ``model_dir`` is a Hugging Face folder or a GGUF file (which transformers dequantizes
    to float32 whole: fine for a reference, never for serving)."""
    model_dir = Path(model_dir)
    if model_dir.is_file():
        model = AutoModelForCausalLM.from_pretrained(model_dir.parent, gguf_file=model_dir.name, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.config._attn_implementation = "sdpa"
    return model.eval()


# Public configs' shapes (random weights, no download) for memory and speed at scale.
SHAPES = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, head_dim=64),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, head_dim=128),
}


def save_random_checkpoint(out_dir: Path, shape: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                           on_unit: Callable[[int, int], None] | None = None) -> Path:
    """A Llama of a public model's shape with random weights, written one layer at a time.

    The model is never built in memory (an 8B shape in float32 would take 32 GB): the
    skeleton is on the meta device, and each layer's tensors are drawn, written to a
    safetensors file of their own (with an index, as large checkpoints are shipped)
    and dropped. Weights ~ N(0, 0.02), norms 1, as the library initialises them.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = transformers.LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, bos_token_id=1,
                                      eos_token_id=2, rope_theta=500000.0)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    groups: dict[str, dict[str, tuple]] = {}
    for name, tensor in skeleton.state_dict().items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        part = name.split(".")[2] if name.startswith("model.layers.") else name.split(".")[1]
        groups.setdefault(part, {})[name] = tuple(tensor.shape)
    generator = torch.Generator().manual_seed(seed)
    weight_map = {}
    for i, (part, tensors) in enumerate(groups.items()):
        file = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        data = {}
        for name, shape in tensors.items():
            if name.endswith("norm.weight"):
                data[name] = torch.ones(shape, dtype=dtype)
            else:
                data[name] = (torch.randn(shape, generator=generator) * config.initializer_range).to(dtype)
            weight_map[name] = file
        save_file(data, str(out_dir / file), metadata={"format": "pt"})
        del data
        if on_unit:
            on_unit(i + 1, len(groups))
    (out_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.torch_dtype = dtype
    config.save_pretrained(out_dir)
    return out_dir
