"""Where multi-task pays (issue 13 part 4): multi-task against single-task with few training cases, equal steps.

    python benchmarks/hippocampus_lowdata.py --dataset-dir ../shared/datasets/Task04_Hippocampus \
        [--sizes 20,40] [--arms all,seg] [--seeds 0,1,2] [--iterations 200] [--output-dir DIR]
    python benchmarks/hippocampus_lowdata.py --summarize DIR/results.jsonl   # the document from finished runs

Every run trains `bundles/hippocampus_mtl` with `python -m monai.bundle run training` (the bundle's own
SupervisedTrainer, loss, schedule) on the first N cases of a fixed shuffle (torch generator, seed 0) of fold 0's
160 training cases, and is scored by the bundle's `evaluate.yaml` on its final weights (`models/last.pt`) on
fold 0's 40 validation cases, through `benchmarks/hippocampus.py`'s `run_variant`. The subset is the same for
every arm and seed (and the 20-case subset is the head of the 40-case one); the seeds change the training seed
only (`_seed_args` pins the split to seed 0's).

Equal steps: every run does the same number of iterations (`--iterations`, batch 4): a size-N run trains
`iterations * batch / N` epochs, so the 20-case arms see each case twice as often as the 40-case arms. The poly
learning-rate schedule decays over those epochs. Nothing validates during training. The patch is fixed at the
bundle's planned 40 x 56 x 40 (strides [2, 2, 2, 1], divisor 8) so no run re-fingerprints the 200 cases.

Arms (`--arms`): `all` (the default heads seg+cls+boundary), `seg` (single task), and auxiliary designs that need
no code change: `seg_boundary_w1` (seg + boundary head at weight 1.0: drops the presence head, whose target is
nearly always [1, 1] on Task04), `all_uncertainty` (Kendall weighting), `seg_deepsup` (deep supervision: extra
Dice+CE losses on the decoder's lower-resolution seg outputs).

The document gives, per arm (N, arm), the per-seed mean Dice and mean HD95, their mean and sample standard
deviation, and per N each arm's difference to `seg` per seed (paired by seed) with its mean and standard
deviation. Each finished run is appended to `<output-dir>/results.jsonl`; a rerun skips the runs found there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hippocampus import VARIANTS, run_variant  # noqa: E402

from medmtl.data.datalist import kfold_split, load_datalist  # noqa: E402

BATCH_SIZE = 4  # the bundle's default; the epochs per size follow from it
PATCH_SIZE = "[40,56,40]"  # the bundle's planned patch on Task04 (median shape rounded up to multiples of 8)
SUBSET_SEED = 0
# arm -> (hippocampus.py variant giving the heads, extra bundle overrides)
ARMS: dict[str, tuple[str, list[str]]] = {
    "all": ("all", []),
    "seg": ("seg", []),
    "seg_boundary_w1": ("seg_boundary", ["--loss_args#weights#boundary", "1.0"]),
    "all_uncertainty": ("all_uncertainty", []),
    "seg_deepsup": ("seg", ["--network_args#deep_supervision", "true"]),
}
BASELINE = "seg"


def subset_expression(size: int) -> str:
    """Bundle expression for `train#dataset#data`: the first `size` of a seed-0 shuffle of the fold's training cases.

    A lambda, not a bare comprehension: MONAI evaluates config expressions with `eval`, whose locals (the
    resolved `@` references) a comprehension's own scope cannot see on Python < 3.12.
    """
    return ("$(lambda tr: [tr[int(i)] for i in torch.randperm(len(tr), generator=torch.Generator()"
            f".manual_seed({SUBSET_SEED}))[:{size}]])(@data#split[0])")


def subset_case_ids(dataset_dir: Path, size: int, fold: int = 0) -> list[str]:
    """The case ids `subset_expression(size)` selects (the same computation, for the document)."""
    train, _ = kfold_split(load_datalist(dataset_dir), n_folds=5, fold=fold, seed=0)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(SUBSET_SEED))[:size]
    return [train[int(i)]["case_id"] for i in order]


def epochs_for(size: int, iterations: int) -> int:
    """Epochs that give `iterations` steps of batch `BATCH_SIZE` over `size` cases (rounded to whole epochs)."""
    return max(1, round(iterations * BATCH_SIZE / size))


def run_arm(arm: str, size: int, seed: int, iterations: int, dataset_dir: Path, output_dir: Path) -> dict:
    """Train and evaluate one (arm, size, seed); returns `run_variant`'s figures with the arm and size added."""
    variant, extra = ARMS[arm]
    overrides = ["--train#dataset#data", subset_expression(size), "--pipeline#patch_size", PATCH_SIZE, *extra]
    out = output_dir / f"n{size}_{arm}_seed{seed}"
    result = run_variant(variant, dataset_dir, out, budget_min=0.0, extra=overrides, fold=0,
                         epochs=epochs_for(size, iterations), seed=seed)
    return {"arm": arm, "train_cases": size, "arm_overrides": extra, **result,
            "final_train_loss_seg": final_train_loss_seg(out)}


def final_train_loss_seg(out: Path) -> float | None:
    """The last epoch's mean training seg loss (Dice+CE) of the training run in `out`: fit, not generalisation.

    At equal steps a lower validation Dice with a higher training seg loss means the run is behind in
    optimisation (underfitting), not that it overfits.
    """
    db = out / "eval" / "mlruns.db"
    if not db.exists():
        return None
    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("hippocampus_mtl")
    runs = [r for r in client.search_runs([experiment.experiment_id]) if not r.info.run_name.startswith("evaluate")]
    history = sorted(client.get_metric_history(runs[0].info.run_id, "train/loss_seg"), key=lambda m: m.step)
    return round(history[-1].value, 4) if runs and history else None


def _mean_sd(values: list[float]) -> dict:
    """Mean and sample standard deviation (None with fewer than two values) of `values`, rounded."""
    return {"mean": round(statistics.mean(values), 4) if values else None,
            "sd": round(statistics.stdev(values), 4) if len(values) > 1 else None, "n": len(values)}


def summarize(results: list[dict]) -> dict:
    """Per (size, arm): per-seed figures, mean, sd; per size: each arm minus `seg`, paired by seed."""
    arms: dict[str, dict] = {}
    for size in sorted({r["train_cases"] for r in results}):
        for arm in dict.fromkeys(r["arm"] for r in results):
            runs = sorted((r for r in results if r["train_cases"] == size and r["arm"] == arm), key=lambda r: r["seed"])
            if not runs:
                continue
            arms[f"n{size}_{arm}"] = {
                "train_cases": size, "arm": arm, "seeds": [r["seed"] for r in runs],
                "iterations": sorted({r["iterations"] for r in runs}), "epochs": sorted({r["epochs"] for r in runs}),
                "mean_dice_per_seed": [round(r["val/mean_dice"], 4) for r in runs],
                "mean_hd95_mm_per_seed": [round(r["val/mean_hd95_mm"], 3) for r in runs],
                "mean_dice": _mean_sd([r["val/mean_dice"] for r in runs]),
                "mean_hd95_mm": _mean_sd([r["val/mean_hd95_mm"] for r in runs]),
                **{f"{key.removeprefix('val/')}_per_seed": [round(r[key], 4) for r in runs] for key in sorted(runs[0])
                   if key.startswith("val/dice_") and all(r.get(key) is not None for r in runs)},
                "final_train_loss_seg_per_seed": [r.get("final_train_loss_seg") for r in runs],
                "sec_per_iter": round(statistics.mean(r["sec_per_iter"] for r in runs), 3),
            }
    differences: dict[str, dict] = {}
    for key, row in arms.items():
        base = arms.get(f"n{row['train_cases']}_{BASELINE}")
        if row["arm"] == BASELINE or base is None:
            continue
        seeds = [s for s in row["seeds"] if s in base["seeds"]]
        dice = [row["mean_dice_per_seed"][row["seeds"].index(s)] - base["mean_dice_per_seed"][base["seeds"].index(s)]
                for s in seeds]
        hd = [row["mean_hd95_mm_per_seed"][row["seeds"].index(s)]
              - base["mean_hd95_mm_per_seed"][base["seeds"].index(s)] for s in seeds]
        differences[f"{key}_minus_{BASELINE}"] = {
            "seeds": seeds, "mean_dice_diff_per_seed": [round(d, 4) for d in dice],
            "mean_dice_diff": _mean_sd(dice), "mean_hd95_mm_diff_per_seed": [round(d, 3) for d in hd],
            "mean_hd95_mm_diff": _mean_sd(hd),
        }
    return {"arms": arms, "differences_paired_by_seed": differences}


def document(results: list[dict], iterations: int | None, dataset_dir: str | None) -> dict:
    """The printed JSON document for `results`."""
    return {
        "benchmark": "hippocampus_mtl low-data study: multi-task vs single-task at equal steps (issue 13 part 4)",
        "dataset_dir": dataset_dir,
        "validation": "fold 0 of 5, seed 0: 40 cases, final weights, bundle evaluate.yaml (Gaussian sliding window)",
        "training_subset": f"first N of a torch.randperm(seed {SUBSET_SEED}) shuffle of fold 0's 160 training cases",
        "equal_steps": {
            "iterations": iterations, "batch_size": BATCH_SIZE,
            "epochs_per_size": {str(n): epochs_for(n, iterations) for n in (20, 40)} if iterations else None,
        },
        "patch_size": PATCH_SIZE,
        "arms_overrides": {arm: VARIANTS[variant] + extra for arm, (variant, extra) in ARMS.items()},
        **summarize(results),
        "runs": results,
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.machine(),
                    "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()},
        "date": time.strftime("%Y-%m-%d"),
    }


def main() -> None:
    """Run the arms one after another (appending to results.jsonl) and print one JSON document."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset-dir", type=Path)
    parser.add_argument("--sizes", default="20,40", help="training subset sizes")
    parser.add_argument("--arms", default="all,seg", help=f"comma-separated of {list(ARMS)}")
    parser.add_argument("--seeds", default="0,1,2", help="training seeds (the split stays seed 0's)")
    parser.add_argument("--iterations", type=int, default=200, help="training iterations per run (equal steps)")
    parser.add_argument("--output-dir", type=Path, default=Path("runs") / "hippocampus_lowdata")
    parser.add_argument("--summarize", type=Path, help="print the document of a results.jsonl (runs of several"
                        " invocations may be concatenated into one file) and exit")
    args = parser.parse_args()
    if args.summarize:
        results = [json.loads(line) for line in args.summarize.read_text().splitlines() if line.strip()]
        for r in results:  # runs recorded before the training loss was part of the record
            if r.get("final_train_loss_seg") is None:
                r["final_train_loss_seg"] = final_train_loss_seg(Path(r["output_dir"]))
        its = {r["iterations"] for r in results}
        print(json.dumps(document(results, its.pop() if len(its) == 1 else None, None), indent=2))
        return
    if args.dataset_dir is None:
        parser.error("--dataset-dir is required (unless --summarize)")
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if unknown := sorted(set(arms) - set(ARMS)):
        sys.exit(f"unknown arm(s) {unknown}; known: {list(ARMS)}")
    sizes = [int(s) for s in args.sizes.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    dataset_dir = args.dataset_dir.resolve()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    log = args.output_dir / "results.jsonl"
    done = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
    results = [r for r in done if r["iterations"] == args.iterations]
    for seed in seeds:  # seed-major: a study cut short still has complete, paired seeds
        for size in sizes:
            for arm in arms:
                if any((r["arm"], r["train_cases"], r["seed"]) == (arm, size, seed) for r in results):
                    continue
                result = run_arm(arm, size, seed, args.iterations, dataset_dir, args.output_dir.resolve())
                results.append(result)
                with log.open("a") as f:
                    f.write(json.dumps(result) + "\n")
                print(json.dumps(result), file=sys.stderr, flush=True)
    doc = document(results, args.iterations, str(args.dataset_dir))
    doc["subset_case_ids"] = {str(n): subset_case_ids(dataset_dir, n) for n in sizes}
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
