"""DICOM robustness on real files: compressed transfer syntaxes, big endian, enhanced multi-frame, bad sequence.

The files are pydicom's own test files and those of the `pydicom-data` package, found on disk with
``get_testdata_file(name, download=False)`` (never the network; a test skips when a file is not installed).
Each one must either load through `discover_series` + `load_series` with the right pixel values, compared
with an uncompressed copy of the same image (lossless: exact; lossy: within a tolerance) or with highdicom's
independent volume reader, or be refused with a one-line `MedmtlError` naming the series and what is wrong.
Files are copied into a temporary folder (one series per folder) and, where a test says so, given geometry
in their header; their pixel data is never touched.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from medmtl.cli import EXIT_FAILED, main
from medmtl.data.dicom import SeriesInfo, discover_series, load_series
from medmtl.data.synthetic import StudyInfo, write_dicom_series
from medmtl.engine.checkpoint import atomic_torch_save
from medmtl.errors import MedmtlError
from medmtl.inference.batch import load_inference_config
from medmtl.networks import MultiTaskUNet

REPO_ROOT = Path(__file__).resolve().parents[1]
PHANTOM = REPO_ROOT / "bundles" / "phantom_mtl"
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS, homogeneous
LABEL = r"^series '[^']*' \(\.\.[\w.]{8}\): "  # how every message starts: the series, named by its short UID
STUDY = StudyInfo(
    uid_seed="test_dicom_robustness",
    patient_name="ROBUST^PAT",
    patient_id="ROB0001",
    patient_birth_date="19800101",
    accession_number="RACC01",
)


def _testfile(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name}: not installed (pydicom test files / pydicom-data)")
    return Path(path)


def _copy(folder: Path, name: str, edit: Callable[[Dataset], None] | None = None) -> Path:
    """A copy of a test file in `folder`, its header edited by `edit` (pixel data kept as stored)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = Path(shutil.copy(_testfile(name), folder / name))
    if edit is not None:
        ds = pydicom.dcmread(path)
        edit(ds)
        ds.save_as(path)
    return path


def _only_series(folder: Path) -> SeriesInfo:
    (series,) = discover_series(folder)
    return series


def _load(folder: Path) -> torch.Tensor:
    return load_series(_only_series(folder))


def _modality_values(name: str) -> np.ndarray:
    """Stored values * RescaleSlope + RescaleIntercept, read by pydicom alone, as (columns, rows)."""
    ds = pydicom.dcmread(_testfile(name))
    slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
    return ds.pixel_array.T.astype(np.float64) * slope + intercept


def _ras_affine(position, orientation, spacing, step) -> np.ndarray:
    """The RAS affine of (columns, rows, slices) from DICOM plane attributes (written out, not MONAI's)."""
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    lps = np.eye(4)
    lps[:3, 0] = row * spacing[1]  # i runs along a row: column spacing
    lps[:3, 1] = col * spacing[0]  # j runs down a column: row spacing
    lps[:3, 2] = np.cross(row, col) * step
    lps[:3, 3] = position
    return LPS @ lps


def _set_geometry(position=(10.0, -20.0, 30.0), orientation=(1, 0, 0, 0, 1, 0), spacing=(0.6, 0.5)):
    """An edit giving a file without patient geometry (secondary capture, NM) a plane in space."""

    def edit(ds: Dataset) -> None:
        ds.ImagePositionPatient = list(position)
        ds.ImageOrientationPatient = list(orientation)
        ds.PixelSpacing = list(spacing)

    return edit


def _phantom_series(folder: Path, shape=(34, 32, 9), number: int = 3) -> list[Path]:
    # 32 pixels or more in-plane: OpenJPEG's default 6 resolution levels need them
    image = np.random.default_rng(number).uniform(0.0, 900.0, shape)
    affine = np.eye(4)
    affine[:3, :3] = np.diag([-0.9, -1.1, 2.0])
    affine[:3, 3] = (10.0, -20.0, 5.0)
    return write_dicom_series(
        image, affine, folder, study=STUDY, series_description="T1 classic", series_number=number
    )


def _one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and "Traceback" not in message
    return message


# ---------------------------------------------------------------------------------------------------------
# single-frame files in compressed and big-endian transfer syntaxes


@pytest.mark.parametrize(
    ("name", "reference"),
    [
        ("MR_small_RLE.dcm", "MR_small.dcm"),  # RLE lossless
        ("MR_small_jp2klossless.dcm", "MR_small.dcm"),  # JPEG 2000 lossless
        ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),  # JPEG-LS lossless
        ("MR_small_bigendian.dcm", "MR_small.dcm"),  # explicit VR big endian
        ("MR_small_implicit.dcm", "MR_small.dcm"),  # implicit VR little endian
        ("MR2_J2KR.dcm", "MR2_UNCR.dcm"),  # JPEG 2000 lossless, 1024x1024 MR
        ("693_J2KR.dcm", "693_UNCR.dcm"),  # JPEG 2000 lossless CT, rescaled (BitsStored mismatch, pydicom #693)
    ],
)
def test_lossless_syntaxes_load_exact_values(name: str, reference: str, tmp_path: Path):
    image = _load(_copy(tmp_path / "c", name).parent)
    expected = _load(_copy(tmp_path / "u", reference).parent)
    assert image.dtype == torch.float32 and image.shape == (*_modality_values(reference).shape, 1)
    # pydicom alone, on the uncompressed file (float64 there: equal to float32 precision)
    np.testing.assert_allclose(image.numpy()[..., 0], _modality_values(reference), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(image.numpy(), expected.numpy())
    np.testing.assert_allclose(image.affine.numpy(), expected.affine.numpy())
    ds = pydicom.dcmread(_testfile(name), stop_before_pixels=True)
    # voxel (0, 0, 0) sits at ImagePositionPatient (LPS, shown in RAS)
    origin = LPS[:3, :3] @ np.asarray(ds.ImagePositionPatient, float)
    np.testing.assert_allclose(image.affine.numpy()[:3, 3], origin, atol=1e-4)


def test_lossy_jpeg2000_loads_within_tolerance(tmp_path: Path):
    original = _modality_values("MR2_UNCR.dcm")
    image = _load(_copy(tmp_path / "lossy", "MR2_J2KI.dcm").parent).numpy()[..., 0]
    # MR2_UNCI is the lossy image as its encoder decompressed it: our decode matches it exactly
    np.testing.assert_allclose(image, _modality_values("MR2_UNCI.dcm"), rtol=1e-6, atol=1e-6)
    error = np.abs(image - original)
    span = original.max() - original.min()
    assert error.mean() < 0.01 * span and error.max() < 0.1 * span
    assert error.max() > 0  # really lossy: not the original read twice


def test_jpeg_lossless_and_lossy_codecs_agree_on_one_image(tmp_path: Path):
    """JPEG lossless (process 14 SV1) has no uncompressed twin; two lossy codecs of the same image bracket it."""
    geometry = _set_geometry()
    lossless = _load(_copy(tmp_path / "ll", "JPEG-LL.dcm", geometry).parent).numpy()[..., 0]
    span = lossless.max() - lossless.min()
    for name in ("JPGExtended.dcm", "JPEG2000.dcm"):  # JPEG extended 12-bit, JPEG 2000 irreversible
        lossy = _load(_copy(tmp_path / name, name, geometry).parent).numpy()[..., 0]
        error = np.abs(lossy - lossless)
        assert lossy.shape == lossless.shape == (256, 1024)
        assert error.mean() < 0.02 * span and np.percentile(error, 99) < 0.1 * span, name
    j2k = _load(_copy(tmp_path / "j2k", "JPEG2000.dcm", geometry).parent).numpy()[..., 0]
    np.testing.assert_array_equal(j2k, _modality_values("JPEG2000_UNC.dcm"))  # its decompressed twin


def test_undecodable_jpeg_names_the_file_or_loads_correctly(tmp_path: Path):
    """JPEG-lossy.dcm needs GDCM (pylibjpeg and Pillow refuse it): refused in one line, or right if decodable."""
    folder = _copy(tmp_path / "s", "JPEG-lossy.dcm", _set_geometry()).parent
    series = _only_series(folder)
    assert series.problems == []  # the header is fine: only decoding can tell
    try:
        image = load_series(series).numpy()[..., 0]
    except MedmtlError as err:
        message = str(err)
        assert "\n" not in message
        assert message.startswith(f"{series.label}: {folder / 'JPEG-lossy.dcm'}: cannot read pixel data (")
        assert re.search(r"pixel data \(\w+: .{20,}\)$", message)  # what the decoders said, on one line
    else:  # a decoder that handles it is installed: it must be the same image as the lossless one
        lossless = _load(_copy(tmp_path / "ll", "JPEG-LL.dcm", _set_geometry()).parent).numpy()[..., 0]
        assert np.abs(image - lossless).mean() < 0.02 * (lossless.max() - lossless.min())


def test_bad_sequence_file_loads(tmp_path: Path):
    """bad_sequence.dcm: a sequence encoded with VR UN in implicit VR (pydicom #1067), JPEG lossless CT."""
    name = "bad_sequence.dcm"
    image = _load(_copy(tmp_path / "s", name).parent)
    ds = pydicom.dcmread(_testfile(name))
    assert ds[0x00189346].VR == "SQ" and len(ds[0x00189346].value) == 1  # pydicom re-parsed the UN sequence
    assert image.shape == (512, 512, 1)
    values = image.numpy()[..., 0]
    np.testing.assert_array_equal(values, _modality_values(name))
    # 12 stored bits, RescaleIntercept -1024: CT numbers of air to bone
    assert -1024 <= values.min() < -900 and 1000 < values.max() <= 4095 - 1024
    expected = _ras_affine(ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing, 1.0)
    np.testing.assert_allclose(image.affine.numpy()[:, :2], expected[:, :2], atol=1e-6)
    np.testing.assert_allclose(image.affine.numpy()[:3, 3], expected[:3, 3], atol=1e-6)


def _rle_damage_that_panics(path: Path) -> bytes | None:
    """Damaged RLE pixel data on which pylibjpeg-rle (Rust) panics, found by a fixed search; None if none."""
    ds = pydicom.dcmread(path)
    good = bytes(ds.PixelData)
    rng = np.random.default_rng(0)
    for _ in range(300):
        data = bytearray(good)
        at = int(rng.integers(0, len(data) - 4))
        data[at : at + 4] = rng.integers(0, 256, 4, dtype=np.uint8).tobytes()
        ds.PixelData = bytes(data)
        ds.pixel_array_options(decoding_plugin="pylibjpeg")
        try:
            _ = ds.pixel_array
        except Exception:
            continue
        except BaseException as err:  # pyo3's PanicException derives from BaseException
            if type(err).__name__ == "PanicException":
                return bytes(data)
            raise
    return None


def test_corrupt_rle_is_refused_without_a_decoder_panic(tmp_path: Path, capfd):
    pytest.importorskip("rle", reason="pylibjpeg-rle not installed")
    files = _phantom_series(tmp_path / "s", shape=(12, 11, 3))
    for path in files:
        ds = pydicom.dcmread(path)
        ds.compress(RLELossless)
        ds.save_as(path)
    damaged = _rle_damage_that_panics(files[1])
    if damaged is None:
        pytest.skip("this pylibjpeg-rle does not panic on the damaged data")
    ds = pydicom.dcmread(files[1])
    ds.PixelData = damaged
    ds.save_as(files[1])
    capfd.readouterr()
    series = _only_series(tmp_path / "s")
    try:
        load_series(series)  # damage inside RLE segments may also decode to wrong values: not detectable
    except MedmtlError as err:
        assert str(err).startswith(f"{series.label}: {files[1]}: cannot read pixel data (")
    captured = capfd.readouterr()
    assert "panicked" not in captured.err and "Traceback" not in captured.err  # no Rust or Python backtrace


def test_modality_lut_is_applied(tmp_path: Path):
    """mlut_18.dcm maps stored values through a Modality LUT Sequence instead of RescaleSlope/Intercept."""
    image = _load(_copy(tmp_path / "s", "mlut_18.dcm", _set_geometry()).parent).numpy()[..., 0]
    ds = pydicom.dcmread(_testfile("mlut_18.dcm"))
    assert "RescaleSlope" not in ds and ds.pixel_array.min() == -2048  # stored: signed 12 bit
    lut = np.asarray(ds.ModalityLUTSequence[0].LUTData)
    first = int(ds.ModalityLUTSequence[0].LUTDescriptor[1])
    expected = lut[np.clip(ds.pixel_array.astype(int) - first, 0, len(lut) - 1)].T  # PS3.3 C.11.1, by hand
    np.testing.assert_array_equal(image, expected)
    assert image.min() == 0 and image.max() == 65535


# ---------------------------------------------------------------------------------------------------------
# refused, with a clear message


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("MR_truncated.dcm", r"unreadable files: 1 \(MR_truncated\.dcm: pixel data truncated \(8130 of 8192"),
        (
            "emri_small_jpeg_2k_lossless_too_short.dcm",
            r"unreadable files: 1 \(emri_small_jpeg_2k_lossless_too_short\.dcm: data set ends early",
        ),
        ("SC_rgb.dcm", r"colour images: SamplesPerPixel is not 1 \(not supported\)"),
        ("SC_rgb_jpeg.dcm", r"colour images: SamplesPerPixel is not 1"),  # JPEG baseline, colour
        ("US1_J2KR.dcm", r"colour images: SamplesPerPixel is not 1"),
        ("JPGLosslessP14SV1_1s_1f_8b.dcm", r"missing geometry: 1 file\(s\) without a valid ImagePositionPatient"),
        ("rtdose.dcm", r"multi-frame images: rtdose\.dcm: 15 frames without per-frame positions"),
    ],
)
def test_unusable_files_are_refused_with_their_reason(name: str, expected: str, tmp_path: Path):
    one = _only_series(_copy(tmp_path, name).parent)
    with pytest.raises(MedmtlError) as excinfo:
        load_series(one)
    message = _one_line_error(excinfo)
    assert message.startswith(f"{one.label}: cannot load as one volume: ")
    assert re.search(expected, message), message


def test_files_of_two_exports_are_two_series(tmp_path: Path):
    _copy(tmp_path, "CT_small.dcm")
    _copy(tmp_path, "MR_small_jpeg_ls_lossless.dcm")
    series = discover_series(tmp_path)
    assert sorted(s.modality for s in series) == ["CT", "MR"]
    for s in series:
        assert load_series(s).shape == (s.columns, s.rows, 1)


def test_segmentations_are_not_inputs(tmp_path: Path):
    _copy(tmp_path, "liver.dcm")  # DICOM SEG: pixel data, but a label map
    _copy(tmp_path, "MR_small.dcm")
    (series,) = discover_series(tmp_path)
    assert series.modality == "MR"


# ---------------------------------------------------------------------------------------------------------
# enhanced (multi-frame) images


EMRI = [
    "emri_small.dcm",  # explicit VR little endian
    "emri_small_big_endian.dcm",
    "emri_small_RLE.dcm",
    "emri_small_jpeg_2k_lossless.dcm",
    "emri_small_jpeg_ls_lossless.dcm",
]
EMRI_SPACING = (0.6, 0.5)  # between rows, between columns
EMRI_STEP = 1.2  # its SpacingBetweenSlices


def _frame_geometry(origin=(10.0, -20.0, 30.0), step: float = EMRI_STEP, frames: int = 10):
    """An edit adding per-frame functional groups: frames stacked along -z from `origin` (reverse order)."""

    def edit(ds: Dataset) -> None:
        orientation, measures, shared = Dataset(), Dataset(), Dataset()
        orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        measures.PixelSpacing = list(EMRI_SPACING)
        measures.SliceThickness = step
        shared.PlaneOrientationSequence = [orientation]
        shared.PixelMeasuresSequence = [measures]
        ds.SharedFunctionalGroupsSequence = [shared]
        items = []
        for i in range(frames):
            position, item = Dataset(), Dataset()
            position.ImagePositionPatient = [origin[0], origin[1], origin[2] - step * i]
            item.PlanePositionSequence = [position]
            items.append(item)
        ds.PerFrameFunctionalGroupsSequence = items

    return edit


@pytest.mark.parametrize("name", EMRI)
def test_enhanced_mr_without_functional_groups_is_refused(name: str, tmp_path: Path):
    series = _only_series(_copy(tmp_path, name).parent)
    assert series.modality == "MR" and series.rows == series.columns == 64
    with pytest.raises(MedmtlError) as excinfo:
        load_series(series)
    message = _one_line_error(excinfo)
    assert message == (
        f"{series.label}: cannot load as one volume: multi-frame images: {name}: 10 frames without per-frame "
        "positions (no PerFrameFunctionalGroupsSequence); its frames cannot be placed"
    )


@pytest.mark.parametrize("name", EMRI)
def test_enhanced_mr_frames_load_as_slices_in_every_syntax(name: str, tmp_path: Path):
    """The real emri_small pixel data (RLE, JPEG 2000, JPEG-LS, big endian), placed by per-frame groups."""
    series = _only_series(_copy(tmp_path, name, _frame_geometry()).parent)
    assert series.problems == [] and series.is_multiframe
    assert series.frame_numbers == list(range(9, -1, -1))  # along +z: the last frame first
    assert series.shape == (64, 64, 10) and series.slice_spacing == pytest.approx(EMRI_STEP)
    image = load_series(series)
    stored = pydicom.dcmread(_testfile("emri_small.dcm")).pixel_array  # uncompressed reference
    expected = np.stack([stored[f].T for f in range(9, -1, -1)], axis=-1).astype(np.float32)
    np.testing.assert_array_equal(image.numpy(), expected)
    first = (10.0, -20.0, 30.0 - EMRI_STEP * 9)
    affine = _ras_affine(first, (1, 0, 0, 0, 1, 0), EMRI_SPACING, EMRI_STEP)
    np.testing.assert_allclose(image.affine.numpy(), affine, atol=1e-6)


def test_enhanced_ct_matches_highdicom(tmp_path: Path):
    """eCT_Supplemental.dcm: 2 frames, 10 mm apart, rescale in the shared Pixel Value Transformation."""
    path = _copy(tmp_path, "eCT_Supplemental.dcm")
    image = load_series(_only_series(path.parent))
    assert image.shape == (512, 512, 2)
    ds = pydicom.dcmread(path)
    shared = ds.SharedFunctionalGroupsSequence[0]
    transform = shared.PixelValueTransformationSequence[0]
    assert float(transform.RescaleIntercept) == -1024 and "RescaleIntercept" not in ds
    # frames sorted along the normal -z: frame 2 (z = -149) first
    positions = [f.PlanePositionSequence[0].ImagePositionPatient for f in ds.PerFrameFunctionalGroupsSequence]
    np.testing.assert_allclose(np.asarray(positions, float)[:, 2], [-159.0, -149.0])
    expected = np.stack([ds.pixel_array[1].T, ds.pixel_array[0].T], axis=-1).astype(np.float32) - 1024
    np.testing.assert_array_equal(image.numpy(), expected)
    spacing = shared.PixelMeasuresSequence[0].PixelSpacing
    orientation = shared.PlaneOrientationSequence[0].ImageOrientationPatient
    affine = _ras_affine(positions[1], orientation, spacing, 10.0)
    np.testing.assert_allclose(image.affine.numpy(), affine, atol=1e-4)
    _assert_same_as_highdicom(path, image)


def _assert_same_as_highdicom(path: Path, image: torch.Tensor) -> None:
    """Every voxel equals highdicom's volume at the same place in the patient (its own geometry code)."""
    volume = hd.imread(path).get_volume(
        apply_real_world_transform=False,
        apply_presentation_lut=False,
        apply_palette_color_lut=False,
        apply_icc_profile=False,
    )
    to_highdicom = np.linalg.inv(volume.affine) @ LPS @ image.affine.numpy()  # our index -> its index
    assert np.allclose(to_highdicom, np.rint(to_highdicom), atol=1e-4)  # the same grid, axes permuted
    index = np.indices(image.shape).reshape(3, -1)
    theirs = np.rint(to_highdicom[:3, :3] @ index + to_highdicom[:3, 3:]).astype(int)
    values = volume.array[theirs[0], theirs[1], theirs[2]]
    np.testing.assert_allclose(image.numpy().reshape(-1), values, atol=1e-3)


def _legacy_converted(files: list[Path], path: Path, syntax: str | None = None) -> Path:
    """The series as one Legacy Converted Enhanced MR file (highdicom), optionally compressed (pydicom)."""
    datasets = [pydicom.dcmread(f) for f in files]
    enhanced = hd.legacy.LegacyConvertedEnhancedMRImage(
        datasets, series_instance_uid=hd.UID(), series_number=40, sop_instance_uid=hd.UID(), instance_number=1
    )
    enhanced.SeriesDescription = "T1 enhanced"
    if syntax is not None:
        enhanced.compress(syntax)
    path.parent.mkdir(parents=True, exist_ok=True)
    enhanced.save_as(path)
    return path


@pytest.mark.parametrize("syntax", [None, RLELossless, JPEG2000Lossless, JPEGLSLossless])
def test_enhanced_mr_equals_the_classic_series_it_came_from(syntax, tmp_path: Path):
    files = _phantom_series(tmp_path / "classic")
    path = _legacy_converted(files, tmp_path / "enhanced" / "mf.dcm", syntax)
    classic, enhanced = _only_series(tmp_path / "classic"), _only_series(path.parent)
    assert pydicom.dcmread(path, stop_before_pixels=True).NumberOfFrames == 9
    assert enhanced.problems == [] and enhanced.shape == classic.shape == (34, 32, 9)
    assert enhanced.files == [path] * 9 and sorted(enhanced.frame_numbers) == list(range(9))
    expected, image = load_series(classic), load_series(enhanced)
    np.testing.assert_array_equal(image.numpy(), expected.numpy())  # same stored values, same rescale
    np.testing.assert_allclose(image.affine.numpy(), expected.affine.numpy(), atol=1e-6)
    if syntax is None:
        _assert_same_as_highdicom(path, image)


def _edit_frames(path: Path, edit: Callable[[Dataset], None]) -> None:
    ds = pydicom.dcmread(path)
    edit(ds)
    ds.save_as(path)


def _position(ds: Dataset, frame: int) -> list[float]:
    return [float(v) for v in ds.PerFrameFunctionalGroupsSequence[frame].PlanePositionSequence[0].ImagePositionPatient]


def _set_position(ds: Dataset, frame: int, position: list[float]) -> None:
    ds.PerFrameFunctionalGroupsSequence[frame].PlanePositionSequence[0].ImagePositionPatient = position


def _two_echoes(ds: Dataset) -> None:
    """Frames 0-4 and 5-8 as two echoes: the second half repeats the positions of the first."""
    for frame in range(5, 9):
        _set_position(ds, frame, _position(ds, frame - 5))


def _missing_item(ds: Dataset) -> None:
    del ds.PerFrameFunctionalGroupsSequence[3]


def _no_position(ds: Dataset) -> None:
    del ds.PerFrameFunctionalGroupsSequence[2].PlanePositionSequence


def _gap(ds: Dataset) -> None:
    positions = sorted((_position(ds, f) for f in range(9)), key=lambda p: p[2])
    for frame in range(9):
        z = _position(ds, frame)[2]
        if z > positions[4][2]:  # shift the upper half: a 4 mm gap instead of 2 mm
            _set_position(ds, frame, [*_position(ds, frame)[:2], z + 2.0])


def _bad_rescale(ds: Dataset) -> None:
    ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0].RescaleSlope = "0"


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (_two_echoes, r"cannot load as one volume: duplicate positions: 4 slice\(s\) repeat a position"),
        (_missing_item, r"multi-frame images: mf\.dcm: 9 frame\(s\) but 8 item\(s\) in PerFrameFunctional"),
        (_no_position, r"missing geometry: 1 file\(s\) without a valid ImagePositionPatient/ImageOrient"),
        (_gap, r"missing slices: gap of 4 mm between slices 4 and 5 \(expected 2 mm\)"),
        (_bad_rescale, r"mf\.dcm: RescaleSlope '0' is not a finite non-zero number$"),
    ],
    ids=["two-echoes", "missing-item", "no-position", "gap", "bad-rescale"],
)
def test_enhanced_mr_that_is_not_one_volume_is_refused(edit, expected, tmp_path: Path):
    path = _legacy_converted(_phantom_series(tmp_path / "classic"), tmp_path / "enhanced" / "mf.dcm")
    _edit_frames(path, edit)
    series = _only_series(path.parent)
    with pytest.raises(MedmtlError) as excinfo:
        load_series(series)
    message = _one_line_error(excinfo)
    assert message.startswith(series.label)
    assert re.search(expected, message), message


# ---------------------------------------------------------------------------------------------------------
# through `medmtl infer`


@pytest.fixture(scope="module")
def random_model(tmp_path_factory) -> Path:
    """The phantom bundle's network, untrained."""
    args = load_inference_config(PHANTOM).get_parsed_content("network_args")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("random") / "model.pt"
    return atomic_torch_save(MultiTaskUNet(**args).state_dict(), path)


def test_infer_segments_enhanced_mr_and_refuses_the_rest(random_model: Path, tmp_path: Path, capsys):
    export = tmp_path / "export"
    files = _phantom_series(tmp_path / "classic", shape=(16, 16, 12))
    _legacy_converted(files, export / "enhanced" / "mf.dcm")
    _copy(export / "emri", "emri_small_RLE.dcm", lambda ds: setattr(ds, "SeriesDescription", "T1 emri"))
    _copy(export / "one", "MR_small_jp2klossless.dcm", lambda ds: setattr(ds, "SeriesDescription", "T1 one"))
    out = tmp_path / "out"
    code = main(["infer", str(export), "--bundle", str(PHANTOM), "--model", str(random_model),
                 "--output", str(out), "--formats", "nifti,report", "--set",
                 "pipeline#patch_size=[32,32,32]"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == EXIT_FAILED, captured.err
    assert "1 input(s) done, 2 failed" in captured.out
    failed = [line.strip() for line in captured.out.splitlines() if line.startswith("  failed  ")]
    assert any("'T1 emri'" in line and "its frames cannot be placed" in line for line in failed)
    assert any("'T1 one'" in line and "1 slice(s), at least 8 needed" in line for line in failed)
    (folder,) = out.iterdir()  # nothing for the refused series
    assert folder.name.startswith("40_T1_enhanced_")
    assert sorted(p.name for p in folder.iterdir()) == [".medmtl-output", "report.json", "seg.nii.gz"]
    report = json.loads((folder / "report.json").read_text())
    assert report["input"]["num_slices"] == 12 and report["input"]["shape"] == [16, 16, 12]
    seg = nib.load(folder / "seg.nii.gz")
    np.testing.assert_allclose(seg.affine, load_series(_only_series(tmp_path / "classic")).affine, atol=1e-5)
