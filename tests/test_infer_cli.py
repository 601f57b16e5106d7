"""`medmtl infer` and the bundles' inference.yaml: series choice, outputs, reports, bad inputs, no PHI.

`medmtl.cli.main` runs in-process (fast); one `python -m monai.bundle run` subprocess checks the second entry
point. A module-scoped fixture trains the phantom bundle for one epoch on tiny volumes (~15 s).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import REPO_ROOT, patient_identifiers, random_checkpoint
from monai.bundle import ConfigParser

from medmtl.cli import EXIT_ERROR, EXIT_FAILED, main
from medmtl.data.synthetic import StudyInfo, generate_dataset, write_dicom_series
from medmtl.inference.batch import load_inference_config, merge_series_rule

PHANTOM = REPO_ROOT / "bundles" / "phantom_mtl"
HIPPO = REPO_ROOT / "bundles" / "hippocampus_mtl"
TINY = ["--set", "pipeline#patch_size=[32,32,32]"]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}


def _failed_lines(text: str) -> list[str]:
    prefix = "  failed  "
    return [line[len(prefix) :] for line in text.splitlines() if line.startswith(prefix)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One epoch of the phantom bundle on 6 cases of 32^3; holds models/model.pt."""
    out = tmp_path_factory.mktemp("tiny_model")
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "training",
        "--config_file", str(PHANTOM / "configs" / "train.yaml"),
        "--max_epochs", "1", "--phantom#cases", "6", "--phantom#size", "32",
        "--pipeline#patch_size", "[32,32,32]", "--val_interval", "1", "--num_workers", "0",
        "--output_dir", str(out), "--dataset_dir", str(out / "data"),
    ]  # fmt: skip
    run = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, env=_env(), timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (out / "models" / "model.pt").is_file()
    return out


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """Two held-out phantom cases as scanner exports (localizer, FLAIR decoy, T1), one of them oblique."""
    out = tmp_path_factory.mktemp("export")
    generate_dataset(out, cases=1, size=32, dicom_cases=2)
    return out


@pytest.fixture(scope="module")
def random_model(tmp_path_factory) -> Path:
    return random_checkpoint(PHANTOM, tmp_path_factory.mktemp("random") / "model.pt")


# ---------------------------------------------------------------------------------------------------------
# the configs


@pytest.mark.parametrize("bundle", [PHANTOM, HIPPO], ids=lambda b: b.name)
def test_inference_config_matches_training(bundle: Path):
    train = ConfigParser()
    train.read_config(str(bundle / "configs" / "train.yaml"))
    infer = load_inference_config(bundle)
    assert infer.get_parsed_content("network_args") == train.get_parsed_content("network_args")
    pipeline = infer.get_parsed_content("pipeline")
    assert pipeline == train.get_parsed_content("pipeline")  # both read configs/plans.json
    plans = json.loads((bundle / "configs" / "plans.json").read_text())
    assert pipeline["patch_size"] == plans["pipeline"]["patch_size"]
    if bundle == HIPPO:
        assert pipeline["patch_size"] == [40, 56, 40]
    assert infer.get_parsed_content("ckpt_file") == f"{bundle}/models/model.pt"
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert infer.get_parsed_content("batch#rule") == meta["input_series"]


def test_series_rule_merge():
    base = {"modality": "MR", "description": "T1"}
    assert merge_series_rule(base, {"description": "FLAIR", "largest": False, "min_slices": None}) == {
        "modality": "MR",
        "description": "FLAIR",
    }
    assert merge_series_rule(base, {"series_uid": "1.2.3", "description": None}) == {"series_uid": "1.2.3"}
    assert merge_series_rule(None, {"largest": True}) == {"largest": True}


# ---------------------------------------------------------------------------------------------------------
# the tiny trained model on the phantom export


def test_infer_dicom_export_with_trained_model(trained: Path, export: Path, tmp_path: Path, capsys, caplog):
    out = tmp_path / "out"
    code = main(["infer", str(export / "dicom"), "--bundle", str(PHANTOM), "--model",
                 str(trained / "models" / "model.pt"), "--output", str(out), *TINY])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    # the T1 series of each study, not the localizer or the FLAIR decoy
    folders = sorted(p.name for p in out.iterdir())
    assert len(folders) == 2 and all(name.startswith("3_T1_MPRAGE_phantom_") for name in folders)
    assert "2 input(s) done, 0 failed" in captured.out
    for name in folders:
        assert f"done    {name}/ (seg.nii.gz, seg.dcm, report.json)" in captured.out
        folder = out / name
        assert sorted(p.name for p in folder.iterdir()) == [".medmtl-output", "report.json", "seg.dcm", "seg.nii.gz"]
        report = json.loads((folder / "report.json").read_text())
        assert report["input"]["description"] == "T1 MPRAGE phantom"
        assert report["input"]["modality"] == "MR" and report["input"]["num_slices"] == 32
        assert report["input"]["series_uid"].endswith(name[-8:])
        version = json.loads((PHANTOM / "configs" / "metadata.json").read_text())["version"]
        assert report["bundle"] == {"name": "phantom_mtl", "version": version}
        assert report["medmtl_version"] == "0.1.0"
        assert set(report["timings_s"]) == {"load", "preprocess", "inference", "postprocess", "write"}
        assert set(report["class_probabilities"]) == {"no_lesion", "lesion"}
        assert sum(report["class_probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        seg = nib.load(folder / "seg.nii.gz")
        label = np.asarray(seg.dataobj)
        assert label.shape == (32, 32, 32) and label.max() <= 2
        voxel_ml = abs(np.linalg.det(seg.affine[:3, :3])) / 1000
        assert report["voxel_volume_ml"] == pytest.approx(voxel_ml)
        for value, structure in ((1, "organ"), (2, "lesion")):
            assert report["volumes_ml"][structure] == pytest.approx((label == value).sum() * voxel_ml)
        ds = pydicom.dcmread(folder / "seg.dcm")
        assert ds.Modality == "SEG"  # a new series that references the source series
        assert ds.SeriesInstanceUID != report["input"]["series_uid"]
        assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == report["input"]["series_uid"]

    # no patient identifier anywhere a user or a log sees it
    identifiers = patient_identifiers(export / "dicom")
    assert any(v.startswith("PHANTOM^") for v in identifiers)  # the export does carry identifiers
    texts = [captured.out, captured.err, caplog.text]
    texts += [str(p.relative_to(out)) for p in out.rglob("*")]
    texts += [p.read_text() for p in out.rglob("report.json")]
    for value in identifiers:
        assert not any(value in text for text in texts), "a patient identifier leaked"


def test_monai_bundle_run_is_the_same_batch(trained: Path, export: Path, tmp_path: Path):
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "monai.bundle", "run",
        "--config_file", str(PHANTOM / "configs" / "inference.yaml"), "--bundle_root", str(PHANTOM),
        "--input_dir", str(export / "dicom"), "--output_dir", str(out),
        "--ckpt_file", str(trained / "models" / "model.pt"), "--pipeline#patch_size", "[32,32,32]",
    ]  # fmt: skip
    # --bundle_root as the model zoo passes it: the config reads the bundle's configs/plans.json from there
    run = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, env=_env(), timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 input(s) done, 0 failed" in run.stdout
    folders = sorted(out.iterdir())
    assert len(folders) == 2
    assert all((f / "seg.dcm").is_file() and (f / "report.json").is_file() for f in folders)
    for value in patient_identifiers(export / "dicom"):
        assert value not in run.stdout and value not in run.stderr


def test_cli_options_override_the_bundle_rule(random_model: Path, export: Path, tmp_path: Path, capsys):
    study = export / "dicom" / "Study_phantom_001"
    out = tmp_path / "flair"
    code = main(["infer", str(study), "--bundle", str(PHANTOM), "--model", str(random_model),
                 "--output", str(out), "--description", "flair", "--formats", "nifti", "--save-maps",
                 "--quiet", *TINY])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0 and captured.out == "" and captured.err == ""
    (folder,) = out.iterdir()
    assert folder.name.startswith("2_T2_FLAIR_phantom_")
    files = sorted(p.name for p in folder.iterdir())
    assert files == [".medmtl-output", "boundary.nii.gz", "probabilities.nii.gz", "seg.nii.gz"]
    seg = nib.load(folder / "seg.nii.gz")
    probs = nib.load(folder / "probabilities.nii.gz")
    assert probs.shape == (*seg.shape, 3) and nib.load(folder / "boundary.nii.gz").shape == (*seg.shape, 2)
    np.testing.assert_allclose(probs.affine, seg.affine)


def test_study1_hippocrop_with_the_hippocampus_bundle(study1_dir: Path, tmp_path: Path, capsys):
    ckpt = random_checkpoint(HIPPO, tmp_path / "model.pt")
    out = tmp_path / "out"
    code = main(["infer", str(study1_dir), "--bundle", str(HIPPO), "--model", str(ckpt), "--output", str(out),
                 "--quiet"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    (folder,) = out.iterdir()
    assert folder.name.startswith("HippoCrop_")
    report = json.loads((folder / "report.json").read_text())
    assert report["input"]["description"] == "HippoCrop" and report["input"]["num_slices"] == 32
    assert report["input"]["shape"] == [35, 51, 32]
    seg = nib.load(folder / "seg.nii.gz")
    label = np.asarray(seg.dataobj)
    assert label.shape == (35, 51, 32)
    voxel_ml = abs(np.linalg.det(seg.affine[:3, :3])) / 1000
    assert voxel_ml == pytest.approx(0.001, rel=1e-3)  # the 1 mm crop
    for value, structure in ((1, "anterior"), (2, "posterior")):
        assert report["volumes_ml"][structure] == pytest.approx((label == value).sum() * voxel_ml)
    assert set(report["class_probabilities"]) == {"anterior", "posterior"}  # presence: one sigmoid each
    assert pydicom.dcmread(folder / "seg.dcm").Modality == "SEG"


# ---------------------------------------------------------------------------------------------------------
# bad inputs


def _study() -> StudyInfo:
    return StudyInfo(
        uid_seed="medmtl-test/bad-inputs",
        patient_name="PHANTOM^BADTREE",
        patient_id="PHANTOM999",
        patient_birth_date="19700101",
        accession_number="PHACC999",
    )


def _series(folder: Path, description: str, number: int, slices: int) -> list[Path]:
    image = np.random.default_rng(number).uniform(100, 1000, (16, 16, slices)).astype(np.float32)
    return write_dicom_series(
        image, np.diag([1.0, 1.0, 1.5, 1.0]), folder, study=_study(), series_description=description,
        series_number=number,
    )  # fmt: skip


def test_bad_inputs_fail_one_by_one_and_the_others_carry_on(random_model: Path, tmp_path: Path, capsys):
    tree = tmp_path / "export"
    _series(tree / "s1", "T1 good", 1, 16)
    truncated = _series(tree / "s2", "T1 truncated", 2, 12)
    truncated[4].write_bytes(truncated[4].read_bytes()[:-200])
    gap = _series(tree / "s3", "T1 gap", 3, 12)
    gap[5].unlink()
    _series(tree / "s4", "T1 two slices", 4, 2)
    for path in _series(tree / "s5", "T1 no frame of reference", 5, 16):  # done, but no DICOM SEG can refer to it
        ds = pydicom.dcmread(path)
        del ds.FrameOfReferenceUID
        ds.save_as(path)
    nan = np.random.default_rng(0).uniform(0, 1, (16, 16, 16)).astype(np.float32)
    nan[2:4, 5, 6] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), tree / "nan_case.nii.gz")
    (tree / "notes").mkdir()
    (tree / "notes" / "readme.txt").write_text("not an image\n")
    before = sorted(str(p) for p in tree.rglob("*"))

    out = tmp_path / "out"
    code = main(["infer", str(tree), "--bundle", str(PHANTOM), "--model", str(random_model),
                 "--output", str(out), *TINY])  # fmt: skip
    captured = capsys.readouterr()
    assert code == EXIT_FAILED
    assert "2 input(s) done, 4 failed" in captured.out
    failed = _failed_lines(captured.out)
    assert len(failed) == 4
    expected = [
        (r"^series 'T1 truncated' \(\.\.\w{8}\): cannot load as one volume: unreadable files: 1 "),
        (r"^series 'T1 gap' \(\.\.\w{8}\): cannot load as one volume: missing slices: gap of 3 mm"),
        (r"^series 'T1 two slices' \(\.\.\w{8}\): 2 slice\(s\), at least 8 needed"),
        (r"nan_case\.nii\.gz: 2 voxel\(s\) are NaN or infinite"),
    ]
    for pattern in expected:
        assert sum(bool(re.search(pattern, line)) for line in failed) == 1, pattern
    assert all("\n" not in line for line in failed)
    # each failure also went to stderr as it happened
    assert captured.err.count("failed: ") == 4
    # the series without a frame of reference is segmented; only its DICOM SEG is missing, and the run says so
    assert re.search(r"  warning 5_T1_no_frame_of_reference_\w+: seg\.dcm not written: .*FrameOfReferenceUID",
                     captured.out)  # fmt: skip
    # only the good series and the one without SEG have outputs; nothing half-written; the input tree untouched
    names = sorted(p.name for p in out.iterdir())
    assert len(names) == 2 and names[0].startswith("1_T1_good_") and names[1].startswith("5_T1_no_frame_"), names
    assert sorted(p.name for p in (out / names[1]).iterdir()) == [".medmtl-output", "report.json", "seg.nii.gz"]
    assert sorted(str(p) for p in tree.rglob("*")) == before


def test_empty_folder_is_reported(random_model: Path, tmp_path: Path, capsys):
    (tmp_path / "empty").mkdir()
    code = main(["infer", str(tmp_path / "empty"), "--bundle", str(PHANTOM), "--model", str(random_model),
                 "--output", str(tmp_path / "out"), *TINY])  # fmt: skip
    captured = capsys.readouterr()
    assert code == EXIT_ERROR  # nothing to segment: the run cannot start, as `medmtl series` on such a folder
    assert captured.out == "" and captured.err.count("\n") == 1
    assert f"medmtl infer: error: {tmp_path / 'empty'}: no inputs found" in captured.err
    assert not (tmp_path / "out").exists()


def test_folder_without_dicom_or_nifti_is_reported(random_model: Path, tmp_path: Path, capsys):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.txt").write_text("hello\n")
    (junk / "scan.dcm").write_bytes(os.urandom(4096))
    (junk / "image.jpg").write_bytes(b"\xff\xd8\xff" + os.urandom(100))
    code = main(["infer", str(junk), "--bundle", str(PHANTOM), "--model", str(random_model), "--quiet",
                 "--output", str(tmp_path / "out"), *TINY])  # fmt: skip
    captured = capsys.readouterr()
    assert code == EXIT_ERROR and captured.out == "" and captured.err.count("\n") == 1
    assert f"{junk}: no inputs found: the folder holds no NIfTI image (.nii, .nii.gz) and no DICOM image series" \
        in captured.err
    assert not (tmp_path / "out").exists()


def test_no_series_matches_the_rule(random_model: Path, export: Path, tmp_path: Path, capsys):
    code = main(["infer", str(export / "dicom"), "--bundle", str(PHANTOM), "--model", str(random_model),
                 "--output", str(tmp_path / "out"), "--description", "^DWI", *TINY])  # fmt: skip
    captured = capsys.readouterr()
    assert code == EXIT_FAILED  # series are there, the rule chose none: as `medmtl series` with a rule
    rule = "(modality=MR, description~/^DWI/)"
    assert f"6 DICOM series found, none matches the series rule {rule}" in captured.out


# ---------------------------------------------------------------------------------------------------------
# nothing can start: exit 2 with one line


def test_output_inside_the_input_is_refused(random_model: Path, export: Path, capsys):
    study = export / "dicom" / "Study_phantom_001"
    before = sorted(str(p) for p in study.rglob("*"))
    code = main(["infer", str(study), "--bundle", str(PHANTOM), "--model", str(random_model),
                 "--output", str(study / "seg_out"), *TINY])  # fmt: skip
    err = capsys.readouterr().err
    assert code == EXIT_ERROR
    assert "the output folder is inside the input" in err and len(err.strip().splitlines()) == 1
    assert sorted(str(p) for p in study.rglob("*")) == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bundle", "{tmp}/no_bundle"], "bundle folder not found"),
        (["--bundle", str(PHANTOM), "--model", "{tmp}/missing.pt"], "missing.pt: checkpoint not found"),
        (["--bundle", str(PHANTOM), "--set", "no_such_key=1"], "has no key 'no_such_key'"),
        (["--bundle", str(PHANTOM), "--formats", "nifti,png"], "formats: ['png']"),
    ],
)
def test_setup_errors_exit_2_with_one_line(args, message, export: Path, tmp_path: Path, capsys):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code = main(["infer", str(export / "imagesTs"), "--output", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    assert code == EXIT_ERROR
    assert err.startswith("medmtl infer: error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_rerun_with_overwrite_replaces_the_previous_outputs(random_model: Path, export: Path, tmp_path: Path, capsys):
    out = tmp_path / "out"
    args = ["infer", str(export / "imagesTs"), "--bundle", str(PHANTOM), "--model", str(random_model),
            "--output", str(out), "--quiet", *TINY]  # fmt: skip
    assert main([*args, "--save-maps"]) == 0
    assert main([*args, "--overwrite"]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == ["phantom_001", "phantom_002"]
    assert sorted(p.name for p in (out / "phantom_001").iterdir()) == [".medmtl-output", "report.json", "seg.nii.gz"]
    report = json.loads((out / "phantom_001" / "report.json").read_text())
    assert report["input"] == {
        "type": "nifti",
        "path": str(export / "imagesTs" / "phantom_001.nii.gz"),
        "shape": [32, 32, 32],
        "spacing_mm": [1.0, 1.0, 1.0],
    }
    shutil.rmtree(out)
