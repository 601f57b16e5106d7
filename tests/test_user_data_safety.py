"""Never lose what the user has, and say clearly what is wrong with broken inputs (issue 20, items 1-9).

Each test reproduces one numbered finding of the broken-inputs review through the real commands (`medmtl infer`
and `medmtl check-data` in-process, `python -m monai.bundle run training` as a subprocess) on tiny data.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import REPO_ROOT, random_checkpoint
from pydicom.uid import DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian

from medmtl.cli import EXIT_ERROR, EXIT_FAILED, main
from medmtl.data.checks import check_dataset
from medmtl.data.datalist import write_dataset_json
from medmtl.data.synthetic import StudyInfo, generate_dataset, write_dicom_series
from medmtl.inference.batch import OUTPUT_MARKER

PHANTOM = REPO_ROOT / "bundles" / "phantom_mtl"
TINY = ["--set", "pipeline#patch_size=[32,32,32]"]
STUDY = StudyInfo(
    uid_seed="medmtl-test/user-data",
    patient_name="PHANTOM^SAFETY",
    patient_id="PHANTOM777",
    patient_birth_date="19800101",
    accession_number="PHACC777",
)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return random_checkpoint(PHANTOM, tmp_path_factory.mktemp("model") / "model.pt")


def infer(model: Path, source: Path, out: Path, *extra: str) -> int:
    return main(["infer", str(source), "--bundle", str(PHANTOM), "--model", str(model), "--output", str(out),
                 "--quiet", *TINY, *extra])  # fmt: skip


def nifti(path: Path, data: np.ndarray | None = None, spacing: float = 1.0) -> Path:
    data = np.random.default_rng(0).uniform(0, 100, (32, 32, 32)).astype(np.float32) if data is None else data
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([spacing, spacing, spacing, 1.0])), path)
    return path


def series(folder: Path, description: str = "T1", number: int = 1, slices: int = 32) -> list[Path]:
    image = np.random.default_rng(number).uniform(100, 1000, (32, 32, slices)).astype(np.float32)
    return write_dicom_series(image, np.eye(4), folder, study=STUDY, series_description=description,
                              series_number=number)  # fmt: skip


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*")
            if p.is_file()}  # fmt: skip


def one_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


# ---------------------------------------------------------------------------------------------------------
# 1. data loss


def test_a_user_folder_at_the_output_name_survives_byte_for_byte(model: Path, tmp_path: Path, capsys):
    x = tmp_path / "x"
    series(x / "case")  # the user's DICOM series folder, named like the NIfTI beside it
    (x / "case" / "notes.txt").write_text("reading of 2026-11-30\n")
    nifti(x / "case.nii.gz")
    before = digests(x / "case")
    for extra in ([], ["--overwrite"]):
        assert infer(model, x / "case.nii.gz", x, *extra) == EXIT_FAILED
        line = one_line(capsys.readouterr().err)
        assert "case.nii.gz" in line and "exists and is not a medmtl output; it is left as it is" in line
        assert digests(x / "case") == before
    assert sorted(p.name for p in x.iterdir()) == ["case", "case.nii.gz"]  # no staging litter


def test_earlier_outputs_are_replaced_only_with_overwrite(model: Path, tmp_path: Path, capsys):
    source, out = nifti(tmp_path / "in" / "scan.nii.gz"), tmp_path / "out"
    assert infer(model, source, out, "--save-maps") == 0
    assert sorted(p.name for p in (out / "scan").iterdir()) == sorted(
        [OUTPUT_MARKER, "boundary.nii.gz", "probabilities.nii.gz", "report.json", "seg.nii.gz"]
    )
    first = digests(out)
    assert infer(model, source, out) == EXIT_FAILED  # a rerun without --overwrite changes nothing
    assert "holds an earlier result; pass --overwrite to replace it" in one_line(capsys.readouterr().err)
    assert digests(out) == first
    assert infer(model, source, out, "--overwrite") == 0  # replaced whole: the maps of the first run are gone
    assert sorted(p.name for p in (out / "scan").iterdir()) == [OUTPUT_MARKER, "report.json", "seg.nii.gz"]
    # a file of the user's inside an output folder makes it the user's: never replaced
    (out / "scan" / "my_edits.nii.gz").write_bytes(b"corrected by hand")
    kept = digests(out)
    assert infer(model, source, out, "--overwrite") == EXIT_FAILED
    assert "exists and is not a medmtl output" in one_line(capsys.readouterr().err)
    assert digests(out) == kept


def test_two_inputs_with_the_same_name_keep_separate_folders(model: Path, tmp_path: Path, capsys):
    tree = tmp_path / "in"
    nifti(tmp_path / "in" / "Scan.nii.gz")
    nifti(tmp_path / "in" / "scan.nii", np.full((32, 32, 32), 5.0, np.float32))
    assert infer(model, tree, tmp_path / "out") == 0
    folders = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert folders == ["Scan", "scan_2"]
    paths = {json.loads((tmp_path / "out" / f / "report.json").read_text())["input"]["path"] for f in folders}
    assert paths == {str(tree / "Scan.nii.gz"), str(tree / "scan.nii")}


# ---------------------------------------------------------------------------------------------------------
# 2. deflated DICOM


def test_a_deflated_series_is_read_not_called_truncated(model: Path, tmp_path: Path, capsys):
    for path in series(tmp_path / "deflated"):
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        ds.save_as(path, enforce_file_format=True)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    assert infer(model, tmp_path / "deflated", tmp_path / "out", "--formats", "nifti,report") == 0
    (folder,) = (tmp_path / "out").iterdir()
    assert nib.load(folder / "seg.nii.gz").shape == (32, 32, 32)


# ---------------------------------------------------------------------------------------------------------
# 3. one line instead of a traceback


def dataset(root: Path, cases: int = 3) -> Path:
    generate_dataset(root, cases=cases, size=32)
    return root


def test_check_data_reports_an_rgb_image_in_one_line(tmp_path: Path, capsys):
    root = dataset(tmp_path / "d")
    image = root / "imagesTr" / "phantom_001.nii.gz"
    rgb = np.zeros((32, 32, 32), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, nib.load(image).affine), image)
    assert main(["check-data", str(root)]) == 1
    out = capsys.readouterr().out
    assert "FAIL phantom_001" in out and "imagesTr/phantom_001.nii.gz: RGB (colour) voxels" in out
    assert "Traceback" not in out


def train(dataset_dir: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file",
           str(PHANTOM / "configs" / "train.yaml"), "--dataset_dir", str(dataset_dir), "--output_dir", str(out),
           "--max_epochs", "1", "--pipeline#patch_size", "[32,32,32]", "--num_workers", "0", *extra]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MEDMTL_DEBUG")}
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, env=env, timeout=600)


def test_training_on_fewer_cases_than_folds_stops_with_one_line(tmp_path: Path):
    run = train(dataset(tmp_path / "d", cases=3), tmp_path / "out")  # the bundle's default is 5 folds
    assert run.returncode != 0
    assert "Traceback" not in run.stderr, run.stderr[-2000:]
    assert "error: cannot split 3 cases into 5 folds; add cases or pass --num_folds N with 2 <= N <= 3" in run.stderr
    assert not (tmp_path / "out" / "models").exists()


def test_training_on_a_dataset_without_training_cases_stops_with_one_line(tmp_path: Path):
    root = dataset(tmp_path / "d")
    meta = json.loads((root / "dataset.json").read_text())
    meta.update(training=[], numTraining=0)
    write_dataset_json(root, meta)
    run = train(root, tmp_path / "out")
    assert run.returncode != 0 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert "'training' lists no cases; there is nothing to train on" in run.stderr


# ---------------------------------------------------------------------------------------------------------
# 4. check-data catches what would crash training later


def test_check_data_fails_a_two_channel_image_and_a_2d_case_in_a_3d_set(tmp_path: Path):
    root = dataset(tmp_path / "d", cases=4)
    affine = nib.load(root / "imagesTr" / "phantom_001.nii.gz").affine
    two = np.random.default_rng(1).uniform(0, 1, (32, 32, 32, 2)).astype(np.float32)
    nib.save(nib.Nifti1Image(two, affine), root / "imagesTr" / "phantom_001.nii.gz")
    for folder, dtype in (("imagesTr", np.float32), ("labelsTr", np.uint8)):
        flat = np.zeros((32, 32), dtype=dtype)
        nib.save(nib.Nifti1Image(flat, affine), root / folder / "phantom_002.nii.gz")
    report = check_dataset(root)
    problems = {case.case_id: case.problems for case in report.cases}
    assert problems["phantom_001"] == ["imagesTr/phantom_001.nii.gz: 2 channel(s) where 1 are expected"]
    assert problems["phantom_002"] == ["imagesTr/phantom_002.nii.gz: a 2D image where 3D images are expected"]
    assert problems["phantom_000"] == [] and problems["phantom_003"] == []


def test_a_dataset_path_outside_the_dataset_folder_is_refused(tmp_path: Path, capsys):
    root = dataset(tmp_path / "d")
    nifti(tmp_path / "elsewhere" / "x.nii.gz")
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"][0]["image"] = "../elsewhere/x.nii.gz"
    write_dataset_json(root, meta)
    assert main(["check-data", str(root)]) == 1
    out = capsys.readouterr().out
    assert "training[0] 'image' '../elsewhere/x.nii.gz' points outside the dataset folder" in out


# ---------------------------------------------------------------------------------------------------------
# 5. file names that are not UTF-8


@pytest.mark.skipif(sys.platform != "linux", reason="file names are bytes on Linux only")
def test_a_latin1_file_name_is_segmented_and_printed(model: Path, tmp_path: Path):
    (tmp_path / "in").mkdir()
    name = os.fsdecode(b"caf\xe9.nii.gz")  # Latin-1 bytes, as an old archive writes them
    nifti(tmp_path / "in" / name)
    cmd = [sys.executable, "-m", "medmtl.cli", "infer", str(tmp_path / "in"), "--bundle", str(PHANTOM),
           "--model", str(model), "--output", str(tmp_path / "out"), *TINY]  # fmt: skip
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict"}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, errors="replace")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    assert "caf\\xe9.nii.gz" not in run.stderr and "1 input(s) done, 0 failed" in run.stdout
    report = json.loads((tmp_path / "out" / "caf" / "report.json").read_text(encoding="utf-8"))
    assert report["input"]["path"] == str(tmp_path / "in" / "caf\\xe9.nii.gz")


# ---------------------------------------------------------------------------------------------------------
# 6. one format failing keeps the others


def test_a_dicom_seg_failure_keeps_the_nifti_and_the_report(model: Path, tmp_path: Path, capsys):
    for path in series(tmp_path / "s"):
        ds = pydicom.dcmread(path)
        ds.PatientBirthDate = "not a date"
        ds.save_as(path)
    assert infer(model, tmp_path / "s", tmp_path / "out") == EXIT_FAILED  # a requested output is missing
    err = one_line(capsys.readouterr().err)
    assert err.startswith("warning: ") and "seg.dcm not written:" in err
    (folder,) = (tmp_path / "out").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == [OUTPUT_MARKER, "report.json", "seg.nii.gz"]
    report = json.loads((folder / "report.json").read_text())
    assert any(w.startswith("seg.dcm not written:") for w in report["warnings"])
    assert report["outputs"] == ["report.json", "seg.nii.gz"]


# ---------------------------------------------------------------------------------------------------------
# 7. implausible inputs are refused, as check-data refuses them


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("spacing", "spacing 1000x1000x1000 mm outside 0.05..20 mm; refusing to segment"),
        ("huge", "intensities up to 3e+38 in magnitude"),
        ("complex", "complex-valued voxels (complex64)"),
    ],
)
def test_implausible_images_are_refused_by_infer_and_check_data(kind, message, model: Path, tmp_path: Path, capsys):
    data = np.random.default_rng(0).uniform(0, 100, (32, 32, 32)).astype(np.float32)
    spacing = 1000.0 if kind == "spacing" else 1.0
    if kind == "huge":
        data[0, 0, 0] = 3e38
    if kind == "complex":
        data = (data + 1j * data).astype(np.complex64)
    source = nifti(tmp_path / "scan.nii.gz", data, spacing)
    assert infer(model, source, tmp_path / "out") == EXIT_FAILED
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"failed: {source}: ") and message.split(";")[0] in line
    assert not (tmp_path / "out").exists()  # every input failed: no empty output folder left


# ---------------------------------------------------------------------------------------------------------
# 8. the output folder is checked before any input is computed


def test_an_unwritable_output_folder_stops_the_run_before_the_first_input(model: Path, tmp_path: Path, capsys):
    source = nifti(tmp_path / "scan.nii.gz")
    (tmp_path / "blocker").write_text("a file where the output's parent folder should be\n")
    assert infer(model, source, tmp_path / "blocker" / "out") == EXIT_ERROR
    line = one_line(capsys.readouterr().err)
    assert "cannot write in the output folder" in line and "nothing was computed" in line
    if os.geteuid() != 0:  # root writes into read-only folders anyway
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        assert infer(model, source, ro) == EXIT_ERROR
        assert "cannot write in the output folder" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# 9. messages that say what is wrong


def test_a_broken_nifti_gets_a_nifti_message_without_reader_noise(model: Path, tmp_path: Path, capsys):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(os.urandom(3000))
    assert infer(model, bad, tmp_path / "out") == EXIT_FAILED
    line = one_line(capsys.readouterr().err)
    assert "broken.nii.gz: not a readable NIfTI file (File broken.nii.gz is not a gzip file)" in line
    assert "DICOM" not in line


def test_a_text_file_as_model_is_called_not_a_checkpoint(tmp_path: Path, capsys):
    text = tmp_path / "model.txt"
    text.write_text("epoch,loss\n1,0.5\n")
    code = main(["infer", str(nifti(tmp_path / "scan.nii.gz")), "--bundle", str(PHANTOM), "--model", str(text),
                 "--output", str(tmp_path / "out")])  # fmt: skip
    assert code == EXIT_ERROR
    line = one_line(capsys.readouterr().err)
    assert "model.txt: not a PyTorch checkpoint" in line and "weights_only" not in line


def test_dicom_files_without_preamble_are_found_and_segmented(model: Path, tmp_path: Path, capsys):
    for path in series(tmp_path / "raw"):
        ds = pydicom.dcmread(path)
        ds.file_meta = pydicom.dataset.FileMetaDataset()  # the bare data set: no preamble, no file meta
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        with open(path, "wb") as fp:
            pydicom.filewriter.write_dataset(pydicom.filebase.DicomFileLike(fp), ds)
    assert not pydicom.misc.is_dicom(path)
    assert infer(model, tmp_path / "raw", tmp_path / "out", "--formats", "nifti,report") == 0
    (folder,) = (tmp_path / "out").iterdir()
    assert nib.load(folder / "seg.nii.gz").shape == (32, 32, 32)
