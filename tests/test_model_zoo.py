"""Both bundles as the MONAI model zoo takes them: `medmtl package` after one short training, then the zoo's own
checks (`../shared/model-zoo-ci/run_checks.py`, unmodified) on the package; the exported TorchScript model against
the eager predictor; the packaged inference config from another working directory; the refusals.

Training is the smallest the bundle tests use: one epoch on six tiny cases (phantom 32^3; six hippocampus cases),
validated once, then `evaluate.yaml` for the figures that `medmtl package` writes to metadata.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, hippocampus_subset

from medmtl.cli import main
from medmtl.packaging import installed_versions

PHANTOM = REPO_ROOT / "bundles" / "phantom_mtl"
HIPPO = REPO_ROOT / "bundles" / "hippocampus_mtl"
PHANTOM_TINY = ["--phantom#cases", "6", "--phantom#size", "32", "--pipeline#patch_size", "[32,32,32]",
                "--num_folds", "2"]  # fmt: skip
HIPPO_CASES = 6


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # each run's own SQLite store


def _train_and_evaluate(bundle: Path, out: Path, *args: str) -> Path:
    """One epoch of `run training`, then `run evaluating` on its model.pt; returns the run folder."""
    configs = bundle / "configs"
    common = ["--output_dir", str(out), "--num_workers", "0", *args]
    for run_id, config in (
        ("training", str(configs / "train.yaml")),
        ("evaluating", str([str(configs / "train.yaml"), str(configs / "evaluate.yaml")])),
    ):
        extra = ["--max_epochs", "1", "--val_interval", "1"] if run_id == "training" else []
        cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", config, *extra, *common]
        proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, env=_env(), timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "models" / "model.pt").is_file() and (out / "eval" / "metrics.json").is_file()
    return out


def _package(bundle: Path, model: Path, out: Path, *args: str) -> int:
    return main(["package", str(bundle), "--model", str(model), "--out", str(out), *args])


@pytest.fixture(scope="module")
def phantom_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("zoo_phantom_run")
    return _train_and_evaluate(PHANTOM, out, "--dataset_dir", str(out / "data"), *PHANTOM_TINY)


@pytest.fixture(scope="module")
def phantom_package(phantom_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("zoo_phantom_pkg") / "phantom_mtl"
    assert _package(PHANTOM, phantom_run / "models" / "model.pt", out) == 0
    return out


@pytest.fixture(scope="module")
def hippocampus_package(hippocampus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six hippocampus cases (symlinks), one epoch, evaluated, packaged."""
    data = hippocampus_subset(hippocampus_dir, tmp_path_factory.mktemp("zoo_hippo_data"), HIPPO_CASES)
    run = _train_and_evaluate(HIPPO, tmp_path_factory.mktemp("zoo_hippo_run"), "--dataset_dir", str(data),
                              "--num_folds", "3")  # fmt: skip
    out = tmp_path_factory.mktemp("zoo_hippo_pkg") / "hippocampus_mtl"
    assert _package(HIPPO, run / "models" / "model.pt", out) == 0
    return out


def _zoo_checks(shared_dir: Path, bundle: Path, cwd: Path) -> str:
    script = shared_dir / "model-zoo-ci" / "run_checks.py"
    if not script.is_file():
        pytest.skip(f"{script} not found")
    proc = subprocess.run([sys.executable, str(script), str(bundle)], cwd=cwd, capture_output=True, text=True,
                          env=_env(), timeout=600)  # fmt: skip
    lines = proc.stdout.strip().splitlines()
    assert lines and lines[-1] == "7 passed, 0 failed", proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0
    return proc.stdout


def test_packaged_phantom_bundle_passes_the_model_zoo_checks(phantom_package: Path, shared_dir: Path,
                                                              tmp_path: Path):  # fmt: skip
    _zoo_checks(shared_dir, phantom_package, tmp_path)


def test_packaged_hippocampus_bundle_passes_the_model_zoo_checks(hippocampus_package: Path, shared_dir: Path,
                                                                  tmp_path: Path):  # fmt: skip
    _zoo_checks(shared_dir, hippocampus_package, tmp_path)


def test_package_carries_the_runs_figures_installed_versions_weights_and_a_zip(phantom_run: Path,
                                                                                phantom_package: Path):  # fmt: skip
    meta = json.loads((phantom_package / "configs" / "metadata.json").read_text())
    report = json.loads((phantom_run / "eval" / "metrics.json").read_text())
    expected = {k.removeprefix("val/"): round(v, 4) for k, v in report["metrics"].items() if v is not None}
    assert meta["eval_metrics"] == expected and 0.0 <= meta["eval_metrics"]["mean_dice"] <= 1.0
    versions = installed_versions(meta["required_packages_version"])
    assert {k: meta[k] for k in versions} == versions
    # the zoo's JSON format, as its pre-commit hook writes it
    text = (phantom_package / "configs" / "metadata.json").read_text()
    assert text == json.dumps(meta, indent=4, ensure_ascii=True) + "\n"
    # model.pt: the run's network weights, nothing else
    packaged = torch.load(phantom_package / "models" / "model.pt", weights_only=True)
    trained = torch.load(phantom_run / "models" / "model.pt", weights_only=True)
    assert list(packaged) == list(trained)
    assert all(torch.equal(packaged[k], trained[k]) for k in trained)
    assert "## This package" in (phantom_package / "docs" / "README.md").read_text()
    with zipfile.ZipFile(phantom_package.parent / f"phantom_mtl_v{meta['version']}.zip") as archive:
        names = set(archive.namelist())
    assert {"phantom_mtl/models/model.ts", "phantom_mtl/configs/metadata.json", "phantom_mtl/LICENSE"} <= names
    assert not any("/eval/" in n or "/data/" in n for n in names)


def test_torchscript_model_segments_like_the_eager_predictor(phantom_run: Path, phantom_package: Path):
    from monai.transforms import LoadImage

    from medmtl.inference.batch import load_inference_config

    parser = load_inference_config(phantom_package, {"tta": False, "cpu_bf16": False, "device": "cpu",
                                                     "pipeline#patch_size": [32, 32, 32]})  # fmt: skip
    eager = parser.get_parsed_content("predictor")
    parser["predictor#network"] = "$torch.jit.load(@bundle_root + '/models/model.ts', map_location='cpu')"
    parser["predictor#ckpt_file"] = None  # the TorchScript model carries its weights
    parser.parse()  # re-resolve with the replaced entries
    scripted = parser.get_parsed_content("predictor")
    assert isinstance(scripted.network, torch.jit.ScriptModule)
    image = LoadImage(image_only=True, ensure_channel_first=True)(str(phantom_run / "data" / "imagesTr" /
                                                                      "phantom_000.nii.gz"))  # fmt: skip
    expected = eager.predict(image).label
    got = scripted.predict(image).label
    assert got.shape == expected.shape == (32, 32, 32)
    np.testing.assert_array_equal(got, expected)


def test_packaged_inference_config_runs_from_another_directory(phantom_run: Path, phantom_package: Path,
                                                               tmp_path: Path):  # fmt: skip
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "case.nii.gz").symlink_to(phantom_run / "data" / "imagesTr" / "phantom_000.nii.gz")
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    cmd = [sys.executable, "-m", "monai.bundle", "run",
           "--config_file", str(phantom_package / "configs" / "inference.yaml"), "--bundle_root", str(phantom_package),
           "--input_dir", str(inputs), "--output_dir", str(tmp_path / "out")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 input(s) done, 0 failed" in proc.stdout
    assert (tmp_path / "out" / "case" / "seg.nii.gz").is_file()
    assert list(cwd.iterdir()) == []  # nothing written where it ran


def test_package_refuses_with_one_line(phantom_run: Path, phantom_package: Path, tmp_path: Path, capsys):
    model = phantom_run / "models" / "model.pt"

    def refused(*args: str) -> str:
        assert _package(PHANTOM, *args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    # an existing non-empty folder: nothing in it changes
    assert "exists and is not empty" in refused(model, phantom_package)
    # a checkpoint of another network (other filters)
    from medmtl.networks import MultiTaskUNet

    other = tmp_path / "other_run" / "models" / "model.pt"
    other.parent.mkdir(parents=True)
    torch.save(MultiTaskUNet(3, 1, 3, filters=(4, 8, 16, 32, 64)).state_dict(), other)
    assert "holds the weights of another network" in refused(other, tmp_path / "out1")
    assert not (tmp_path / "out1").exists()
    # a checkpoint without an evaluation of it: no figures are made up
    (tmp_path / "bare" / "models").mkdir(parents=True)
    bare = tmp_path / "bare" / "models" / "model.pt"
    bare.write_bytes(model.read_bytes())
    assert "no evaluation of this checkpoint" in refused(bare, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
    # an evaluation of another checkpoint
    metrics = json.loads((phantom_run / "eval" / "metrics.json").read_text())
    (tmp_path / "bare" / "eval").mkdir()
    (tmp_path / "bare" / "eval" / "metrics.json").write_text(json.dumps({**metrics, "checkpoint": str(other)}))
    assert "evaluates" in refused(bare, tmp_path / "out3")


def test_package_without_figures_and_with_a_weights_url(phantom_run: Path, tmp_path: Path, capsys):
    from monai.apps.utils import check_hash
    from monai.bundle import ConfigParser

    out = tmp_path / "phantom_mtl"
    url = "https://example.org/weights/phantom_mtl"
    assert _package(PHANTOM, phantom_run / "models" / "model.pt", out, "--no-eval-metrics", "--weights-url", url) == 0
    assert "eval_metrics left out" in capsys.readouterr().out
    assert "eval_metrics" not in json.loads((out / "configs" / "metadata.json").read_text())
    entries = ConfigParser.load_config_file(out / "large_files.yml")["large_files"]
    assert [e["path"] for e in entries] == ["models/model.pt", "models/model.ts"]
    for entry in entries:
        assert entry["url"] == f"{url}/{Path(entry['path']).name}" and entry["hash_type"] == "sha256"
        assert check_hash(out / entry["path"], entry["hash_val"], entry["hash_type"])
