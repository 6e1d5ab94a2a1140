"""The swarm secret: join codes, storage (0600, XDG_CONFIG_HOME), precedence, derivation."""

import hashlib
import hmac
import stat

import pytest

from swarm import secret
from swarm.secret import NoSecretError, SecretError, SwarmSecret


@pytest.fixture
def config_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.delenv(secret.ENV_VARIABLE, raising=False)
    monkeypatch.delenv(secret.INSECURE_VARIABLE, raising=False)
    yield tmp_path
    secret.reset()


def test_join_code_round_trips_and_catches_typos():
    s = SwarmSecret.new()
    code = s.join_code
    assert len(code) == 34 and code.count("-") == 6 and code == code.lower()
    assert SwarmSecret.from_join_code(code) == s
    assert SwarmSecret.from_join_code(f"  {code.upper().replace('-', ' ')} ") == s  # as someone might type it
    typo = code[:5] + ("a" if code[5] != "a" else "b") + code[6:]
    with pytest.raises(SecretError, match="typo"):
        SwarmSecret.from_join_code(typo)
    with pytest.raises(SecretError, match="not a join code"):
        SwarmSecret.from_join_code("hello!")
    assert code not in repr(s) and s.key.hex() not in repr(s)


def test_derivation_is_rfc5869_hkdf_sha256_and_separates_purposes():
    s = SwarmSecret(bytes(range(16)))
    prk = hmac.new(b"swarm secret v1", s.key, hashlib.sha256).digest()
    t1 = hmac.new(prk, b"curve server key\x01", hashlib.sha256).digest()
    assert s.derive("curve server key") == t1
    t2 = hmac.new(prk, t1 + b"curve server key\x02", hashlib.sha256).digest()
    assert s.derive("curve server key", 40) == (t1 + t2)[:40]
    assert s.derive("curve client key") != s.derive("curve server key")


def test_stored_with_mode_0600_under_xdg_config_home(config_home):
    s = SwarmSecret.new()
    path = secret.store(s)
    assert path == config_home / "swarm" / "secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert secret.load_stored() == s
    assert [p.name for p in path.parent.iterdir()] == ["secret"]  # no temporary file left


def test_precedence_code_then_environment_then_stored(config_home, monkeypatch):
    stored, env, given = SwarmSecret.new(), SwarmSecret.new(), SwarmSecret.new()
    assert secret.resolve() is None
    secret.store(stored)
    assert secret.resolve() == stored
    monkeypatch.setenv(secret.ENV_VARIABLE, env.join_code)
    assert secret.resolve() == env
    assert secret.resolve(given.join_code) == given
    monkeypatch.setenv(secret.ENV_VARIABLE, "nonsense")
    with pytest.raises(SecretError, match="SWARM_SECRET"):
        secret.resolve()


def test_without_a_secret_the_process_says_how_to_get_one(config_home):
    secret.reset()
    with pytest.raises(NoSecretError, match="swarm join --join-code"):
        secret.current()


def test_insecure_is_explicit(config_home, monkeypatch):
    secret.reset()
    monkeypatch.setenv(secret.INSECURE_VARIABLE, "1")
    assert secret.current() is None
