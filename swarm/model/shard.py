"""A shard: a contiguous range of a model's units with its own weights and KV cache.

The same class serves every position in a chain: the first shard takes token ids,
middle shards take and return hidden states, the shard holding the head samples
and returns token ids, and one shard may hold the whole model. Its decoder blocks are
swarm's compact blocks (``block.py``) over its own kernels (``kernels/``), built unit
by unit from only the tensors of its range.

The KV cache is preallocated (the paper's blocks x batch x (input + generated)
tokens) with one slot per sequence. Each slot keeps its own length, so sequences
with different prompt lengths share a batch without left padding: new tokens are
right-padded, positions start at each slot's own length, and a mask hides what a
row must not see. Every stage of a chain sees the same (slots, lengths) steps, so
the slot lengths stay in step across stages without being sent.
"""

from __future__ import annotations

import ctypes
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from swarm.model import kernels
from swarm.model.block import NATIVE_MAX_WIDTH, Block, BlockShape, rms_norm, rope
from swarm.model.dtypes import dtype_name, torch_dtype
from swarm.model.checkpoint import open_checkpoint
from swarm.model.formats import QuantizedTensor, Weight
from swarm.model.kernels import Linear, embedding
from swarm.model.kernels.native import DecodeTarget
from swarm.model.rotary import rotary_embedding
from swarm.model.sampling import GREEDY, SamplingParams, sample_next
from swarm.model.units import ModelLayout, check_quant

# The rotary embedding's call: (hidden, position ids) -> (cos, sin) (``rotary.rotary_embedding``).
Rotary = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

log = logging.getLogger(__name__)


class SlotKVCache:
    """Preallocated keys and values for a shard's blocks, one slot per sequence.

    Buffers are [slots, kv_heads, max_len, head_dim] per block. The shard calls
    ``begin_step`` once per step; each block then calls ``update`` once, which writes the new keys/values and returns the keys/values
    the batch attends to: [B, kv_heads, span, head_dim].
    """

    def __init__(self, block_ids: Sequence[int], max_slots: int, max_len: int,
                 kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.max_slots, self.max_len = max_slots, max_len
        shape = (max_slots, kv_heads, max_len, head_dim)
        self._index = {block: i for i, block in enumerate(block_ids)}
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in block_ids]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in block_ids]
        self.lengths = [0] * max_slots
        self._write: tuple | None = None
        self._read: slice | torch.Tensor | None = None
        self._span = 0
        self._narrow: list[tuple[int, int]] | None = None  # (slot, position) of each token of a narrow step

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def begin_step(self, slots: Sequence[int], width: int) -> None:
        starts = [self.lengths[s] for s in slots]
        self._span = max(starts) + width
        if self._span > self.max_len:
            raise ValueError(f"sequence would reach {self._span} tokens; the cache holds {self.max_len}")
        first = slots[0]
        narrow = width == 1 or (width <= NATIVE_MAX_WIDTH and min(starts) > 0)
        self._narrow = [(s, p + j) for s, p in zip(slots, starts) for j in range(width)] if narrow else None
        contiguous = list(slots) == list(range(first, first + len(slots)))
        self._read = slice(first, first + len(slots)) if contiguous else torch.tensor(slots)
        if contiguous and len(set(starts)) == 1:
            # One rectangular block: a plain slice write, the common decode case.
            self._write = (self._read, slice(starts[0], starts[0] + width))
        else:
            device = self.keys[0].device if self.keys else "cpu"
            rows = torch.tensor(slots, device=device)[:, None, None]
            heads = torch.arange(self.keys[0].shape[1], device=device)[None, :, None] if self.keys else None
            positions = (torch.tensor(starts, device=device)[:, None] + torch.arange(width, device=device))[:, None, :]
            self._write = (rows, heads, positions)

    def decode_target(self, layer_idx: int, dtype: torch.dtype = torch.float32) -> DecodeTarget | None:
        """For a narrow step in a CPU cache of ``dtype``: where each new token's sequence's keys and
        values are and the position it takes, for a native block to write and read the cache itself
        (row by row, each token attending to its own positions: no mask needed); None for any other step.

        Narrow: one token a row (decode), or at most NATIVE_MAX_WIDTH tokens a row that all follow
        cached ones (a verify step of drafts, a short chat turn). Such a step's tokens are computed
        as that many one-token steps would compute them, bit for bit, without the torch operator
        calls of a wider step: at 135M on one thread each extra token costs about half a one-token
        step (docs/speculative.md). A prefill from an empty slot stays the library's calls."""
        if self._narrow is None:
            return None
        i = self._index[layer_idx]
        keys, values = self.keys[i], self.values[i]
        if keys.dtype != dtype or keys.device.type != "cpu":
            return None
        row = keys.stride(0) * keys.element_size()
        return DecodeTarget([keys.data_ptr() + slot * row for slot, _ in self._narrow],
                            [values.data_ptr() + slot * row for slot, _ in self._narrow],
                            self.max_len, [position for _, position in self._narrow])

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        i = self._index[layer_idx]
        keys, values = self.keys[i], self.values[i]
        if len(self._write) == 2:
            rows, positions = self._write
            keys[rows, :, positions] = key
            values[rows, :, positions] = value
        else:
            keys[self._write] = key
            values[self._write] = value
        span = slice(0, self._span)
        return keys[self._read, :, span], values[self._read, :, span]


@dataclass(frozen=True)
class StepPlan:
    """Per-row bookkeeping of one step: absolute positions, attention mask, last real token."""

    position_ids: torch.Tensor  # int64 [B, T]
    mask: torch.Tensor | None  # bool [B, 1, T, span], or None when plain causal attention is exact
    last_index: torch.Tensor  # int64 [B]: index of each row's last real new token


def plan_step(starts: Sequence[int], real: Sequence[int], width: int, device: torch.device) -> StepPlan:
    start = torch.tensor(starts, device=device)
    offsets = torch.arange(width, device=device)
    position_ids = start[:, None] + offsets
    last_index = torch.tensor(real, device=device) - 1
    same_start = len(set(starts)) == 1
    # sdpa's own causal masking is exact when every row starts at 0, or when a
    # single new token attends to all cached ones (span == start + 1 for every row).
    if same_start and (width == 1 or starts[0] == 0):
        return StepPlan(position_ids, None, last_index)
    span = max(starts) + width
    key_pos = torch.arange(span, device=device)
    mask = key_pos[None, None, :] <= position_ids[:, :, None]  # [B, T, span]
    return StepPlan(position_ids, mask[:, None], last_index)


@dataclass
class ShardWeights:
    """What a shard computes with, unit by unit: any of them may be absent (a middle shard has no embedding)."""

    embedding: Weight | None = None  # [vocab, hidden]
    blocks: list[Block] = field(default_factory=list)
    norm: torch.Tensor | None = None  # [hidden]
    head: Linear | None = None  # hidden -> vocab

    def tensors(self) -> list[torch.Tensor]:
        out = [] if self.embedding is None else _tensors_of(self.embedding)
        for module in [*self.blocks, self.head]:
            if module is not None:
                out += [*module.parameters(), *module.buffers()]
        return out + ([] if self.norm is None else [self.norm])


class Shard:
    """Units [start, end) of a model, ready to run prefill and decode steps."""

    def __init__(self, layout: ModelLayout, start: int, end: int, weights: ShardWeights, rotary: Rotary,
                 norm_eps: float, cache: SlotKVCache, dtype: torch.dtype, device: torch.device,
                 load_seconds: float, quant: str | None = None):
        self.layout, self.start, self.end = layout, start, end
        self.dtype, self.device, self.quant = dtype, device, quant
        self.weights, self.rotary, self.norm_eps = weights, rotary, norm_eps
        self.cache = cache
        self.load_seconds = load_seconds
        self._sampling: list[SamplingParams] = [GREEDY] * cache.max_slots
        self.prefilled_tokens = 0  # new tokens this shard has run, for tests and stats

    # ----------------------------------------------------------------- loading
    @classmethod
    def load(cls, model_dir: Path | str, start: int, end: int, *, max_slots: int = 1, max_len: int = 512,
             dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu",
             quant: str | None = None) -> "Shard":
        """Load units [start, end) of the checkpoint in ``model_dir``, reading only their tensors.

        ``model_dir`` is a Hugging Face folder or a GGUF file (``checkpoint.open_checkpoint``).
        One unit at a time: its tensors are read (and, with ``quant`` "int8" or "int4",
        CPU only, held as GGUF blocks: a file's own Q8_0/Q4_0/Q4_1 blocks as they are) and
        built into its block before the next is read, so the range is never held twice.
        """
        began = time.perf_counter()
        model_dir = Path(model_dir)
        checkpoint = open_checkpoint(model_dir)
        layout = checkpoint.layout
        if not 0 <= start < end <= layout.num_units:
            raise ValueError(f"unit range [{start}, {end}) is not inside [0, {layout.num_units})")
        if max_slots < 1 or max_len < 1:
            raise ValueError("max_slots and max_len must be positive")
        dtype, device, quant = torch_dtype(dtype), torch.device(device), check_quant(quant)
        if quant and device.type != "cpu":
            raise ValueError(f"--quant {quant} runs on swarm's CPU kernels; {device} is not a CPU")
        config = checkpoint.config_dict()
        shape = BlockShape.from_config(config)
        weights = ShardWeights()
        for unit in range(start, end):
            tensors = {name: t.to(device) if isinstance(t, torch.Tensor) else t
                       for name, t in checkpoint.read_unit(unit, dtype, quant).items()}
            if unit == 0:
                weights.embedding = tensors["model.embed_tokens.weight"]
            elif unit == layout.num_units - 1:
                weights.norm = tensors["model.norm.weight"]
                head = tensors["lm_head.weight"]
                if layout.tied_embeddings and weights.embedding is not None and _same_form(head, weights.embedding):
                    head = weights.embedding  # a tied head beside its embedding: one copy
                weights.head = Linear(head)
            else:
                weights.blocks.append(Block(unit - 1, shape, tensors))
            del tensors
            # The float tensors a unit was read (and quantized) from would otherwise stay in the heap,
            # in pieces the next unit's tensors do not fit: the peak would grow by them.
            return_freed_memory()
        rotary = rotary_embedding(config, device)
        block_ids = [block.index for block in weights.blocks]
        cache = SlotKVCache(block_ids, max_slots, max_len, layout.num_kv_heads, layout.head_dim, dtype, device)
        shard = cls(layout, start, end, weights, rotary, shape.rms_norm_eps, cache, dtype, device,
                    time.perf_counter() - began, quant)
        log.info("loaded units [%d, %d) in %.2fs: %.1f MB weights (%s), %.1f MB KV cache", start, end,
                 shard.load_seconds, shard.weight_bytes / 1e6, quant or dtype_name(dtype), cache.nbytes / 1e6)
        return shard

    # ---------------------------------------------------------------- facts
    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.end == self.layout.num_units

    @property
    def hidden_size(self) -> int:
        return self.layout.hidden_size

    @property
    def max_slots(self) -> int:
        return self.cache.max_slots

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    @property
    def kv_cache_bytes(self) -> int:
        return self.cache.nbytes

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weights held (shared storage, such as a tied head, counted once)."""
        seen: dict[int, int] = {}
        for t in self.weights.tensors():
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return sum(seen.values())

    # ---------------------------------------------------------------- slots
    def open_slot(self, slot: int, sampling: SamplingParams = GREEDY) -> None:
        """Start a new sequence in ``slot`` (its old contents are forgotten)."""
        self._check_slot(slot)
        self.cache.lengths[slot] = 0
        self._sampling[slot] = sampling

    def free_slot(self, slot: int) -> None:
        self._check_slot(slot)
        self.cache.lengths[slot] = 0
        self._sampling[slot] = GREEDY

    def slot_length(self, slot: int) -> int:
        return self.cache.lengths[slot]

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.cache.max_slots:
            raise ValueError(f"slot {slot} is outside [0, {self.cache.max_slots})")

    # ---------------------------------------------------------------- compute
    @torch.inference_mode()
    def step(self, slots: Sequence[int], inputs: torch.Tensor, lengths: Sequence[int] | None = None,
             keep: Sequence[int] | None = None, draws: Sequence[int] | None = None) -> torch.Tensor:
        """Run one step for a batch of slots.

        inputs: int64 [B, T] token ids on the first shard, else hidden states [B, T, H].
        lengths: the real new tokens of each row (rows are right-padded to T); None = all T.
        keep: per row, how many cached positions the row keeps before its new tokens (at most
            what the slot holds; fewer drops what a rejected draft left); None = all of them.
        draws: per row, at how many of its last real positions the last shard draws (1 for plain
            decoding, k + 1 to verify k drafted tokens); None = 1 each.
        Returns, on the last shard, int64 [B] next tokens (``draws`` None) or int64 [B, max(draws)]
        (row i's draws in its first draws[i] columns, -1 after); else hidden states [B, T, H].
        """
        slots = list(slots)
        batch, width = inputs.shape[0], inputs.shape[1]
        real = [width] * batch if lengths is None else list(lengths)
        if len(slots) != batch or len(real) != batch or len(set(slots)) != batch:
            raise ValueError(f"need {batch} distinct slots and lengths, got slots={slots} lengths={real}")
        if any(not 1 <= n <= width for n in real):
            raise ValueError(f"lengths must be in [1, {width}], got {real}")
        for slot in slots:
            self._check_slot(slot)
        if draws is not None and (len(draws) != batch or any(not 1 <= d <= n for d, n in zip(draws, real))):
            raise ValueError(f"draws must be {batch} values, each in [1, the row's length], got {draws}")
        if keep is not None:
            self._keep(slots, keep)
        plan = plan_step([self.cache.lengths[s] for s in slots], real, width, self.device)

        w = self.weights
        if self.is_first:
            if inputs.dtype != torch.int64 or inputs.dim() != 2:
                raise ValueError(f"the first shard takes int64 token ids [B, T], got {inputs.dtype} {tuple(inputs.shape)}")
            hidden = embedding(w.embedding, inputs.to(self.device), self.dtype)
        else:
            if inputs.dim() != 3 or inputs.shape[2] != self.hidden_size:
                raise ValueError(f"expected hidden states [B, T, {self.hidden_size}], got {tuple(inputs.shape)}")
            hidden = inputs.to(self.device, self.dtype)

        if w.blocks:
            self.cache.begin_step(slots, width)
            tables = rope(*self.rotary(hidden, plan.position_ids))
            for block in w.blocks:
                hidden = block(hidden, tables, self.cache, plan.mask)
        for slot, n in zip(slots, real):
            self.cache.lengths[slot] += n
        self.prefilled_tokens += sum(real)

        if not self.is_last:
            return hidden
        if draws is not None:
            return self._draw_many(slots, hidden, real, draws)
        last = hidden[torch.arange(batch, device=self.device), plan.last_index]  # [B, H]
        logits = self.logits(last)
        # Each draw is seeded by its position (the slot's length now): a replayed history draws the same.
        params = [self._sampling[s] for s in slots]
        generators = [p.generator_at(self.cache.lengths[s], self.device) for p, s in zip(params, slots)]
        return sample_next(logits, params, generators)

    def _keep(self, slots: Sequence[int], keep: Sequence[int]) -> None:
        """Set each slot back to ``keep`` cached positions: what lies beyond (a rejected draft's
        keys and values) is never attended to again and is overwritten by the next tokens."""
        if len(keep) != len(slots):
            raise ValueError(f"keep needs one value per row, got {len(keep)} for {len(slots)} rows")
        for slot, n in zip(slots, keep):
            if not 0 <= n <= self.cache.lengths[slot]:
                raise ValueError(f"slot {slot} holds {self.cache.lengths[slot]} positions; cannot keep {n}")
        for slot, n in zip(slots, keep):
            self.cache.lengths[slot] = n

    def _draw_many(self, slots: Sequence[int], hidden: torch.Tensor, real: Sequence[int],
                   draws: Sequence[int]) -> torch.Tensor:
        """Draws at each row's last ``draws[i]`` real positions -> int64 [B, max(draws)], -1 padded.

        The draw after position p is seeded by (seed, p + 1), as plain decoding seeds it: a
        verified draft gets exactly the token one-at-a-time decoding would have drawn there."""
        rows, columns, params, generators = [], [], [], []
        for i, (slot, n, d) in enumerate(zip(slots, real, draws)):
            end = self.cache.lengths[slot]  # the slot's length after this step: position of row's last token + 1
            for j in range(d):
                rows.append(i)
                columns.append(n - d + j)
                params.append(self._sampling[slot])
                generators.append(self._sampling[slot].generator_at(end - d + j + 1, self.device))
        picked = hidden[torch.tensor(rows, device=self.device), torch.tensor(columns, device=self.device)]  # [N, H]
        tokens = sample_next(self.logits(picked), params, generators).cpu()  # [N]
        out = torch.full((len(slots), max(draws)), -1, dtype=torch.int64)
        flat = 0
        for i, d in enumerate(draws):
            out[i, :d] = tokens[flat:flat + d]
            flat += d
        return out

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [..., vocab] of hidden states [..., H] (the last shard only)."""
        if not self.is_last:
            raise ValueError("only the last shard holds the output head")
        w = self.weights
        return w.head(rms_norm(hidden, w.norm, self.norm_eps)).float()


def warm_up(model_dir: Path) -> None:
    """Do ahead what a first load of this model would otherwise pay for: open its checkpoint
    (a GGUF file's header), build its rotary embedding and build (or load) the native kernels."""
    rotary_embedding(open_checkpoint(Path(model_dir)).config_dict())
    kernels.kernel_id()


def _same_form(a: Weight, b: Weight) -> bool:
    if isinstance(a, QuantizedTensor) and isinstance(b, QuantizedTensor):
        return a.kind == b.kind and torch.equal(a.scales, b.scales) and torch.equal(a.codes, b.codes)
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)


def _tensors_of(weight: Weight) -> list[torch.Tensor]:
    return list(weight.tensors().values()) if isinstance(weight, QuantizedTensor) else [weight]


def return_freed_memory() -> None:
    """Hand freed heap back to the OS (glibc keeps it otherwise), so the resident size is the
    shard's, as the planner counts it. A no-op where there is no glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
