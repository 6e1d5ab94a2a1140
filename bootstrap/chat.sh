#!/usr/bin/env bash
# The main job from a fresh clone: venv, dependencies, the default model's cache,
# then a chat with SmolLM2 split across a local swarm of 3 peers on this machine.
#   bootstrap/chat.sh                     3 local peers (loopback only)
#   bootstrap/chat.sh --local 2 --view    any `swarm chat` arguments pass through
set -euo pipefail
cd "$(dirname "$0")/.."
bash bootstrap/setup.sh
args=("$@")
[ ${#args[@]} -eq 0 ] && args=(--local 3 --view)
exec "${SWARM_VENV:-.venv}/bin/swarm" chat "${args[@]}"
