#!/usr/bin/env bash
# The whole test suite from a fresh clone: venv, dependencies, model cache, then pytest.
#   bootstrap/test.sh                 everything (slow tests included, as CI runs it)
#   bootstrap/test.sh -m "not slow"   the fast suite; any pytest arguments pass through
set -euo pipefail
cd "$(dirname "$0")/.."
bash bootstrap/setup.sh test
exec "${SWARM_VENV:-.venv}/bin/python" -m pytest -ra "$@"
