"""The wire format between peers: one msgpack header frame, then one raw frame per tensor.

    frame 0: msgpack map {"v": version, "k": kind, "id": request id, "re": reply-to id,
                          "t": [[dtype, shape], ...], ...kind-specific fields}
    frame 1..n: each tensor's bytes, C order, native little-endian

Tensors are sent without copies (their storage is handed to zmq as a buffer) and
come back without copies (``torch.frombuffer`` on the received frame). No pickle:
a peer only ever parses msgpack maps of plain values. Every field is validated
before use, unknown fields are dropped, and anything wrong raises ``WireError``
whose text names the problem, so the server can send it back and carry on.
"""

from __future__ import annotations

import enum
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import msgpack
import torch

from swarm.model.dtypes import WIRE_DTYPES, torch_dtype

PROTOCOL_VERSION = 2  # 2: steps travel on a separate data socket

# Received tensors are read-only views of zmq's frames (no copy), which torch warns
# about once per call site; nothing downstream writes to a step's input. One narrow
# filter at import, not a catch_warnings block per tensor on the hot path.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


class Kind(str, enum.Enum):
    """Message kinds. Requests carry an ``id``; their replies carry ``re`` = that id."""

    STEP = "step"  # hidden states of one micro-batch step, travelling down the chain
    TOKENS = "tokens"  # next token per row, last stage -> source
    LOAD = "load"  # load a unit range; reply READY
    READY = "ready"
    UNLOAD = "unload"  # drop the shard and the link to the next stage; reply OK
    OPEN = "open"  # (re)start KV slots with sampling params; reply OK
    CLOSE = "close"  # free KV slots; reply OK
    PING = "ping"  # heartbeat; reply PONG with status and stage stats
    PONG = "pong"
    PROBE = "probe"  # bandwidth/RTT probe: payload is sunk, reply carries reply_bytes bytes
    INFO = "info"  # reply INFO with the dict the peer was started with
    OK = "ok"
    ERROR = "error"
    # Weights over the swarm (swarm.runtime.transfer): a receiver asks a holder, chunk by chunk.
    MANIFEST = "manifest"  # a model's config and layout in one held form; reply MODEL
    MODEL = "model"
    UNIT = "unit"  # one unit file's size and sha256 (the holder writes it first if it must); reply UNIT_FILE
    UNIT_FILE = "unit_file"
    FETCH = "fetch"  # bytes [offset, offset + length) of a unit file; reply CHUNK (one uint8 tensor)
    CHUNK = "chunk"
    PROGRESS = "progress"  # a LOAD's weights on the move (unsolicited, to the loader; keeps its LOAD alive)


DTYPES: dict[str, torch.dtype] = {name: torch_dtype(name, WIRE_DTYPES) for name in WIRE_DTYPES}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class WireLimits:
    """Bounds checked on every received message before anything is allocated, and on what
    any one client (a connection's identity) may make a peer hold, so that a member that
    misbehaves gets error replies while everyone else is served."""

    max_header_bytes: int = 64 * 1024
    max_tensors: int = 4
    max_ndim: int = 4
    max_tensor_bytes: int = 512 * 1024 * 1024
    max_list_len: int = 4096
    max_str_len: int = 4096
    max_sessions_per_client: int = 256  # KV slots one client may hold open at once
    max_requests_per_client: int = 64  # control requests of one client queued or running
    max_queued_bytes_per_client: int = 1024 * 1024 * 1024  # received and not yet handled, per socket
    request_timeout_s: float = 30.0  # a control request not done this long after it arrived gets an error
    load_timeout_s: float = 900.0  # the same for LOAD, which reads weights from disk

    @property
    def max_frame_bytes(self) -> int:
        """The largest frame a socket should accept at all (zmq drops the sender above it)."""
        return max(self.max_tensor_bytes, self.max_header_bytes)


DEFAULT_LIMITS = WireLimits()


class WireError(ValueError):
    """A received message is malformed; the text names the problem."""


@dataclass(frozen=True)
class Message:
    kind: Kind
    fields: Mapping[str, Any] = field(default_factory=dict)
    tensors: tuple[torch.Tensor, ...] = ()
    id: int = 0  # request id (0: no reply wanted)
    re: int = 0  # id of the request this replies to (0: not a reply)

    def __getitem__(self, name: str) -> Any:
        return self.fields[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.fields.get(name, default)


# ---------------------------------------------------------------- field validators

Validator = Callable[[str, Any, WireLimits], Any]
_U63 = 2**63 - 1


def _int(name: str, value: Any, limits: WireLimits) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _U63:
        raise WireError(f"field {name!r}: expected a non-negative integer, got {value!r:.60}")
    return value


def _float(name: str, value: Any, limits: WireLimits) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise WireError(f"field {name!r}: expected a finite number, got {value!r:.60}")
    return float(value)


def _str(name: str, value: Any, limits: WireLimits) -> str:
    if not isinstance(value, str) or len(value) > limits.max_str_len:
        raise WireError(f"field {name!r}: expected a string of at most {limits.max_str_len} characters")
    return value


def _bytes(name: str, value: Any, limits: WireLimits) -> bytes:
    if not isinstance(value, bytes) or not 0 < len(value) <= 255:
        raise WireError(f"field {name!r}: expected 1 to 255 bytes")
    return value


def _int_list(name: str, value: Any, limits: WireLimits) -> list[int]:
    if not isinstance(value, list) or len(value) > limits.max_list_len:
        raise WireError(f"field {name!r}: expected a list of at most {limits.max_list_len} integers")
    return [_int(f"{name}[{i}]", v, limits) for i, v in enumerate(value)]


def _int_lists(name: str, value: Any, limits: WireLimits) -> list[list[int]]:
    if not isinstance(value, list) or len(value) > limits.max_list_len:
        raise WireError(f"field {name!r}: expected a list of at most {limits.max_list_len} integer lists")
    return [_int_list(f"{name}[{i}]", v, limits) for i, v in enumerate(value)]


def _map(name: str, value: Any, limits: WireLimits) -> dict:
    if not isinstance(value, dict):
        raise WireError(f"field {name!r}: expected a map")
    return value


def _bool(name: str, value: Any, limits: WireLimits) -> bool:
    if not isinstance(value, bool):
        raise WireError(f"field {name!r}: expected true or false")
    return value


def _sha256(name: str, value: Any, limits: WireLimits) -> str:
    if not (isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)):
        raise WireError(f"field {name!r}: expected a sha256 as 64 lowercase hex digits")
    return value


def _optional(inner: Validator) -> Validator:
    def check(name: str, value: Any, limits: WireLimits) -> Any:
        return None if value is None else inner(name, value, limits)

    return check


# kind -> {field: (validator, required)}; fields not listed are dropped on decode.
_HELD = {"fp": (_str, True), "dtype": (_str, True), "quant": (_optional(_str), False)}  # which weights, held how
_STEP_IDS = {"dep": (_int, True), "mb": (_int, True), "step": (_int, True), "slots": (_int_list, True)}
SCHEMAS: dict[Kind, dict[str, tuple[Validator, bool]]] = {
    # keep: per row, the cached positions kept before its tokens (a rejected draft's dropped);
    # draws: per row, at how many last positions the last stage draws (k + 1 to verify k drafts);
    # skips (a replay after a re-deployment): per stage from this one on, per row, the positions
    # the stage already holds: it drops its leading input rows up to there (keep: where they start).
    Kind.STEP: {**_STEP_IDS, "lengths": (_optional(_int_list), False), "keep": (_optional(_int_list), False),
                "draws": (_optional(_int_list), False), "skips": (_optional(_int_lists), False),
                "src": (_bytes, True)},
    Kind.TOKENS: dict(_STEP_IDS),
    Kind.LOAD: {
        "dep": (_int, True),
        "model": (_str, True),
        "start": (_int, True),
        "end": (_int, True),
        "slots": (_int, True),
        "max_len": (_int, True),
        "dtype": (_str, True),
        "next": (_optional(_str), False),
        "fp": (_optional(_str), False),  # model fingerprint: the peer loads its own copy
        "quant": (_optional(_str), False),  # the held form's quantization (int8 | int4), for fetched weights
        "holder": (_optional(_str), False),  # where a peer without these weights fetches them (control address)
        "from": (_optional(_int), False),  # the loader's previous deployment: a kept shard of it keeps its KV slots
    },
    Kind.READY: {"load_s": (_float, True), "weight_bytes": (_int, True), "kv_bytes": (_int, True),
                 "rss_bytes": (_int, True),
                 "kept": (_bool, False),  # the peer already hosted these units: its shard stays
                 "kv_kept": (_bool, False)},  # ... and its KV slots, from the LOAD's "from" deployment
    Kind.UNLOAD: {"dep": (_int, False)},  # only that deployment's shard: an old farewell spares a newer one
    Kind.OPEN: {"slots": (_int_list, True), "temperature": (_float, False), "top_k": (_int, False),
                "top_p": (_float, False), "seed": (_optional(_int), False)},
    Kind.CLOSE: {"slots": (_int_list, True)},
    Kind.PING: {},
    Kind.PONG: {"status": (_map, True)},
    Kind.PROBE: {"reply_bytes": (_int, False)},
    Kind.INFO: {"info": (_optional(_map), False)},
    Kind.OK: {},
    Kind.ERROR: {"error": (_str, True), "dep": (_int, False), "mb": (_int, False), "step": (_int, False)},
    Kind.MANIFEST: dict(_HELD),
    Kind.MODEL: {"manifest": (_map, True)},
    Kind.UNIT: {**_HELD, "unit": (_int, True), "verify": (_bool, False)},
    Kind.UNIT_FILE: {"unit": (_int, True), "size": (_int, True), "sha256": (_sha256, True)},
    Kind.FETCH: {**_HELD, "unit": (_int, True), "offset": (_int, True), "length": (_int, True)},
    Kind.CHUNK: {"unit": (_int, True), "offset": (_int, True)},
    Kind.PROGRESS: {"of": (_int, True), "done": (_int, True), "total": (_int, True), "rate": (_float, True)},
}
# kind -> (min tensors, max tensors)
TENSOR_COUNTS: dict[Kind, tuple[int, int]] = {Kind.STEP: (1, 1), Kind.TOKENS: (1, 1), Kind.PROBE: (0, 1),
                                             Kind.CHUNK: (1, 1)}


# ---------------------------------------------------------------- encode


def tensor_buffer(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes as a buffer sharing its storage (a copy only if not contiguous)."""
    flat = tensor.detach().contiguous().reshape(-1)
    # numpy has no bfloat16: go through a uint8 view, which works for every dtype.
    return memoryview(flat.view(torch.uint8).numpy())


def encode(message: Message) -> list[bytes | memoryview]:
    """Frames for ``socket.send_multipart(frames, copy=False)``."""
    header: dict[str, Any] = dict(message.fields)
    header.update(
        v=PROTOCOL_VERSION,
        k=message.kind.value,
        id=message.id,
        re=message.re,
        t=[[DTYPE_NAMES[t.dtype], list(t.shape)] for t in message.tensors],
    )
    return [msgpack.packb(header, use_bin_type=True), *(tensor_buffer(t) for t in message.tensors)]


# ---------------------------------------------------------------- decode


def _frame_buffer(frame: Any) -> memoryview:
    # zmq.Frame (received with copy=False) exposes .buffer; bytes/memoryview in tests.
    buffer = getattr(frame, "buffer", None)
    return memoryview(frame) if buffer is None else buffer


def _tensor_from(buffer: memoryview, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    if buffer.nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    raw = torch.frombuffer(buffer, dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


def _tensor_specs(specs: Any, limits: WireLimits) -> list[tuple[torch.dtype, list[int], int]]:
    if not isinstance(specs, list) or len(specs) > limits.max_tensors:
        raise WireError(f"field 't': expected a list of at most {limits.max_tensors} tensor specs")
    out = []
    for i, spec in enumerate(specs):
        if not (isinstance(spec, list) and len(spec) == 2 and isinstance(spec[1], list)):
            raise WireError(f"tensor {i}: spec must be [dtype, shape]")
        name, shape = spec
        if not isinstance(name, str) or name not in DTYPES:
            raise WireError(f"tensor {i}: unsupported dtype {name!r:.40}")
        if len(shape) > limits.max_ndim:
            raise WireError(f"tensor {i}: {len(shape)} dimensions, at most {limits.max_ndim}")
        dims = [_int(f"t[{i}].shape", d, limits) for d in shape]
        dtype = DTYPES[name]
        nbytes = math.prod(dims) * dtype.itemsize
        if nbytes > limits.max_tensor_bytes:
            raise WireError(f"tensor {i}: {nbytes} bytes, over the limit of {limits.max_tensor_bytes}")
        out.append((dtype, dims, nbytes))
    return out


def decode(frames: Sequence[Any], limits: WireLimits = DEFAULT_LIMITS) -> Message:
    """Parse and validate one message; raises WireError naming the first problem found."""
    if not frames:
        raise WireError("empty message")
    head = _frame_buffer(frames[0])
    if head.nbytes > limits.max_header_bytes:
        raise WireError(f"header of {head.nbytes} bytes, over the limit of {limits.max_header_bytes}")
    try:
        header = msgpack.unpackb(
            head, raw=False, strict_map_key=True,
            max_array_len=limits.max_list_len, max_map_len=limits.max_list_len,
            max_str_len=limits.max_str_len, max_bin_len=limits.max_str_len, max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise WireError(f"header is not valid msgpack: {type(exc).__name__}") from None
    if not isinstance(header, dict):
        raise WireError("header is not a map")
    version = header.get("v")
    if version != PROTOCOL_VERSION:
        raise WireError(f"protocol version {version!r:.20}, expected {PROTOCOL_VERSION}")
    try:
        kind = Kind(header.get("k"))
    except (ValueError, TypeError):
        raise WireError(f"unknown message kind {header.get('k')!r:.40}") from None
    msg_id = _int("id", header.get("id", 0), limits)
    re = _int("re", header.get("re", 0), limits)

    fields: dict[str, Any] = {}
    for name, (check, required) in SCHEMAS[kind].items():
        if name in header:
            fields[name] = check(name, header[name], limits)
        elif required:
            raise WireError(f"{kind.value}: missing field {name!r}")

    specs = _tensor_specs(header.get("t", []), limits)
    low, high = TENSOR_COUNTS.get(kind, (0, 0))
    if not low <= len(specs) <= high:
        raise WireError(f"{kind.value}: {len(specs)} tensors, expected {low} to {high}")
    if len(frames) != 1 + len(specs):
        raise WireError(f"{len(frames) - 1} tensor frames for {len(specs)} tensor specs")
    tensors = []
    for i, ((dtype, shape, nbytes), frame) in enumerate(zip(specs, frames[1:])):
        buffer = _frame_buffer(frame)
        if buffer.nbytes != nbytes:
            raise WireError(f"tensor {i}: shape {shape} {DTYPE_NAMES[dtype]} needs {nbytes} bytes, "
                            f"frame has {buffer.nbytes}")
        tensors.append(_tensor_from(buffer, dtype, shape))
    return Message(kind, fields, tuple(tensors), msg_id, re)


def error_reply(problem: str, request: Message | None = None) -> Message:
    """The ERROR message answering ``request`` (or an undecodable message)."""
    fields: dict[str, Any] = {"error": problem}
    if request is not None and request.kind is Kind.STEP:
        fields.update(dep=request["dep"], mb=request["mb"], step=request["step"])
    return Message(Kind.ERROR, fields, re=request.id if request is not None else 0)
