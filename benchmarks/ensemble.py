"""Single models against their ensemble on one fold's validation cases, as `medmtl infer --model A B C` runs it.

    python benchmarks/ensemble.py --dataset-dir ../shared/datasets/Task04_Hippocampus --fold 0 \
        --models RUN_A/models/last.pt RUN_B/models/last.pt RUN_C/models/last.pt [--bundle bundles/hippocampus_mtl]

Every checkpoint must have been trained without the fold's validation cases (e.g. the same fold with other
seeds), so both the members and the ensemble are scored on cases none of them has seen. Each validation case is
segmented by the bundle's inference predictor (Gaussian sliding window, no TTA) once per member and once by the
ensemble (softmax probabilities averaged before the argmax), on the input grid, and scored by Dice per structure
against its label. Prints one JSON document: per member and for the ensemble, Dice per structure and the mean, and
the ensemble's gain over the mean of the members and over the best member.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.data import NibabelReader
from monai.transforms import LoadImage

from medmtl.data.datalist import kfold_split, label_names, load_datalist, read_dataset_json
from medmtl.inference.batch import build_from_config, load_inference_config

REPO_ROOT = Path(__file__).resolve().parents[1]


def dice_per_label(pred: np.ndarray, ref: np.ndarray, labels: list[int]) -> list[float]:
    """Dice of each label value (NaN where it is absent from both)."""
    out = []
    for value in labels:
        a, b = pred == value, ref == value
        total = int(a.sum() + b.sum())
        out.append(2.0 * float((a & b).sum()) / total if total else float("nan"))
    return out


def score(bundle: Path, models: list[str], cases: list[dict], labels: list[int]) -> dict:
    """Segment every case with the predictor of `models` (one checkpoint, or an ensemble); Dice per label."""
    config = load_inference_config(bundle, {"ckpt_file": models if len(models) > 1 else models[0], "tta": False})
    predictor, _ = build_from_config(config)
    load = LoadImage(reader=NibabelReader(), image_only=True, ensure_channel_first=True, dtype=np.float32)
    rows, start = [], time.perf_counter()
    for case in cases:
        label = predictor.predict(load(case["image"]), name=case["case_id"]).label
        ref = np.asarray(nib.load(case["label"]).dataobj).astype(np.int64)
        rows.append(dice_per_label(label, ref, labels))
    per_label = np.nanmean(np.asarray(rows, dtype=float), axis=0)
    return {
        "models": models,
        "dice": [round(float(d), 4) for d in per_label],
        "mean_dice": round(float(np.mean(per_label)), 4),
        "seconds_per_case": round((time.perf_counter() - start) / len(cases), 3),
    }


def main() -> None:
    """Score each member and the ensemble; print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset-dir", type=Path, required=True)
    parser.add_argument("--models", nargs="+", required=True, help="checkpoints trained without the fold's cases")
    parser.add_argument("--bundle", type=Path, default=REPO_ROOT / "bundles" / "hippocampus_mtl")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--num-folds", type=int, default=5)
    parser.add_argument("--split-seed", type=int, default=0)
    args = parser.parse_args()
    if len(args.models) < 2:
        sys.exit("give at least two checkpoints to compare with their ensemble")

    names = label_names(read_dataset_json(args.dataset_dir))
    labels = [v for v in names if v != 0]
    _, val = kfold_split(load_datalist(args.dataset_dir), args.num_folds, args.fold, args.split_seed)
    members = [score(args.bundle, [m], val, labels) for m in args.models]
    ensemble = score(args.bundle, list(args.models), val, labels)
    member_means = [m["mean_dice"] for m in members]
    print(json.dumps({
        "benchmark": "single checkpoints against their ensemble",
        "bundle": str(args.bundle),
        "fold": args.fold,
        "validation_cases": len(val),
        "labels": [names[v] for v in labels],
        "members": members,
        "ensemble": ensemble,
        "members_mean_dice": round(statistics.mean(member_means), 4),
        "members_sd": round(statistics.stdev(member_means), 4),
        "gain_over_member_mean": round(ensemble["mean_dice"] - statistics.mean(member_means), 4),
        "gain_over_best_member": round(ensemble["mean_dice"] - max(member_means), 4),
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
