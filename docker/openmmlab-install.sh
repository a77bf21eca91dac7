#!/usr/bin/env bash
# Installs the optional OpenMMLab backend (mmengine 0.10.7, mmcv 2.1.0, mmsegmentation 1.2.2, mmdet 3.3.0,
# mmpose 1.3.2) into the project's .venv:  bash run.sh openmmlab-install   (or bash docker/openmmlab-install.sh)
#
# Decisions:
# - Not in pyproject/uv.lock: mmcv 2.1.0 has no wheel for Python 3.11 + torch 2.13, and its setup.py imports
#   torch, so `uv lock` cannot even read its metadata without building it against the installed torch.
#   The packages are installed with `uv pip install` on top of the locked environment, and run.sh syncs with
#   `uv sync --frozen --inexact`, which keeps packages that are not in the lock (a plain `uv sync` removes them).
# - The locked versions are constraints (`uv export`), so OpenMMLab's requirements never move a locked package
#   and the next `uv sync --frozen --inexact` has nothing to change.
# - mmcv (full, with ops: mmcv-lite lacks the ops mmdet needs; mmseg/mmdet assert mmcv < 2.2.0) and xtcocotools
#   (mmpose; its PyPI wheels are built for numpy 1) are compiled once from their PyPI sources into a wheel cache
#   outside the repository ($LOSSFORGE_WHEEL_CACHE, default ~/.cache/lossforge/wheels); re-running reuses them.
#   Their setup.py needs the installed torch/numpy, hence --no-build-isolation, and mmcv 2.1.0's setup.py predates
#   setuptools 81 (the known-good recipe uses setuptools < 81): that setuptools goes into a side folder put first
#   on PYTHONPATH for the build only, so the locked setuptools in .venv stays as it is.
# - chumpy (an mmpose requirement, only for SMPL body models) is skipped: it does not build on numpy 2.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v uv >/dev/null 2>&1 || export PATH="$HOME/.local/bin:$PATH"

WHEELS="${LOSSFORGE_WHEEL_CACHE:-$HOME/.cache/lossforge/wheels}"
VENV="${UV_PROJECT_ENVIRONMENT:-$PWD/.venv}"
PY="$VENV/bin/python"
mkdir -p "$WHEELS"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# the locked environment first (as run.sh makes it), unless it is there (docker: synced with its own options)
[ -x "$PY" ] || uv sync --frozen --inexact --quiet
uv export --frozen --no-hashes --no-emit-project --all-extras --all-groups --format requirements-txt \
  --quiet > "$work/constraints.txt"

build_wheel() {  # build_wheel NAME VERSION: compile NAME==VERSION from its sdist into $WHEELS once
  local name="$1" version="$2"
  if compgen -G "$WHEELS/${name}-${version}-*.whl" >/dev/null; then
    echo "openmmlab-install: using cached $(basename "$(compgen -G "$WHEELS/${name}-${version}-*.whl" | head -1)")"
    return
  fi
  if [ ! -d "$work/buildtools" ]; then
    uv pip install --quiet --target "$work/buildtools" "setuptools<81" wheel pip "cython>=3" ninja
  fi
  echo "openmmlab-install: building ${name}==${version} from source (mmcv: ~20 min on 2 busy cores, once)"
  PYTHONPATH="$work/buildtools" MMCV_WITH_OPS=1 FORCE_CUDA=0 CFLAGS="${CFLAGS:--O1 -g0}" \
    MAX_JOBS="${MAX_JOBS:-2}" nice -n 10 "$PY" -m pip wheel --quiet --no-deps --no-build-isolation \
    --no-binary "$name" "${name}==${version}" -w "$work/wheel-$name"
  mv "$work/wheel-$name"/*.whl "$WHEELS/"
}
build_wheel mmcv 2.1.0
build_wheel xtcocotools 1.14.3

# mmpose without its requirements (they name chumpy), then everything else with the locked constraints; the
# compiled wheels are given by path (PyPI's manylinux xtcocotools wheel, built for numpy 1, would win otherwise)
uv pip install --python "$PY" --quiet --no-deps mmpose==1.3.2
uv pip install --python "$PY" --quiet --constraint "$work/constraints.txt" \
  "$(compgen -G "$WHEELS/mmcv-2.1.0-*.whl" | head -1)" "$(compgen -G "$WHEELS/xtcocotools-1.14.3-*.whl" | head -1)" \
  mmengine==0.10.7 mmsegmentation==1.2.2 mmdet==3.3.0 ftfy regex json_tricks munkres
# mmsegmentation 1.2.2's wheel also installs its own test suite as a top-level package `tests`: a regular package
# in site-packages wins over the project's tests/ folder (a namespace package) in `import tests.x`, so remove it
site="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
if grep -q '^tests/__init__.py' "$site"/mmsegmentation-*.dist-info/RECORD 2>/dev/null; then rm -rf "$site/tests"; fi
"$PY" -c "import mmcv.ops, mmseg, mmdet, mmpose; print('openmmlab-install: mmcv', mmcv.__version__, \
'mmseg', mmseg.__version__, 'mmdet', mmdet.__version__, 'mmpose', mmpose.__version__)"
