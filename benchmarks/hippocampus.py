"""Hippocampus benchmark: multi-task variants against single-task, each trained within the same time budget.

    python benchmarks/hippocampus.py --dataset-dir ../shared/datasets/Task04_Hippocampus --budget-min 30 \
        [--variants seg,seg_boundary,seg_cls,all,all_uncertainty] [--output-dir DIR] [--study ../shared/dicom/Study1]
        [--epochs N]   # instead of the budget: every variant trains N epochs (equal steps, not equal time)

Every variant trains `bundles/hippocampus_mtl` from scratch with the same seed, split (fold 0 of 5: 160 training
and 40 validation cases, seed 0) and wall-clock budget (`--time_budget_min`: training stops at the last epoch
boundary that fits; the learning rate decays over the budget). The validation cases are never trained on and are
not used to pick a checkpoint: each variant is scored on its final weights (`models/last.pt`). Per variant the
benchmark prints Dice and HD95 (mm) per structure, mean Dice, epochs and iterations done, seconds per iteration,
the fraction of step time spent waiting for data, inference seconds per case and peak memory. With `--study`,
the default variant's checkpoint segments a real scanner export with `medmtl infer` and the per-label volumes
are printed.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient
from monai.bundle import ConfigParser

from medmtl.engine.checkpoint import load_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "bundles" / "hippocampus_mtl" / "configs"
VARIANTS = {
    "seg": ["--heads", "['seg']"],
    "seg_boundary": ["--heads", "['seg','boundary']"],
    "seg_cls": ["--heads", "['seg','cls']"],
    "all": ["--heads", "['seg','cls','boundary']"],
    "all_uncertainty": ["--heads", "['seg','cls','boundary']", "--loss_args#weighting", "uncertainty"],
}
DEFAULT_VARIANT = "all"


def _bundle(run_id: str, configs: list[Path], args: list[str], log: Path) -> tuple[float, int]:
    """Run a bundle command; returns (seconds, peak resident memory in MiB of that process)."""
    config_file = str(configs[0]) if len(configs) == 1 else str([str(c) for c in configs])
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", config_file, *args]
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed (exit {proc.returncode}); see {log}")
    return time.perf_counter() - start, usage.ru_maxrss // 1024


def _metric_mean(client: MlflowClient, run_id: str, key: str) -> float | None:
    history = client.get_metric_history(run_id, key)
    return sum(m.value for m in history) / len(history) if history else None


def run_variant(name: str, dataset_dir: Path, out: Path, budget_min: float, extra: list[str], fold: int = 0,
                epochs: int | None = None) -> dict:
    """Train one variant within `budget_min` minutes (or for exactly `epochs` epochs), evaluate it, return figures."""
    out.mkdir(parents=True, exist_ok=True)
    common = ["--dataset_dir", str(dataset_dir), "--output_dir", str(out), "--seed", "0", "--fold", str(fold),
              *VARIANTS[name], *extra]
    budget = ["--time_budget_min", str(budget_min), "--max_epochs", "100000"]
    # no validation while training: the held-out cases are scored once, at the end
    train = (["--max_epochs", str(epochs)] if epochs else budget) + ["--val_interval", "100000"]
    train_s, train_mib = _bundle("training", [CONFIGS / "train.yaml"], common + train, out / "train.out")
    last = out / "models" / "last.pt"
    eval_s, eval_mib = _bundle("evaluating", [CONFIGS / "train.yaml", CONFIGS / "evaluate.yaml"],
                               common + ["--ckpt_file", str(last)], out / "evaluate.out")
    report = json.loads((out / "eval" / "metrics.json").read_text())
    state = load_checkpoint(last)["trainer"]
    client = MlflowClient(f"sqlite:///{out / 'eval' / 'mlruns.db'}")
    (run,) = [r for r in client.search_runs([client.get_experiment_by_name("hippocampus_mtl").experiment_id])
              if not r.info.run_name.startswith("evaluate")]
    metrics = report["metrics"]
    return {
        "variant": name,
        "args": VARIANTS[name],
        **{k: metrics.get(k) for k in sorted(metrics) if k.startswith("val/")},
        "epochs": state["iteration"] // state["epoch_length"],
        "iterations": state["iteration"],
        "train_wall_seconds": round(train_s, 1),
        "sec_per_iter": _metric_mean(client, run.info.run_id, "train/sec_per_iter"),
        "data_wait_fraction": _metric_mean(client, run.info.run_id, "train/data_wait_fraction"),
        "inference_seconds_per_case": report.get("seconds_per_case"),
        "peak_memory_mib": {"training": train_mib, "evaluation": eval_mib},
        "validation_cases": len(report["cases"]),
        "output_dir": str(out),
    }


def measure_step_cost(dataset_dir: Path, fold: int, names: list[str], extra: list[str], rounds: int = 4,
                      iterations: int = 10) -> dict:
    """Seconds per training iteration of each variant, measured in one process with the rounds interleaved.

    The budgeted runs above happen one after the other, and on a shared machine their `sec_per_iter` also
    measures whatever else ran meanwhile; here every variant's real trainer (same backbone, batch, data and
    handlers that cost time per step, without tracking and checkpoints) runs `iterations` steps in turn with
    the others, `rounds` times after a warm-up round, and the median round counts.
    """
    overrides = dict(zip(extra[::2], extra[1::2], strict=True))  # "--key value" pairs from the command line
    trainers = {}
    for name in names:
        parser = ConfigParser()
        parser.read_config(str(CONFIGS / "train.yaml"))
        args = dict(zip(VARIANTS[name][::2], VARIANTS[name][1::2], strict=True)) | overrides
        for key, value in args.items():
            parser[key.removeprefix("--")] = _literal(value)
        parser.update({
            "dataset_dir": str(dataset_dir), "fold": fold, "seed": 0, "resume": False, "max_epochs": 1,
            "output_dir": str(REPO_ROOT / "runs" / "step_cost"),
            "train#dataset#data": "$@data#split[0][:16]",  # 16 cached cases are enough to time steps
            "train#handlers": ["@step_timer", "@train#loss_terms"],
            "train#trainer#epoch_length": iterations,
        })
        trainers[name] = parser.get_parsed_content("train#trainer")
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds + 1):
        for name, trainer in trainers.items():
            trainer.run()
            if round_:  # round 0 warms up (oneDNN kernels, caches)
                seconds[name].append(trainer.state.metrics["train/sec_per_iter"])
    median = {name: statistics.median(values) for name, values in seconds.items()}
    base = median.get("seg")
    return {
        "method": f"interleaved in one process: {rounds} rounds of {iterations} iterations per variant, median",
        "sec_per_iter": {name: round(v, 4) for name, v in median.items()},
        "ratio_to_seg": {name: round(v / base, 3) for name, v in median.items()} if base else None,
    }


def check_targets(results: list[dict], step_cost: dict | None) -> dict:
    """The issue's targets, each with the figure it is judged on and whether it is met (None: not measured)."""
    by_name = {r["variant"]: r for r in results}
    default, single = by_name.get(DEFAULT_VARIANT), by_name.get("seg")
    targets: dict[str, dict] = {}
    if default:
        dice = default["val/mean_dice"]
        targets["default_mean_dice_at_least_0.90"] = {"value": dice, "met": dice >= 0.90}
    if default and single:
        targets["multi_task_beats_single_task"] = {
            "mean_dice": [default["val/mean_dice"], single["val/mean_dice"]],
            "mean_hd95_mm": [default["val/mean_hd95_mm"], single["val/mean_hd95_mm"]],
            "met": default["val/mean_dice"] > single["val/mean_dice"]
            and default["val/mean_hd95_mm"] < single["val/mean_hd95_mm"],
        }
    ratios = (step_cost or {}).get("ratio_to_seg") or {}
    if len(ratios) > 1:
        worst = max(v for k, v in ratios.items() if k != "seg")
        targets["multi_task_step_cost_at_most_1.15x"] = {"value": worst, "met": worst <= 1.15}
    waits = [r["data_wait_fraction"] for r in results if r["data_wait_fraction"] is not None]
    if waits:
        targets["data_wait_under_10_percent"] = {"value": max(waits), "met": max(waits) < 0.10}
    return targets


def _literal(value: str):
    """A command-line override value as the bundle CLI (fire) reads it: a Python literal, else the string."""
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def infer_study(study: Path, model: Path, out: Path) -> dict:
    """Segment a real export with the default variant's checkpoint; return what the report says."""
    proc = subprocess.run(
        [sys.executable, "-m", "medmtl.cli", "infer", str(study), "--bundle", str(CONFIGS.parent),
         "--model", str(model), "--output", str(out), "--quiet"],
        cwd=REPO_ROOT, capture_output=True, text=True,
    )
    reports = [json.loads(p.read_text()) for p in sorted(out.glob("*/report.json"))]
    return {
        "exit_code": proc.returncode,
        "series": [r["input"].get("description") for r in reports],
        "volumes_ml": [r["volumes_ml"] for r in reports],
        "errors": proc.stderr.strip().splitlines()[-3:] if proc.returncode else [],
    }


def main() -> None:
    """Run the variants and print one JSON document."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset-dir", type=Path, required=True)
    parser.add_argument("--budget-min", type=float, default=30.0, help="training budget per variant (minutes)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated of {list(VARIANTS)}")
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "runs" / "hippocampus_benchmark")
    parser.add_argument("--study", type=Path, help="a DICOM export to segment with the default variant")
    parser.add_argument("--fold", type=int, default=0,
                        help="validation fold (default 0, the reported one; pilots for choosing settings use another)")
    parser.add_argument("--epochs", type=int,
                        help="train exactly N epochs instead of the time budget (compares variants at equal steps)")
    parser.add_argument("--skip-step-cost", action="store_true", help="skip the interleaved step-time measurement")
    parser.add_argument("overrides", nargs="*", help="extra bundle overrides for every variant")
    args = parser.parse_args()

    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        sys.exit(f"unknown variant(s) {unknown}; known: {list(VARIANTS)}")
    # measured first, on the machine as the runs will find it, and so that a failure here costs minutes, not hours
    step_cost = None if args.skip_step_cost else measure_step_cost(args.dataset_dir.resolve(), args.fold, names,
                                                                    args.overrides)
    print(json.dumps({"step_cost": step_cost}), file=sys.stderr, flush=True)
    results = []
    for name in names:
        results.append(run_variant(name, args.dataset_dir.resolve(), args.output_dir / name, args.budget_min,
                                   args.overrides, fold=args.fold, epochs=args.epochs))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)  # progress, one line per variant
    document = {
        "benchmark": "hippocampus_mtl variants at a fixed time budget",
        "dataset_dir": str(args.dataset_dir),
        "split": f"fold {args.fold} of 5, seed 0 (160 train / 40 validation)",
        "budget_minutes": None if args.epochs else args.budget_min,
        "epochs": args.epochs,
        "variants": results,
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.machine(),
                    "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()},
        "date": time.strftime("%Y-%m-%d"),
        "step_cost": step_cost,
        "targets": check_targets(results, step_cost),
    }
    if args.study and DEFAULT_VARIANT in names:
        model = args.output_dir / DEFAULT_VARIANT / "models" / "last.pt"
        document["study_inference"] = infer_study(args.study, model, args.output_dir / "study_inference")
    print(json.dumps(document, indent=2))


if __name__ == "__main__":
    main()
