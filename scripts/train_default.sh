#!/usr/bin/env bash
# The main job on the built-in default data: generate the phantom set (once), then check it.
# (The training issue replaces the check with the phantom bundle's training run.)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATASET_DIR:-data/phantom}
[ -f "$DATA/dataset.json" ] || .venv/bin/medmtl synth --out "$DATA"
.venv/bin/medmtl check-data "$DATA"
