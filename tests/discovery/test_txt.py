from swarm.discovery.txt import (MAX_RECORD_BYTES, MAX_STRING_BYTES, Link, TxtError, decode, encode,
                                 from_profile, record_bytes)
from tests.helpers.discovery import fixture_profile

import pytest


def _links(n):
    return {f"{i:012x}": Link(bandwidth=1_250_000.0 * (i + 1), rtt=200 * (i + 1) / 1e6) for i in range(n)}


def test_round_trip_keeps_profile_figures_to_the_microsecond():
    profile = fixture_profile(num_blocks=30)
    a = from_profile(profile, "0123456789ab", "kitchen laptop", links=_links(3), seq=7)
    props = encode(a)
    assert all(len(f"{k}={v}".encode()) <= MAX_STRING_BYTES for k, v in props.items())
    assert record_bytes(props) <= MAX_RECORD_BYTES
    # zeroconf hands properties back as bytes
    b = decode({k.encode(): v.encode() for k, v in props.items()})
    assert b == a
    times = b.unit_times()
    assert len(times) == 32
    for t, u in zip(times, profile["units"]):
        assert abs(t - u["decode_s"]) <= 1e-6
    assert b.links["000000000002"] == Link(bandwidth=3_750_000.0, rtt=0.0006)


def test_large_model_is_summarised_within_dns_limits():
    a = from_profile(fixture_profile(num_blocks=80, block_decode_s=0.2), "0123456789ab", "big", links=_links(8))
    props = encode(a)
    assert record_bytes(props) <= MAX_RECORD_BYTES
    assert all(len(f"{k}={v}".encode()) <= MAX_STRING_BYTES for k, v in props.items())
    b = decode(props)
    assert b.summarised and b.unit_times() is None
    assert len(b.prefill_us) == 3 and b.prefill_us[0] == a.prefill_us[0] and b.prefill_us[2] == a.prefill_us[-1]
    assert b.links == a.links  # links still fit once the tables are summarised


def test_foreign_or_broken_records_are_rejected_with_a_reason():
    props = encode(from_profile(fixture_profile(), "0123456789ab", "x"))
    with pytest.raises(TxtError, match="protocol 9"):
        decode({**props, "v": "9"})
    with pytest.raises(TxtError, match="expected 6"):
        decode({**props, "pf": "1,2"})
    with pytest.raises(TxtError, match="malformed"):
        decode({k: v for k, v in props.items() if k != "mem"})


from hypothesis import given, settings, strategies as st

_seconds = st.floats(min_value=0, max_value=100, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(blocks=st.integers(1, 120), decode_s=_seconds, n_links=st.integers(0, 40),
       name=st.text(min_size=0, max_size=80), mem=st.integers(0, 2**50), seq=st.integers(0, 2**31))
def test_any_announcement_fits_dns_and_decodes_to_what_was_announced(blocks, decode_s, n_links, name, mem, seq):
    a = from_profile(fixture_profile(num_blocks=blocks, block_decode_s=decode_s), "0123456789ab", name, mem,
                     links=_links(n_links), seq=seq)
    props = encode(a)
    assert record_bytes(props) <= MAX_RECORD_BYTES
    assert all(len(f"{k}={v}".encode()) <= MAX_STRING_BYTES for k, v in props.items())
    b = decode({k.encode(): v.encode() for k, v in props.items()})
    assert (b.peer_id, b.mem_bytes, b.seq, b.num_units, b.fingerprint) == (a.peer_id, mem, seq, blocks + 2, a.fingerprint)
    assert b.name == name[:63]
    if not b.summarised:
        assert (b.prefill_us, b.decode_us) == (a.prefill_us, a.decode_us)
    assert b.links in (a.links, {})  # every link, or none when even the summary left no room
