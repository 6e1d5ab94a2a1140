"""The swarm secret: what a device must hold to join, read or drive a swarm (stdlib only).

    secret = SwarmSecret.new()            # the first `swarm join` makes one
    secret.join_code                      # 'k3jd-8fh2-...': typed on the next device
    SwarmSecret.from_join_code(code)      # which checks it for typos
    store(secret); load_stored()          # $XDG_CONFIG_HOME/swarm/secret, mode 0600

Everything secret-derived is an HKDF-SHA256 expansion of it under a purpose label
(``secret.derive("curve server")``): the CURVE keypairs of every ZeroMQ socket
(swarm.runtime.sockets) and the key that tags mDNS announcements
(swarm.discovery.txt). The secret itself never leaves the device.

Which swarm this process belongs to is chosen once, at the entry point
(``use(secret)``, or ``use(INSECURE)`` for --insecure); code that makes sockets or
reads announcements asks ``current()``, which otherwise resolves it from
``SWARM_SECRET`` or the stored file the first time it is needed. That is how peers
started by ``--local N`` and by tests get theirs: through the environment.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

SECRET_BYTES = 16  # 128 bits: out of reach of an offline search over a captured tag
ENV_VARIABLE = "SWARM_SECRET"
# Set (to 1) by `--insecure` for the processes it starts; any command that reads it warns.
INSECURE_VARIABLE = "SWARM_INSECURE"
_HKDF_SALT = b"swarm secret v1"
_GROUP = 4  # characters per dash-separated group of a join code

HOW_TO_GET_ONE = (
    "this device holds no swarm secret. Run `swarm join` once to create one (the first device of a swarm), "
    "or `swarm join --join-code CODE` with the code the first device printed; a script may set "
    f"{ENV_VARIABLE}=CODE. On a network you trust completely, --insecure runs without one.")


class SecretError(ValueError):
    """A join code or stored secret that cannot be used; the text says why."""


class NoSecretError(SecretError):
    """No secret was given, set or stored (the text says how to get one)."""


@dataclass(frozen=True)
class SwarmSecret:
    key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.key) != SECRET_BYTES:
            raise SecretError(f"a swarm secret is {SECRET_BYTES} bytes, not {len(self.key)}")

    def __repr__(self) -> str:  # never the key itself, even in a traceback
        return f"SwarmSecret(id={self.swarm_id})"

    @classmethod
    def new(cls) -> "SwarmSecret":
        return cls(secrets.token_bytes(SECRET_BYTES))

    @property
    def join_code(self) -> str:
        """The secret plus one checksum byte in lowercase base32, dash-grouped (34 characters)."""
        text = base64.b32encode(self.key + _checksum(self.key)).decode().rstrip("=").lower()
        return "-".join(text[i:i + _GROUP] for i in range(0, len(text), _GROUP))

    @classmethod
    def from_join_code(cls, code: str) -> "SwarmSecret":
        text = "".join(code.split()).replace("-", "").upper()
        try:
            raw = base64.b32decode(text + "=" * (-len(text) % 8))
        except ValueError:
            raise SecretError("not a join code: use the letters and digits `swarm join` printed "
                              "(like abcd-efgh-...)") from None
        if len(raw) != SECRET_BYTES + 1 or not hmac.compare_digest(raw[-1:], _checksum(raw[:-1])):
            raise SecretError("that join code has a typo (its checksum does not match); copy it again")
        return cls(raw[:-1])

    def derive(self, purpose: str, length: int = 32) -> bytes:
        """A key for one purpose (RFC 5869 HKDF-SHA256): knowing it tells nothing of the secret
        or of the keys for other purposes."""
        prk = hmac.new(_HKDF_SALT, self.key, hashlib.sha256).digest()
        out, block, counter = b"", b"", 1
        while len(out) < length:
            block = hmac.new(prk, block + purpose.encode() + bytes([counter]), hashlib.sha256).digest()
            out, counter = out + block, counter + 1
        return out[:length]

    @property
    def swarm_id(self) -> str:
        """A short public name for the swarm (logs, diagnostics): derived, so it gives nothing away."""
        return self.derive("swarm id", 4).hex()


def _checksum(key: bytes) -> bytes:
    return hashlib.sha256(b"join code" + key).digest()[:1]


# ---------------------------------------------------------------- where it is kept

def config_dir() -> Path:
    """$XDG_CONFIG_HOME/swarm, or ~/.config/swarm."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "swarm"


def secret_path() -> Path:
    return config_dir() / "secret"


def store(secret: SwarmSecret, path: Path | None = None) -> Path:
    """Write the join code, readable by this user only (0600 in a 0700 folder), atomically."""
    path = path or secret_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secret.join_code + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_stored(path: Path | None = None) -> SwarmSecret | None:
    path = path or secret_path()
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s is readable by other users; `chmod 600 %s`", path, path)
    try:
        return SwarmSecret.from_join_code(text)
    except SecretError as exc:
        raise SecretError(f"{path}: {exc}") from None


def from_environment() -> SwarmSecret | None:
    code = os.environ.get(ENV_VARIABLE)
    if not code:
        return None
    try:
        return SwarmSecret.from_join_code(code)
    except SecretError as exc:
        raise SecretError(f"{ENV_VARIABLE}: {exc}") from None


def resolve(join_code: str | None = None) -> SwarmSecret | None:
    """The secret to use: an explicit join code, else SWARM_SECRET, else the stored one."""
    if join_code:
        return SwarmSecret.from_join_code(join_code)
    return from_environment() or load_stored()


# ---------------------------------------------------------------- this process's swarm

INSECURE = None  # use(INSECURE): plain TCP and untagged announcements (--insecure)
_UNSET = object()
_current: object = _UNSET


def use(secret: SwarmSecret | None) -> None:
    """Make ``secret`` (or INSECURE) the swarm of every socket and announcement made from now on."""
    global _current
    _current = secret


@contextlib.contextmanager
def using(secret: SwarmSecret | None):
    """``use(secret)`` for the sockets made inside the block (a benchmark comparing swarms,
    a test); the choice before it is restored after."""
    global _current
    before, _current = _current, secret
    try:
        yield
    finally:
        _current = before


def current() -> SwarmSecret | None:
    """This process's swarm secret; None when running insecure. Raises NoSecretError when
    there is none and nobody said --insecure."""
    global _current
    if _current is _UNSET:
        if os.environ.get(INSECURE_VARIABLE) == "1":
            log.warning("running without encryption or authentication (%s=1)", INSECURE_VARIABLE)
            _current = INSECURE
        else:
            found = resolve()
            if found is None:
                raise NoSecretError(HOW_TO_GET_ONE)
            _current = found
    return _current  # type: ignore[return-value]


def reset() -> None:
    """Forget the choice (tests): the next current() resolves it again."""
    global _current
    _current = _UNSET
