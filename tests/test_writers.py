"""Inference writers: safe names, NIfTI geometry round trips, DICOM SEG on phantom exports, report.json.

DICOM SEG outputs are read back with highdicom and checked frame by frame against the source slices
(reference, position, pixels), and validated with dciodvfy (Debian's dicom3tools, installed by
scripts/setup.sh) when it is available.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from pydicom.sr.codedict import codes
from scipy.spatial.transform import Rotation

from medmtl.data.dicom import SeriesInfo, discover_series, load_series
from medmtl.data.synthetic import (
    LABELS,
    MAIN_SERIES_DESCRIPTION,
    StudyInfo,
    generate_dataset,
    write_dicom_series,
)
from medmtl.errors import MedmtlError
from medmtl.inference.writers import (
    SAFE_NAME_MAX,
    label_volumes_ml,
    safe_name,
    write_dicom_seg,
    write_nifti,
    write_report,
)

LPS = np.diag([-1.0, -1.0, 1.0])  # RAS <-> LPS
SEG_KWARGS = {"algorithm_name": "phantom", "algorithm_version": "0.1.0"}
# type 2 patient/study attributes that derived exports (crops, anonymised copies) often leave out
SPARSE = (
    "PatientBirthDate", "PatientSex", "ReferringPhysicianName", "StudyID", "AccessionNumber", "StudyDate",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# safe_name

HOSTILE = [
    "../../etc/passwd",
    "/abs/path",
    "a\x00b\n",
    "..",
    ".",
    "",
    "   ",
    "x" * 500,
    "Müller Ñandú",
    "日本語",
    "..\\..\\windows\\system32",
    "-rf --no-preserve-root",
    "\x1b[31mred\x1b[0m",
    "case 007/T1 (post)",
]


@pytest.mark.parametrize("text", HOSTILE)
def test_safe_name_is_one_safe_path_component(text: str, tmp_path: Path) -> None:
    name = safe_name(text)
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name), name
    assert name not in (".", "..") and len(name) <= SAFE_NAME_MAX
    assert "__" not in name and not name.endswith((".", "_"))
    # a file created under that name stays directly in the folder
    target = tmp_path / name
    target.write_text("x")
    assert target.resolve().parent == tmp_path.resolve()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("../../etc/passwd", "etc_passwd"),
        ("/abs/path", "abs_path"),
        ("a\x00b\n", "a_b"),
        ("..", "case"),
        ("", "case"),
        ("日本語", "case"),
        ("Müller Ñandú", "Muller_Nandu"),
        ("case 007/T1 (post)", "case_007_T1_post"),
        ("phantom_001.v2-final", "phantom_001.v2-final"),
    ],
)
def test_safe_name_values(text: str, expected: str) -> None:
    assert safe_name(text) == expected


def test_safe_name_fallback_and_long_names() -> None:
    assert safe_name("///", fallback="series") == "series"
    with pytest.raises(ValueError, match="fallback"):
        safe_name("..", fallback="../x")
    first, second = "a" * 200 + "1", "a" * 200 + "2"
    assert len(safe_name(first)) == SAFE_NAME_MAX
    assert safe_name(first) != safe_name(second)  # the hash of the whole text keeps them apart
    assert safe_name(first) == safe_name(first)  # deterministic
    assert safe_name(first).startswith("a" * 60)


# ---------------------------------------------------------------------------------------------------------
# NIfTI


def _float32_exact(affine: np.ndarray) -> np.ndarray:
    return affine.astype(np.float32).astype(np.float64)  # the sform is stored as float32


def _oblique_affine() -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_rotvec([0.2, -0.3, 0.25]).as_matrix() @ np.diag([0.8, 1.1, 2.5])
    affine[:3, 3] = [-31.5, 12.25, 40.0]
    return _float32_exact(affine)


AFFINES = {
    "oblique-anisotropic": _oblique_affine(),
    "lps-like": np.array([[-1.0, 0, 0, 90.0], [0, -1.0, 0, 126.0], [0, 0, 1.0, -72.0], [0, 0, 0, 1]]),
    "flipped-det-negative": np.array(
        [[-0.75, 0, 0, 10.0], [0, 0.75, 0, -20.0], [0, 0, 3.0, 5.0], [0, 0, 0, 1]]
    ),
}


def _asymmetric_labels(shape=(5, 6, 7)) -> np.ndarray:
    """Values that differ along every axis, so a swapped or flipped axis changes the array."""
    i, j, k = np.indices(shape)
    return ((i + 2 * j + 3 * k) % 4).astype(np.int64)


def _itk_affine_ras(image: sitk.Image) -> np.ndarray:
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = LPS @ direction @ np.diag(image.GetSpacing())
    affine[:3, 3] = LPS @ np.asarray(image.GetOrigin())
    return affine


@pytest.mark.parametrize("name", AFFINES)
def test_nifti_round_trip_keeps_voxels_and_affine(name: str, tmp_path: Path) -> None:
    affine = AFFINES[name]
    label = _asymmetric_labels()
    path = write_nifti(label, affine, tmp_path / "case.nii.gz")

    image = nib.load(path)
    assert image.get_data_dtype() == np.uint8  # label maps are stored as uint8
    assert np.array_equal(np.asarray(image.dataobj), label)
    np.testing.assert_allclose(image.affine, affine, atol=1e-5)
    sform, sform_code = image.get_sform(coded=True)
    qform, qform_code = image.get_qform(coded=True)
    assert (int(sform_code), int(qform_code)) == (1, 1)
    np.testing.assert_allclose(sform, affine, atol=1e-5)
    np.testing.assert_allclose(qform, affine, atol=1e-4)

    itk_image = sitk.ReadImage(str(path))
    np.testing.assert_allclose(_itk_affine_ras(itk_image), affine, atol=1e-4)
    assert np.array_equal(sitk.GetArrayFromImage(itk_image).transpose(2, 1, 0), label)


def test_nifti_types(tmp_path: Path) -> None:
    affine = AFFINES["lps-like"]
    image = np.random.default_rng(0).normal(size=(4, 3, 2))
    path = write_nifti(image, affine, tmp_path / "image.nii")
    assert nib.load(path).get_data_dtype() == np.float32
    np.testing.assert_allclose(np.asarray(nib.load(path).dataobj), image, rtol=1e-6)

    wide = np.array([[[0, 300]]])
    assert nib.load(write_nifti(wide, affine, tmp_path / "wide.nii.gz")).get_data_dtype() == np.int16
    mask = np.zeros((2, 2, 2), bool)
    mask[1, 0, 1] = True
    written = write_nifti(mask, affine, tmp_path / "mask.nii.gz")
    assert np.array_equal(np.asarray(nib.load(written).dataobj), mask)

    with pytest.raises(MedmtlError, match=r"wide8\.nii\.gz: the values do not fit uint8"):
        write_nifti(wide, affine, tmp_path / "wide8.nii.gz", dtype=np.uint8)
    with pytest.raises(MedmtlError, match="do not fit uint8"):
        write_nifti(np.array([[[0.5]]]), affine, tmp_path / "fraction.nii.gz", dtype="uint8")
    with pytest.raises(MedmtlError, match=r"label\.png: .* must end in \.nii or \.nii\.gz"):
        write_nifti(mask, affine, tmp_path / "label.png")
    with pytest.raises(MedmtlError, match="invertible 4x4"):
        write_nifti(mask, np.zeros((4, 4)), tmp_path / "singular.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.nii", "mask.nii.gz", "wide.nii.gz"]


def test_nifti_refuses_overwrite_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    affine = AFFINES["oblique-anisotropic"]
    path = write_nifti(np.zeros((3, 3, 3), np.uint8), affine, tmp_path / "out" / "case.nii.gz")
    with pytest.raises(MedmtlError, match=r"case\.nii\.gz: already exists"):
        write_nifti(np.ones((3, 3, 3), np.uint8), affine, path)
    assert np.asarray(nib.load(path).dataobj).max() == 0  # untouched
    write_nifti(np.ones((3, 3, 3), np.uint8), affine, path, overwrite=True)
    assert np.asarray(nib.load(path).dataobj).min() == 1
    assert [p.name for p in path.parent.iterdir()] == ["case.nii.gz"]


def test_nifti_sheared_affine_keeps_sform_only(tmp_path: Path) -> None:
    affine = np.array([[1.0, 0.5, 0, 0], [0, 1.0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]])
    image = nib.load(write_nifti(np.zeros((2, 2, 2), np.uint8), affine, tmp_path / "shear.nii.gz"))
    assert int(image.get_qform(coded=True)[1]) == 0
    np.testing.assert_allclose(image.affine, affine, atol=1e-6)


def test_nifti_aligned_code(tmp_path: Path) -> None:
    path = write_nifti(np.zeros((2, 2, 2), np.uint8), np.eye(4), tmp_path / "a.nii.gz", xform_code=2)
    image = nib.load(path)
    assert (int(image.get_sform(coded=True)[1]), int(image.get_qform(coded=True)[1])) == (2, 2)


# ---------------------------------------------------------------------------------------------------------
# DICOM SEG


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A phantom dataset with two DICOM exports: the first axial, the second oblique."""
    out = tmp_path_factory.mktemp("writers") / "phantom"
    generate_dataset(out, cases=1, size=24, dicom_cases=2)
    return out


def _export(phantom_dir: Path, index: int) -> tuple[SeriesInfo, np.ndarray]:
    """The T1 series of one export and its reference label on the series grid."""
    entry = json.loads((phantom_dir / "dataset.json").read_text())["dicom_exports"][index]
    assert entry["oblique"] == (index == 1)
    found = discover_series(phantom_dir / entry["study_dir"])
    (series,) = [s for s in found if s.description == MAIN_SERIES_DESCRIPTION]
    reference = nib.load(phantom_dir / entry["label"])
    # the reference label was written on exactly the series grid: same affine, same voxel order
    np.testing.assert_allclose(load_series(series).meta["affine"].numpy(), reference.affine, atol=1e-3)
    return series, np.asarray(reference.dataobj).astype(np.uint8)


def _frames_by_slice(seg: hd.seg.Segmentation) -> dict[tuple[int, str], int]:
    """(segment number, referenced SOPInstanceUID) -> frame index."""
    frames = {}
    for index, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        uid = str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        frames[(number, uid)] = index
    return frames


def _assert_frames_match_slices(path: Path, series: SeriesInfo, label: np.ndarray, values: list[int]) -> None:
    """Each frame references source slice k, sits at its position and holds label[:, :, k].T == value."""
    seg = hd.seg.segread(path)
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in series.files]
    uids = [str(ds.SOPInstanceUID) for ds in sources]
    frames = _frames_by_slice(seg)
    pixels = seg.pixel_array.reshape(-1, series.rows, series.columns)
    expected = {
        (number, uids[k])
        for number, value in enumerate(values, start=1)
        for k in range(series.num_slices)
        if np.any(label[:, :, k] == value)
    }
    assert set(frames) == expected  # every non-empty slice has its frame, empty ones are omitted
    affine = load_series(series).meta["affine"].numpy()
    for (number, uid), index in frames.items():
        k = uids.index(uid)
        item = seg.PerFrameFunctionalGroupsSequence[index]
        position = np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, float)
        np.testing.assert_allclose(position, np.asarray(sources[k].ImagePositionPatient, float), atol=1e-3)
        assert np.array_equal(pixels[index], label[:, :, k].T == values[number - 1]), (number, k)
        # the first marked pixel (row r, column c) is voxel (c, r, k) of the load_series grid, in the world
        r, c = np.argwhere(pixels[index])[0]
        row_dir = np.asarray(sources[k].ImageOrientationPatient[:3], float)
        col_dir = np.asarray(sources[k].ImageOrientationPatient[3:], float)
        spacing = np.asarray(sources[k].PixelSpacing, float)  # between rows, between columns
        world_lps = position + c * spacing[1] * row_dir + r * spacing[0] * col_dir
        np.testing.assert_allclose(LPS @ (affine @ [c, r, k, 1.0])[:3], world_lps, atol=1e-3)
    # the whole label map back through highdicom's reader
    volume = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, combine_segments=True, assert_missing_frames_are_empty=True
    )
    lookup = np.zeros(max(max(values), int(label.max())) + 1, np.uint8)
    lookup[values] = np.arange(1, len(values) + 1)
    assert np.array_equal(volume, np.transpose(lookup[label], (2, 1, 0)))


@pytest.mark.parametrize("index", [0, 1], ids=["axial", "oblique"])
def test_dicom_seg_frames_line_up_with_source_slices(index: int, phantom_dir: Path, tmp_path: Path) -> None:
    series, label = _export(phantom_dir, index)
    assert label.max() >= 1
    path = write_dicom_seg(label, series, LABELS, tmp_path / "seg.dcm", **SEG_KWARGS)

    seg = hd.seg.segread(path)
    source = pydicom.dcmread(series.files[0], stop_before_pixels=True)
    assert [(s.SegmentNumber, s.SegmentLabel) for s in seg.SegmentSequence] == [(1, "organ"), (2, "lesion")]
    organ, lesion = seg.SegmentSequence
    assert organ.SegmentedPropertyTypeCodeSequence[0].CodeValue == codes.SCT.Organ.value
    assert lesion.SegmentedPropertyTypeCodeSequence[0].CodeValue == codes.SCT.Lesion.value
    abnormal = codes.SCT.MorphologicallyAbnormalStructure.value
    assert lesion.SegmentedPropertyCategoryCodeSequence[0].CodeValue == abnormal
    assert organ.SegmentAlgorithmType == "AUTOMATIC" and organ.SegmentAlgorithmName == "phantom"
    algorithm = organ.SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "phantom" and algorithm.AlgorithmVersion == "0.1.0"
    assert algorithm.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
    assert seg.SegmentationType == "BINARY" and seg.SeriesDescription == "medmtl phantom segmentation"
    assert seg.SeriesNumber == source.SeriesNumber + 1000
    assert seg.SeriesInstanceUID != source.SeriesInstanceUID and seg.SOPInstanceUID != source.SOPInstanceUID
    for keyword in ("StudyInstanceUID", "FrameOfReferenceUID", "PatientID", "PatientName"):
        assert seg.get(keyword) == source.get(keyword), keyword  # required content of the SEG file
    _assert_frames_match_slices(path, series, label, [1, 2])


def test_dicom_seg_transposition_on_a_non_square_oblique_series(tmp_path: Path) -> None:
    """7 columns x 5 rows: a swapped i/j cannot even have the right frame shape, let alone pixels."""
    study = StudyInfo("test_writers", "DOE^JANE", "PID424242", "19700101", "ACC777")
    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_rotvec([0.1, 0.3, -0.2]).as_matrix() @ np.diag([0.9, 1.3, 2.0])
    affine[:3, 3] = [5.0, -8.0, 12.0]
    image = np.random.default_rng(1).uniform(0, 500, size=(7, 5, 4))
    write_dicom_series(
        image, affine, tmp_path / "dicom", study=study, series_description="t1", series_number=4
    )
    (series,) = discover_series(tmp_path / "dicom")
    assert series.shape == (7, 5, 4)
    label = np.zeros(series.shape, np.uint8)
    label[6, 1, 0] = 1  # one voxel near a corner: i=6 (column), j=1 (row), k=0
    label[2:5, 0:4, 2] = 3
    label[1, 4, 3] = 1
    names = {0: "background", 1: "left thing", 3: "right thing"}  # non-consecutive values
    path = write_dicom_seg(label, series, names, tmp_path / "seg.dcm", **SEG_KWARGS)
    seg = hd.seg.segread(path)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["left thing", "right thing"]
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Tissue"  # generic
    _assert_frames_match_slices(path, series, label, [1, 3])
    frame = _frames_by_slice(seg)[(1, str(pydicom.dcmread(series.files[0]).SOPInstanceUID))]
    assert np.argwhere(seg.pixel_array.reshape(-1, 5, 7)[frame]).tolist() == [[1, 6]]  # row j=1, column i=6


def test_dicom_seg_empty_label_and_absent_segment(phantom_dir: Path, tmp_path: Path) -> None:
    series, label = _export(phantom_dir, 0)
    empty = np.zeros_like(label)
    seg = hd.seg.segread(write_dicom_seg(empty, series, LABELS, tmp_path / "empty.dcm", **SEG_KWARGS))
    assert len(seg.SegmentSequence) == 2
    assert seg.NumberOfFrames >= 1 and not seg.pixel_array.any()
    organ_only = (label > 0).astype(np.uint8)  # no lesion: segment 2 is described but has no frame
    path = write_dicom_seg(organ_only, series, LABELS, tmp_path / "organ.dcm", **SEG_KWARGS)
    _assert_frames_match_slices(path, series, organ_only, [1, 2])


def _dciodvfy(path: Path) -> str:
    if shutil.which("dciodvfy") is None:
        if os.environ.get("CI"):
            pytest.fail("dciodvfy not found on CI: scripts/setup.sh installs Debian's dicom3tools")
        pytest.skip("dciodvfy not found (install Debian's dicom3tools; scripts/setup.sh does so as root)")
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return result.stdout + result.stderr


@pytest.mark.parametrize(
    ("index", "sparse"), [(0, False), (1, False), (1, True)], ids=["axial", "oblique", "sparse-header"]
)
def test_dicom_seg_passes_dciodvfy(index: int, sparse: bool, phantom_dir: Path, tmp_path: Path) -> None:
    series, label = _export(phantom_dir, index)
    if sparse:
        series = _sparse_copy(series, tmp_path / "sparse")
    path = write_dicom_seg(label, series, LABELS, tmp_path / "seg.dcm", **SEG_KWARGS)
    report = _dciodvfy(path)
    errors = [line for line in report.splitlines() if line.startswith("Error")]
    assert not errors, report
    assert "Segmentation" in report  # dciodvfy recognised the IOD it checked


def _copy_series(series: SeriesInfo, folder: Path) -> list[Path]:
    folder.mkdir(parents=True)
    return [Path(shutil.copy(f, folder / f"{k:03d}.dcm")) for k, f in enumerate(series.files)]


def _edit(files: list[Path], **tags: object) -> None:
    for f in files:
        ds = pydicom.dcmread(f)
        for keyword, value in tags.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        ds.save_as(f)


def _sparse_copy(series: SeriesInfo, folder: Path) -> SeriesInfo:
    """A copy without the optional (type 2) patient and study attributes, as derived exports often are."""
    _edit(_copy_series(series, folder), **dict.fromkeys(SPARSE, None))
    (copied,) = discover_series(folder)
    return copied


def test_dicom_seg_from_a_series_without_type2_attributes(phantom_dir: Path, tmp_path: Path) -> None:
    series, label = _export(phantom_dir, 0)
    copied = _sparse_copy(series, tmp_path / "sparse")
    path = write_dicom_seg(label, copied, LABELS, tmp_path / "seg.dcm", **SEG_KWARGS)
    seg = pydicom.dcmread(path)
    for keyword in SPARSE:
        assert keyword in seg and not seg[keyword].value, keyword  # present and empty: "unknown"
    assert seg.SeriesNumber == copied.series_number + 1000
    _assert_frames_match_slices(path, copied, label, [1, 2])


def test_dicom_seg_refuses_unsuitable_input(phantom_dir: Path, tmp_path: Path) -> None:
    series, label = _export(phantom_dir, 1)
    with pytest.raises(MedmtlError, match=re.escape(series.label) + r": label shape \(24, 24, 23\)"):
        write_dicom_seg(label[:, :, 1:], series, LABELS, tmp_path / "a.dcm", **SEG_KWARGS)
    bad = label.copy()
    bad[0, 0, 0] = 5
    with pytest.raises(MedmtlError, match=r"label values \[5\] have no name"):
        write_dicom_seg(bad, series, LABELS, tmp_path / "b.dcm", **SEG_KWARGS)
    with pytest.raises(MedmtlError, match="must be integer"):
        write_dicom_seg(label.astype(float), series, LABELS, tmp_path / "c.dcm", **SEG_KWARGS)

    files = _copy_series(series, tmp_path / "no_for")
    _edit(files[3:4], FrameOfReferenceUID=None)
    (copied,) = discover_series(tmp_path / "no_for")
    with pytest.raises(MedmtlError, match=re.escape(copied.label) + r": .*: no FrameOfReferenceUID"):
        write_dicom_seg(label, copied, LABELS, tmp_path / "d.dcm", **SEG_KWARGS)

    files = _copy_series(series, tmp_path / "multi")
    _edit(files[:1], NumberOfFrames="2")
    (copied,) = discover_series(tmp_path / "multi")
    with pytest.raises(MedmtlError, match=re.escape(copied.label) + ": .*multi-frame"):
        write_dicom_seg(label, copied, LABELS, tmp_path / "e.dcm", **SEG_KWARGS)
    # the writer checks the files itself too, whatever the SeriesInfo says
    unchecked = dataclasses.replace(copied, problems=[])
    with pytest.raises(MedmtlError, match=re.escape(copied.label) + r": .*000\.dcm: multi-frame images"):
        write_dicom_seg(label, unchecked, LABELS, tmp_path / "f.dcm", **SEG_KWARGS)
    assert not any(tmp_path.glob("*.dcm"))  # nothing written for refused inputs


def test_dicom_seg_refuses_overwrite(phantom_dir: Path, tmp_path: Path) -> None:
    series, label = _export(phantom_dir, 0)
    path = write_dicom_seg(label, series, LABELS, tmp_path / "seg.dcm", **SEG_KWARGS)
    first_uid = pydicom.dcmread(path).SOPInstanceUID
    with pytest.raises(MedmtlError, match=r"seg\.dcm: already exists"):
        write_dicom_seg(label, series, LABELS, path, **SEG_KWARGS)
    assert pydicom.dcmread(path).SOPInstanceUID == first_uid
    write_dicom_seg(label, series, LABELS, path, overwrite=True, **SEG_KWARGS)
    assert pydicom.dcmread(path).SOPInstanceUID != first_uid
    assert [p.name for p in tmp_path.iterdir()] == ["seg.dcm"]


def test_dicom_seg_keeps_patient_identifiers_out_of_messages_and_logs(
    phantom_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture
) -> None:
    series, label = _export(phantom_dir, 0)
    identifiers = {
        "PatientName": "Secretname Hiddenperson",  # no caret: highdicom warns about it, quoting the name
        "PatientID": "PID-SECRET-99",
        "PatientBirthDate": "19450203",
        "AccessionNumber": "ACCSECRET77",
    }
    files = _copy_series(series, tmp_path / "phi")
    _edit(files, **identifiers)
    (copied,) = discover_series(tmp_path / "phi")
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = write_dicom_seg(label, copied, LABELS, tmp_path / "seg.dcm", **SEG_KWARGS)
        with pytest.raises(MedmtlError) as refused:
            write_dicom_seg(label[:, :, 1:], copied, LABELS, tmp_path / "bad.dcm", **SEG_KWARGS)
    captured = capsys.readouterr()
    emitted = "\n".join([caplog.text, captured.out, captured.err, str(refused.value)])
    emitted += "\n".join(str(w.message) for w in caught)
    for keyword, value in identifiers.items():
        assert value not in emitted, keyword
        assert value.split()[0] not in emitted, keyword
    assert str(pydicom.dcmread(path).PatientName) == identifiers["PatientName"]  # copied into the file


def test_dicom_seg_segment_code_overrides(phantom_dir: Path, tmp_path: Path) -> None:
    series, label = _export(phantom_dir, 0)
    overrides = {1: (codes.SCT.AnatomicalStructure, codes.SCT.Hippocampus)}
    path = write_dicom_seg(label, series, LABELS, tmp_path / "seg.dcm", segment_codes=overrides, **SEG_KWARGS)
    first = pydicom.dcmread(path).SegmentSequence[0]
    assert first.SegmentedPropertyTypeCodeSequence[0].CodeValue == codes.SCT.Hippocampus.value


# ---------------------------------------------------------------------------------------------------------
# report and volumes


def test_report_converts_numpy_torch_and_nan(tmp_path: Path) -> None:
    report = {
        "dice": {"organ": np.float32(0.5), "lesion": float("nan")},
        "hd95_mm": [np.float64(1.25), np.inf, -np.inf],
        "voxels": np.int64(12),
        "has_lesion": np.bool_(True),
        "probabilities": np.array([[0.25, np.nan]]),
        "logits": torch.tensor([1.5, -2.0]),
        "output": tmp_path / "case.nii.gz",
        np.int64(3): "integer key",
        "patient": None,
    }
    path = write_report(report, tmp_path / "report.json")
    text = path.read_text(encoding="utf-8")
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {
        "dice": {"organ": 0.5, "lesion": None},
        "hd95_mm": [1.25, None, None],
        "voxels": 12,
        "has_lesion": True,
        "probabilities": [[0.25, None]],
        "logits": [1.5, -2.0],
        "output": str(tmp_path / "case.nii.gz"),
        "3": "integer key",
        "patient": None,
    }
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_report_refusals_leave_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_report({"version": 1}, tmp_path / "report.json")
    with pytest.raises(MedmtlError, match=r"report\.cases\[1\]\.model: a object has no JSON form"):
        write_report({"cases": [{}, {"model": object()}]}, path)

    def broken_write(self: Path, text: str, encoding: str | None = None) -> int:
        with open(self, "w", encoding=encoding) as f:
            f.write(text[:5])  # a partial file, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", broken_write)
    with pytest.raises(MedmtlError, match=r"report\.json: cannot write \(No space left on device\)"):
        write_report({"version": 2}, path)
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temporary file left behind


def test_label_volumes_ml() -> None:
    label = np.zeros((4, 5, 6), np.uint8)
    label[:2, :3, :4] = 1  # 24 voxels
    label[3, 4, 5] = 2
    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_rotvec([0.3, 0.1, -0.2]).as_matrix() @ np.diag([-0.5, 2.0, 3.0])  # 3 mm^3
    volumes = label_volumes_ml(label, affine, {"0": "background", "1": "organ", "2": "lesion", "4": "cyst"})
    assert list(volumes) == ["organ", "lesion", "cyst"]
    np.testing.assert_allclose([volumes["organ"], volumes["lesion"], volumes["cyst"]], [0.072, 0.003, 0.0])
    with pytest.raises(MedmtlError, match="is not a label value"):
        label_volumes_ml(label, affine, {"one": "organ"})
    with pytest.raises(MedmtlError, match="names repeat"):
        label_volumes_ml(label, affine, {1: "organ", 2: "organ"})
