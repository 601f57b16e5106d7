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

# Debian tools the tests use: dciodvfy (dicom3tools) validates DICOM SEG files, postgresql backs the team
# MLflow server test, chromium renders the MLflow UI for the clinician-view test. Installed where apt-get can be
# used (root); elsewhere the tests that need them skip and say why.
apt_packages=()
command -v dciodvfy >/dev/null 2>&1 || apt_packages+=(dicom3tools)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || apt_packages+=(postgresql)
command -v chromium >/dev/null 2>&1 || apt_packages+=(chromium)
if [ ${#apt_packages[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing ${apt_packages[*]} with apt-get"
    apt_log=$(mktemp)
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${apt_packages[@]}"; } >"$apt_log" 2>&1; then
      tail -n 20 "$apt_log" >&2
      rm -f "$apt_log"
      echo "setup: could not install ${apt_packages[*]}; see the apt-get output above" >&2
      exit 1
    fi
    rm -f "$apt_log"
  else
    echo "setup: ${apt_packages[*]} missing and not installable here (needs apt-get as root);" \
      "the tests that need them will skip"
  fi
fi
echo "setup: ready ($("$PY" -c 'import torch, monai; print(f"torch {torch.__version__}, monai {monai.__version__}")'))"
