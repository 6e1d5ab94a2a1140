"""Announcements and their compact mDNS TXT encoding (pure functions, no sockets).

A TXT record is a list of strings of at most 255 bytes each, and the whole record
should fit in one mDNS packet with room to spare (RFC 6763 section 6.2). Numbers are
integers (times in microseconds, bandwidth in kB/s) so a 32-unit model fits in a few
hundred bytes; a value longer than one string is split over numbered keys
(``pf``, ``pf1``, ``pf2`` ...). If the per-unit tables would make the record too
large, they are replaced by a summary (embedding, median block, head) and the full
profile is fetched from the peer over ZeroMQ (INFO).

In a private swarm every record carries ``tag``: an HMAC-SHA256 (truncated to 128
bits) over all its other strings, the sequence number included, under a key
derived from the swarm secret (``swarm_key``). A record without the right tag
comes from another swarm (or a forger) and is ignored; a ``ReplayGuard`` ignores a
peer's record older than one already accepted. The tag proves membership to a
reader; it gives a stranger nothing to join with (the CURVE keys are derived
under other labels, and HMAC does not reveal its key).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import statistics
from dataclasses import dataclass, field

PROTOCOL_VERSION = 2  # 2: steps travel on a separate data socket
SERVICE_TYPE = "_swarm._tcp.local."
MAX_STRING_BYTES = 255
# One mDNS packet is 1500 bytes on Ethernet; leave room for the PTR/SRV/A records.
MAX_RECORD_BYTES = 1100
TAG_KEY = "tag"
TAG_BYTES = 16
_TAG_STRING_BYTES = 1 + len(f"{TAG_KEY}=") + 22  # 16 bytes in unpadded base64
_CHUNK = 200  # value bytes per TXT string, below 255 minus the key


class TxtError(ValueError):
    """A TXT record that is not a swarm announcement of our protocol."""


class ForeignRecord(TxtError):
    """A record without this swarm's tag: another swarm's, or a forgery."""


def swarm_key() -> bytes | None:
    """The key that tags this process's announcements (None: --insecure, no tags)."""
    from swarm import secret

    current = secret.current()
    return None if current is None else current.derive("mdns announcement tag")


def tag(props: dict[str, str], key: bytes) -> str:
    """HMAC over every string but the tag, in a canonical order (zeroconf may reorder them)."""
    body = "\n".join(f"{k}={v}" for k, v in sorted(props.items()) if k != TAG_KEY).encode()
    return base64.urlsafe_b64encode(hmac.new(key, body, hashlib.sha256).digest()[:TAG_BYTES]).decode().rstrip("=")


def verify(props: dict[str, str], key: bytes) -> None:
    got = props.get(TAG_KEY)
    if got is None:
        raise ForeignRecord("no swarm tag: from another swarm, or one running --insecure")
    if not hmac.compare_digest(got.encode(), tag(props, key).encode()):
        raise ForeignRecord("wrong swarm tag: from another swarm")


class ReplayGuard:
    """Per peer id, the highest sequence number accepted: an older one is a replay (or stale)."""

    def __init__(self) -> None:
        self._seq: dict[str, int] = {}

    def fresh(self, a: "Announcement") -> bool:
        if a.seq < self._seq.get(a.peer_id, -1):
            return False
        self._seq[a.peer_id] = a.seq
        return True


@dataclass(frozen=True)
class Link:
    """What a peer measured towards another peer."""

    bandwidth: float  # bytes per second, payload bytes over transfer time
    rtt: float  # seconds, small request/reply round trip


@dataclass(frozen=True)
class Announcement:
    """What one peer says about itself on the network."""

    peer_id: str
    name: str
    fingerprint: str  # model fingerprint prefix: peers with different weights never mix
    mem_bytes: int  # usable memory for shards
    threads: int
    kind: str  # cpu | cuda | mps
    prefill_us: tuple[int, ...]  # per unit; a 3-tuple (embed, median block, head) when summarised
    decode_us: tuple[int, ...]
    num_units: int
    links: dict[str, Link] = field(default_factory=dict)  # peer id -> measured link
    seq: int = 0  # bumped on every change, so a reader can tell fresh from stale
    summarised: bool = False  # per-unit tables did not fit; fetch the profile over INFO
    protocol: int = PROTOCOL_VERSION
    quant: str = ""  # "int8" | "int4" weights ("" = unquantized); the fingerprint covers it too
    # Issue 26 (keys "so", "ho"; 0 in records from before): fixed costs per step, in microseconds.
    step_overhead_us: int = 0  # the shard's per-step constant (profile: units back to back vs alone)
    hop_overhead_us: int = 0  # a hop's wake-up, decode and encode on this peer (swarm.runtime.hopcost)
    # Offers its memory for any model (`swarm join` without --model): it fetches the weights a
    # plan gives it. Its times were measured on its own model (``fingerprint``); a source of
    # another model scales them (swarm.discovery.problem.device_for_model).
    open: bool = False

    def unit_times(self) -> list[float] | None:
        """Per-unit decode time in seconds, as the planner uses it (a plan's R is then the
        per-token latency), or None when only a summary was announced."""
        if self.summarised:
            return None
        return [d / 1e6 for d in self.decode_us]

    def prefill_times(self) -> list[float] | None:
        """Per-unit prefill time in seconds (for the profile's prompt length), or None for a summary."""
        return None if self.summarised else [p / 1e6 for p in self.prefill_us]


FINGERPRINT_CHARS = 16


def from_profile(profile: dict, peer_id: str, name: str, mem_bytes: int | None = None,
                 links: dict[str, Link] | None = None, seq: int = 0, hop_overhead_s: float = 0.0,
                 open: bool = False) -> Announcement:
    """The announcement for a device profile (the JSON of swarm.model.profile) and the hop
    overhead this peer measured on its own data path."""
    dev, units = profile["device"], profile["units"]
    return Announcement(
        peer_id=peer_id,
        name=name,
        fingerprint=short_fingerprint(profile["model"]["fingerprint"]),
        mem_bytes=int(dev["mem_bytes"] if mem_bytes is None else mem_bytes),
        threads=int(dev.get("threads", 1)),
        kind=str(dev.get("kind", "cpu")),
        prefill_us=tuple(_us(u["prefill_s"]) for u in units),
        decode_us=tuple(_us(u["decode_s"]) for u in units),
        num_units=len(units),
        links=dict(links or {}),
        seq=seq,
        quant=str(profile["model"].get("quant") or ""),
        step_overhead_us=_us(profile.get("step_decode_s", 0.0)),
        hop_overhead_us=_us(hop_overhead_s),
        open=open,
    )


def short_fingerprint(fingerprint: str) -> str:
    return fingerprint.removeprefix("sha256:")[:FINGERPRINT_CHARS]


def _us(seconds: float) -> int:
    return max(0, round(seconds * 1e6))


def encode(a: Announcement, key: bytes | None = None) -> dict[str, str]:
    """Announcement -> TXT properties; every string <= 255 bytes, whole record bounded;
    tagged when a swarm key is given."""
    props = _encode(a, MAX_RECORD_BYTES - (_TAG_STRING_BYTES if key else 0))
    if key:
        props[TAG_KEY] = tag(props, key)
    return props


def _encode(a: Announcement, max_bytes: int) -> dict[str, str]:
    base = {
        "v": str(a.protocol), "id": a.peer_id, "n": a.name[:63], "fp": a.fingerprint,
        "mem": str(a.mem_bytes), "thr": str(a.threads), "k": a.kind,
        "nu": str(a.num_units), "seq": str(a.seq), "so": str(a.step_overhead_us), "ho": str(a.hop_overhead_us),
    }
    if a.quant:
        base["q"] = a.quant
    if a.open:
        base["any"] = "1"
    links = ",".join(f"{pid}:{round(l.bandwidth / 1000)}:{_us(l.rtt)}" for pid, l in sorted(a.links.items()))
    full = {**base, **_chunked("pf", _ints(a.prefill_us)), **_chunked("dc", _ints(a.decode_us)),
            **_chunked("lk", links)}
    if a.summarised or record_bytes(full) > max_bytes:
        summary = {**base, "su": "1", "pf": _ints(_summary(a.prefill_us)), "dc": _ints(_summary(a.decode_us))}
        full = {**summary, **_chunked("lk", links)}
        # Links are last to go: with dozens of peers the source probes them itself.
        if record_bytes(full) > max_bytes:
            full = summary
    return full


def decode(props: dict, key: bytes | None = None) -> Announcement:
    """TXT properties (bytes or str keys/values, as zeroconf gives them) -> Announcement.
    With a swarm key, a record without its tag raises ForeignRecord."""
    p = {_s(k): _s(v) for k, v in props.items() if v is not None}
    if key:
        verify(p, key)
    try:
        protocol = int(p["v"])
        if protocol != PROTOCOL_VERSION:
            raise TxtError(f"protocol {protocol}, this build speaks {PROTOCOL_VERSION}")
        pf, dc = _parse_ints(_joined(p, "pf")), _parse_ints(_joined(p, "dc"))
        num_units, summarised = int(p["nu"]), p.get("su") == "1"
        expected = 3 if summarised else num_units
        if len(pf) != expected or len(dc) != expected:
            raise TxtError(f"pf/dc carry {len(pf)}/{len(dc)} times, expected {expected}")
        links = {}
        for item in filter(None, _joined(p, "lk").split(",")):
            pid, kbps, rtt = item.split(":")
            links[pid] = Link(bandwidth=int(kbps) * 1000.0, rtt=int(rtt) / 1e6)
        return Announcement(
            peer_id=p["id"], name=p.get("n", p["id"]), fingerprint=p["fp"], mem_bytes=int(p["mem"]),
            threads=int(p.get("thr", "1")), kind=p.get("k", "cpu"), prefill_us=pf, decode_us=dc,
            num_units=num_units, links=links, seq=int(p.get("seq", "0")), summarised=summarised,
            protocol=protocol, quant=p.get("q", ""), open=p.get("any") == "1",
            step_overhead_us=int(p.get("so", "0")), hop_overhead_us=int(p.get("ho", "0")),
        )
    except TxtError:
        raise
    except (KeyError, ValueError) as e:
        raise TxtError(f"malformed swarm TXT record: {e!r}") from e


def record_bytes(props: dict[str, str]) -> int:
    """Size of the TXT RDATA: one length byte plus key=value per string."""
    return sum(1 + len(f"{k}={v}".encode()) for k, v in props.items())


def _summary(values: tuple[int, ...]) -> tuple[int, ...]:
    if len(values) == 3:
        return values
    return (values[0], round(statistics.median(values[1:-1])), values[-1])


def _ints(values) -> str:
    return ",".join(str(int(v)) for v in values)


def _parse_ints(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(",")) if s else ()


def _chunked(key: str, value: str) -> dict[str, str]:
    pieces = [value[i:i + _CHUNK] for i in range(0, len(value), _CHUNK)] or [""]
    return {(key if i == 0 else f"{key}{i}"): piece for i, piece in enumerate(pieces)}


def _joined(p: dict[str, str], key: str) -> str:
    out, i = [p.get(key, "")], 1
    while f"{key}{i}" in p:
        out.append(p[f"{key}{i}"])
        i += 1
    return "".join(out)


def _s(x) -> str:
    return x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)
