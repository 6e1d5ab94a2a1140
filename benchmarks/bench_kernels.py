"""Decode products of swarm's native kernels alone, per weight format, A/B against another version of native.c.

One "step" runs a one-token x through every product of a model's decoder blocks (fused
q/k/v, o, fused gate/up, down; random weights of the shape's sizes) in order, so the
weights are read from memory as a real decode step reads them (the blocks together are
larger than the caches at the 1B shape). With ``--against FILE.c`` a second build of
another native.c (e.g. ``git show BASE:swarm/model/kernels/native.c > old.c``) runs in
the same process, interleaved round by round with this one: its ratio to this build is
what a change of kernel bought, with the machine's load landing on both. Prints each
format's median ms per step, its effective read bandwidth (weight bytes / step time)
and this machine's own single-thread read bandwidth (bench_shard.py's measure). f32 against a
native.c without a float32 kernel (kernels 4 and before) is the native kernel against the BLAS.

    python benchmarks/bench_kernels.py [--shape llama-1b] [--formats q4_0,q4_1,q8_0,bf16,f32]
        [--rounds 15] [--threads 1] [--rows 1] [--against old.c]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from swarm.model.formats import BLOCK
from swarm.model.kernels import native

from bench_shard import read_bandwidth  # noqa: E402  (benchmarks/ is on sys.path when this script runs)

SHAPES = {  # hidden, q/k/v outputs, MLP width, blocks
    "smollm2-135m": (576, 576 + 2 * 192, 1536, 30),
    "llama-1b": (2048, 2048 + 2 * 512, 8192, 16),
}
def weight(kind: str, n: int, k: int) -> dict[str, torch.Tensor]:
    """Random codes and float16 scales (and mins) of a [n, k] matrix, or a bfloat16 or float32 one."""
    if kind in ("bf16", "f32"):
        dense = torch.randn(n, k) * 0.02
        return {"dense": dense.bfloat16() if kind == "bf16" else dense}
    blocks = k // BLOCK
    codes = (torch.randint(-127, 128, (n, k), dtype=torch.int8) if kind == "q8_0"
             else torch.randint(0, 256, (n, k // 2), dtype=torch.uint8))
    parts = {"codes": codes, "scales": (torch.rand(n, blocks) * 0.01).half()}
    if kind == "q4_1":
        parts["mins"] = (-torch.rand(n, blocks) * 0.08).half()
    return parts


class Build:
    """One build of a native.c, called through ctypes with any ABI (1: float32 x only for bf16; below 3: no
    float32 kernel, so f32 products are torch's F.linear, the BLAS, as those versions computed them)."""

    def __init__(self, lib: ctypes.CDLL, name: str):
        self.name, self.lib = name, lib
        self.abi = lib.swarm_kernels_abi()
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.swarm_matmul_quant.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, ptr, ptr, i64, ptr, ctypes.c_int]
        lib.swarm_matmul_bf16.argtypes = ([ptr, ctypes.c_int, i64, i64, ptr, i64, ptr, ctypes.c_int] if self.abi >= 2
                                          else [ptr, i64, i64, ptr, i64, ptr, ctypes.c_int])
        if self.abi >= 3:
            lib.swarm_matmul_f32.argtypes = [ptr, i64, i64, ptr, i64, ptr, ctypes.c_int]

    def product(self, kind: str, x: torch.Tensor, w: dict[str, torch.Tensor], out: torch.Tensor, threads: int) -> None:
        m, k = x.shape
        if kind == "f32":
            dense = w["dense"]
            if self.abi >= 3:
                self.lib.swarm_matmul_f32(ctypes.c_void_p(x.data_ptr()), m, k, ctypes.c_void_p(dense.data_ptr()),
                                          dense.shape[0], ctypes.c_void_p(out.data_ptr()), threads)
            else:
                torch.nn.functional.linear(x, dense, out=out)
            return
        if kind == "bf16":
            dense = w["dense"]
            if self.abi >= 2:  # the shard's bfloat16 path hands its bfloat16 x over as it is
                self.lib.swarm_matmul_bf16(x.data_ptr(), int(x.dtype == torch.bfloat16), m, k, dense.data_ptr(),
                                           dense.shape[0], out.data_ptr(), threads)
            else:
                xf = x.float()
                self.lib.swarm_matmul_bf16(xf.data_ptr(), m, k, dense.data_ptr(), dense.shape[0], out.data_ptr(),
                                           threads)
            return
        mins = w.get("mins")
        self.lib.swarm_matmul_quant(native.KIND_CODES[kind], x.data_ptr(), m, k, w["codes"].data_ptr(),
                                    w["scales"].data_ptr(), None if mins is None else mins.data_ptr(),
                                    w["scales"].shape[0], out.data_ptr(), threads)


def build_other(source: Path, directory: Path) -> Build:
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / "libother.so"
    subprocess.run([native.compiler() or "cc", *native.FLAG_SETS[0], "-shared", "-fPIC", "-o", str(out), str(source),
                    "-lm"], check=True)
    return Build(ctypes.CDLL(str(out)), source.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-1b")
    parser.add_argument("--formats", default="q4_0,q4_1,q8_0,bf16")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, default=1, help="rows of x (1: decode; more: a prefill's tokens)")
    parser.add_argument("--against", type=Path, action="append", default=[],
                        help="another native.c to compare with (repeatable)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    this = native.library()
    assert this is not None, "no C compiler: nothing to measure"
    builds = [Build(ctypes.CDLL(str(this.path)), f"this ({this.simd})")]
    scratch = tempfile.TemporaryDirectory()
    for i, source in enumerate(args.against):
        builds.append(build_other(source, Path(scratch.name) / str(i)))
    hidden, qkv, mlp, blocks = SHAPES[args.shape]
    sizes = [(qkv, hidden), (hidden, hidden), (2 * mlp, hidden), (hidden, mlp)]
    bandwidth = read_bandwidth(torch.get_num_threads())
    print(f"{args.shape}, {args.threads} thread(s), x rows {args.rows}, {args.rounds} rounds; "
          f"load average {os.getloadavg()[0]:.2f}; read bandwidth {bandwidth / 1e9:.1f} GB/s")
    for kind in args.formats.split(","):
        torch.manual_seed(0)
        layers = [[weight(kind, n, k) for n, k in sizes] for _ in range(blocks)]
        nbytes = sum(t.numel() * t.element_size() for layer in layers for w in layer for t in w.values())
        dtype = torch.bfloat16 if kind == "bf16" else torch.float32
        xs = {k: torch.randn(args.rows, k).to(dtype) for k in (hidden, mlp)}
        outs = {n: torch.empty(args.rows, n) for n, _ in sizes}

        def step(build: Build) -> float:
            began = time.perf_counter()
            for layer in layers:
                for (n, k), w in zip(sizes, layer):
                    build.product(kind, xs[k], w, outs[n], args.threads)
            return time.perf_counter() - began

        for build in builds:
            step(build)  # warm-up
        times: dict[str, list[float]] = {b.name: [] for b in builds}
        for r in range(args.rounds):
            for build in builds[r % len(builds):] + builds[:r % len(builds)]:  # rotate which goes first
                times[build.name].append(step(build))
        base = statistics.median(times[builds[0].name])
        for build in builds:
            med = statistics.median(times[build.name])
            print(f"  {kind:5s} {build.name:22s} {1000 * med:8.2f} ms/step  {nbytes / med / 1e9:5.1f} GB/s "
                  f"({100 * nbytes / med / bandwidth:3.0f}%)  x{med / base:.2f}  ({nbytes / 1e6:.0f} MB)")
        del layers
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
