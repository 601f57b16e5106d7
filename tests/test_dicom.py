"""DICOM series discovery, selection and loading: geometry, problems flagged, rules, the `series` command.

Series are written with the phantom generator (`medmtl.data.synthetic.write_dicom_series`, whose geometry
contract the loader must agree with) and then damaged with pydicom where a test needs a broken export.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from scipy.spatial.transform import Rotation

from medmtl.cli import main
from medmtl.data.dicom import (
    SeriesInfo,
    SeriesRule,
    discover_series,
    format_series_table,
    load_series,
    orientation_label,
    select_series,
)
from medmtl.data.synthetic import StudyInfo, generate_dataset, write_dicom_series
from medmtl.errors import MedmtlError

LPS = np.diag([-1.0, -1.0, 1.0])  # RAS <-> LPS
STUDY = StudyInfo(
    uid_seed="test_dicom",
    patient_name="DOE^JANE",
    patient_id="PID424242",
    patient_birth_date="19700101",
    accession_number="ACC777",
)
IDENTIFIERS = ("DOE", "JANE", "PID424242", "19700101", "ACC777")


def _affine(spacing=(0.9, 1.1, 2.0), origin=(10.0, -20.0, 5.0), rotation=np.eye(3)) -> np.ndarray:
    """A right-handed RAS affine (the generator refuses det <= 0)."""
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-1.0, -1.0, 1.0]) @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def _shifted(affine: np.ndarray, slices: int) -> np.ndarray:
    """The affine of the same grid starting `slices` further along k."""
    return affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, slices], [0, 0, 0, 1]], float)


def _volume(shape=(6, 5, 4), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.0, 900.0, size=shape)


def _write(folder: Path, image: np.ndarray, affine: np.ndarray, **kwargs) -> list[Path]:
    """Write a series with shuffled extension-less names and InstanceNumber running against k."""
    depth = image.shape[2]
    kwargs.setdefault("series_description", "T1 axial")
    kwargs.setdefault("series_number", 3)
    kwargs.setdefault("file_names", [f"IM{(7 * k + 3) % depth:03d}" for k in range(depth)])
    kwargs.setdefault("instance_numbers", list(range(depth, 0, -1)))
    return write_dicom_series(image, affine, folder, study=STUDY, **kwargs)


def _only(folder: Path) -> SeriesInfo:
    series = discover_series(folder)
    assert len(series) == 1
    return series[0]


def _assert_affine_matches_tags(image, series: SeriesInfo) -> None:
    """World position (RAS) of voxel (0, 0, k) is the k-th file's ImagePositionPatient in RAS."""
    affine = np.asarray(image.meta["affine"], float)
    for k, path in enumerate(series.files):
        ipp = np.array(pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient, float)
        np.testing.assert_allclose(affine @ [0, 0, k, 1], [*(LPS @ ipp), 1], atol=0.01)


def _rescaled_slices(series: SeriesInfo) -> np.ndarray:
    """Stored values * RescaleSlope + RescaleIntercept, stacked as (columns, rows, slices)."""
    slices = []
    for path in series.files:
        ds = pydicom.dcmread(path)
        slices.append(ds.pixel_array.T * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
    return np.stack(slices, axis=-1)


# -- loading: geometry and values --


@pytest.mark.parametrize(
    "rotation", [np.eye(3), Rotation.from_euler("xyz", [0.3, -0.2, 0.5]).as_matrix()], ids=["axial", "oblique"]
)
def test_load_geometry_and_values(tmp_path, rotation):
    vol, affine = _volume(), _affine(rotation=rotation)
    files = _write(tmp_path / "export" / "s1", vol, affine)
    series = _only(tmp_path / "export")
    assert series.files == files  # along the normal, not by name (shuffled) or InstanceNumber (reversed)
    assert sorted(files) != files
    assert series.shape == vol.shape and series.problems == [] and not series.is_localizer
    assert series.slice_spacing == pytest.approx(2.0, abs=1e-4)
    assert series.pixel_spacing == pytest.approx((1.1, 0.9), abs=1e-5)

    image = load_series(series)
    assert tuple(image.shape) == vol.shape and image.dtype.is_floating_point and image.element_size() == 4
    np.testing.assert_allclose(np.asarray(image.meta["affine"], float), affine, atol=1e-4)
    _assert_affine_matches_tags(image, series)
    np.testing.assert_allclose(image.numpy(), _rescaled_slices(series), rtol=1e-6, atol=1e-3)
    slope = float(pydicom.dcmread(files[0]).RescaleSlope)
    assert slope != 1.0 and np.abs(image.numpy() - vol).max() <= slope / 2 + 1e-3
    assert image.meta["original_channel_dim"] == "no_channel"
    assert image.meta["filename_or_obj"] == str(tmp_path / "export" / "s1")


def test_single_slice_and_min_slices(tmp_path):
    vol, affine = _volume((4, 3, 1)), _affine(rotation=Rotation.from_euler("y", 0.4).as_matrix())
    _write(tmp_path, vol, affine)
    series = _only(tmp_path)
    image = load_series(series)
    assert tuple(image.shape) == (4, 3, 1)
    np.testing.assert_allclose(np.asarray(image.meta["affine"], float), affine, atol=1e-4)
    with pytest.raises(MedmtlError, match=r"^series 'T1 axial' \(\.\.\w{8}\): 1 slice\(s\), at least 2 needed"):
        load_series(series, min_slices=2)


def test_no_patient_identifiers_in_outputs(tmp_path):
    _write(tmp_path / "ok", _volume(), _affine(), series_description="T1", series_number=3)
    files = _write(tmp_path / "gap", _volume(), _affine(), series_description="T2", series_number=4)
    files[2].unlink()
    series = discover_series(tmp_path)
    text = format_series_table(series) + repr(series) + str(dict(load_series(series[0]).meta))
    with pytest.raises(MedmtlError) as err:
        load_series(series[1])
    text += str(err.value)
    assert "missing slices" in text and not any(name in text for name in IDENTIFIERS)


# -- discovery and selection on a phantom scanner export --


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    """Phantom dataset with two DICOM studies (axial, oblique): localizer, FLAIR, T1, README, export.log."""
    out = tmp_path_factory.mktemp("phantom") / "set"
    generate_dataset(out, cases=1, size=16, seed=0, dicom_cases=2)
    return out


@pytest.fixture(scope="module")
def export(phantom, tmp_path_factory) -> Path:
    """The axial phantom study plus a CT series in a nested folder and a binary non-DICOM decoy."""
    root = tmp_path_factory.mktemp("export") / "export"
    entry = json.loads((phantom / "dataset.json").read_text())["dicom_exports"][0]
    shutil.copytree(phantom / entry["study_dir"], root / "study")
    _write(root / "more" / "ct" / "abdomen", _volume((4, 4, 10)), _affine(), series_description="abdomen",
           series_number=9, extra_tags={"Modality": "CT"})  # fmt: skip
    (root / "more" / "noise.bin").write_bytes(np.random.default_rng(1).bytes(600))
    return root


def test_discovery_groups_series_and_flags_localizer(export):
    series = discover_series(export)
    assert [s.description for s in series] == ["localizer", "T2 FLAIR phantom", "T1 MPRAGE phantom", "abdomen"]
    loc, flair, t1, ct = series
    assert loc.is_localizer and loc.num_slices == 3
    assert loc.problems == ["mixed orientations: 3 different ImageOrientationPatient values"]
    assert not (flair.is_localizer or t1.is_localizer or ct.is_localizer)
    assert (flair.shape, t1.shape, ct.shape) == ((8, 8, 6), (16, 16, 16), (4, 4, 10))
    assert flair.problems == t1.problems == ct.problems == []
    assert (flair.slice_spacing, t1.slice_spacing) == (pytest.approx(3.0), pytest.approx(1.0))
    assert [s.modality for s in series] == ["MR", "MR", "MR", "CT"]


def _descriptions(series, **rule) -> list[str]:
    return [s.description for s in select_series(series, SeriesRule(**rule))]


def test_selection_rules(export):
    series = discover_series(export)
    loc = series[0]
    assert _descriptions(series, modality="mr") == ["T2 FLAIR phantom", "T1 MPRAGE phantom"]  # no localizer
    assert _descriptions(series, modality="CT") == ["abdomen"]
    assert _descriptions(series, description="flair|mprage") == ["T2 FLAIR phantom", "T1 MPRAGE phantom"]
    assert _descriptions(series, description="^t1") == ["T1 MPRAGE phantom"]
    assert _descriptions(series, description="loc") == []  # localizers need their UID
    assert _descriptions(series, min_slices=7) == ["T1 MPRAGE phantom", "abdomen"]
    assert _descriptions(series, largest=True) == ["T1 MPRAGE phantom"]
    assert _descriptions(series, modality="MR", min_slices=7, largest=True) == ["T1 MPRAGE phantom"]
    assert _descriptions(series, description="flair|abdomen", largest=True) == ["T2 FLAIR phantom"]
    assert _descriptions(series, series_uid=loc.series_uid) == ["localizer"]
    assert _descriptions(series, series_uid=loc.series_uid, modality="CT") == []
    rule = SeriesRule(modality="MR", description="t1", min_slices=5, largest=True)
    assert rule.is_set() and not SeriesRule().is_set() and SeriesRule(largest=True).is_set()
    assert rule.describe() == "modality=MR, description~/t1/, min_slices=5, largest"
    with pytest.raises(MedmtlError, match=r"^--description '\(t1': invalid regular expression"):
        SeriesRule(description="(t1")


def test_table_lines_markers_and_flags(export):
    series = discover_series(export)
    lines = format_series_table(series, selected=[series[2]]).splitlines()
    assert lines[0].split()[:3] == ["#", "description", "mod"]
    rows = lines[1:5]
    assert [r.startswith("*") for r in rows] == [False, False, True, False]
    assert "T1 MPRAGE phantom" in rows[2] and "16x16x16" in rows[2] and "1x1x1" in rows[2]
    assert "2x2x3" in rows[1] and "axial" in rows[1] and "0.9x1.1x2" in rows[3]
    assert "mixed" in rows[0] and rows[0].endswith("localizer, mixed orientations")
    assert lines[5:] == ["problems:", f"  1 ..{series[0].series_uid[-8:]}: {series[0].problems[0]}"]
    assert max(len(line) for line in rows) < 140
    assert format_series_table([]) == "no DICOM series found"


def test_discovery_errors_and_empty(tmp_path):
    with pytest.raises(MedmtlError, match="nowhere: folder not found"):
        discover_series(tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("no DICOM here")
    assert discover_series(tmp_path) == []


@pytest.mark.parametrize("index", [0, 1], ids=["axial", "oblique"])
def test_phantom_main_series_matches_nifti(phantom, index):
    entry = json.loads((phantom / "dataset.json").read_text())["dicom_exports"][index]
    series = discover_series(phantom / entry["study_dir"])
    (main_series,) = select_series(series, SeriesRule(description=f"^{entry['series_description']}$"))
    image = load_series(main_series, min_slices=2)
    reference = nib.load(phantom / entry["image"])
    np.testing.assert_allclose(np.asarray(image.meta["affine"], float), reference.affine, atol=1e-4)
    slope = float(pydicom.dcmread(main_series.files[0]).RescaleSlope)
    assert np.abs(image.numpy() - reference.get_fdata()).max() <= slope / 2 + 1e-3 * slope
    assert orientation_label(main_series.orientation).startswith("oblique" if entry["oblique"] else "axial")


# -- problems that stop a series from being one volume --


def _damage(files: list[Path], kind: str) -> None:
    if kind == "gap":
        files[3].unlink()
    elif kind == "uneven":  # slice 3 moved 0.5 mm along the normal
        ds = pydicom.dcmread(files[3])
        iop = np.array(ds.ImageOrientationPatient, float)
        ds.ImagePositionPatient = list(np.array(ds.ImagePositionPatient, float) + 0.5 * np.cross(iop[:3], iop[3:]))
        ds.save_as(files[3])
    elif kind == "duplicate":  # the same slice exported twice
        shutil.copy(files[2], files[2].with_name("copy_of_slice_2"))


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("gap", r"missing slices: gap of 4 mm between slices 2 and 3 \(expected 2 mm\)"),
        ("uneven", r"uneven spacing: steps from 1.5 to 2.5 mm along the normal"),
        ("duplicate", r"duplicate positions: 1 slice\(s\) repeat a position \(first: slices 2 and 3\)"),
    ],
)
def test_position_problems_flagged_and_refused(tmp_path, kind, expected):
    _damage(_write(tmp_path, _volume((4, 4, 6)), _affine(), series_description="T1 broken"), kind)
    series = _only(tmp_path)
    assert len(series.problems) == 1
    assert series.slice_spacing == pytest.approx(2.0)
    with pytest.raises(MedmtlError, match=r"^series 'T1 broken' \(\.\.\w{8}\): cannot load as one volume: " + expected):
        load_series(series)


def test_lateral_shift_is_uneven(tmp_path):
    files = _write(tmp_path, _volume((4, 4, 5)), _affine())
    ds = pydicom.dcmread(files[2])
    ds.ImagePositionPatient = [float(ds.ImagePositionPatient[0]) + 3.0, *ds.ImagePositionPatient[1:]]
    ds.save_as(files[2])
    assert _only(tmp_path).problems == ["uneven spacing: slice positions deviate up to 3 mm from a regular grid"]


def test_mixed_sizes_flagged_and_refused(tmp_path):
    affine = _affine()
    # one series (same study and series number): slice 0 is 6 columns wide, slices 1-4 are 4 wide
    _write(tmp_path, _volume((6, 4, 1)), affine, file_names=["wide"], instance_numbers=[5])
    _write(tmp_path, _volume((4, 4, 4)), _shifted(affine, 1))
    series = _only(tmp_path)
    assert series.problems == ["mixed sizes: 4x4 (4 files), 6x4 (1 files)"]
    assert series.num_slices == 5 and series.shape == (4, 4, 5) and series.files[0].name == "wide"
    with pytest.raises(MedmtlError, match="cannot load as one volume: mixed sizes"):
        load_series(series)


def test_truncated_pixel_data_is_a_problem_of_its_series(tmp_path):
    files = _write(tmp_path, _volume((8, 8, 4)), _affine(), series_description="T1")
    files[1].write_bytes(files[1].read_bytes()[:-30])
    series = _only(tmp_path)
    assert series.num_slices == 4  # its header is fine: it still holds its place along the normal
    assert series.problems == [f"unreadable files: 1 ({files[1].name}: pixel data truncated (98 of 128 bytes))"]
    with pytest.raises(MedmtlError, match=f"'T1'.*{files[1].name}: pixel data truncated"):
        load_series(series)


def test_file_truncated_after_discovery_names_the_file(tmp_path):
    files = _write(tmp_path, _volume((8, 8, 4)), _affine(), series_description="T1")
    series = _only(tmp_path)
    files[2].write_bytes(files[2].read_bytes()[:-30])
    with pytest.raises(MedmtlError, match=rf"^series 'T1' \(\.\.\w+\): {files[2]}: cannot read pixel data"):
        load_series(series)


def test_broken_headers(tmp_path, caplog):
    files = _write(tmp_path / "s", _volume((4, 4, 4)), _affine(), series_description="T1")
    data = files[3].read_bytes()
    cut = data.find(b"\x20\x00\x32\x00")  # ImagePositionPatient: after the SeriesInstanceUID
    files[3].write_bytes(data[: cut + 10])  # cut inside the header: the UID is still readable
    (tmp_path / "garbage.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff" + b"\1" * 64)
    with caplog.at_level(logging.WARNING, logger="medmtl.data.dicom"):
        series = _only(tmp_path)
    assert series.num_slices == 3
    assert series.problems[-1] == f"unreadable files: 1 ({files[3].name}: no pixel data (truncated?))"
    assert "garbage.dcm: not a readable DICOM file" in caplog.text


# -- the real MR study export --


def test_study1_hippocrop(study1_dir):
    series = discover_series(study1_dir)
    assert len(series) == 5
    descriptions = [pydicom.dcmread(s.files[0], stop_before_pixels=True).SeriesDescription for s in series]
    assert sorted(descriptions) == ["FLAIR_reg", "HippoCrop", "T1post", "T1pre_reg", "T2_reg"]
    (crop,) = select_series(series, SeriesRule(description=r"^hippo"))
    assert crop.description == "HippoCrop" and crop.problems == []
    assert crop.pixel_spacing == (1.0, 1.0) and crop.slice_spacing == pytest.approx(1.0)
    assert sorted(crop.shape) == [32, 35, 51]
    image = load_series(crop, min_slices=2)
    assert tuple(image.shape) == crop.shape == (35, 51, 32)
    _assert_affine_matches_tags(image, crop)
    np.testing.assert_allclose(np.abs(np.linalg.det(np.asarray(image.meta["affine"])[:3, :3])), 1.0, atol=1e-4)


def test_study1_oblique_series_affine_matches_tags(study1_dir):
    series = discover_series(study1_dir)
    (t1post,) = select_series(series, SeriesRule(description="t1post"))
    assert t1post.shape == (512, 512, 22) and t1post.problems == []
    assert orientation_label(t1post.orientation) == "oblique (ax 15°)"
    _assert_affine_matches_tags(load_series(t1post), t1post)


# -- the command line --


def test_cli_series_lists_and_selects(export, capsys):
    assert main(["series", str(export)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 + 4 + 2  # header, four series, the localizer's problem under "problems:"
    assert "localizer" in out[1] and not any(line.startswith("*") for line in out)

    assert main(["series", str(export), "--modality", "MR", "--largest"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[2:4] for line in out if line.startswith("*")] == [["T1", "MPRAGE"]]


def test_cli_series_no_match_and_errors(export, tmp_path, capsys):
    assert main(["series", str(export), "--description", "diffusion"]) == 1
    captured = capsys.readouterr()
    assert "no series matches the rule: description~/diffusion/" in captured.err
    assert len(captured.out.splitlines()) == 7  # the table is still shown

    assert main(["series", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing: folder not found" in err and "Traceback" not in err

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here\n")
    assert main(["series", str(tmp_path / "empty")]) == 2  # scripts can tell "nothing found" from a listing
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert f"{tmp_path / 'empty'}: no DICOM image series found" in captured.err

    assert main(["series", str(export), "--description", "[t1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medmtl series: error: --description '[t1': invalid regular expression")
