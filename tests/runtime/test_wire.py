"""The wire codec: round trips without copies, and every malformed message is a WireError."""

from __future__ import annotations

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from swarm.runtime.wire import (
    PROTOCOL_VERSION, Kind, Message, WireError, WireLimits, decode, encode, error_reply, tensor_buffer,
)

STEP_FIELDS = {"dep": 1, "mb": 2, "step": 3, "slots": [0, 1], "lengths": [3, 1], "src": b"src-1"}


def header(**fields) -> bytes:
    base = {"v": PROTOCOL_VERSION, "k": "ping", "id": 1, "re": 0, "t": []}
    base.update(fields)
    return msgpack.packb(base, use_bin_type=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64])
def test_round_trip_every_dtype(dtype):
    x = (torch.randn(2, 3, 5) * 100).to(dtype)
    got = decode([bytes(f) for f in encode(Message(Kind.STEP, STEP_FIELDS, (x,), id=7))])
    assert got.kind is Kind.STEP and got.id == 7 and dict(got.fields) == STEP_FIELDS
    assert got.tensors[0].dtype == dtype and torch.equal(got.tensors[0], x)


def test_scalar_and_empty_tensors_round_trip():
    for x in (torch.tensor(5, dtype=torch.int64), torch.zeros(0, 4)):
        ids = {k: STEP_FIELDS[k] for k in ("dep", "mb", "step", "slots")}
        (got,) = decode(encode(Message(Kind.TOKENS, ids, (x,)))).tensors
        assert got.shape == x.shape and torch.equal(got, x)


def test_encode_shares_the_tensor_storage():
    x = torch.zeros(4, dtype=torch.bfloat16)
    buffer = tensor_buffer(x)
    x[1] = 1.0
    assert bytes(buffer) == x.view(torch.uint8).numpy().tobytes()
    assert bytes(buffer) != bytes(8)


def test_decode_shares_the_received_frame():
    x = torch.arange(6, dtype=torch.float32)
    frames = encode(Message(Kind.STEP, STEP_FIELDS, (x.reshape(1, 2, 3),)))
    received = bytearray(bytes(frames[1]))
    got = decode([bytes(frames[0]), received]).tensors[0]
    received[0:4] = torch.tensor([42.0]).numpy().tobytes()
    assert got[0, 0, 0].item() == 42.0  # same memory: no copy was made


def test_unknown_fields_are_dropped():
    got = decode([header(k="ping", extra={"a": 1}, future_field=[1, 2])])
    assert got.kind is Kind.PING and "future_field" not in got.fields and "extra" not in got.fields


@pytest.mark.parametrize("frames, problem", [
    ([], "empty message"),
    ([b"\xc1"], "not valid msgpack"),
    ([msgpack.packb([1, 2])], "not a map"),
    ([header(v=PROTOCOL_VERSION + 1)], "protocol version"),
    ([header(k="explode")], "unknown message kind"),
    ([header(k="close")], "missing field 'slots'"),
    ([header(k="close", slots=[-1])], "slots[0]"),
    ([header(k="close", slots=[True])], "slots[0]"),
    ([header(id="x")], "'id'"),
    ([header(k="step", **STEP_FIELDS, t=[["float32", [2, 2]]])], "1 tensor specs"),
    ([header(k="step", **STEP_FIELDS, t=[["float32", [2, 2]]]), b"\0" * 15], "needs 16 bytes"),
    ([header(k="step", **STEP_FIELDS, t=[["complex64", [1]]]), b"\0" * 8], "unsupported dtype"),
    ([header(k="step", **STEP_FIELDS, t=[["float32", [1, 1, 1, 1, 1]]]), b"\0" * 4], "dimensions"),
    ([header(k="step", **STEP_FIELDS, t=[["float32", [2**40, 2**20]]]), b""], "over the limit"),
    ([header(k="step", **STEP_FIELDS, t=[["float32", [1, -1]]]), b""], "shape"),
    ([header(k="ping", t=[["uint8", [1]]]), b"\0"], "expected 0 to 0"),
    ([header(k="step", **{**STEP_FIELDS, "src": ""}, t=[["float32", [1]]]), b"\0" * 4], "'src'"),
    ([b"\x80" * 70000], "header of 70000 bytes"),
])
def test_malformed_messages_name_the_problem(frames, problem):
    with pytest.raises(WireError, match=None) as info:
        decode(frames)
    assert problem in str(info.value)


def test_limits_are_configurable():
    small = WireLimits(max_tensor_bytes=100)
    frames = encode(Message(Kind.PROBE, {"reply_bytes": 0}, (torch.zeros(101, dtype=torch.uint8),)))
    with pytest.raises(WireError, match="over the limit"):
        decode(frames, small)


def test_error_reply_carries_the_request_and_step_ids():
    request = Message(Kind.STEP, STEP_FIELDS, (torch.zeros(1),), id=9)
    reply = decode(encode(error_reply("boom", request)))
    assert reply.kind is Kind.ERROR and reply.re == 9 and reply["error"] == "boom" and reply["mb"] == 2


def _decode_or_wire_error(frames):
    try:
        return decode(frames)
    except WireError:
        return None


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=200), min_size=0, max_size=4))
def test_fuzz_random_frames_never_raise_anything_but_wire_error(frames):
    _decode_or_wire_error(frames)


values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70).filter(lambda i: -2**63 <= i < 2**64)
    | st.floats(allow_nan=True) | st.text(max_size=10) | st.binary(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(kind=st.sampled_from([k.value for k in Kind] + ["nope"]),
       fields=st.dictionaries(st.sampled_from(["dep", "mb", "step", "slots", "lengths", "src", "t", "model",
                                               "start", "reply_bytes", "status", "v", "id"]), values, max_size=6),
       tail=st.lists(st.binary(max_size=64), max_size=3))
def test_fuzz_structured_headers_never_raise_anything_but_wire_error(kind, fields, tail):
    frames = [msgpack.packb({"v": PROTOCOL_VERSION, "k": kind, **fields}, use_bin_type=True), *tail]
    got = _decode_or_wire_error(frames)
    if got is not None:  # whatever passed validation is well-formed
        assert all(isinstance(t, torch.Tensor) for t in got.tensors)
