"""Inference outputs: NIfTI label maps, DICOM SEG, report.json, and the names they are written under.

Every writer writes atomically (`medmtl.io.atomic_write`: a hidden temporary file, then a rename), so a reader
or a crashed batch never leaves a half-written output behind. `write_nifti` and `write_dicom_seg` refuse to
replace an existing file unless told to. Geometry is never re-oriented: output voxel (i, j, k) is the
caller's voxel (i, j, k), and for DICOM the caller's array is on the grid of `load_series` (columns, rows,
slices), so ``label[:, :, k].T`` is the frame of source file k.

Patient identifiers copied into a DICOM SEG (the standard requires the source's patient and study modules)
stay in the file: highdicom and pydicom are silenced while the SEG is built and written because their
warnings quote attribute values, the patient's name included.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import re
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

import medmtl
from medmtl.data.dicom import SeriesInfo
from medmtl.errors import MedmtlError
from medmtl.io import atomic_write
from medmtl.quiet import silenced

SAFE_NAME_MAX = 80
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_RUNS = re.compile(r"_{2,}")
_LO_MAX = 64  # DICOM LO (long string) value length
_IS_MAX = 2**31 - 1  # DICOM IS (integer string) range
_SEG_SERIES_OFFSET = 1000  # default SEG SeriesNumber: the source's plus this, a common convention
# what a SEG frame needs from its source image: the reference and the plane geometry
_SOURCE_KEYWORDS = (
    "SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "Modality", "FrameOfReferenceUID",
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
)  # fmt: skip
# type 2 attributes (present, possibly empty) of the Patient and General Study modules that the SEG copies;
# exports of derived series (crops, anonymised copies) often leave them out
_TYPE2_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "StudyID", "AccessionNumber",
)  # fmt: skip
_PATIENT_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber")
_UNNAMED = 2**16 - 1  # lookup value of label values without a name
_QFORM_TOL = 1e-4  # mm: the qform is written only where it reproduces the affine

# segment codes (SegmentedPropertyCategory, SegmentedPropertyType) by a word in the label name; the first
# match wins, an unknown name gets the generic tissue codes
_SEGMENT_CODES: tuple[tuple[re.Pattern, Code, Code], ...] = tuple(
    (re.compile(pattern, re.IGNORECASE), category, kind)
    for pattern, category, kind in (
        (r"lesion", codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Lesion),
        (r"tumou?r|neoplasm", codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Neoplasm),
        (r"oedema|edema", codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Edema),
        (r"necros", codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Necrosis),
        (r"hippocamp", codes.SCT.AnatomicalStructure, codes.SCT.Hippocampus),
        (r"organ", codes.SCT.AnatomicalStructure, codes.SCT.Organ),
    )
)
_GENERIC_CODES = (codes.SCT.Tissue, codes.SCT.Tissue)


# ---------------------------------------------------------------------------------------------------------
# names and atomic files


def safe_name(text: str, fallback: str = "case") -> str:
    """A file or folder name built from untrusted text (case ids, DICOM tags).

    Accents are folded to ASCII; every run of characters outside ``[A-Za-z0-9._-]`` (path separators,
    control characters, spaces, other scripts) becomes one ``_``; leading ``.``, ``_`` and ``-`` (hidden
    files, ``..``, command-line options) and trailing ``.`` and ``_`` are stripped. A name longer than
    `SAFE_NAME_MAX` is cut and ends with a hash of the whole text, so that long names stay distinct.

    Args:
        text: the text to turn into a name.
        fallback: the name used when nothing is left of `text`; must itself be a safe name.

    Returns:
        A non-empty name of at most `SAFE_NAME_MAX` characters that is never ``.`` or ``..``.
    """
    text = str(text)
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    name = _RUNS.sub("_", _UNSAFE_CHARS.sub("_", folded)).lstrip("._-").rstrip("._")
    if len(name) > SAFE_NAME_MAX:
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        name = name[: SAFE_NAME_MAX - len(digest) - 1].rstrip("._-") + "-" + digest
    if name:
        return name
    if not fallback or safe_name(fallback, fallback="x") != fallback:
        raise ValueError(f"fallback {fallback!r} is not a safe name")
    return fallback


# ---------------------------------------------------------------------------------------------------------
# NIfTI


def write_nifti(
    array: np.ndarray,
    affine: np.ndarray,
    path: Path,
    *,
    dtype: np.dtype | type | str | None = None,
    overwrite: bool = False,
    xform_code: int = 1,
) -> Path:
    """Write an array as NIfTI-1 with the affine in both the sform and the qform.

    Voxel (i, j, k) of the file is ``array[i, j, k]``: nothing is re-oriented. The qform (rotation,
    voxel sizes and offset, float32) is written with the same code as the sform when it reproduces the
    affine, so nibabel and ITK read back the same geometry; an affine with shear gets qform code 0.

    Args:
        array: the voxels; a label map is integer or bool, an image or probabilities floating point.
        affine: 4x4 voxel-to-world (RAS, mm) matrix.
        path: output file, ending in ``.nii`` or ``.nii.gz``.
        dtype: the stored type; by default uint8 for integer/bool arrays whose values fit (int16 or int32
            otherwise) and float32 for floating point arrays. Values that the type cannot hold exactly are
            refused.
        overwrite: replace an existing file.
        xform_code: NIfTI code of the affine: 1 scanner anatomical (DICOM sources, scanner-space NIfTI),
            2 aligned anatomical (another image's space), 3 Talairach, 4 MNI.

    Returns:
        The written path.

    Raises:
        MedmtlError: for a bad path, affine or dtype, an existing file without `overwrite`, or a write
            failure.
    """
    path = Path(path)
    if not path.name.endswith((".nii", ".nii.gz")):
        raise MedmtlError(f"{path}: a NIfTI output name must end in .nii or .nii.gz")
    if xform_code not in (1, 2, 3, 4):
        raise MedmtlError(f"{path}: xform_code must be 1, 2, 3 or 4 (got {xform_code})")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine)) < 1e-12:
        raise MedmtlError(f"{path}: the affine must be a finite, invertible 4x4 matrix")
    data = _nifti_data(np.asarray(array), dtype, path)
    image = nib.Nifti1Image(data, affine)
    image.header.set_data_dtype(data.dtype)
    image.header.set_xyzt_units("mm")
    image.set_sform(affine, code=xform_code)
    image.set_qform(affine, code=xform_code)
    if not np.allclose(image.get_qform(), affine, atol=_QFORM_TOL):
        image.set_qform(affine, code=0)  # a qform cannot hold shear: readers must use the sform alone
    return atomic_write(path, lambda tmp: nib.save(image, tmp), overwrite=overwrite)


def _nifti_data(array: np.ndarray, dtype: Any, path: Path) -> np.ndarray:
    """The array in the type it is stored as; refuses a type that changes the values."""
    if dtype is None:
        if array.dtype.kind in "biu":
            low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
            candidates = (np.uint8, np.int16, np.int32)
            dtype = next((t for t in candidates if np.iinfo(t).min <= low and high <= np.iinfo(t).max), None)
            if dtype is None:
                raise MedmtlError(f"{path}: integer values {low}..{high} do not fit a NIfTI label type")
        elif array.dtype.kind == "f":
            dtype = np.float32
        else:
            raise MedmtlError(f"{path}: cannot write an array of type {array.dtype} as NIfTI")
    try:
        target = np.dtype(dtype)
    except TypeError:
        raise MedmtlError(f"{path}: {dtype!r} is not a data type") from None
    with np.errstate(invalid="ignore", over="ignore"):
        data = array.astype(target)
    if target.kind in "biu" and not np.array_equal(data, array):
        raise MedmtlError(f"{path}: the values do not fit {target} exactly (fractions or out of range)")
    return data


# ---------------------------------------------------------------------------------------------------------
# DICOM SEG


def write_dicom_seg(
    label: np.ndarray,
    series: SeriesInfo,
    label_names: Mapping[int | str, str],
    path: Path,
    *,
    algorithm_name: str,
    algorithm_version: str,
    manufacturer: str = "medmtl",
    series_description: str | None = None,
    series_number: int | None = None,
    segment_codes: Mapping[int, tuple[Code, Code]] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a label map as a DICOM Segmentation (binary) of the series it was computed on.

    One segment per named label value (0 is background and gets none), numbered 1..N in label order;
    segments absent from `label` are described but have no frames, empty frames are omitted. Frames
    reference their source image (SOPInstanceUID) and carry its plane position. Patient and study
    attributes are copied from the source as the standard requires; new Series and SOP Instance UIDs.

    Args:
        label: integer array of shape ``series.shape`` (columns, rows, slices), as on the grid of
            `medmtl.data.dicom.load_series`: ``label[:, :, k].T`` is the frame of ``series.files[k]``.
        series: the source series (from `discover_series`, files ordered along the slice normal).
        label_names: label value (int or its text, as in MSD ``dataset.json``) to structure name; the names
            become the segment labels.
        path: output file.
        algorithm_name: the model (bundle) name, for the algorithm identification and SeriesDescription.
        algorithm_version: the model (bundle) version.
        manufacturer: Manufacturer of the SEG.
        series_description: SeriesDescription; default ``medmtl <algorithm_name> segmentation``.
        series_number: SeriesNumber; default the source's plus 1000.
        segment_codes: (category, type) codes by label value, overriding those chosen from the names
            (lesion, tumour, oedema, necrosis, hippocampus, organ; generic "Tissue" otherwise).
        overwrite: replace an existing file.

    Returns:
        The written path.

    Raises:
        MedmtlError: naming the series when it cannot carry a SEG (irregular series, multi-frame or
            unreadable files, missing FrameOfReferenceUID or geometry), when `label` does not match it or
            holds unnamed values, or when the file exists or cannot be written.
    """
    names = _label_names(label_names)
    segments = _segment_numbers(np.asarray(label), series, names)
    sources = _read_sources(series)
    identifiers = _patient_identifiers(sources)
    frames = np.ascontiguousarray(np.transpose(segments, (2, 1, 0)))  # (slices, rows, columns)
    if series_number is None:
        series_number = min((series.series_number or 0) + _SEG_SERIES_OFFSET, _IS_MAX)
    description = series_description or f"medmtl {algorithm_name} segmentation"
    model = _lo(f"{algorithm_name} {algorithm_version}")
    try:
        with silenced("highdicom", "pydicom"):
            described = _segment_descriptions(names, algorithm_name, algorithm_version, segment_codes)
            seg = hd.seg.Segmentation(
                source_images=sources,
                pixel_array=frames,
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=described,
                series_instance_uid=hd.UID(),
                series_number=series_number,
                sop_instance_uid=hd.UID(),
                instance_number=1,
                manufacturer=_lo(manufacturer),
                manufacturer_model_name="medmtl",
                software_versions=(f"medmtl {medmtl.__version__}", model),
                device_serial_number="0",
                series_description=_lo(description),
                content_description=model,
                omit_empty_frames=True,
            )
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as err:
        # highdicom's checks name attributes and sometimes quote values: keep patient identifiers out
        reason = _redact(f"{type(err).__name__}: {err}", identifiers)
        raise MedmtlError(f"{series.label}: cannot build a DICOM SEG from this series ({reason})") from None

    def save(tmp: Path) -> None:
        with silenced("highdicom", "pydicom"):
            seg.save_as(tmp, enforce_file_format=True)

    return atomic_write(Path(path), save, overwrite=overwrite)


def _segment_descriptions(
    names: Mapping[int, str],
    algorithm_name: str,
    algorithm_version: str,
    overrides: Mapping[int, tuple[Code, Code]] | None,
) -> list[hd.seg.SegmentDescription]:
    """One automatic segment per named label value, numbered 1..N in label order."""
    algorithm = hd.AlgorithmIdentificationSequence(
        name=_lo(algorithm_name), family=codes.DCM.ArtificialIntelligence, version=_lo(algorithm_version)
    )
    descriptions = []
    for number, value in enumerate(sorted(names), start=1):
        category, kind = _segment_codes(value, names[value], overrides)
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=_lo(names[value]),
                segmented_property_category=category,
                segmented_property_type=kind,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
            )
        )
    return descriptions


def _label_names(label_names: Mapping[int | str, str]) -> dict[int, str]:
    """Label value -> name, keys as ints, background (0) dropped; refuses malformed entries."""
    names: dict[int, str] = {}
    for key, name in label_names.items():
        try:
            value = int(key)
        except (TypeError, ValueError):
            raise MedmtlError(f"label names: {key!r} is not a label value") from None
        if value < 0 or str(value) != str(key).strip():
            raise MedmtlError(f"label names: {key!r} is not a label value")
        if not isinstance(name, str) or not name.strip():
            raise MedmtlError(f"label names: label {value} has no name")
        if value:
            names[value] = name.strip()
    if not names:
        raise MedmtlError("label names: no label other than background (0) is named")
    if len(set(names.values())) != len(names):
        raise MedmtlError(f"label names: names repeat ({sorted(names.values())})")
    return names


def _segment_numbers(label: np.ndarray, series: SeriesInfo, names: Mapping[int, str]) -> np.ndarray:
    """The label map with each named value replaced by its segment number (1..N in label order).

    Refuses a series that is not one regular volume, a label off the series grid and unnamed values.
    """
    if series.problems:
        problems = "; ".join(series.problems)
        raise MedmtlError(f"{series.label}: not one regular volume, cannot write a DICOM SEG: {problems}")
    if label.shape != series.shape:
        raise MedmtlError(
            f"{series.label}: label shape {label.shape} is not the series grid {series.shape} "
            "(columns, rows, slices)"
        )
    if label.dtype.kind not in "biu":
        raise MedmtlError(f"{series.label}: the label map must be integer, not {label.dtype}")
    label = label.view(np.uint8) if label.dtype == bool else label
    low, high = (int(label.min()), int(label.max())) if label.size else (0, 0)
    if low < 0 or high > _UNNAMED:
        raise MedmtlError(f"{series.label}: label values {low}..{high} are not all named label values")
    # a lookup table instead of per-value masks: one pass, no int64 copy of a large volume
    lookup = np.full(max(high, *names) + 1, _UNNAMED, dtype=np.uint16)
    lookup[0] = 0
    lookup[sorted(names)] = np.arange(1, len(names) + 1)
    segments = lookup[label]
    unnamed = segments == _UNNAMED
    if unnamed.any():
        values = np.unique(label[unnamed]).tolist()
        raise MedmtlError(f"{series.label}: label values {values} have no name in the label names")
    return segments.astype(np.uint8) if len(names) < 256 else segments


def _read_sources(series: SeriesInfo) -> list[pydicom.Dataset]:
    """Headers of the source images, in series order; refuses what a SEG cannot reference."""
    with silenced("highdicom", "pydicom"):  # reading attributes warns too, and may quote patient data
        return _checked_sources(series)


def _checked_sources(series: SeriesInfo) -> list[pydicom.Dataset]:
    sources = []
    for path in series.files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)  # sources may lack the preamble
        except Exception as err:  # pydicom raises many types for corrupt files; all mean "unreadable"
            reason = f"not a readable DICOM file ({type(err).__name__})"
            raise MedmtlError(f"{series.label}: {path}: {reason}") from None
        frames = ds.get("NumberOfFrames")
        if frames is not None and str(frames).strip() not in ("", "1"):
            raise MedmtlError(f"{series.label}: {path}: multi-frame images are not supported for DICOM SEG")
        missing = [keyword for keyword in _SOURCE_KEYWORDS if not ds.get(keyword)]
        if missing:
            reason = f"no {', '.join(missing)}; a DICOM SEG cannot reference it"
            raise MedmtlError(f"{series.label}: {path}: {reason}")
        if str(ds.get("SeriesInstanceUID", "")) != series.series_uid:
            raise MedmtlError(f"{series.label}: {path}: belongs to another series")
        if (ds.get("Rows"), ds.get("Columns")) != (series.rows, series.columns):
            raise MedmtlError(f"{series.label}: {path}: image size differs from the series")
        for keyword in _TYPE2_KEYWORDS:
            if keyword not in ds:
                setattr(ds, keyword, "")  # empty means unknown; the header is in memory only
        sources.append(ds)
    if len({str(ds.FrameOfReferenceUID) for ds in sources}) > 1:
        reason = "images have different FrameOfReferenceUIDs"
        raise MedmtlError(f"{series.label}: {reason}; cannot write a DICOM SEG")
    return sources


def _patient_identifiers(sources: Sequence[pydicom.Dataset]) -> set[str]:
    """The patient identifier texts of the sources (and the parts of names), to keep out of messages."""
    found: set[str] = set()
    for ds in sources[:1]:  # every file of one series belongs to the same patient
        for keyword in _PATIENT_KEYWORDS:
            value = str(ds.get(keyword, "") or "").strip()
            found.update(part for part in [value, *re.split(r"[\^=\s]+", value)] if len(part) >= 3)
    return found


def _redact(text: str, identifiers: set[str]) -> str:
    for value in sorted(identifiers, key=len, reverse=True):
        text = text.replace(value, "<redacted>")
    return text


def _segment_codes(
    value: int, name: str, overrides: Mapping[int, tuple[Code, Code]] | None
) -> tuple[Code, Code]:
    if overrides and value in overrides:
        return overrides[value]
    return next(((c, t) for pattern, c, t in _SEGMENT_CODES if pattern.search(name)), _GENERIC_CODES)


def _lo(text: str) -> str:
    """A DICOM LO value: one line without backslashes, at most 64 characters."""
    printable = "".join(ch if ch.isprintable() else " " for ch in str(text))
    return " ".join(printable.replace("\\", "/").split())[:_LO_MAX]


# ---------------------------------------------------------------------------------------------------------
# report and volumes


def write_report(report: Mapping[str, Any], path: Path, *, overwrite: bool = True) -> Path:
    """Write a report as JSON (UTF-8, indented).

    NaN and infinities become ``null``; numpy and torch scalars and arrays become numbers and lists;
    paths become text; dates ISO 8601 text.

    Args:
        report: the report; keys must be text or integers.
        path: output file.
        overwrite: replace an existing file (default: reports are regenerated with their outputs).

    Returns:
        The written path.

    Raises:
        MedmtlError: for a value that has no JSON form (naming where it is), or a write failure.
    """
    text = json.dumps(_jsonable(report, "report"), indent=2, allow_nan=False, ensure_ascii=False) + "\n"
    return atomic_write(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite=overwrite)


def _jsonable(value: Any, where: str) -> Any:
    """`value` in JSON's types; `where` names it in errors (e.g. ``report.cases[3].dice``)."""
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if isinstance(key, (bool, np.bool_)) or not isinstance(key, (str, int, np.integer)):
                raise MedmtlError(f"{where}: key {key!r} is not text or an integer; cannot write JSON")
            out[str(key)] = _jsonable(item, f"{where}.{key}")
        return out
    if isinstance(value, (list, tuple)):
        return [_jsonable(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if hasattr(value, "tolist"):  # numpy arrays, torch tensors and their scalars
        return _jsonable(value.tolist(), where)
    raise MedmtlError(f"{where}: a {type(value).__name__} has no JSON form")


def label_volumes_ml(
    label: np.ndarray, affine: np.ndarray, label_names: Mapping[int | str, str]
) -> dict[str, float]:
    """Volume of each named structure: voxel count times the voxel volume.

    Args:
        label: integer label map.
        affine: 4x4 voxel-to-world (mm) matrix of `label`.
        label_names: label value (int or its text) to name; background (0) is not measured.

    Returns:
        Name to volume in millilitres, in label order; 0.0 for a structure absent from `label`.

    Raises:
        MedmtlError: for malformed label names or affine.
    """
    names = _label_names(label_names)
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise MedmtlError("label volumes: the affine must be a finite 4x4 matrix")
    voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0  # mm^3 -> ml
    label = np.asarray(label)
    return {names[value]: float(np.count_nonzero(label == value)) * voxel_ml for value in sorted(names)}
