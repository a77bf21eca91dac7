#!/usr/bin/env bash
# Lossforge set-up + entry point. On a fresh machine this installs everything (uv, then the locked
# environment in .venv) and runs the requested command:
#   bash run.sh demo   -> a small search end to end on the embedded dataset (CPU, no servers)
#   bash run.sh test   -> the test suite
# Anything else is passed to the `lossforge` CLI: bash run.sh loss show FILE.json
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v uv >/dev/null 2>&1; then
  python3 -m pip install --quiet --user "uv==0.13.8" || python3 -m pip install --quiet "uv==0.13.8"
  export PATH="$HOME/.local/bin:$PATH"
fi
uv sync --frozen --quiet
cmd="${1:-demo}"
[ $# -gt 0 ] && shift
case "$cmd" in
  test) exec uv run --frozen --no-sync python -m pytest "$@" ;;
  *)    exec uv run --frozen --no-sync lossforge "$cmd" "$@" ;;
esac
