"""swarm.model.rotary: the same cos and sin tables as transformers' own rotary embedding, bit for
bit, for every rope type it computes, from config dicts as checkpoints hold them; any other
type comes from transformers itself."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import transformers

from swarm.model import hf
from swarm.model.rotary import RotaryEmbedding, rope_parameters, rotary_embedding

SHAPE = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, vocab_size=64,
             max_position_embeddings=4096)
CONFIGS = {
    "llama default": ("llama", {}),
    "llama theta": ("llama", {"rope_theta": 500000.0}),
    "llama head_dim": ("llama", {"head_dim": 32}),
    "qwen2": ("qwen2", {"rope_theta": 1000000.0}),
    "mistral": ("mistral", {"rope_theta": 1000000.0}),
    "linear (legacy 'type')": ("llama", {"rope_scaling": {"type": "linear", "factor": 4.0}}),
    "llama3 (Llama 3.1)": ("llama", {"rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 128}}),
}


def _theirs(model_type: str, config: dict):
    return hf.build_rotary(hf.config_from_dict({"model_type": model_type, **config}), torch.device("cpu"))


@pytest.mark.parametrize("name", CONFIGS)
def test_tables_equal_the_librarys_bit_for_bit(name):
    model_type, extra = CONFIGS[name]
    config = {"model_type": model_type, **SHAPE, **extra}
    ours, theirs = rotary_embedding(config), _theirs(model_type, {**SHAPE, **extra})
    assert isinstance(ours, RotaryEmbedding)
    assert torch.equal(ours.inv_freq, theirs.inv_freq)
    positions = torch.tensor([[0, 1, 2, 7, 100, 1000, 4095], [5, 6, 7, 8, 9, 10, 11]])
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.zeros(2, 7, 8, dtype=dtype)
        for mine, library in zip(ours(x, positions), theirs(x, positions)):
            assert mine.dtype == library.dtype == dtype and torch.equal(mine, library), (name, dtype)


def test_rope_parameters_read_as_transformers_standardizes_them():
    for _, (model_type, extra) in CONFIGS.items():
        library = getattr(transformers, {"llama": "LlamaConfig", "qwen2": "Qwen2Config",
                                          "mistral": "MistralConfig"}[model_type])(**SHAPE, **extra)
        ours = rope_parameters({**SHAPE, **extra})
        assert {k: v for k, v in ours.items() if k != "type"} == \
            {k: v for k, v in library.rope_parameters.items() if k != "type"}


def test_another_rope_type_comes_from_transformers():
    config = {"model_type": "llama", **SHAPE, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}
    rotary = rotary_embedding(config)
    assert type(rotary).__name__ == "LlamaRotaryEmbedding"


def test_loading_a_shard_never_imports_transformers(smollm2_dir):
    """What the rotary module is for: a peer loads a stage without the library's 2.5 s import."""
    code = ("import sys; from swarm.model.shard import Shard, warm_up; "
            f"warm_up({str(smollm2_dir)!r}); Shard.load({str(smollm2_dir)!r}, 0, 3); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
