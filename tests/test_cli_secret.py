"""`swarm join` creates and stores the secret, `--join-code` joins, and commands without one say how to get one."""

from __future__ import annotations

import argparse
import os
import stat

import pytest

from swarm import secret
from swarm.cli.common import add_secret_arguments, use_swarm_secret
from swarm.secret import SwarmSecret


@pytest.fixture
def bare(tmp_path, monkeypatch):
    """No secret anywhere: an empty config dir, no SWARM_SECRET; this process's choice restored after."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.delenv(secret.ENV_VARIABLE, raising=False)
    monkeypatch.delenv(secret.INSECURE_VARIABLE, raising=False)
    yield tmp_path
    secret.reset()


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_secret_arguments(parser)
    parser.add_argument("--local", type=int)
    return parser.parse_args(argv)


def test_the_first_join_creates_a_secret_and_prints_its_join_code(bare, capsys):
    use_swarm_secret(parse(), store=True)
    stored = secret.load_stored()
    assert stored is not None and secret.current() == stored
    assert stat.S_IMODE((bare / "swarm" / "secret").stat().st_mode) == 0o600
    assert f"swarm join --join-code {stored.join_code}" in capsys.readouterr().err
    use_swarm_secret(parse(), store=True)  # the next run uses it, and makes no new one
    assert secret.load_stored() == stored and secret.current() == stored


def test_join_with_a_code_stores_it(bare):
    code = SwarmSecret.new().join_code
    use_swarm_secret(parse("--join-code", code), store=True)
    assert secret.load_stored().join_code == code and secret.current().join_code == code


def test_a_command_without_a_secret_says_how_to_get_one(bare):
    with pytest.raises(SystemExit, match="swarm join --join-code CODE"):
        use_swarm_secret(parse())
    with pytest.raises(SystemExit, match="typo"):
        use_swarm_secret(parse("--join-code", "abcd-efgh-ijkl-mnop-qrst-uvwx-yz23"))


def test_local_peers_get_a_fresh_secret_through_the_environment(bare):
    use_swarm_secret(parse("--local", "2"))
    fresh = secret.current()
    assert fresh is not None and os.environ[secret.ENV_VARIABLE] == fresh.join_code
    assert secret.load_stored() is None  # nothing written for a local swarm


def test_insecure_warns_every_time_and_reaches_started_peers(bare, capsys):
    use_swarm_secret(parse("--insecure"))
    assert secret.current() is None and os.environ[secret.INSECURE_VARIABLE] == "1"
    assert "nothing is encrypted" in capsys.readouterr().err
    use_swarm_secret(parse())  # as a peer it started would run: insecure too, and it says so
    assert secret.current() is None
    assert "nothing is encrypted" in capsys.readouterr().err
