"""Shared by the discovery tests: device profiles in the documented JSON format
(docs/architecture.md) for tests that need no real model measured, and stopping the
`swarm join` processes a test started."""

from __future__ import annotations

import signal
import subprocess

STOP_TIMEOUT_S = 10.0  # SIGHUP (an mDNS goodbye, leaving at once), then SIGKILL


def stop_processes(procs: list[subprocess.Popen]) -> None:
    """SIGHUP every process still running, wait, SIGKILL what outlives STOP_TIMEOUT_S."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGHUP)
    for proc in procs:
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def fixture_profile(num_blocks: int = 4, block_decode_s: float = 0.001, mem_bytes: int = 8 << 30,
                    fingerprint: str = "sha256:" + "ab" * 32, hidden: int = 64, name: str = "dev") -> dict:
    units = []
    for i in range(num_blocks + 2):
        kind = "embed" if i == 0 else "head" if i == num_blocks + 1 else f"block.{i - 1}"
        scale = 0.3 if kind in ("embed", "head") else 1.0
        decode = block_decode_s * scale * (1 + 0.01 * i)
        prefill = decode * 7.3
        units.append({"name": kind, "weight_bytes": 1_000_000 + 1000 * i, "kv_bytes_per_token": 512 if kind.startswith("block") else 0,
                      "out_bytes_per_token": hidden * 4 if i <= num_blocks else 8,
                      "prefill_s": prefill, "decode_s": decode, "time_s": (prefill + decode) / 2})
    return {"version": 1,
            "device": {"name": name, "kind": "cpu", "threads": 1, "mem_bytes": mem_bytes},
            "model": {"name": "tiny", "fingerprint": fingerprint, "num_units": num_blocks + 2,
                      "dtype": "float32", "hidden_size": hidden},
            "prefill_tokens": 32, "decode_context": 100, "units": units}
