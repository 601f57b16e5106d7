"""Reading DICOM headers: what discovery needs from each file (classic, or each frame of a multi-frame file),
and the per-slice geometry and rescale values that loading uses.

A multi-frame file's frames are placed by their per-frame functional groups (PS3.3 C.7.6.16: Plane Position,
Plane Orientation, Pixel Measures and Pixel Value Transformation, per-frame items before shared ones). Pixel
data is not read here (values larger than `_DEFER_BYTES` are deferred). pydicom warnings are silenced by the
callers because they can quote tag values, patient names included.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from monai.utils import ensure_tuple
from pydicom.misc import is_dicom
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from medmtl.data.dicom.info import printable

_PIXEL_DATA = 0x7FE00010


_UNDEFINED_LENGTH = 0xFFFFFFFF


_DEFER_BYTES = 1024  # header values larger than this are not read during discovery (pixel data)


_LOCALIZER_WORDS = re.compile(r"\b(localiz|localis|scout|survey|3[- ]?plane)", re.IGNORECASE)


UNIT_TOL = 1e-2  # direction cosines: unit length and orthogonal within this (scanners round to ~1e-5)


_PER_FRAME = "PerFrameFunctionalGroupsSequence"


_SHARED = "SharedFunctionalGroupsSequence"


_GREY = ("MONOCHROME1", "MONOCHROME2", "")  # "" (absent): pydicom decodes as grey


_PIXEL_DESCRIPTION = (
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "PlanarConfiguration",
    "NumberOfFrames",
)


_NOT_INPUT_CLASSES = ("Segmentation Storage",)  # pixel data, but label maps: never an image to segment


@dataclass
class _Header:
    """What discovery needs from one file."""

    path: Path
    series_uid: str
    study_uid: str = ""
    description: str = ""
    modality: str = ""
    series_number: int | None = None
    instance_number: int | None = None
    rows: int = 0
    columns: int = 0
    samples: int = 1
    frames: int = 1
    orientation: tuple[float, ...] | None = None
    position: tuple[float, ...] | None = None
    pixel_spacing: tuple[float, ...] | None = None
    image_type: tuple[str, ...] = ()
    photometric: str = ""
    parsed: bool = True  # False when only the SeriesInstanceUID could be read
    error: str | None = None  # set when the file belongs to the series but cannot be read as a slice
    frame: int | None = None  # 0-based frame of a multi-frame file; None for a classic single-frame file
    unplaced: str | None = None  # why the frames of a multi-frame file cannot be placed as slices


def _floats(ds: pydicom.Dataset, keyword: str, count: int) -> tuple[float, ...] | None:
    """`count` finite floats from a multi-valued tag, or None when absent or malformed."""
    value = ds.get(keyword)
    if value is None:
        return None
    try:
        values = tuple(float(v) for v in ensure_tuple(value))
    except (TypeError, ValueError):
        return None
    if len(values) != count or not all(math.isfinite(v) for v in values):
        return None
    return values


def _int_or_none(value: Any) -> int | None:
    try:
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def _pixel_description_error(ds: pydicom.Dataset) -> str | None:
    """Which attribute describing the pixel data is not one whole number (decoders need them), or None."""
    for keyword in _PIXEL_DESCRIPTION:
        try:
            value = ds.get(keyword)
        except Exception:  # bytes that do not decode as the VR says (e.g. 3 bytes for a US)
            return f"malformed {keyword}"
        if value is not None and value != "" and _int_or_none(value) is None:
            return f"malformed {keyword} (not one whole number)"
    return None


def _orientation(ds: pydicom.Dataset) -> tuple[float, ...] | None:
    """ImageOrientationPatient when it is two orthogonal unit vectors, else None."""
    values = _floats(ds, "ImageOrientationPatient", 6)
    if values is None:
        return None
    row, col = np.asarray(values[:3]), np.asarray(values[3:])
    unit = abs(np.linalg.norm(row) - 1) <= UNIT_TOL and abs(np.linalg.norm(col) - 1) <= UNIT_TOL
    return values if unit and abs(float(row @ col)) <= UNIT_TOL else None


def _pixel_spacing(ds: pydicom.Dataset) -> tuple[float, ...] | None:
    """PixelSpacing when it is two positive numbers, else None."""
    values = _floats(ds, "PixelSpacing", 2)
    return values if values is not None and min(values) > 0 else None


def _macro(ds: pydicom.Dataset, frame: int | None, sequence: str) -> pydicom.Dataset | None:
    """The item of a functional group macro for one frame: its per-frame item, else the shared one."""
    groups = []
    per_frame = ds.get(_PER_FRAME) if frame is not None else None
    if per_frame and frame < len(per_frame):
        groups.append(per_frame[frame])
    shared = ds.get(_SHARED)
    if shared:
        groups.append(shared[0])
    for group in groups:
        items = group.get(sequence)
        if items:
            return items[0]
    return None


def _plane(ds: pydicom.Dataset, frame: int | None) -> tuple[tuple[float, ...] | None, ...]:
    """(ImagePositionPatient, ImageOrientationPatient, PixelSpacing) of a classic image or of one frame."""
    if frame is None:
        return _floats(ds, "ImagePositionPatient", 3), _orientation(ds), _pixel_spacing(ds)
    position = _macro(ds, frame, "PlanePositionSequence")
    # orientation and spacing may sit at the top level in converted files; a position never can
    orientation = _macro(ds, frame, "PlaneOrientationSequence") or ds
    measures = _macro(ds, frame, "PixelMeasuresSequence") or ds
    return (
        _floats(position, "ImagePositionPatient", 3) if position is not None else None,
        _orientation(orientation),
        _pixel_spacing(measures),
    )


def _slice_thickness(ds: pydicom.Dataset, frame: int | None) -> float:
    """Slice extent of a single-slice volume: SpacingBetweenSlices, else SliceThickness, else 1 mm."""
    measures = _macro(ds, frame, "PixelMeasuresSequence") if frame is not None else None
    for source in (measures, ds):
        for keyword in ("SpacingBetweenSlices", "SliceThickness"):
            value = _floats(source, keyword, 1) if source is not None else None
            if value is not None and value[0] > 0:
                return value[0]
    return 1.0


def _rescale(ds: pydicom.Dataset, frame: int | None) -> tuple[float, float] | str:
    """(RescaleSlope, RescaleIntercept) of a classic image or of one frame, or why they are invalid."""
    item = _macro(ds, frame, "PixelValueTransformationSequence") if frame is not None else None
    source = item if item is not None else ds
    values = []
    for keyword, default in (("RescaleSlope", 1.0), ("RescaleIntercept", 0.0)):
        raw = source.get(keyword)
        try:
            value = default if raw is None or str(raw).strip() == "" else float(raw)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value) or (keyword == "RescaleSlope" and value == 0):
            what = "a finite non-zero number" if keyword == "RescaleSlope" else "a finite number"
            return f"{keyword} {str(raw)[:20]!r} is not {what}"
        values.append(value)
    return values[0], values[1]


def _pixel_data_error(path: Path, ds: pydicom.Dataset) -> str | None:
    """Why the (deferred) pixel data of a file cannot be complete, or None."""
    elem = ds.get_item(_PIXEL_DATA, keep_deferred=True)
    length = getattr(elem, "length", None)
    tell = getattr(elem, "value_tell", None)
    if length is None or tell is None or length == _UNDEFINED_LENGTH:
        return None  # fully read (small or encapsulated): a truncation would have failed the read
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    # in a deflated file the offset counts inflated bytes, so the file size says nothing about truncation
    # (a cut deflate stream fails the read instead)
    available = path.stat().st_size - tell
    if syntax != DeflatedExplicitVRLittleEndian and available < length:
        return f"pixel data truncated ({max(available, 0)} of {length} bytes)"
    if syntax is not None and not syntax.is_compressed:
        bits = _int_or_none(ds.get("BitsAllocated")) or 16
        pixels = (
            (_int_or_none(ds.get("Rows")) or 0)
            * (_int_or_none(ds.get("Columns")) or 0)
            * (_int_or_none(ds.get("SamplesPerPixel")) or 1)
            * (_int_or_none(ds.get("NumberOfFrames")) or 1)
        )
        expected = (pixels * bits + 7) // 8
        if length < expected:
            return f"pixel data too short ({length} of {expected} bytes)"
    return None


def _sop_class_name(ds: pydicom.Dataset) -> str:
    uid = ds.get("SOPClassUID") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None)
    return str(getattr(uid, "name", "") or "")


def _header_from_dataset(path: Path, ds: pydicom.Dataset) -> list[_Header] | str | None:
    """The slices of one file (one `_Header` per frame), an error text, or None for a non-image file."""
    sop_class = _sop_class_name(ds)
    series_uid = str(ds.get("SeriesInstanceUID", "") or "")
    if not series_uid:
        if "Directory" in sop_class:
            return None  # DICOMDIR: an index of the export, not an image
        # pydicom returns an empty data set for some files cut inside encapsulated pixel data
        uid = _series_uid_only(path)
        if uid is None:
            return "not a readable DICOM file (no SeriesInstanceUID)"
        return [_Header(path=path, series_uid=uid, parsed=False, error="data set ends early (truncated?)")]
    if any(name in sop_class for name in _NOT_INPUT_CLASSES):
        return None
    if _PIXEL_DATA not in ds:
        if "Image Storage" in sop_class or "Rows" in ds:
            # pydicom stops quietly at the end of a file cut short; an image without pixels is broken
            return [_Header(path=path, series_uid=series_uid, parsed=False, error="no pixel data (truncated?)")]
        return None  # structured reports, RT structures, presentation states: not image slices
    malformed = _pixel_description_error(ds)
    if malformed is not None:
        return [_Header(path=path, series_uid=series_uid, parsed=False, error=malformed)]
    image_type = ds.get("ImageType") or ()
    header = _Header(
        path=path,
        series_uid=series_uid,
        study_uid=str(ds.get("StudyInstanceUID", "") or ""),
        description=printable(" ".join(str(ds.get("SeriesDescription", "") or "").split())),  # one line
        modality=printable(str(ds.get("Modality", "") or "")),
        series_number=_int_or_none(ds.get("SeriesNumber")),
        instance_number=_int_or_none(ds.get("InstanceNumber")),
        rows=_int_or_none(ds.get("Rows")) or 0,
        columns=_int_or_none(ds.get("Columns")) or 0,
        samples=_int_or_none(ds.get("SamplesPerPixel")) or 1,
        frames=_int_or_none(ds.get("NumberOfFrames")) or 1,
        image_type=tuple(str(v).upper() for v in ensure_tuple(image_type)),
        photometric=printable(str(ds.get("PhotometricInterpretation", "") or "").strip().upper()),
        error=_pixel_data_error(path, ds),
    )
    return _frame_headers(header, ds)


def _frame_headers(header: _Header, ds: pydicom.Dataset) -> list[_Header]:
    """One header per slice of a file: itself for a classic image, one per frame for a multi-frame image."""
    if _PER_FRAME not in ds and _SHARED not in ds:
        position, orientation, spacing = _plane(ds, None)
        header = replace(header, position=position, orientation=orientation, pixel_spacing=spacing)
        if header.frames > 1:
            # classic multi-frame images (NM, US, RT dose) describe frame positions in modality-specific ways
            header.unplaced = f"{header.frames} frames without per-frame positions (no {_PER_FRAME})"
        return [header]
    items = len(ds.get(_PER_FRAME) or ())
    if items != header.frames:
        header.unplaced = f"{header.frames} frame(s) but {items} item(s) in {_PER_FRAME}"
        return [header]
    slices = []
    for frame in range(header.frames):
        position, orientation, spacing = _plane(ds, frame)
        slices.append(
            replace(header, frame=frame, position=position, orientation=orientation, pixel_spacing=spacing)
        )
    return slices


def _series_uid_only(path: Path) -> str | None:
    """SeriesInstanceUID of a file whose full header cannot be parsed, if the start of it can."""
    try:
        with open(path, "rb") as fp:
            ds = pydicom.filereader.read_partial(fp, stop_when=lambda tag, vr, length: tag > 0x0020000E)
        return str(ds.get("SeriesInstanceUID", "") or "") or None
    except Exception:  # any parse failure means the UID is not readable either
        return None


def _headerless_dicom(path: Path) -> bool:
    """Whether a file without the 128-byte preamble and "DICM" starts like a bare DICOM data set.

    Some archives and old scanners write the data set alone; it then starts with a tag of the file meta
    (0002,xxxx) or identifying (0008,xxxx) group, little endian. Only such files are read with force=True.
    """
    with open(path, "rb") as fp:
        head = fp.read(4)
    return len(head) == 4 and head[:2] in (b"\x02\x00", b"\x08\x00") and head[3] == 0


def _read_dataset(path: Path | str, **kwargs: Any) -> pydicom.Dataset:
    """`pydicom.dcmread` that also reads a data set stored without preamble (see `_headerless_dicom`)."""
    ds = pydicom.dcmread(path, **{"force": True, **kwargs})
    meta = ds.file_meta
    if "TransferSyntaxUID" not in meta:
        # no file meta: the pixel decoders need the transfer syntax the data set was actually read with
        implicit, _little = ds.original_encoding
        meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    return ds


def _read_header(path: Path) -> list[_Header] | str | None:
    """Headers of one file's slices, an error text for a broken DICOM file, or None to skip it."""
    try:
        if not is_dicom(path) and not _headerless_dicom(path):
            return None
    except OSError as err:
        return f"cannot be opened ({err.strerror or err})"
    try:
        ds = _read_dataset(path, defer_size=_DEFER_BYTES)
        return _header_from_dataset(path, ds)
    except Exception as err:  # pydicom raises many types for corrupt files; all mean "unreadable"
        reason = f"not a readable DICOM file ({type(err).__name__})"
        uid = _series_uid_only(path)
        if uid is None:
            return reason
        return [_Header(path=path, series_uid=uid, parsed=False, error=reason)]


def _slice_normal(orientation: Sequence[float]) -> np.ndarray:
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    normal = np.cross(row, col)
    norm = np.linalg.norm(normal)
    return normal / norm if norm > 0 else np.array([0.0, 0.0, 1.0])
