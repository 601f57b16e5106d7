"""The MSD Task04 hippocampus bundle: real `monai.bundle run` commands on a six-case copy of the dataset."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, hippocampus_subset
from monai.bundle import ConfigParser

from medmtl.data.datalist import kfold_split, label_names, load_datalist, read_dataset_json
from medmtl.networks import MultiTaskUNet

BUNDLE = "bundles/hippocampus_mtl"
META = f"{BUNDLE}/configs/metadata.json"
TRAIN = f"{BUNDLE}/configs/train.yaml"
EVALUATE = f"{BUNDLE}/configs/evaluate.yaml"
NUM_CASES, NUM_FOLDS = 6, 3


def _bundle_run(run_id: str, config_files: list[str], *args: str) -> subprocess.CompletedProcess:
    """`python -m monai.bundle run <run_id>` from the repository root, as the docs show it."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the store goes to output_dir
    config = config_files[0] if len(config_files) == 1 else repr(config_files)
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", config, *args]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)


def _parse(**overrides: object) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(REPO_ROOT / TRAIN)
    parser.update(overrides)
    return parser


@pytest.fixture(scope="module")
def tiny_msd(hippocampus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MSD folder in tmp holding symlinks to the first six labelled cases and its own dataset.json."""
    return hippocampus_subset(hippocampus_dir, tmp_path_factory.mktemp("hippo_tiny"), NUM_CASES)


@pytest.fixture(scope="module")
def trained(tiny_msd: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One epoch of the real training command; returns its output_dir."""
    out = tmp_path_factory.mktemp("hippo_run")
    result = _bundle_run(
        "training", [TRAIN], "--dataset_dir", str(tiny_msd), "--output_dir", str(out),
        "--max_epochs", "1", "--val_interval", "1", "--num_folds", str(NUM_FOLDS), "--num_workers", "0",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_training_writes_checkpoints_and_one_mlflow_run(trained: Path):
    from mlflow.tracking import MlflowClient
    from monai.utils import path_to_sqlite_uri

    assert (trained / "models" / "model.pt").is_file()
    assert (trained / "models" / "last.pt").is_file()
    client = MlflowClient(tracking_uri=path_to_sqlite_uri(trained / "eval" / "mlruns.db"))
    experiment = client.get_experiment_by_name("hippocampus_mtl")
    assert experiment is not None
    runs = [r for r in client.search_runs([experiment.experiment_id])
            if not r.info.run_name.startswith("evaluate-")]  # the evaluation test may add its own run
    assert len(runs) == 1
    metrics = runs[0].data.metrics
    for name in ("val/dice_anterior", "val/dice_posterior"):
        assert 0.0 <= metrics[name] <= 1.0
    assert runs[0].data.params["dataset"] == "Task04_Hippocampus"


def test_evaluate_writes_per_case_metrics(trained: Path, tiny_msd: Path):
    result = _bundle_run(
        "evaluating", [TRAIN, EVALUATE], "--dataset_dir", str(tiny_msd), "--output_dir", str(trained),
        "--num_folds", str(NUM_FOLDS), "--num_workers", "0",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((trained / "eval" / "metrics.json").read_text())
    _, val = kfold_split(load_datalist(tiny_msd), n_folds=NUM_FOLDS, fold=0, seed=0)
    assert sorted(row["case_id"] for row in report["cases"]) == sorted(item["case_id"] for item in val)
    for row in report["cases"]:
        assert {"dice_anterior", "dice_posterior", "hd95_anterior_mm", "hd95_posterior_mm"} <= set(row)
    assert set(report["metrics"]) >= {"val/dice_anterior", "val/dice_posterior", "val/mean_dice"}
    assert report["checkpoint"].endswith("models/model.pt")


def test_missing_dataset_stops_with_one_clear_line(tmp_path: Path):
    missing = tmp_path / "no_such_folder"
    result = _bundle_run("training", [TRAIN], "--dataset_dir", str(missing), "--output_dir", str(tmp_path / "out"))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    error, hint = result.stderr.strip().splitlines()[-2:]
    assert error == f"error: {missing}: dataset folder not found"
    assert "medicaldecathlon.com" in hint and "--dataset_dir" in hint
    assert not (tmp_path / "out").exists()  # stopped before writing anything


def test_default_dataset_dir_is_inside_the_bundle():
    assert _parse().get_parsed_content("dataset_dir") == f"{BUNDLE}/data"


def test_patch_size_comes_from_plans_json_as_documented(tmp_path: Path):
    # the plan is read from configs/plans.json: no dataset is read for it (the dataset_dir does not even exist)
    parser = _parse(dataset_dir=str(tmp_path / "absent"))
    plans = json.loads((REPO_ROOT / BUNDLE / "configs" / "plans.json").read_text())
    patch = parser.get_parsed_content("pipeline#patch_size")
    divisor = MultiTaskUNet(**parser.get_parsed_content("network_args")).size_divisor
    assert patch == plans["pipeline"]["patch_size"] == [40, 56, 40]
    assert all(p % d == 0 for p, d in zip(patch, divisor, strict=True)) and divisor[0] == 8
    assert "fingerprint" not in parser and "size_divisor" not in parser  # nothing planned at train time
    readme = (REPO_ROOT / BUNDLE / "docs" / "README.md").read_text()
    assert re.search(r"40\s*x\s*56\s*x\s*40", readme)


def test_patch_size_override(tmp_path: Path):
    parser = _parse(dataset_dir=str(tmp_path / "absent"), **{"pipeline#patch_size": [32, 48, 32]})
    # the tracker logs the resolved value as pipeline.patch_size
    assert parser.get_parsed_content("pipeline#patch_size") == [32, 48, 32]
    assert parser.get_parsed_content("pipeline")["patch_size"] == [32, 48, 32]


def test_metadata_passes_the_schema_and_matches_the_network(hippocampus_dir: Path):
    jsonschema = pytest.importorskip("jsonschema")
    from monai.bundle import verify_net_in_out

    meta = json.loads((REPO_ROOT / META).read_text())
    jsonschema.validate(meta, json.loads((REPO_ROOT / "bundles/schema/meta_schema.json").read_text()))
    # the smallest shape the metadata allows (n=1) must pass the network: 16^3, a 2^3 bottleneck
    verify_net_in_out("network_seg_def", meta_file=str(REPO_ROOT / META), config_file=str(REPO_ROOT / TRAIN),
                      device="cpu", n=1)
    channels = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    names = label_names(read_dataset_json(hippocampus_dir))
    assert {int(k): v for k, v in channels.items()} == {k: v.lower() for k, v in names.items()}


def _benchmark_module():
    """benchmarks/hippocampus.py as a module (it is a script, not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("hippocampus_benchmark", REPO_ROOT / "benchmarks/hippocampus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _document(runs: list[dict], step_cost: dict | None = None, epochs: int | None = 8) -> dict:
    return {"benchmark": "b", "dataset_dir": "d", "split": "fold 0", "budget_minutes": None, "budget_clock": None,
            "epochs": epochs, "overrides": [], "variants": runs, "summary": [{"variant": runs[0]["variant"]}]
            if runs else [], "bundle_batch_size": 4, "machine": {}, "date": "today", "step_cost": step_cost}


def _run(variant: str, seed: int, dice: float, sec_per_iter: float) -> dict:
    return {"variant": variant, "seed": seed, "val/mean_dice": dice, "val/mean_hd95_mm": 1.5, "epochs": 8,
            "sec_per_iter": sec_per_iter, "data_wait_fraction": 0.05}


def test_benchmark_merges_separate_invocations_into_one_comparison_with_the_peer():
    bench = _benchmark_module()
    peer = _document([_run("monai_unet", 0, 0.86, 0.8), _run("monai_unet", 1, 0.88, 0.8)])
    default = _document([_run("all", 0, 0.89, 0.4), _run("all", 1, 0.89, 0.4)])
    cost = _document([], {"sec_per_sample": {"monai_unet": 0.2, "all": 0.25},
                          "ratio_to_monai_unet_per_sample": {"monai_unet": 1.0, "all": 1.25}}, epochs=None)
    merged = bench.merge_documents([peer, default, cost])
    versus = merged["vs_monai_unet"]
    assert versus["dice_difference"] == pytest.approx(0.02)  # seed means 0.89 - 0.87
    assert versus["dice_spread_over_seeds"] == {"all": 0.0, "monai_unet": pytest.approx(0.02)}
    assert versus["sec_per_sample_in_runs"] == {"all": 0.1, "monai_unet": 0.2}  # batch 4 both
    assert versus["sec_per_sample_ratio_interleaved"] == 1.25
    assert merged["targets"]["default_mean_dice_at_least_monai_unet_plus_0.01"]["met"] is True
    assert merged["targets"]["default_cost_per_sample_at_most_1.5x_monai_unet"]["met"] is True
    # the same runs with the default only 0.005 ahead: the target is not met
    worse = bench.merge_documents([peer, _document([_run("all", 0, 0.875, 0.4)])])
    assert worse["targets"]["default_mean_dice_at_least_monai_unet_plus_0.01"]["met"] is False
    with pytest.raises(SystemExit, match="different conditions"):
        bench.merge_documents([peer, _document([_run("all", 0, 0.89, 0.4)], epochs=12)])


def test_cpu_clock_budget_ignores_time_the_process_did_not_get():
    """The benchmark's `--budget-clock cpu`: sleeping (another process holding the CPU) does not count."""
    import time

    from medmtl.engine.budget import TimeBudget

    wall, cpu = TimeBudget(1.0, clock="wall"), TimeBudget(1.0, clock="cpu")
    wall._start(None)
    cpu._start(None)
    time.sleep(0.3)
    assert wall.elapsed_s() >= 0.3
    assert cpu.elapsed_s() < 0.1
    with pytest.raises(ValueError, match="clock"):
        TimeBudget(1.0, clock="gpu")
