"""Write a GGUF file of a public model's shape with random Q4_0 or Q8_0 weights, in seconds.

The blocks are random bytes under one small scale, written tensor by tensor: no float32
model is ever made (an 8B one would be 32 GB, and quantizing it in numpy would take an
hour). The file is what llama.cpp's own tools write for a Q4_0 / Q8_0 model: llama's
tensor names, norms in F32, every matrix (embedding and head included) in the one type.

The tokenizer is the default model's (SmolLM2's GPT-2 BPE, its merges and chat
template), its vocabulary padded to the shape's size with unused tokens, so
`swarm generate --model FILE --prompt ...` and llama.cpp both run it as they would a
real model; a token id past SmolLM2's 49,152 decodes as ``<unused_N>``.

    python benchmarks/big_gguf.py --shape llama-8b --type Q4_0 OUT.gguf
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import gguf
import numpy as np

from swarm.model.hf import SHAPES
from swarm.model.store import resolve_model

BLOCK = 32
BLOCK_BYTES = {"Q4_0": 2 + BLOCK // 2, "Q8_0": 2 + BLOCK}
# One scale for every block: Q4_0 codes minus 8 (about 4.6 std) or Q8_0 codes (about 74 std)
# times it give weights of about 0.02 std, like a trained model's, so activations stay finite.
SCALE = {"Q4_0": np.float16(0.0045), "Q8_0": np.float16(0.00027)}
TOKENIZER_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.merges", "tokenizer.chat_template",
                  "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
                  "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token")


def random_blocks(rng: np.random.Generator, rows: int, cols: int, kind: str) -> np.ndarray:
    """[rows, cols / 32 * block bytes] uint8: each block its fp16 scale, then random codes."""
    blocks = rng.integers(0, 256, size=(rows, cols // BLOCK, BLOCK_BYTES[kind]), dtype=np.uint8)
    blocks[:, :, :2] = np.frombuffer(SCALE[kind].tobytes(), dtype=np.uint8)
    return blocks.reshape(rows, -1)


def tensor_shapes(shape: dict) -> list[tuple[str, tuple[int, ...]]]:
    """llama.cpp's tensor names and HF-order shapes ([out, in]) for one model shape."""
    hidden, mlp, vocab = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    head_dim = shape.get("head_dim", hidden // shape["num_attention_heads"])
    q, kv = shape["num_attention_heads"] * head_dim, shape["num_key_value_heads"] * head_dim
    out = [("token_embd.weight", (vocab, hidden))]
    for i in range(shape["num_hidden_layers"]):
        out += [(f"blk.{i}.attn_norm.weight", (hidden,)), (f"blk.{i}.attn_q.weight", (q, hidden)),
                (f"blk.{i}.attn_k.weight", (kv, hidden)), (f"blk.{i}.attn_v.weight", (kv, hidden)),
                (f"blk.{i}.attn_output.weight", (hidden, q)), (f"blk.{i}.ffn_norm.weight", (hidden,)),
                (f"blk.{i}.ffn_gate.weight", (mlp, hidden)), (f"blk.{i}.ffn_up.weight", (mlp, hidden)),
                (f"blk.{i}.ffn_down.weight", (hidden, mlp))]
    out.append(("output_norm.weight", (hidden,)))
    if not shape.get("tie_word_embeddings", False):
        out.append(("output.weight", (vocab, hidden)))
    return out


def _copy_tokenizer(writer: gguf.GGUFWriter, vocab: int) -> None:
    reader = gguf.GGUFReader(str(resolve_model(None)))
    fields = reader.fields
    tokens = list(fields["tokenizer.ggml.tokens"].contents())
    types = list(fields["tokenizer.ggml.token_type"].contents())
    if vocab < len(tokens):
        raise ValueError(f"a vocabulary of {vocab} is smaller than the tokenizer's {len(tokens)}")
    tokens += [f"<unused_{i}>" for i in range(len(tokens), vocab)]
    types += [int(gguf.TokenType.UNUSED)] * (vocab - len(types))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    for key in TOKENIZER_KEYS:
        field = fields.get(key)
        if field is not None:
            writer.add_key_value(key, field.contents(), field.types[-1] if len(field.types) == 1 else field.types[0],
                                 sub_type=field.types[-1] if len(field.types) > 1 else None)


def write_random_gguf(shape_name: str, kind: str, out: Path, seed: int = 0) -> Path:
    shape = SHAPES[shape_name]
    hidden, heads = shape["hidden_size"], shape["num_attention_heads"]
    head_dim = shape.get("head_dim", hidden // heads)
    quant = getattr(gguf.GGMLQuantizationType, kind)
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name(f"random {shape_name} {kind}")
    writer.add_context_length(4096)
    writer.add_embedding_length(hidden)
    writer.add_block_count(shape["num_hidden_layers"])
    writer.add_feed_forward_length(shape["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(shape["num_key_value_heads"])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(500000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(shape["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0 if kind == "Q4_0" else gguf.LlamaFileType.MOSTLY_Q8_0)
    _copy_tokenizer(writer, shape["vocab_size"])

    tensors = tensor_shapes(shape)
    for name, dims in tensors:
        if len(dims) == 1:
            writer.add_tensor_info(name, dims, np.dtype(np.float32), dims[0] * 4)
        else:
            byte_shape = (dims[0], dims[1] // BLOCK * BLOCK_BYTES[kind])
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), byte_shape[0] * byte_shape[1], raw_dtype=quant)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for name, dims in tensors:  # one tensor in memory at a time
        if len(dims) == 1:
            writer.write_tensor_data(np.ones(dims, dtype=np.float32))
        else:
            writer.write_tensor_data(random_blocks(rng, dims[0], dims[1], kind))
    writer.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-8b")
    parser.add_argument("--type", choices=sorted(BLOCK_BYTES), default="Q4_0")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    path = write_random_gguf(args.shape, args.type, args.out, args.seed)
    print(f"{path}: {path.stat().st_size / 2**30:.2f} GiB in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
