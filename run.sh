#!/usr/bin/env bash
# Lossforge set-up + entry point. On a fresh machine this installs everything (uv, then the locked
# environment in .venv) and runs the requested command:
#   bash run.sh demo   -> a small search end to end on the embedded dataset (CPU, no servers)
#   bash run.sh test   -> the test suite
#   bash run.sh openmmlab-install -> add the optional OpenMMLab backend (mmseg, mmdet, mmpose) to .venv
# Anything else is passed to the `lossforge` CLI: bash run.sh loss show FILE.json
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v uv >/dev/null 2>&1; then
  python3 -m pip install --quiet --user "uv==0.13.8" || python3 -m pip install --quiet "uv==0.13.8"
  export PATH="$HOME/.local/bin:$PATH"
fi
# --inexact: keep packages that are not in the lock, i.e. the optional OpenMMLab backend that
# `bash run.sh openmmlab-install` adds with `uv pip install` (mmcv must be compiled against the installed torch,
# so it cannot be locked); a plain sync would uninstall it. Locked packages are still put at their locked versions.
uv sync --frozen --inexact --quiet
cmd="${1:-demo}"
[ $# -gt 0 ] && shift
case "$cmd" in
  test) exec uv run --frozen --no-sync python -m pytest "$@" ;;
  openmmlab-install) exec bash docker/openmmlab-install.sh "$@" ;;
  *)    exec uv run --frozen --no-sync lossforge "$cmd" "$@" ;;
esac
