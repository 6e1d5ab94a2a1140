"""Write a Hugging Face Llama folder as an F32 GGUF file, one tensor at a time (for llama.cpp side by side).

llama.cpp's own converter needs the model's tokenizer; the random checkpoints of
``hf.save_random_checkpoint`` have none, so this writes the tensors under llama.cpp's
names (q/k rows permuted into its rotary layout, as convert_hf_to_gguf.py does) with a
placeholder vocabulary of the right size. Token ids are what the benchmarks compare, so
the vocabulary's strings do not matter. llama-quantize then makes Q8_0 / Q4_0 files from it.

    python benchmarks/gguf_files.py MODEL_DIR OUT.gguf
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors import safe_open

from swarm.model.units import ModelLayout

NAMES = {  # HF suffix -> llama.cpp suffix, inside a block
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, index, rest = hf_name.split(".", 3)
    return f"blk.{index}.{NAMES[rest]}"


def permute_for_rotary(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: HF's rotate-half rows to llama.cpp's interleaved pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_f32_gguf(model_dir: Path, out: Path) -> Path:
    config = json.loads((model_dir / "config.json").read_text())
    layout = ModelLayout.read(model_dir)
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_context_length(config.get("max_position_embeddings", 4096))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(layout.head_dim)
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-5)))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    vocab = config["vocab_size"]
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"<t{i}>" for i in range(vocab)])
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types([gguf.TokenType.NORMAL] * vocab)
    writer.add_bos_token_id(config.get("bos_token_id", 1))
    writer.add_eos_token_id(config.get("eos_token_id", 2))

    tensors = [(name, path, entry) for name, (path, entry) in layout.tensor_locations.items()]
    for name, _, entry in tensors:
        shape = entry["shape"]
        writer.add_tensor_info(gguf_name(name), shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, path, _ in tensors:  # one tensor in memory at a time
        with safe_open(str(path), framework="pt") as f:
            w = f.get_tensor(name).to(torch.float32).numpy()
        if name.endswith("q_proj.weight"):
            w = permute_for_rotary(w, heads)
        elif name.endswith("k_proj.weight"):
            w = permute_for_rotary(w, kv_heads)
        writer.write_tensor_data(np.ascontiguousarray(w))
    writer.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    print(write_f32_gguf(args.model_dir, args.out))


if __name__ == "__main__":
    main()
