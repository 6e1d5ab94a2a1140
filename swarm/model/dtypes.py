"""The one table of element types: their names (on the wire, in profiles, on the command
line), their sizes, and their torch types.

Importing it does not import torch (the CLI's option declarations and the model layout
read it); ``torch_dtype`` and ``dtype_name`` do, when called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

FLOAT_DTYPES = ("float32", "float16", "bfloat16")  # what weights, caches and activations may be
WIRE_DTYPES = FLOAT_DTYPES + ("int64", "int32", "uint8")  # what a tensor on the wire may be
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "uint8": 1}


def torch_dtype(dtype: "str | torch.dtype", allowed: tuple[str, ...] = FLOAT_DTYPES) -> "torch.dtype":
    """The torch type of a name in ``allowed`` (a torch type passes through)."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in allowed:
        raise ValueError(f"unknown dtype {dtype!r} (choose from {', '.join(allowed)})")
    return getattr(torch, dtype)


def dtype_name(dtype: "torch.dtype") -> str:
    """torch.float32 -> 'float32' (the name every table here uses)."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_BYTES:
        raise ValueError(f"unsupported dtype {dtype}")
    return name
