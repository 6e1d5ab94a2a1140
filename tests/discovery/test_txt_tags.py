"""Announcements tagged with the swarm key: another swarm's, forged and replayed records are refused."""

import dataclasses

import pytest

from swarm.discovery.mdns import Heard
from swarm.discovery.txt import (MAX_RECORD_BYTES, TAG_KEY, ForeignRecord, Link, ReplayGuard, decode, encode,
                                 from_profile, record_bytes)
from swarm.secret import SwarmSecret
from tests.helpers.discovery import fixture_profile

KEY_A = SwarmSecret.new().derive("mdns announcement tag")
KEY_B = SwarmSecret.new().derive("mdns announcement tag")


def announcement(seq=3, blocks=30, links=3):
    return from_profile(fixture_profile(num_blocks=blocks), "0123456789ab", "kitchen",
                        links={f"{i:012x}": Link(1e6, 1e-3) for i in range(links)}, seq=seq)


def test_a_tagged_record_reads_back_with_the_same_key_only():
    a = announcement()
    props = encode(a, KEY_A)
    assert decode({k.encode(): v.encode() for k, v in props.items()}, KEY_A) == a  # as zeroconf hands them back
    with pytest.raises(ForeignRecord, match="wrong swarm tag"):
        decode(props, KEY_B)
    with pytest.raises(ForeignRecord, match="no swarm tag"):
        decode(encode(a), KEY_A)


@pytest.mark.parametrize("field, value", [("seq", "9"), ("mem", "1"), ("id", "ffffffffffff"), ("n", "evil")])
def test_changing_any_string_breaks_the_tag(field, value):
    props = encode(announcement(), KEY_A)
    assert props[field] != value
    with pytest.raises(ForeignRecord):
        decode({**props, field: value}, KEY_A)


def test_the_tag_leaves_no_secret_material_and_fits_the_record():
    secret = SwarmSecret.new()
    key = secret.derive("mdns announcement tag")
    props = encode(announcement(blocks=80, links=8), key)  # a record at the size limit: summarised to fit
    assert record_bytes(props) <= MAX_RECORD_BYTES and TAG_KEY in props
    text = "".join(props.values())
    for material in (secret.join_code, secret.key.hex(), key.hex(), secret.derive("curve server key").hex()):
        assert material not in text


def test_replays_of_older_records_are_refused():
    guard = ReplayGuard()
    assert guard.fresh(announcement(seq=5))
    assert guard.fresh(announcement(seq=5))  # the same record heard again
    assert not guard.fresh(announcement(seq=4))
    assert guard.fresh(announcement(seq=6))
    assert guard.fresh(dataclasses.replace(announcement(seq=0), peer_id="another00000"))


def test_the_diagnostic_counts_records_from_another_swarm():
    heard = Heard()
    assert heard.summary() == ""
    heard.foreign.add("stranger-1._swarm._tcp.local.")
    assert heard.summary().startswith("heard 1 record from another swarm (stranger-1._swarm._tcp.local.)")
