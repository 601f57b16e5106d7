"""The phantom generator: determinism, MSD layout, lesion placement, and the DICOM scanner export."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage
from scipy import ndimage
from scipy.spatial.transform import Rotation

from medmtl.cli import main
from medmtl.data.synthetic import (
    FLAIR_SERIES_DESCRIPTION,
    LOCALIZER_SERIES_DESCRIPTION,
    MAIN_SERIES_DESCRIPTION,
    StudyInfo,
    ensure_phantom_dataset,
    generate_dataset,
    make_case,
    write_dicom_series,
)
from medmtl.errors import MedmtlError

F = np.diag([-1.0, -1.0, 1.0])  # RAS <-> LPS
SMALL = {"cases": 4, "size": 24, "seed": 0, "dicom_cases": 2}


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    """4 training cases of 24^3 and 2 DICOM-exported cases (the second oblique)."""
    out = tmp_path_factory.mktemp("phantom") / "set"
    generate_dataset(out, **SMALL)
    return out


def _load(root: Path, relative: str) -> nib.Nifti1Image:
    return nib.load(root / relative)


def _read_study(study_dir: Path) -> tuple[dict[str, list[tuple[Path, pydicom.Dataset]]], list[Path]]:
    """All files under a study folder: DICOM grouped by SeriesInstanceUID, and the non-DICOM ones."""
    series, others = defaultdict(list), []
    for path in sorted(p for p in study_dir.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path)
        except InvalidDicomError:
            others.append(path)
            continue
        series[ds.SeriesInstanceUID].append((path, ds))
    return series, others


def _relative_files(folder: Path) -> list[Path]:
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())


def _normal(ds: pydicom.Dataset) -> np.ndarray:
    row, column = np.reshape(np.array(ds.ImageOrientationPatient, dtype=float), (2, 3))
    return np.cross(row, column)


def _by_description(series: dict, description: str) -> list[tuple[Path, pydicom.Dataset]]:
    (files,) = [f for f in series.values() if f[0][1].SeriesDescription == description]
    return files


# ---------------------------------------------------------------------------------------------------------
# MSD dataset


def test_same_seed_gives_identical_dataset_other_seed_differs(small_dataset, tmp_path):
    again = tmp_path / "again"
    other = tmp_path / "other"
    generate_dataset(again, **SMALL)
    generate_dataset(other, **{**SMALL, "seed": 1, "dicom_cases": 0})
    assert (again / "dataset.json").read_text() == (small_dataset / "dataset.json").read_text()
    description = json.loads((small_dataset / "dataset.json").read_text())
    for entry in description["training"] + description["dicom_exports"]:
        for key in ("image", "label"):
            first, second = _load(small_dataset, entry[key]), _load(again, entry[key])
            assert np.array_equal(np.asarray(first.dataobj), np.asarray(second.dataobj))
            assert np.array_equal(first.affine, second.affine)
    # DICOM files, UIDs included, are byte-identical on a rerun
    dicom_files = _relative_files(small_dataset / "dicom")
    assert dicom_files == _relative_files(again / "dicom")
    for path in dicom_files:
        assert (small_dataset / "dicom" / path).read_bytes() == (again / "dicom" / path).read_bytes()
    first_image = description["training"][0]["image"]
    assert not np.array_equal(
        np.asarray(_load(small_dataset, first_image).dataobj), np.asarray(_load(other, first_image).dataobj)
    )


def test_dataset_json_and_files(small_dataset):
    description = json.loads((small_dataset / "dataset.json").read_text())
    assert description["tensorImageSize"] == "3D"
    assert description["modality"] == {"0": "MR"}
    assert description["labels"] == {"0": "background", "1": "organ", "2": "lesion"}
    assert description["classes"] == {"0": "no_lesion", "1": "lesion"}
    assert description["numTraining"] == len(description["training"]) == 4
    assert description["numTest"] == len(description["test"]) == 2
    seen = set()
    for entry in description["training"]:
        assert entry["image"].startswith("./imagesTr/") and entry["label"].startswith("./labelsTr/")
        image, label = _load(small_dataset, entry["image"]), _load(small_dataset, entry["label"])
        assert image.get_data_dtype() == np.float32 and label.get_data_dtype() == np.uint8
        assert image.shape == label.shape == (24, 24, 24)
        assert np.allclose(image.header.get_zooms(), 1.0)
        assert np.array_equal(image.affine, label.affine)
        values = set(np.unique(np.asarray(label.dataobj)).tolist())
        assert values <= {0, 1, 2} and 1 in values
        assert entry["class"] == int(2 in values)
        seen |= values
    assert seen == {0, 1, 2}
    assert sorted(e["class"] for e in description["training"]) == [0, 0, 1, 1]
    test_images = {e["image"] for e in description["dicom_exports"]}
    assert test_images == set(description["test"])
    assert not test_images & {e["image"] for e in description["training"]}


def test_lesion_inside_organ_and_about_half_the_cases(tmp_path):
    generate_dataset(tmp_path / "set", cases=20, size=20, seed=5)
    description = json.loads((tmp_path / "set" / "dataset.json").read_text())
    assert sum(e["class"] for e in description["training"]) == 10
    for entry in description["training"]:
        label = np.asarray(_load(tmp_path / "set", entry["label"]).dataobj)
        lesion = label == 2
        assert lesion.any() == bool(entry["class"])
        # fully inside: the lesion grown by one voxel still lies in the organ, never touches background
        assert not (ndimage.binary_dilation(lesion) & (label == 0)).any()
        assert not (label[[0, -1]].any() or label[:, [0, -1]].any() or label[:, :, [0, -1]].any())
    # make_case draws the class itself when not told
    classes = [make_case(np.random.default_rng(i), size=16, spatial_dims=2).has_lesion for i in range(20)]
    assert 5 <= sum(classes) <= 15


def test_lesion_is_subtle_but_visible():
    case = make_case(np.random.default_rng(7), size=48, has_lesion=True)
    lesion, organ = case.label == 2, case.label == 1
    # organ voxels around the lesion: the local contrast a network sees (the bias field varies slowly)
    ring = ndimage.binary_dilation(lesion, iterations=4) & ~ndimage.binary_dilation(lesion) & organ
    cnr = abs(case.image[ring].mean() - case.image[lesion].mean()) / case.image[ring].std()
    assert 1.5 < cnr < 4.0
    outside = ndimage.binary_dilation(organ | lesion, iterations=4) & (case.label == 0)
    organ_cnr = abs(case.image[organ].mean() - case.image[outside].mean()) / case.image[organ].std()
    assert organ_cnr > cnr
    assert case.image.dtype == np.float32 and case.label.dtype == np.uint8
    assert case.affine.shape == (4, 4) and np.linalg.det(case.affine[:3, :3]) > 0


def test_two_dimensional_dataset(tmp_path):
    generate_dataset(tmp_path / "set", cases=2, size=32, seed=0, spatial_dims=2)
    description = json.loads((tmp_path / "set" / "dataset.json").read_text())
    assert description["tensorImageSize"] == "2D"
    for entry in description["training"]:
        image, label = _load(tmp_path / "set", entry["image"]), _load(tmp_path / "set", entry["label"])
        assert image.shape == label.shape == (32, 32)
        assert 1 in np.unique(np.asarray(label.dataobj))


def test_refuses_non_empty_folder_and_unsupported_requests(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(MedmtlError, match="mine: output folder is not empty"):
        generate_dataset(out, cases=1, size=16)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me"
    with pytest.raises(MedmtlError, match="not supported for 2D"):
        generate_dataset(tmp_path / "flat", cases=1, size=16, spatial_dims=2, dicom_cases=1)
    with pytest.raises(MedmtlError, match="at least 16"):
        generate_dataset(tmp_path / "tiny", cases=1, size=8)


def test_ensure_generates_once(tmp_path):
    dataset_json = ensure_phantom_dataset(tmp_path / "phantom", cases=2, size=16, seed=2)
    assert dataset_json == tmp_path / "phantom" / "dataset.json" and dataset_json.is_file()
    written = dataset_json.stat().st_mtime_ns
    assert ensure_phantom_dataset(tmp_path / "phantom", cases=2, size=16, seed=2) == dataset_json
    assert dataset_json.stat().st_mtime_ns == written
    assert [p.name for p in tmp_path.iterdir()] == ["phantom"]  # no staging folder left behind
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.nii.gz").write_bytes(b"")
    with pytest.raises(MedmtlError, match="other: folder has files but no dataset.json"):
        ensure_phantom_dataset(tmp_path / "other")


# ---------------------------------------------------------------------------------------------------------
# DICOM export


def test_dicom_main_series_geometry_and_values(small_dataset):
    description = json.loads((small_dataset / "dataset.json").read_text())
    angles = []
    for export in description["dicom_exports"]:
        reference = _load(small_dataset, export["image"])
        volume, affine = np.asarray(reference.dataobj), reference.affine
        angles.append(np.rad2deg(Rotation.from_matrix(affine[:3, :3]).magnitude()))
        series, _ = _read_study(small_dataset / export["study_dir"])
        main_files = _by_description(series, MAIN_SERIES_DESCRIPTION)
        assert len(main_files) == volume.shape[2]
        row_dir = F @ affine[:3, 0] / np.linalg.norm(affine[:3, 0])
        col_dir = F @ affine[:3, 1] / np.linalg.norm(affine[:3, 1])
        slices = []
        for _, ds in main_files:
            position = np.array(ds.ImagePositionPatient, dtype=float)
            # which slice this file claims to be, from its position along the slice axis
            k = int(round((F @ position - affine[:3, 3]) @ affine[:3, 2] / (affine[:3, 2] @ affine[:3, 2])))
            slices.append(k)
            assert np.allclose(position, F @ (affine @ [0, 0, k, 1])[:3], atol=1e-3)
            orientation = np.array(ds.ImageOrientationPatient, dtype=float)
            assert np.allclose(orientation, [*row_dir, *col_dir], atol=1e-6)
            assert np.allclose(np.array(ds.PixelSpacing, dtype=float), 1.0)
            assert float(ds.SliceThickness) == pytest.approx(1.0) == float(ds.SpacingBetweenSlices)
            slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
            assert slope != 1.0 and intercept != 0.0
            real = ds.pixel_array * slope + intercept
            assert ds.pixel_array.shape == (ds.Rows, ds.Columns) == (volume.shape[1], volume.shape[0])
            assert np.abs(real - volume[:, :, k].T).max() <= slope / 2 + 1e-4 * slope
        assert sorted(slices) == list(range(volume.shape[2]))
        # sorting along the normal (row x column) gives the NIfTI slice order: a loader recovers the affine
        normal = np.cross(row_dir, col_dir)
        along = [np.array(ds.ImagePositionPatient, dtype=float) @ normal for _, ds in main_files]
        assert [slices[i] for i in np.argsort(along)] == list(range(volume.shape[2]))
    assert angles[0] == pytest.approx(0.0, abs=1e-3)
    assert 10 - 1e-3 <= angles[1] <= 25 + 1e-3  # the second exported case is oblique


def test_dicom_decoys_uids_and_tags(small_dataset):
    description = json.loads((small_dataset / "dataset.json").read_text())
    sop_uids, series_uids, study_uids = [], [], []
    for export in description["dicom_exports"]:
        study_dir = small_dataset / export["study_dir"]
        series, others = _read_study(study_dir)
        assert others and all(p.suffix in (".txt", ".log") for p in others)
        assert {f[0][1].SeriesDescription for f in series.values()} == {
            MAIN_SERIES_DESCRIPTION, FLAIR_SERIES_DESCRIPTION, LOCALIZER_SERIES_DESCRIPTION,
        }  # fmt: skip
        assert all(path.parent.parent == study_dir for files in series.values() for path, _ in files)
        main_files = _by_description(series, MAIN_SERIES_DESCRIPTION)
        flair = _by_description(series, FLAIR_SERIES_DESCRIPTION)
        localizer = _by_description(series, LOCALIZER_SERIES_DESCRIPTION)
        assert len(localizer) == 3
        assert all("LOCALIZER" in ds.ImageType for _, ds in localizer)
        normals = [_normal(ds) for _, ds in localizer]
        assert abs(normals[0] @ normals[1]) < 1e-6 and abs(normals[0] @ normals[2]) < 1e-6
        assert 1 < len(flair) < len(main_files)
        assert float(flair[0][1].PixelSpacing[0]) != float(main_files[0][1].PixelSpacing[0])
        assert any(p.suffix == "" for p, _ in main_files) and any(p.suffix == ".dcm" for p, _ in main_files)

        def position_order(files):
            normal = _normal(files[0][1])
            return np.argsort([np.array(ds.ImagePositionPatient, dtype=float) @ normal for _, ds in files])

        for files in (main_files, flair):  # files are listed by name: names do not follow the slices
            assert list(position_order(files)) != list(range(len(files)))
        flair_numbers = [int(flair[i][1].InstanceNumber) for i in position_order(flair)]
        assert flair_numbers == sorted(flair_numbers, reverse=True)

        datasets = [ds for files in series.values() for _, ds in files]
        assert {ds.StudyInstanceUID for ds in datasets} == {datasets[0].StudyInstanceUID}
        assert len({ds.FrameOfReferenceUID for ds in datasets}) == 1
        patient = {
            (str(ds.PatientName), ds.PatientID, ds.PatientBirthDate, ds.AccessionNumber) for ds in datasets
        }
        assert len(patient) == 1
        name, patient_id, birth_date, accession = patient.pop()
        assert name.startswith("PHANTOM^") and patient_id.startswith("PHANTOM") and birth_date and accession
        assert not any(patient_id in str(p) for p in study_dir.rglob("*"))
        for ds in datasets:
            assert ds.Modality == "MR" and ds.SOPClassUID == MRImageStorage
            assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        sop_uids += [ds.SOPInstanceUID for ds in datasets]
        series_uids += list(series)
        study_uids.append(datasets[0].StudyInstanceUID)
    assert len(set(sop_uids)) == len(sop_uids)
    assert len(set(series_uids)) == len(series_uids) == 6
    assert len(set(study_uids)) == 2


def test_write_dicom_series_refuses_left_handed_affine(tmp_path):
    study = StudyInfo("test", "PHANTOM^1", "PHANTOM1", "19700101", "PHACC1")
    with pytest.raises(MedmtlError, match="series: affine's slice axis"):
        write_dicom_series(
            np.zeros((4, 4, 3)), np.diag([1.0, 1.0, -1.0, 1.0]), tmp_path / "series",
            study=study, series_description="x", series_number=1,
        )  # fmt: skip
    assert not (tmp_path / "series").exists()


def test_cli_synth_prints_no_patient_identifiers(tmp_path, capsys):
    argv = ["synth", "--out", str(tmp_path / "set"), "--cases", "1", "--size", "16", "--dicom", "1"]
    assert main(argv) == 0
    printed = capsys.readouterr()
    assert "dataset.json" in printed.out
    assert "PHANTOM" not in printed.out + printed.err
