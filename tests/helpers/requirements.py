"""What a test needs from the machine: skipped where it is missing, failed in CI.

CI runs as root after ``bootstrap/setup.sh test``, which installs every tool the tests
use (chromium, chromium-driver, tcpdump, the default model's wheel), so a test skipped
there would check nothing and hide a broken set-up. Under ``CI=true`` a missing
requirement fails the test, in the same words a developer's run skips it with.

    pytestmark = pytest.mark.needs(None if shutil.which("tcpdump") else "tcpdump is not installed")
    require(cannot_run())          # inside a test or fixture
"""

from __future__ import annotations

import os

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"


def require(missing: str | None) -> None:
    """Go on when ``missing`` is None; else skip the test, or fail it in CI."""
    if missing is None:
        return
    if IN_CI:
        pytest.fail(f"CI must run this test, but {missing} (bootstrap/setup.sh test should provide it)",
                    pytrace=False)
    pytest.skip(missing)
