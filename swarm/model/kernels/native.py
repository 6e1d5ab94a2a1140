"""The compiled kernels of native.c: built once per machine with the system's C compiler, loaded with ctypes.

The shared library is built at first use into ``cache_root()/kernels/<hash>/``, the
hash covering the source, the compiler's version and the flags, so an edited
kernel or a new compiler gets a build of its own. ``-march=native`` makes the
build this CPU's (AVX-512 VNNI or AVX2 where it has them); OpenMP splits rows over threads where the
compiler has it. Concurrent peers take a file lock, so one builds and the others
load. With no compiler (or a failing build) ``library()`` returns None and
``swarm.model.kernels`` computes on its torch path instead.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from swarm.model.formats import QuantizedTensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native.c")
ABI = 4  # swarm_kernels_abi() of the source this module calls
KIND_CODES = {"q8_0": 0, "q4_0": 1, "q4_1": 2}
FLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-march=native"], ["-O3"])


class NativeKernels:
    """Typed calls into the built library."""

    def __init__(self, lib: ctypes.CDLL, path: Path):
        self.path = path
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        self._quant = lib.swarm_matmul_quant
        self._quant.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, ptr, ptr, i64, ptr, ctypes.c_int]
        self._quant.restype = ctypes.c_int
        self._bf16 = lib.swarm_matmul_bf16
        self._bf16.argtypes = [ptr, ctypes.c_int, i64, i64, ptr, i64, ptr, ctypes.c_int]
        self._bf16.restype = ctypes.c_int
        self._f32 = lib.swarm_matmul_f32
        self._f32.argtypes = [ptr, i64, i64, ptr, i64, ptr, ctypes.c_int]
        self._f32.restype = ctypes.c_int
        self._block = lib.swarm_block_decode
        self._block.argtypes = [ptr, i64, ctypes.c_int, i64, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_float,
                                ctypes.c_float, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, ptr, ctypes.c_int]
        self._block.restype = ctypes.c_int
        self.simd = {512: "avx512", 2: "avx2"}.get(lib.swarm_kernels_simd(), "plain C")

    def matmul(self, x: torch.Tensor, weight: QuantizedTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., K] (float32 or bfloat16) @ W.T -> [..., N], in x's dtype."""
        return self.matmul_parts(x, weight.kind, weight.codes, weight.scales, weight.mins, bias)

    def matmul_parts(self, x: torch.Tensor, kind: str, codes: torch.Tensor, scales: torch.Tensor,
                     mins: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
        """``matmul`` of a weight given as its contiguous parts (Linear's decode path: no objects built,
        x's leading dimensions taken as rows without a reshape)."""
        n, k = scales.shape[0], x.shape[-1]
        rows = x.numel() // k
        dtype = x.dtype
        xf = x if dtype == torch.float32 and x.is_contiguous() else x.to(torch.float32).contiguous()
        out = torch.empty(*x.shape[:-1], n, dtype=torch.float32)
        rc = self._quant(KIND_CODES[kind], xf.data_ptr(), rows, k, codes.data_ptr(), scales.data_ptr(),
                         None if mins is None else mins.data_ptr(), n, out.data_ptr(), torch.get_num_threads())
        if rc != 0:
            raise MemoryError(f"no memory for a [{rows}, {k}] activation buffer")
        if bias is not None:
            out += bias if bias.dtype == torch.float32 else bias.to(torch.float32)
        return out if dtype == torch.float32 else out.to(dtype)

    def matmul_bf16(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x [..., K] @ W.T for a bfloat16 W [N, K]: float32 sums of exact bf16 products, out in x's dtype."""
        n, k = weight.shape
        rows = x.numel() // k
        # a bfloat16 x goes in as it is (the AVX-512 kernel multiplies bf16 pairs); anything else as float32
        xc = x if x.dtype in (torch.bfloat16, torch.float32) else x.to(torch.float32)
        xc = xc.contiguous()
        out = torch.empty(*x.shape[:-1], n, dtype=torch.float32)
        rc = self._bf16(xc.data_ptr(), int(xc.dtype == torch.bfloat16), rows, k, weight.data_ptr(), n,
                        out.data_ptr(), torch.get_num_threads())
        if rc != 0:
            raise MemoryError(f"no memory for a [{rows}, {k}] activation buffer")
        return out if x.dtype == torch.float32 else out.to(x.dtype)

    def matmul_f32(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x [..., K] @ W.T for float32 x and W [N, K] (decode: a few rows of x), float32 sums in the
        kernel's own order: within float32 rounding of torch's product, not its bits."""
        n, k = weight.shape
        xc = x.contiguous()
        out = torch.empty(*x.shape[:-1], n, dtype=torch.float32)
        self._f32(xc.data_ptr(), xc.numel() // k, k, weight.data_ptr(), n, out.data_ptr(), torch.get_num_threads())
        return out


class BlockDecoder:
    """swarm_block_decode's arguments for one decoder block, built once: a decode step (one new token of
    each sequence of a batch) then costs one call per block (see native.c). The tensors are kept referenced, so
    the addresses handed to C stay valid for the decoder's life (a buffer replaced on the block
    afterwards would not be seen: blocks are built once and never moved)."""

    WEIGHT_KINDS = {**KIND_CODES, "bfloat16": 3, "float32": 4}

    def __init__(self, lib: NativeKernels, linears: list, norm1: torch.Tensor, norm2: torch.Tensor,
                 heads: int, kv_heads: int, head_dim: int, eps: float, scale: float):
        # linears: the block's fused q/k/v, o, fused gate/up and down Linears, quantized, bfloat16 or float32;
        # the norms' dtype (float32 or bfloat16) is the activations', the biases' and the cache's
        self._lib = lib
        self.dtype = norm1.dtype
        parts = [(lin.codes, lin.scales, lin.mins, lin.bias) if lin.quantized else (lin.dense, None, None, lin.bias)
                 for lin in linears]
        self._keep = [norm1, norm2] + [t for group in parts for t in group if t is not None]
        self._kinds = (ctypes.c_int * 4)(*[self.WEIGHT_KINDS[lin.kind] for lin in linears])
        self._parts = (ctypes.c_void_p * 16)(*[None if t is None else t.data_ptr() for group in parts for t in group])
        self._shapes = (ctypes.c_int64 * 8)(*[d for lin in linears for d in (lin.out_features, lin.in_features)])
        self._fixed = (int(self.dtype == torch.bfloat16), norm1.shape[0], heads, kv_heads, head_dim, eps, scale,
                       norm1.data_ptr(), norm2.data_ptr())

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, target: "DecodeTarget") -> torch.Tensor:
        """x [B, T, H] in ``dtype`` -> the block's output; cos, sin: contiguous [B, ..., T, dim] tables;
        ``target``: for each of the B x T tokens, row by row, where its sequence's cache is and the
        position it is written at (``DecodeTarget``). A sequence's tokens are rows in order: each is
        written before the next attends to it."""
        out = x.clone(memory_format=torch.contiguous_format)
        bf16, hidden, heads, kv, dim, eps, scale, n1, n2 = self._fixed
        rc = self._lib._block(out.data_ptr(), x.shape[0] * x.shape[1], bf16, hidden, heads, kv, dim, eps, scale, n1, n2,
                              self._kinds, self._parts, self._shapes, cos.data_ptr(), sin.data_ptr(), target.keys,
                              target.values, target.max_len, target.positions, torch.get_num_threads())
        if rc != 0:
            raise MemoryError("no memory for a decode block's scratch buffers")
        return out


class DecodeTarget:
    """The caches a native step writes and reads in one block, per new token (a row): the addresses of its
    sequence's keys and values [kv_heads, max_len, head_dim] and the position it takes."""

    def __init__(self, keys: list[int], values: list[int], max_len: int, positions: list[int]):
        self.keys = (ctypes.c_void_p * len(keys))(*keys)
        self.values = (ctypes.c_void_p * len(values))(*values)
        self.positions = (ctypes.c_int64 * len(positions))(*positions)
        self.max_len = max_len


def compiler() -> str | None:
    cc = os.environ.get("CC", "cc")
    return shutil.which(cc)


def _compiler_version(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _build(cc: str, directory: Path) -> Path | None:
    """Compile native.c into ``directory`` with the first flag set that works."""
    target = directory / "libswarmkernels.so"
    for flags in FLAG_SETS:
        with tempfile.TemporaryDirectory(dir=directory) as scratch:
            out = Path(scratch) / target.name
            result = subprocess.run([cc, *flags, "-shared", "-fPIC", "-o", str(out), str(SOURCE), "-lm"],
                                    capture_output=True, text=True)
            if result.returncode == 0:
                os.replace(out, target)  # atomic: a reader sees a whole library or none
                log.info("built the native kernels with %s %s", cc, " ".join(flags))
                return target
            log.debug("kernel build with %s failed: %s", flags, result.stderr.strip()[:500])
    log.warning("could not build the native kernels with %s; using the torch kernels", cc)
    return None


@lru_cache(maxsize=1)
def library() -> NativeKernels | None:
    """The built kernels, or None where there is no working C compiler."""
    cc = compiler()
    if cc is None:
        log.info("no C compiler (%s): using the torch kernels", os.environ.get("CC", "cc"))
        return None
    from swarm.model.store import cache_root

    key = hashlib.sha256(SOURCE.read_bytes() + _compiler_version(cc).encode() + repr(FLAG_SETS).encode())
    directory = cache_root() / "kernels" / key.hexdigest()[:16]
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / "libswarmkernels.so"
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one peer builds, the others wait and load
        if not target.exists() and _build(cc, directory) is None:
            return None
    try:
        lib = ctypes.CDLL(str(target))
        if lib.swarm_kernels_abi() != ABI:
            raise OSError(f"ABI {lib.swarm_kernels_abi()} != {ABI}")
    except OSError as e:
        log.warning("could not load %s (%s); using the torch kernels", target, e)
        return None
    return NativeKernels(lib, target)
