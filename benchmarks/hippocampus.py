"""Hippocampus benchmark: the bundle's variants and the plain MONAI UNet peer, each trained within the same budget.

    python benchmarks/hippocampus.py --dataset-dir ../shared/datasets/Task04_Hippocampus --budget-min 30 \
        [--variants monai_unet,seg,seg_boundary,seg_cls,all,all_uncertainty] [--output-dir DIR]
        [--study ../shared/dicom/Study1]
        [--epochs N]   # instead of the budget: every variant trains N epochs (equal steps, not equal time)
        [--budget-clock cpu]   # count process CPU time per thread instead of wall time (a shared machine)
        [--seeds 0,1]  # training seeds (the split stays fold F of seed 0); each variant runs once per seed
        [--step-cost-only]  # only the interleaved step-cost measurement
    python benchmarks/hippocampus.py --merge a.json b.json [c.json]  # one document from runs made separately

`--merge` reads documents this benchmark printed (same fold, epochs or budget) and prints one document with all
their runs, the comparison and the targets: arms can then run as parallel invocations on a shared machine (each
at equal epochs, or with `--budget-clock cpu`), and the step cost can be measured in its own invocation.

`monai_unet` is the peer of issue 13 (`benchmarks/monai_unet_peer.py`): MONAI's tutorial UNet with DiceCELoss,
AdamW 3e-3 constant, batch 4, trained by MONAI's SupervisedTrainer on the same fold and budget, and scored by
the bundle's own `evaluate.yaml` on its final weights (same validation cases, same Gaussian sliding window,
same metric code). The document's `vs_monai_unet` gives the default's Dice difference to it and the cost per
training sample of both (interleaved in one process, and as measured in the runs).

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

from medmtl.data.datalist import kfold_split, load_datalist
from medmtl.engine.checkpoint import load_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from monai_unet_peer import PEER_NAME, PEER_NETWORK_EXPR, build_peer_trainer, peer_patch_size  # noqa: E402

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
PEER_BATCH = 4


def _bundle(run_id: str, configs: list[Path], args: list[str], log: Path) -> tuple[float, int]:
    """Run a bundle command; returns (seconds, peak resident memory in MiB of that process)."""
    config_file = str(configs[0]) if len(configs) == 1 else str([str(c) for c in configs])
    return _run([sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", config_file, *args], log)


def _run(cmd: list[str], log: Path) -> tuple[float, int]:
    """Run a command, output to `log`; returns (seconds, peak resident memory in MiB of that process)."""
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


def _seed_args(seed: int) -> list[str]:
    """Training seed overrides that keep the split of seed 0 (the bundle's split follows @seed otherwise)."""
    args = ["--seed", str(seed)]
    if seed:
        args += ["--data#split",
                 "$medmtl.data.datalist.kfold_split(@data#all, n_folds=@num_folds, fold=@fold, seed=0)"]
    return args


def run_variant(name: str, dataset_dir: Path, out: Path, budget_min: float, extra: list[str], fold: int = 0,
                epochs: int | None = None, seed: int = 0, clock: str = "wall") -> dict:
    """Train one variant within `budget_min` minutes (or for exactly `epochs` epochs), evaluate it, return figures."""
    if name == PEER_NAME:
        return run_peer(dataset_dir, out, budget_min, fold, epochs, seed, clock)
    out.mkdir(parents=True, exist_ok=True)
    common = ["--dataset_dir", str(dataset_dir), "--output_dir", str(out), *_seed_args(seed), "--fold", str(fold),
              *VARIANTS[name], *extra]
    budget = ["--time_budget_min", str(budget_min), "--time_budget_clock", clock, "--max_epochs", "100000"]
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
        "seed": seed,
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


def run_peer(dataset_dir: Path, out: Path, budget_min: float, fold: int = 0, epochs: int | None = None,
             seed: int = 0, clock: str = "wall") -> dict:
    """Train the plain MONAI UNet peer (its own process) and score its final weights with the bundle's evaluation."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve().parent / "monai_unet_peer.py"), "--dataset-dir",
           str(dataset_dir), "--output-dir", str(out), "--fold", str(fold), "--seed", str(seed),
           "--budget-min", str(budget_min), "--budget-clock", clock, *(["--epochs", str(epochs)] if epochs else [])]
    train_s, train_mib = _run(cmd, out / "train.out")
    summary = json.loads((out / "train_summary.json").read_text())
    last = out / "models" / "last.pt"
    # the bundle's evaluation with the peer's network: same cases, sliding window (roi = its patch) and metrics
    evaluate = ["--dataset_dir", str(dataset_dir), "--output_dir", str(out), *_seed_args(seed), "--fold", str(fold),
                "--heads", "['seg']", "--network_def", PEER_NETWORK_EXPR, "--pipeline#patch_size",
                str(summary["patch_size"]), "--ckpt_file", str(last)]
    eval_s, eval_mib = _bundle("evaluating", [CONFIGS / "train.yaml", CONFIGS / "evaluate.yaml"], evaluate,
                               out / "evaluate.out")
    report = json.loads((out / "eval" / "metrics.json").read_text())
    metrics = report["metrics"]
    return {
        "variant": PEER_NAME,
        "seed": seed,
        "args": summary["settings"],
        **{k: metrics.get(k) for k in sorted(metrics) if k.startswith("val/")},
        "epochs": summary["epochs"],
        "iterations": summary["iterations"],
        "train_wall_seconds": round(train_s, 1),
        "sec_per_iter": summary["sec_per_iter"],
        "data_wait_fraction": summary["data_wait_fraction"],
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
    batch: dict[str, int] = {}
    for name in names:
        if name == PEER_NAME:
            items = load_datalist(dataset_dir)
            train_items = kfold_split(items, n_folds=5, fold=fold, seed=0)[0][:16]
            trainers[name] = build_peer_trainer(train_items, peer_patch_size(items), 1, None,
                                                batch_size=PEER_BATCH, epoch_length=iterations)[0]
            batch[name] = PEER_BATCH
            continue
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
        batch[name] = int(parser.get_parsed_content("batch_size"))
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds + 1):
        for name, trainer in trainers.items():
            trainer.run()
            if round_:  # round 0 warms up (oneDNN kernels, caches)
                seconds[name].append(trainer.state.metrics["train/sec_per_iter"])
    median = {name: statistics.median(values) for name, values in seconds.items()}
    per_sample = {name: v / batch[name] for name, v in median.items()}
    base = median.get("seg")
    peer = per_sample.get(PEER_NAME)
    return {
        "method": f"interleaved in one process: {rounds} rounds of {iterations} iterations per variant, median",
        "batch_size": batch,
        "sec_per_iter": {name: round(v, 4) for name, v in median.items()},
        "sec_per_sample": {name: round(v, 4) for name, v in per_sample.items()},
        "ratio_to_seg": {name: round(v / base, 3) for name, v in median.items() if name != PEER_NAME} if base
        else None,
        "ratio_to_monai_unet_per_sample": {name: round(v / peer, 3) for name, v in per_sample.items()} if peer
        else None,
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
    peer = by_name.get(PEER_NAME)
    if default and peer:
        diff = default["val/mean_dice"] - peer["val/mean_dice"]
        targets["default_mean_dice_at_least_monai_unet_plus_0.01"] = {
            "mean_dice": [default["val/mean_dice"], peer["val/mean_dice"]], "difference": round(diff, 4),
            "met": diff >= 0.01,
        }
    peer_ratio = ((step_cost or {}).get("ratio_to_monai_unet_per_sample") or {}).get(DEFAULT_VARIANT)
    if peer_ratio is not None:
        targets["default_cost_per_sample_at_most_1.5x_monai_unet"] = {"value": peer_ratio, "met": peer_ratio <= 1.5}
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


def _bundle_batch_size(extra: list[str]) -> int:
    """The bundle's training batch size, with the command line's overrides."""
    overrides = dict(zip(extra[::2], extra[1::2], strict=True))
    if "--batch_size" in overrides:
        return int(overrides["--batch_size"])
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.yaml"))
    return int(parser["batch_size"])


def summarize(results: list[dict]) -> list[dict]:
    """One row per variant: figures averaged over its seeds, with the per-seed mean Dice and their spread."""
    rows = []
    for name in dict.fromkeys(r["variant"] for r in results):
        runs = [r for r in results if r["variant"] == name]
        dice = [r["val/mean_dice"] for r in runs]
        row = {"variant": name, "seeds": [r["seed"] for r in runs], "mean_dice_per_seed": dice,
               "mean_dice_spread": round(max(dice) - min(dice), 4), "epochs": [r["epochs"] for r in runs]}
        for key in ("val/mean_dice", "val/mean_hd95_mm", "sec_per_iter"):
            values = [r[key] for r in runs if r.get(key) is not None]
            row[key] = statistics.mean(values) if values else None
        waits = [r["data_wait_fraction"] for r in runs if r["data_wait_fraction"] is not None]
        row["data_wait_fraction"] = max(waits) if waits else None
        rows.append(row)
    return rows


def compare_to_peer(rows: list[dict], step_cost: dict | None, batch_size: int) -> dict | None:
    """The default against the MONAI UNet peer: Dice difference (seed means) and cost per training sample."""
    by_name = {r["variant"]: r for r in rows}
    default, peer = by_name.get(DEFAULT_VARIANT), by_name.get(PEER_NAME)
    if not (default and peer):
        return None
    in_runs = {DEFAULT_VARIANT: default["sec_per_iter"] / batch_size, PEER_NAME: peer["sec_per_iter"] / PEER_BATCH}
    interleaved = (step_cost or {}).get("sec_per_sample") or {}
    return {
        "mean_dice": {DEFAULT_VARIANT: default["val/mean_dice"], PEER_NAME: peer["val/mean_dice"]},
        "dice_difference": round(default["val/mean_dice"] - peer["val/mean_dice"], 4),
        "dice_spread_over_seeds": {DEFAULT_VARIANT: default["mean_dice_spread"], PEER_NAME: peer["mean_dice_spread"]},
        "epochs": {DEFAULT_VARIANT: default["epochs"], PEER_NAME: peer["epochs"]},
        "sec_per_sample_in_runs": {k: round(v, 4) for k, v in in_runs.items()},
        "sec_per_sample_ratio_in_runs": round(in_runs[DEFAULT_VARIANT] / in_runs[PEER_NAME], 3),
        # None unless both were timed in one process (arms run as separate invocations are timed apart)
        "sec_per_sample_ratio_interleaved": ((step_cost or {}).get("ratio_to_monai_unet_per_sample") or {}).get(
            DEFAULT_VARIANT) if DEFAULT_VARIANT in interleaved else None,
    }


def merge_documents(documents: list[dict]) -> dict:
    """One document from several of this benchmark's documents: their runs together, compared and judged anew.

    Args:
        documents: printed documents; those with runs must share fold, epochs, budget and clock. The step cost is
            taken from the last document that has one (a `--step-cost-only` invocation, typically).

    Raises:
        SystemExit: the runs were made under different conditions.
    """
    with_runs = [d for d in documents if d["variants"]]
    conditions = {(d["split"], d["epochs"], d["budget_minutes"], d.get("budget_clock")) for d in with_runs}
    if len(conditions) > 1:
        sys.exit(f"cannot merge runs made under different conditions: {sorted(map(str, conditions))}")
    step_cost = next((d["step_cost"] for d in reversed(documents) if d.get("step_cost")), None)
    results = [r for d in with_runs for r in d["variants"]]
    rows = summarize(results)
    batch_size = next((d.get("bundle_batch_size") for d in with_runs
                       if any(r["variant"] != PEER_NAME for r in d["variants"])), None)
    base = with_runs[0]
    return {
        **{k: base[k] for k in ("benchmark", "dataset_dir", "split", "budget_minutes", "budget_clock", "epochs")},
        "merged_from": [{"overrides": d.get("overrides"), "variants": [r["variant"] for r in d["variants"]],
                         "date": d["date"]} for d in documents],
        "seeds": sorted({r["seed"] for r in results}),
        "variants": results,
        "summary": rows,
        "bundle_batch_size": batch_size,
        "vs_monai_unet": compare_to_peer(rows, step_cost, batch_size) if batch_size else None,
        "machine": base["machine"],
        "date": time.strftime("%Y-%m-%d"),
        "step_cost": step_cost,
        "targets": check_targets(rows, step_cost),
    }


def main() -> None:
    """Run the variants and print one JSON document."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    known = [PEER_NAME, *VARIANTS]
    parser.add_argument("--dataset-dir", type=Path)
    parser.add_argument("--budget-min", type=float, default=30.0, help="training budget per variant (minutes)")
    parser.add_argument("--budget-clock", choices=["wall", "cpu"], default="wall",
                        help="what the budget counts: wall time, or process CPU time per thread (shared machines)")
    parser.add_argument("--variants", default=",".join(known), help=f"comma-separated of {known}")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds (the split stays seed 0's)")
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "runs" / "hippocampus_benchmark")
    parser.add_argument("--study", type=Path, help="a DICOM export to segment with the default variant")
    parser.add_argument("--fold", type=int, default=0,
                        help="validation fold (default 0, the reported one; pilots for choosing settings use another)")
    parser.add_argument("--epochs", type=int,
                        help="train exactly N epochs instead of the time budget (compares variants at equal steps)")
    parser.add_argument("--skip-step-cost", action="store_true", help="skip the interleaved step-time measurement")
    parser.add_argument("--step-cost-only", action="store_true", help="measure the step cost, train nothing")
    parser.add_argument("--merge", type=Path, nargs="+", help="documents of earlier invocations to merge")
    parser.add_argument("overrides", nargs="*", help="extra bundle overrides for every bundle variant (not the peer)")
    args = parser.parse_args()
    if args.merge:
        print(json.dumps(merge_documents([json.loads(p.read_text()) for p in args.merge]), indent=2))
        return
    if args.dataset_dir is None:
        parser.error("--dataset-dir is required (unless --merge)")

    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    unknown = sorted(set(names) - set(known))
    if unknown:
        sys.exit(f"unknown variant(s) {unknown}; known: {known}")
    # measured first, on the machine as the runs will find it, and so that a failure here costs minutes, not hours
    step_cost = None if args.skip_step_cost else measure_step_cost(args.dataset_dir.resolve(), args.fold, names,
                                                                    args.overrides)
    print(json.dumps({"step_cost": step_cost}), file=sys.stderr, flush=True)
    results = []
    for seed in ([] if args.step_cost_only else seeds):
        for name in names:
            out = args.output_dir / (name if seed == 0 else f"{name}_seed{seed}")
            results.append(run_variant(name, args.dataset_dir.resolve(), out, args.budget_min, args.overrides,
                                       fold=args.fold, epochs=args.epochs, seed=seed, clock=args.budget_clock))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)  # progress, one line per run
    rows = summarize(results)
    document = {
        "benchmark": "hippocampus_mtl variants and the plain MONAI UNet at a fixed budget",
        "dataset_dir": str(args.dataset_dir),
        "split": f"fold {args.fold} of 5, seed 0 (160 train / 40 validation)",
        "budget_minutes": None if args.epochs else args.budget_min,
        "budget_clock": None if args.epochs else args.budget_clock,
        "epochs": args.epochs,
        "seeds": seeds,
        "overrides": args.overrides,
        "variants": results,
        "summary": rows,
        "bundle_batch_size": _bundle_batch_size(args.overrides),
        "vs_monai_unet": compare_to_peer(rows, step_cost, _bundle_batch_size(args.overrides)),
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.machine(),
                    "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()},
        "date": time.strftime("%Y-%m-%d"),
        "step_cost": step_cost,
        "targets": check_targets(rows, step_cost),
    }
    if args.study and DEFAULT_VARIANT in names:
        model = args.output_dir / DEFAULT_VARIANT / "models" / "last.pt"
        document["study_inference"] = infer_study(args.study, model, args.output_dir / "study_inference")
    print(json.dumps(document, indent=2))


if __name__ == "__main__":
    main()
