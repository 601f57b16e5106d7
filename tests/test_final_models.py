"""Final models the way nnU-Net makes them: `--fold all` training and checkpoint ensembles in `medmtl infer`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, random_checkpoint
from mlflow.tracking import MlflowClient

from medmtl.cli import main

PHANTOM = REPO_ROOT / "bundles" / "phantom_mtl"
CASES = 6


@pytest.fixture(scope="module")
def fold_all(tmp_path_factory) -> Path:
    """One epoch of the phantom bundle with --fold all on 6 cases of 32^3."""
    out = tmp_path_factory.mktemp("fold_all")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file",
           str(PHANTOM / "configs" / "train.yaml"), "--max_epochs", "1", "--phantom#cases", str(CASES),
           "--phantom#size", "32", "--pipeline#patch_size", "[32,32,32]", "--num_workers", "0",
           "--output_dir", str(out), "--dataset_dir", str(out / "data"), "--fold", "all"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    run = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def test_fold_all_trains_on_every_case_and_keeps_the_last_weights(fold_all: Path):
    last = torch.load(fold_all / "models" / "last.pt", weights_only=True)
    assert last["trainer"]["iteration"] == CASES // 2  # every case, batch 2: nothing held out
    model = torch.load(fold_all / "models" / "model.pt", weights_only=True)
    for key, value in model.items():  # model.pt is the final network, not a best-validation one
        assert torch.equal(value, last["network"][key]), key
    client = MlflowClient(f"sqlite:///{fold_all / 'eval' / 'mlruns.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("phantom_mtl").experiment_id])
    assert "train/loss" in run.data.metrics
    assert not [m for m in run.data.metrics if m.startswith("val/")]  # nothing was validated


def test_an_ensemble_of_checkpoints_is_one_prediction(fold_all: Path, tmp_path: Path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for case in ("phantom_000", "phantom_001"):
        (images / f"{case}.nii.gz").symlink_to(fold_all / "data" / "imagesTr" / f"{case}.nii.gz")
    other = random_checkpoint(PHANTOM, tmp_path / "random.pt")
    args = ["infer", str(images), "--bundle", str(PHANTOM), "--output"]
    tiny = ["--set", "pipeline#patch_size=[32,32,32]", "--save-maps", "--quiet"]
    model = fold_all / "models" / "model.pt"
    assert main([*args, str(tmp_path / "single"), "--model", str(model), *tiny]) == 0
    assert main([*args, str(tmp_path / "other"), "--model", str(other), *tiny]) == 0
    assert main([*args, str(tmp_path / "pair"), "--model", str(model), str(other), *tiny]) == 0
    capsys.readouterr()
    for folder in sorted((tmp_path / "pair").iterdir()):
        report = json.loads((folder / "report.json").read_text())
        assert report["settings"]["checkpoint"] == [str(model), str(other)]
        probs = {run: np.asarray(nib.load(tmp_path / run / folder.name / "probabilities.nii.gz").dataobj)
                 for run in ("single", "other", "pair")}  # fmt: skip
        np.testing.assert_allclose(probs["pair"], (probs["single"] + probs["other"]) / 2, atol=2e-3)
        label = np.asarray(nib.load(folder / "seg.nii.gz").dataobj)
        np.testing.assert_array_equal(label, np.argmax(probs["pair"], axis=-1))
