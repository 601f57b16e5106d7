"""The phantom bundle through the real command: `python -m monai.bundle run training ...` on a tiny set.

One module-scoped training (2 epochs) is shared by the checks; later tests resume it, add MONAI's own
`--tracking mlflow`, evaluate it, and train the single-task and 2D variants.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from medmtl.engine.checkpoint import load_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "bundles" / "phantom_mtl" / "configs"
TINY = ["--phantom#cases", "8", "--phantom#size", "32", "--pipeline#patch_size", "[32,32,32]",
        "--num_folds", "2", "--val_interval", "1", "--num_workers", "0"]


def run_bundle(run_id: str, configs: list[str], *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run `python -m monai.bundle run <run_id>` from the repository root, as a user would."""
    config_file = str(CONFIGS / configs[0]) if len(configs) == 1 else str([str(CONFIGS / c) for c in configs])
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", config_file, *args]
    # the bundle's own SQLite store, whatever the caller's environment says
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, env=env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def runs_of(out: Path, experiment: str = "phantom_mtl") -> list:
    client = MlflowClient(f"sqlite:///{out / 'eval' / 'mlruns.db'}")
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id])


def artifacts(out: Path, run_id: str, path: str = "") -> list[str]:
    client = MlflowClient(f"sqlite:///{out / 'eval' / 'mlruns.db'}")
    found = []
    for item in client.list_artifacts(run_id, path):
        found += artifacts(out, run_id, item.path) if item.is_dir else [item.path]
    return found


def history(out: Path, run_id: str, key: str) -> list[int]:
    client = MlflowClient(f"sqlite:///{out / 'eval' / 'mlruns.db'}")
    return sorted(m.step for m in client.get_metric_history(run_id, key))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantom_run")
    bundle_before = sorted(p.name for p in (REPO_ROOT / "bundles" / "phantom_mtl").iterdir())
    proc = run_bundle("training", ["train.yaml"], "--max_epochs", "2", "--output_dir", str(out),
                      "--dataset_dir", str(out / "data"), *TINY)
    (out / "first_run.log").write_text(proc.stdout + proc.stderr)
    # nothing lands in the bundle folder or the working directory
    assert sorted(p.name for p in (REPO_ROOT / "bundles" / "phantom_mtl").iterdir()) == bundle_before
    assert not (REPO_ROOT / "mlruns").exists()
    return out


def test_training_writes_checkpoints_under_output_dir(trained):
    assert (trained / "data" / "dataset.json").is_file()  # generated on first use
    model = load_checkpoint(trained / "models" / "model.pt")
    assert all(isinstance(v, torch.Tensor) for v in model.values())
    last = load_checkpoint(trained / "models" / "last.pt")
    assert {"network", "optimizer", "loss", "trainer", "tracker", "checkpoints", "rng"} <= set(last)
    assert last["trainer"]["iteration"] == 2 * last["trainer"]["epoch_length"]
    assert (trained / "eval" / "train.log").stat().st_size > 0


def test_one_mlflow_run_with_params_metrics_and_artifacts(trained):
    (run,) = runs_of(trained)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["max_epochs"] == "2" and params["pipeline.patch_size"] == "[32, 32, 32]"
    assert params["loss_args.weighting"] == "fixed" and json.loads(params["heads"]) == ["seg", "cls", "boundary"]
    metrics = set(run.data.metrics)
    expected = {"train/loss", "train/loss_seg", "train/loss_cls", "train/loss_boundary", "train/weight_seg",
                "train/weight_cls", "train/weight_boundary", "train/lr", "val/mean_dice", "val/dice_organ",
                "val/dice_lesion", "val/hd95_organ_mm", "val/cls_accuracy", "val/boundary_mae"}
    assert expected <= metrics, expected - metrics
    assert history(trained, run.info.run_id, "val/dice_organ") == [1, 2]
    assert history(trained, run.info.run_id, "train/loss_seg") == [1, 2]

    files = artifacts(trained, run.info.run_id)
    assert "config/resolved_config.json" in files and "model/model.pt" in files
    assert "validation/cases_epoch_002.csv" in files
    assert len([f for f in files if f.startswith("overlays/epoch_002/") and f.endswith(".png")]) == 3
    table = MlflowClient(f"sqlite:///{trained / 'eval' / 'mlruns.db'}").download_artifacts(
        run.info.run_id, "validation/cases_epoch_002.csv", str(trained / "dl"))
    rows = list(csv.DictReader(io.StringIO(Path(table).read_text())))
    assert len(rows) == 4 and {"case_id", "dice_organ", "hd95_organ_mm", "cls_prob", "cls_true"} <= set(rows[0])
    assert all(r["case_id"].startswith("phantom_") for r in rows)


def test_resume_continues_the_same_run_at_the_next_epoch(trained):
    proc = run_bundle("training", ["train.yaml"], "--max_epochs", "3", "--output_dir", str(trained),
                      "--dataset_dir", str(trained / "data"), *TINY)
    assert "Restored all variables" in proc.stdout + proc.stderr
    (run,) = runs_of(trained)
    assert history(trained, run.info.run_id, "train/loss") == [1, 2, 3]  # epoch 3 added, none repeated
    assert history(trained, run.info.run_id, "val/mean_dice") == [1, 2, 3]
    assert load_checkpoint(trained / "models" / "last.pt")["trainer"]["iteration"] > 0


def test_monai_tracking_flag_adds_no_second_run(trained):
    run_bundle("training", ["train.yaml"], "--max_epochs", "4", "--output_dir", str(trained),
               "--dataset_dir", str(trained / "data"), "--tracking", "mlflow", *TINY)
    (run,) = runs_of(trained)
    assert history(trained, run.info.run_id, "train/loss") == [1, 2, 3, 4]
    assert all(not r.data.metrics for r in runs_of(trained, "monai_experiment"))


def test_evaluate_writes_metrics_json(trained):
    run_bundle("evaluating", ["train.yaml", "evaluate.yaml"], "--output_dir", str(trained),
               "--dataset_dir", str(trained / "data"), *TINY)
    report = json.loads((trained / "eval" / "metrics.json").read_text())
    assert 0.0 <= report["metrics"]["val/mean_dice"] <= 1.0
    assert len(report["cases"]) == 4 and "dice_lesion" in report["cases"][0]
    assert report["checkpoint"].endswith("models/model.pt")


def test_single_task_baseline_trains(tmp_path):
    run_bundle("training", ["train.yaml"], "--max_epochs", "1", "--heads", "['seg']", "--output_dir",
               str(tmp_path), "--dataset_dir", str(tmp_path / "data"), *TINY)
    (run,) = runs_of(tmp_path)
    assert "train/loss_seg" in run.data.metrics and "val/dice_lesion" in run.data.metrics
    assert not {"train/loss_cls", "train/loss_boundary", "val/cls_auc", "val/boundary_mae"} & set(run.data.metrics)
    weights = load_checkpoint(tmp_path / "models" / "model.pt")
    assert not any(k.startswith(("cls", "boundary")) for k in weights)  # switched-off heads have no parameters


def test_2d_variant_trains_on_slices_and_validates_volumes(tmp_path):
    run_bundle("training", ["train.yaml", "train_2d.yaml"], "--max_epochs", "1", "--output_dir", str(tmp_path),
               "--dataset_dir", str(tmp_path / "data"), *TINY, "--pipeline#patch_size", "[32,32]",
               "--batch_size", "4", "--pipeline#samples_per_volume", "2")
    (run,) = runs_of(tmp_path, "phantom_mtl_2d")
    assert {"val/dice_organ", "val/cls_accuracy"} <= set(run.data.metrics)
    weights = load_checkpoint(tmp_path / "models" / "model.pt")
    assert any(v.ndim == 4 for v in weights.values())  # 2D convolution kernels
