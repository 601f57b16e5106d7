#!/usr/bin/env bash
# The main job on the built-in default: train the phantom bundle (it generates the phantom dataset on first
# use). Everything goes under bundles/phantom_mtl/{data,models,eval}; a second run resumes from
# models/last.pt. Extra arguments are bundle overrides, e.g. `make train ARGS="--max_epochs 2"`.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m monai.bundle run training --config_file bundles/phantom_mtl/configs/train.yaml "$@"
