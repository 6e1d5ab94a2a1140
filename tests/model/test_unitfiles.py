"""Unit files: exactly the tensors read_unit returns, deterministic bytes, and a shard loads from them."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from swarm.model.checkpoint import open_checkpoint
from swarm.model.formats import QuantizedTensor
from swarm.model.shard import Shard
from swarm.model.store import weights_fingerprint
from swarm.model.unitcache import HeldModel
from swarm.model.unitfiles import UnitsCheckpoint, file_sha256, holds_units, unit_path
from tests.helpers.gguf import write_gguf

FORMS = [("HF", "float32", None), ("HF", "bfloat16", None), ("HF", "float32", "int8"), ("HF", "float32", "int4"),
         ("Q4_0", "float32", "int4"), ("Q8_0", "float32", "int8"), ("Q4_1", "float32", None)]


@pytest.fixture(scope="module")
def checkpoints(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    out = {"HF": tiny_model_dir}
    for qtype in ("Q4_0", "Q8_0", "Q4_1"):
        out[qtype] = write_gguf(tiny_model_dir, folder / f"tiny-{qtype}.gguf", qtype)
    return out


def same_weight(a, b) -> bool:
    if isinstance(a, QuantizedTensor):
        return (isinstance(b, QuantizedTensor) and a.kind == b.kind
                and all(torch.equal(x, y) for x, y in zip(a.tensors().values(), b.tensors().values()))
                and a.tensors().keys() == b.tensors().keys())
    return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("source,dtype,quant", FORMS)
def test_unit_files_hold_exactly_what_read_unit_returns(checkpoints, tmp_path, source, dtype, quant):
    path = checkpoints[source]
    held = HeldModel(path, weights_fingerprint(path, quant), dtype, quant, root=tmp_path)
    original = open_checkpoint(path)
    num_units = original.layout.num_units
    entries = [held.ensure(unit) for unit in range(num_units)]
    assert holds_units(held.folder, range(num_units))
    from_files = open_checkpoint(held.folder)
    assert isinstance(from_files, UnitsCheckpoint)
    assert from_files.config_dict() == original.config_dict()
    assert from_files.layout.held_weight_bytes(dtype, quant) == original.layout.held_weight_bytes(dtype, quant)
    for unit, entry in enumerate(entries):
        want = original.read_unit(unit, getattr(torch, dtype), quant)
        got = from_files.read_unit(unit, getattr(torch, dtype), quant)
        assert list(got) == list(want)
        assert all(same_weight(got[name], want[name]) for name in want), (unit, [n for n in want if not same_weight(got[n], want[n])])
        assert file_sha256(unit_path(held.folder, unit)) == entry.sha256
        assert unit_path(held.folder, unit).stat().st_size == entry.size
    if quant == "int4" and source == "Q4_0":  # int4 stays 4-bit blocks on disk: half a byte a weight, plus scales
        block = original.read_unit(1, torch.float32, quant)["model.layers.0.mlp.up_proj.weight"]
        assert block.kind == "q4_0"
        assert entries[1].size < sum(t.numel() for t in original.read_unit(1, torch.float32, None).values())


def test_the_same_unit_gives_the_same_bytes_and_a_safetensors_file(checkpoints, tmp_path):
    path = checkpoints["Q4_0"]
    fp = weights_fingerprint(path, "int4")
    a = HeldModel(path, fp, "float32", "int4", root=tmp_path / "a").ensure(2)
    b = HeldModel(path, fp, "float32", "int4", root=tmp_path / "b").ensure(2)
    assert a == b
    with safe_open(str(unit_path(HeldModel(path, fp, "float32", "int4", root=tmp_path / "a").folder, 2)), "pt") as f:
        assert "model.layers.1.mlp.up_proj.weight.codes" in f.keys()


def test_a_flipped_byte_is_found_by_verify_and_the_unit_written_again(checkpoints, tmp_path):
    path = checkpoints["HF"]
    held = HeldModel(path, weights_fingerprint(path), "float32", None, root=tmp_path)
    entry = held.ensure(1)
    file = unit_path(held.folder, 1)
    data = bytearray(file.read_bytes())
    data[-5] ^= 0x01
    file.write_bytes(bytes(data))
    assert held.ensure(1) == entry  # without verify: trusted by its size
    assert file_sha256(file) != entry.sha256
    assert held.ensure(1, verify=True) == entry
    assert file_sha256(file) == entry.sha256


@pytest.mark.parametrize("source,quant", [("HF", None), ("Q4_0", "int4")])
def test_a_shard_loaded_from_unit_files_computes_the_same(checkpoints, tmp_path, source, quant):
    path = checkpoints[source]
    held = HeldModel(path, weights_fingerprint(path, quant), "float32", quant, root=tmp_path)
    num_units = open_checkpoint(path).layout.num_units
    for unit in range(2, num_units):
        held.ensure(unit)
    ids = torch.tensor([[5, 9, 33, 2, 101]])
    first = Shard.load(path, 0, 2, quant=quant)
    hidden = first.step([0], ids)
    want = Shard.load(path, 2, num_units - 1, quant=quant).step([0], hidden)  # hidden states [1, 5, H]
    got = Shard.load(held.folder, 2, num_units - 1, quant=quant).step([0], hidden)
    assert torch.equal(got, want)
    want_logits = Shard.load(path, num_units - 1, num_units, quant=quant).logits(want)
    assert torch.equal(Shard.load(held.folder, num_units - 1, num_units, quant=quant).logits(got), want_logits)
    with pytest.raises(FileNotFoundError):  # units 0 and 1 were never written
        Shard.load(held.folder, 0, 2, quant=quant)
