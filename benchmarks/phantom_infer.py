"""Benchmark inference on scanner exports: `medmtl infer` on held-out phantom DICOM studies, scored by Dice.

    python benchmarks/phantom_infer.py --model bundles/phantom_mtl/models/model.pt [--cases 4] [--seed 1]

Generates K held-out phantom cases as scanner exports (each study: the T1 series, a localizer and a FLAIR
series as decoys, non-DICOM files, every second study oblique; `medmtl synth --dicom K`), runs
`medmtl infer <study> --bundle bundles/phantom_mtl --model M` on each study folder as a user would, and prints
JSON: which series was chosen, Dice of the NIfTI output against the phantom's reference label (same grid:
output voxel i,j,k is input voxel i,j,k), the classification probability, `dciodvfy` errors on the DICOM SEG,
and seconds per study. Target of the inference issue: the right series every time and Dice >= 0.9.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from medmtl.data.datalist import read_dataset_json
from medmtl.data.synthetic import MAIN_SERIES_DESCRIPTION, generate_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]
MEDMTL = [sys.executable, "-m", "medmtl.cli"]


def dice(a: np.ndarray, b: np.ndarray) -> float | None:
    """Dice of two boolean masks; None when both are empty."""
    total = int(a.sum() + b.sum())
    return None if total == 0 else 2.0 * float((a & b).sum()) / total


def dciodvfy_errors(path: Path) -> list[str] | None:
    """The `Error` lines dciodvfy prints for a file; None when dciodvfy is not installed."""
    if shutil.which("dciodvfy") is None:
        return None
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]


def main() -> None:
    """Generate, infer, score, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a trained phantom_mtl checkpoint (model.pt)")
    parser.add_argument("--bundle", type=Path, default=REPO_ROOT / "bundles" / "phantom_mtl")
    parser.add_argument("--cases", type=int, default=4, help="held-out studies to export (default 4)")
    parser.add_argument("--seed", type=int, default=1, help="phantom seed (default 1: not the training set)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="medmtl_infer_bench_"))
    try:
        data = work / "data"
        generate_dataset(data, cases=2, seed=args.seed, dicom_cases=args.cases)
        exports = read_dataset_json(data)["dicom_exports"]
        results = []
        for entry in exports:
            out = work / "out" / entry["case"]
            start = time.perf_counter()
            proc = subprocess.run(
                [*MEDMTL, "infer", str(data / entry["study_dir"]), "--bundle", str(args.bundle),
                 "--model", str(args.model), "--output", str(out), "--quiet"],
                capture_output=True, text=True, cwd=REPO_ROOT,
            )
            seconds = time.perf_counter() - start
            row: dict = {"case": entry["case"], "oblique": entry.get("oblique"), "exit_code": proc.returncode,
                         "seconds": round(seconds, 2)}
            reports = sorted(out.glob("*/report.json"))
            if proc.returncode != 0 or len(reports) != 1:
                row["error"] = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                results.append(row)
                continue
            folder = reports[0].parent
            report = json.loads(reports[0].read_text())
            reference = np.asarray(nib.load(data / entry["label"]).dataobj)
            predicted = np.asarray(nib.load(folder / "seg.nii.gz").dataobj)
            row.update(
                series_chosen=report["input"]["description"],
                right_series=report["input"]["description"] == MAIN_SERIES_DESCRIPTION,
                same_grid=bool(np.allclose(nib.load(folder / "seg.nii.gz").affine,
                                           nib.load(data / entry["label"]).affine, atol=1e-4)),
                dice_organ=dice(predicted == 1, reference == 1),
                dice_lesion=dice(predicted == 2, reference == 2),
                lesion_present=bool(entry["class"]),
                class_probabilities=report["class_probabilities"],
                dciodvfy_errors=dciodvfy_errors(folder / "seg.dcm"),
            )
            scored = [row[k] for k in ("dice_organ", "dice_lesion") if row[k] is not None]
            row["mean_dice"] = float(np.mean(scored)) if scored else None
            results.append(row)

        means = [r["mean_dice"] for r in results if r.get("mean_dice") is not None]
        organ = [r["dice_organ"] for r in results if r.get("dice_organ") is not None]
        lesion = [r["dice_lesion"] for r in results if r.get("dice_lesion") is not None]
        print(json.dumps({
            "benchmark": "medmtl infer on phantom scanner exports",
            "model": str(args.model),
            "studies": len(results),
            "right_series": sum(bool(r.get("right_series")) for r in results),
            "mean_dice": round(float(np.mean(means)), 4) if means else None,
            "mean_dice_organ": round(float(np.mean(organ)), 4) if organ else None,
            "mean_dice_lesion": round(float(np.mean(lesion)), 4) if lesion else None,
            "dciodvfy_errors": sum(len(r.get("dciodvfy_errors") or []) for r in results),
            "target": {"mean_dice": 0.9, "right_series": len(results)},
            "cases": results,
            "date": time.strftime("%Y-%m-%d"),
        }, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
