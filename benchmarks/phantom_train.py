"""Benchmark the built-in default: train the phantom bundle from scratch and print its figures as JSON.

    python benchmarks/phantom_train.py [--output-dir DIR] [--keep] [-- extra bundle overrides]

Runs exactly what `make train` runs (phantom generation, then `python -m monai.bundle run training` on
`bundles/phantom_mtl/configs/train.yaml`) into a fresh output folder, then `evaluate.yaml` on the best
checkpoint, and prints wall-clock seconds, the validation figures of the best checkpoint and whether the
targets of the training issue are met: under 10 minutes on 2 CPU cores, mean Dice >= 0.90 over organ and
lesion, classification AUC >= 0.95.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from medmtl.engine.checkpoint import load_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "bundles" / "phantom_mtl" / "configs"
TARGETS = {"wall_seconds": 600.0, "val/mean_dice": 0.90, "val/cls_auc": 0.95}


def _bundle(run_id: str, configs: list[Path], overrides: list[str]) -> float:
    config_file = str(configs[0]) if len(configs) == 1 else str([str(c) for c in configs])
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", config_file, *overrides]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return time.perf_counter() - start


def main() -> None:
    """Train, evaluate, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, help="where the run writes (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary output folder")
    parser.add_argument("overrides", nargs="*", help="extra bundle overrides, e.g. --max_epochs 10")
    args = parser.parse_args()

    out = args.output_dir or Path(tempfile.mkdtemp(prefix="medmtl_phantom_bench_"))
    if out.exists() and any(out.iterdir()):
        sys.exit(f"{out} is not empty: the benchmark trains from scratch")
    common = ["--output_dir", str(out), "--dataset_dir", str(out / "data"), *args.overrides]
    train_seconds = _bundle("training", [CONFIGS / "train.yaml"], common)
    _bundle("evaluating", [CONFIGS / "train.yaml", CONFIGS / "evaluate.yaml"], common)
    report = json.loads((out / "eval" / "metrics.json").read_text())
    metrics = report["metrics"]
    last = load_checkpoint(out / "models" / "last.pt")
    epochs = int(last["trainer"]["iteration"] // last["trainer"]["epoch_length"])

    figures = {
        "benchmark": "phantom_mtl training (the README's main command)",
        "wall_seconds": round(train_seconds, 1),
        "epochs": epochs,
        "seconds_per_epoch": round(train_seconds / max(epochs, 1), 2),
        "best_epoch": int(last["checkpoints"]["best_epoch"]),
        **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in sorted(metrics.items())},
        "validation_cases": len(report["cases"]),
        "targets": TARGETS,
        "meets_targets": train_seconds <= TARGETS["wall_seconds"]
        and (metrics.get("val/mean_dice") or 0) >= TARGETS["val/mean_dice"]
        and (metrics.get("val/cls_auc") or 0) >= TARGETS["val/cls_auc"],
        "machine": {
            "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(),
        },
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(figures, indent=2))
    if args.output_dir is None and not args.keep:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
