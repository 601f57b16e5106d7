"""Does training on label-only cases help when masks are scarce? Phantom benchmark, printed as JSON.

    python benchmarks/partial_labels.py [--size 32] [--steps 480] [--seeds 0 1 2] [--output-dir DIR [--reuse]]

Two arms, each trained by the phantom bundle through `python -m monai.bundle run training` for the same
number of optimizer steps, with the same seeds, and scored on the same fully labelled held-out set:

- `masked_only`: the K = 8 cases that keep their masks (and their lesion-present labels), batch 2.
- `masked_plus_label_only`: the same 8 plus 40 cases with only their lesion-present label, batch 4 with
  `--masked_share 0.5`: every step holds 2 masked cases, as in the first arm, and 2 label-only cases. The
  segmentation head sees the same masks per step in both arms; the difference is what the label-only cases
  add through the classification head and the shared encoder (at about twice the compute per step).

Data: `generate_dataset(cases=48, masked=8)` (cases 0-7 masked: 4 with a lesion, 4 without) and a held-out
set of 16 fully labelled cases from another seed. Each run validates once, after its last step, on the
held-out set (Dice organ and lesion over the 16 masks, lesion-present AUC over the 16 class labels). The
seeds change the network initialisation and the sampling, not the data. Prints per-run figures and, per arm,
the mean and the sample standard deviation over seeds, and the gain (mean of the paired differences, its
spread and its range).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from medmtl.data.datalist import load_datalist
from medmtl.data.synthetic import generate_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_YAML = REPO_ROOT / "bundles" / "phantom_mtl" / "configs" / "train.yaml"
MASKED, TOTAL, HELD_OUT = 8, 48, 16
METRICS = {"dice_organ": "val/dice_organ", "dice_lesion": "val/dice_lesion", "lesion_auc": "val/cls_auc"}
# arm -> (batch size, masked share per batch, use the label-only cases)
ARMS = {"masked_only": (2, None, False), "masked_plus_label_only": (4, 0.5, True)}


def _datasets(root: Path, size: int) -> tuple[Path, list[dict], list[dict]]:
    """The training set (8 masked, 40 label-only) and the held-out set: its folder and both datalists."""
    train_dir, held_out_dir = root / "train", root / "held_out"
    if not (train_dir / "dataset.json").is_file():
        generate_dataset(train_dir, cases=TOTAL, size=size, seed=0, masked=MASKED)
    if not (held_out_dir / "dataset.json").is_file():
        generate_dataset(held_out_dir, cases=HELD_OUT, size=size, seed=1000)
    return held_out_dir, load_datalist(train_dir), load_datalist(held_out_dir)


def _run(arm: str, seed: int, steps: int, size: int, held_out_dir: Path, train: list[dict],
         held_out: list[dict], out: Path, threads: int, reuse: bool = False) -> dict:
    result_file = out / "result.json"
    if reuse and result_file.is_file():
        done = json.loads(result_file.read_text())
        if done["steps"] == steps:
            return done
    batch_size, share, label_only = ARMS[arm]
    items = train if label_only else [item for item in train if "label" in item]
    per_epoch = len(items) // batch_size  # the sampler and plain shuffling both give whole batches here
    if steps % per_epoch:
        sys.exit(f"--steps {steps} is not a multiple of {per_epoch} steps per epoch of {arm}")
    epochs = steps // per_epoch
    overrides = {
        "data#split": [items, held_out],  # the held-out set validates, once, after the last epoch
        "training": [
            "$@resume_from",
            "$@train#trainer.run()",
            "$medmtl.engine.write_evaluation_report(@validate#evaluator, @eval_dir + '/metrics.json')",
        ],
    }
    args_file = out / "overrides.json"
    out.mkdir(parents=True, exist_ok=True)
    args_file.write_text(json.dumps(overrides))
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(TRAIN_YAML),
        # dataset_dir: the set the bundle checks and takes its label names from; the cases come from data#split
        "--args_file", str(args_file), "--dataset_dir", str(held_out_dir), "--output_dir", str(out),
        "--seed", str(seed), "--max_epochs", str(epochs), "--val_interval", str(epochs),
        "--batch_size", str(batch_size), *(["--masked_share", str(share)] if share is not None else []),
        "--pipeline#patch_size", str([size] * 3), "--num_workers", "0", "--resume", "false",
        "--experiment_name", "partial_labels", "--run_name", f"{arm} seed {seed}",
    ]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    # on a shared CPU, more threads than free cores make every step several times slower
    env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    metrics = json.loads((out / "eval" / "metrics.json").read_text())["metrics"]
    result = {"arm": arm, "seed": seed, "epochs": epochs, "steps": steps, "batch_size": batch_size,
              "seconds": round(seconds, 1), **{k: metrics.get(v) for k, v in METRICS.items()}}
    result_file.write_text(json.dumps(result))
    return result


def _spread(values: list[float]) -> dict:
    return {"mean": round(statistics.mean(values), 4) + 0.0,  # + 0.0: no "-0.0"
            "sd": round(statistics.stdev(values), 4) if len(values) > 1 else None,
            "min": round(min(values), 4), "max": round(max(values), 4)}


def main() -> None:
    """Run both arms for every seed and print the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=32, help="phantom edge length and patch size (default 32)")
    parser.add_argument("--steps", type=int, default=480, help="optimizer steps per run (default 480)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    parser.add_argument("--output-dir", type=Path, help="where data and runs go (default: a temporary folder)")
    parser.add_argument("--reuse", action="store_true",
                        help="take the runs already finished in --output-dir (their result.json) instead of rerunning")
    args = parser.parse_args()

    root = args.output_dir or Path(tempfile.mkdtemp(prefix="medmtl_partial_labels_"))
    held_out_dir, train, held_out = _datasets(root, args.size)
    runs = []
    for seed in args.seeds:
        for arm in args.arms:
            runs.append(_run(arm, seed, args.steps, args.size, held_out_dir, train, held_out,
                             root / "runs" / f"{arm}_seed{seed}", args.threads, args.reuse))
            print(json.dumps(runs[-1]), file=sys.stderr, flush=True)  # progress; stdout gets the report
    arms = {}
    for arm in args.arms:
        mine = [r for r in runs if r["arm"] == arm]
        arms[arm] = {k: _spread([r[k] for r in mine]) for k in [*METRICS, "seconds"]}
    gain = {}
    if len(args.arms) == 2:
        base, other = (sorted({r["seed"]: r for r in runs if r["arm"] == a}.items()) for a in args.arms)
        for key in METRICS:
            gain[key] = _spread([o[key] - b[key] for (_, b), (_, o) in zip(base, other, strict=True)])
    report = {
        "benchmark": "partial_labels",
        "command": " ".join(["python", "benchmarks/partial_labels.py", *sys.argv[1:]]),
        "data": {"size": args.size, "masked": MASKED, "label_only": TOTAL - MASKED, "held_out": HELD_OUT},
        "steps": args.steps,
        "seeds": args.seeds,
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                    "cuda": torch.cuda.is_available()},
        "runs": runs,
        "arms": arms,
        "gain_of_label_only_cases": gain,
        "output_dir": str(root),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
