#!/usr/bin/env bash
# Create .venv and install medmtl with its dev tools. Safe to re-run: it skips what is already done.
#
# torch goes in first, so that the package's own "torch>=2.3" finds it satisfied:
#   - no CUDA GPU: torch==2.13.0, the CPU build (on this project's machines it lies on disk; elsewhere
#     set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu to avoid a multi-GB CUDA download);
#   - a CUDA GPU: torch==2.13.0 from PyPI, which is a CUDA build.
# Override with TORCH_SPEC (e.g. TORCH_SPEC="torch==2.14.1").
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "medmtl needs Python >= 3.10")'
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@" 2>&1 | grep -v '^WARNING: Location' || true; }

if ! "$PY" -c 'import torch' 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: CUDA GPU found; installing $TORCH_SPEC (CUDA build)"
    pip_install "$TORCH_SPEC"
  else
    echo "setup: no CUDA GPU; installing $TORCH_SPEC (CPU build)"
    pip_install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"
  fi
  "$PY" -c 'import torch' || { echo "setup: torch failed to install" >&2; exit 1; }
fi

# Re-install the package only when its requirements change.
stamp="$VENV/.medmtl-installed"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing medmtl and its dependencies into $VENV"
  pip_install -e ".[dev]"
  "$PY" -c 'import medmtl, monai, mlflow, highdicom' || { echo "setup: install incomplete" >&2; exit 1; }
  echo "$want" >"$stamp"
fi

# dciodvfy (Debian's dicom3tools) validates the DICOM SEG files that medmtl writes (tests/test_writers.py).
# Installed where apt-get can be used (root); elsewhere that one test skips and says why.
if ! command -v dciodvfy >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing dicom3tools (dciodvfy) with apt-get"
    apt_log=$(mktemp)
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends dicom3tools; } >"$apt_log" 2>&1 \
        || ! command -v dciodvfy >/dev/null 2>&1; then
      tail -n 20 "$apt_log" >&2
      rm -f "$apt_log"
      echo "setup: could not install dicom3tools (it provides dciodvfy); see the apt-get output above" >&2
      exit 1
    fi
    rm -f "$apt_log"
  else
    echo "setup: dciodvfy not found and not installable here (needs apt-get as root); the DICOM SEG" \
      "validation test will skip (install Debian's dicom3tools to run it)"
  fi
fi
echo "setup: ready ($("$PY" -c 'import torch, monai; print(f"torch {torch.__version__}, monai {monai.__version__}")'))"
