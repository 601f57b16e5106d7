"""DICOM series discovery, selection and loading.

A scanner export is a tree of files with arbitrary names. `discover_series` reads the headers, groups the
files by SeriesInstanceUID, orders each series along the normal of ImageOrientationPatient and records what
would stop it from being one regular volume (gaps, duplicate positions, mixed sizes, ...). `SeriesRule` and
`select_series` pick series by modality, description, size or UID; `format_series_table` shows them;
`load_series` reads one series through MONAI's `LoadImage` as a float32 MetaTensor in RAS.

A slice is one frame: a classic file holds one, an enhanced (multi-frame) file such as Enhanced MR holds many,
each placed by its per-frame functional groups (PS3.3 C.7.6.16: Plane Position, Plane Orientation, Pixel
Measures and Pixel Value Transformation, per-frame items before shared ones). Frames of a multi-frame file are
slices like any other: sorted along the normal and checked for gaps the same way. Pixel data in any transfer
syntax that pydicom and the installed decoders read (JPEG, JPEG-LS, JPEG 2000, RLE, big endian) loads; what
cannot be decoded, colour images, multi-frame files without per-frame positions, invalid geometry or rescale
values are refused with a message naming the series and the file.

Only header facts without patient identifiers are kept (`SeriesInfo`); pydicom warnings are silenced while
reading because they can quote tag values, patient names included.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from monai.data import MetaTensor, PydicomReader
from monai.data.utils import orientation_ras_lps
from monai.transforms import LoadImage
from monai.utils import MetaKeys, ensure_tuple
from pydicom.misc import is_dicom
from pydicom.pixels import apply_modality_lut
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from medmtl.errors import MedmtlError, error_summary
from medmtl.quiet import MONAI_READER_NOISE, silenced

logger = logging.getLogger(__name__)

POSITION_TOL_MM = 0.01  # slice positions closer than this are the same position
ORIENTATION_TOL = 1e-3  # direction cosines closer than this are the same orientation
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
# what a decoder may raise that is no error of the data; anything else it raises is. Rust decoders
# (pylibjpeg-rle) raise pyo3's PanicException, a BaseException, on corrupt data
NOT_DATA_ERRORS = (KeyboardInterrupt, SystemExit, GeneratorExit)


@dataclass
class SeriesInfo:
    """Header facts about one DICOM series; no patient identifiers are stored here.

    `files` holds one entry per slice, ordered along the slice normal (ascending projection of
    ImagePositionPatient on cross(row, column) of ImageOrientationPatient); a multi-frame file appears once
    per frame, and `frame_numbers[k]` is then the 0-based frame of ``files[k]`` that slice k is. `problems`
    lists, in words, everything that stops the series from loading as one regular volume; `load_series`
    refuses a series with problems.
    """

    series_uid: str
    study_uid: str
    description: str
    modality: str
    series_number: int | None
    files: list[Path]
    rows: int
    columns: int
    pixel_spacing: tuple[float, float] | None  # DICOM order: (between rows, between columns) in mm
    slice_spacing: float | None  # distance between neighbouring slice planes in mm
    orientation: tuple[float, ...] | None  # ImageOrientationPatient: row cosines, column cosines (LPS)
    is_localizer: bool = False
    problems: list[str] = field(default_factory=list)
    frame_numbers: list[int] = field(default_factory=list)  # empty when every file is a classic single frame

    @property
    def num_slices(self) -> int:
        """Number of slices (image files, or frames of multi-frame files) in the series."""
        return len(self.files)

    @property
    def is_multiframe(self) -> bool:
        """Whether the slices are frames of multi-frame (e.g. Enhanced MR) files."""
        return bool(self.frame_numbers)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Volume shape as loaded: (columns, rows, slices)."""
        return (self.columns, self.rows, self.num_slices)

    @property
    def num_voxels(self) -> int:
        """Number of voxels of the volume."""
        return self.columns * self.rows * self.num_slices

    @property
    def label(self) -> str:
        """How messages name the series: description and short UID (never a patient identifier)."""
        return f"series '{self.description or '(no description)'}' ({printable(short_uid(self.series_uid))})"

    @property
    def folder(self) -> Path | None:
        """The deepest folder holding all files of the series."""
        if not self.files:
            return None
        return Path(os.path.commonpath([str(f.parent) for f in self.files]))


def short_uid(uid: str, keep: int = 8) -> str:
    """The last `keep` characters of a UID (UIDs of one site share long prefixes).

    Args:
        uid: a DICOM UID.
        keep: how many trailing characters to keep.

    Returns:
        ``..`` followed by the tail of the UID, or the UID itself when it is short.
    """
    return uid if len(uid) <= keep + 2 else ".." + uid[-keep:]


def printable(text: str) -> str:
    """`text` with every character that is not printable (control characters, line breaks) as ``?``.

    Args:
        text: a header value, e.g. a description or UID as a broken exporter wrote it.

    Returns:
        the text, safe to show on one line.
    """
    return "".join(c if c.isprintable() else "?" for c in text)


# ---------------------------------------------------------------------------------------------------------
# header reading


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


def discover_series(root: Path | str) -> list[SeriesInfo]:
    """Find every DICOM image series under a folder tree.

    Files may have any name and sit in nested folders; non-DICOM files are skipped. Files that carry the DICOM
    preamble but cannot be read become a problem of their series when their SeriesInstanceUID is readable, and
    are logged as unreadable (a warning naming the file) otherwise.

    Args:
        root: a folder (study, series or any tree) or a single DICOM file.

    Returns:
        One `SeriesInfo` per SeriesInstanceUID, ordered by series number, description and UID; empty when
        there is no DICOM image under `root`.

    Raises:
        MedmtlError: when `root` does not exist.
    """
    root = Path(root)
    if not root.exists():
        raise MedmtlError(f"{root}: folder not found")
    if root.is_file():
        paths = [root]
    else:
        paths = sorted(Path(d) / name for d, _, names in os.walk(root) for name in names)
    groups: dict[str, list[_Header]] = defaultdict(list)
    with silenced("pydicom"):
        for path in paths:
            headers = _read_header(path)
            if isinstance(headers, str):
                logger.warning("%s: %s", path, headers)
            elif headers:
                groups[headers[0].series_uid].extend(headers)
        series = [_build_series_safely(uid, headers) for uid, headers in groups.items()]
    series.sort(key=lambda s: (s.series_number is None, s.series_number or 0, s.description, s.series_uid))
    return series


# ---------------------------------------------------------------------------------------------------------
# grouping and geometry checks


def _most_common(values: Sequence[Any]) -> Any:
    return Counter(values).most_common(1)[0][0] if values else None


def _slice_normal(orientation: Sequence[float]) -> np.ndarray:
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    normal = np.cross(row, col)
    norm = np.linalg.norm(normal)
    return normal / norm if norm > 0 else np.array([0.0, 0.0, 1.0])


def _mm(value: float) -> str:
    return f"{value:.3g}"


def _regular_spacing(steps: np.ndarray) -> float:
    """The spacing a series was meant to have, from its (non-duplicate) steps between slices."""
    # with few slices a median is no estimate: steps 2, 4 are one missing slice, not an uneven series.
    # When the steps are whole multiples of the smallest one, and at least half are the smallest one,
    # that is the spacing; otherwise the median
    base = float(steps.min())
    multiples = np.round(steps / base)
    tol = max(POSITION_TOL_MM, 0.01 * base)
    if np.all(np.abs(steps - multiples * base) <= tol * multiples) and np.mean(multiples == 1) >= 0.5:
        return float(np.median(steps[multiples == 1]))
    return float(np.median(steps))


def _position_problems(positions: np.ndarray, normal: np.ndarray) -> tuple[list[str], float | None]:
    """Problems of slice positions (already sorted along `normal`) and the regular slice spacing."""
    if len(positions) < 2:
        return [], None
    steps = np.diff(positions @ normal)
    problems = []
    duplicates = np.flatnonzero(steps <= POSITION_TOL_MM)
    if len(duplicates):
        i = int(duplicates[0])
        where = f"first: slices {i} and {i + 1}"
        problems.append(f"duplicate positions: {len(duplicates)} slice(s) repeat a position ({where})")
    distinct = steps[steps > POSITION_TOL_MM]
    if not len(distinct):
        return problems, None
    spacing = _regular_spacing(distinct)
    tol = max(POSITION_TOL_MM, 0.01 * spacing)
    gaps = np.flatnonzero(steps > 1.5 * spacing)
    if len(gaps):
        i = int(gaps[np.argmax(steps[gaps])])
        more = f", and {len(gaps) - 1} more gap(s)" if len(gaps) > 1 else ""
        problems.append(
            f"missing slices: gap of {_mm(steps[i])} mm between slices {i} and {i + 1} "
            f"(expected {_mm(spacing)} mm){more}"
        )
    uneven = distinct[(np.abs(distinct - spacing) > tol) & (distinct <= 1.5 * spacing)]
    if len(uneven):
        low, high = float(min(distinct.min(), spacing)), float(distinct[distinct <= 1.5 * spacing].max())
        problems.append(f"uneven spacing: steps from {_mm(low)} to {_mm(high)} mm along the normal")
    if not problems:
        # regular along the normal; the volume affine also needs the positions on one line (tilt is fine)
        n = len(positions)
        grid = positions[0] + np.outer(np.arange(n), (positions[-1] - positions[0]) / (n - 1))
        deviation = float(np.linalg.norm(positions - grid, axis=1).max())
        if deviation > tol:
            off = _mm(deviation)
            problems.append(f"uneven spacing: slice positions deviate up to {off} mm from a regular grid")
    return problems, spacing


def _size_text(counts: Counter) -> str:
    return ", ".join(f"{c}x{r} ({n} files)" for (r, c), n in counts.most_common())


def _file_count(headers: Sequence[_Header]) -> int:
    return len({h.path for h in headers})  # the frames of a multi-frame file are one file


def _build_series(uid: str, headers: list[_Header]) -> SeriesInfo:
    """Order the slices of one series along its normal and list what is wrong with it."""
    readable = [h for h in headers if h.parsed]
    broken = list({h.path: h for h in headers if h.error is not None}.values())
    unplaced = [h for h in readable if h.unplaced is not None]
    placed = [h for h in readable if h.unplaced is None]
    first = readable[0] if readable else headers[0]
    problems: list[str] = []

    orientations = [h.orientation for h in placed if h.orientation is not None]
    reference = _most_common([tuple(round(v, 4) for v in o) for o in orientations])
    reference = next((o for o in orientations if tuple(round(v, 4) for v in o) == reference), None)
    normal = _slice_normal(reference) if reference is not None else np.array([0.0, 0.0, 1.0])

    def order(h: _Header) -> tuple:
        along = float(np.dot(h.position, normal)) if h.position is not None else math.inf
        along = along if not math.isnan(along) else math.inf  # overflowing positions sort last, not anywhere
        number = h.instance_number if h.instance_number is not None else 0
        return (along, number, str(h.path), h.frame or 0)

    readable.sort(key=order)
    placed.sort(key=order)

    mixed_orientation = any(np.abs(np.subtract(o, reference)).max() > ORIENTATION_TOL for o in orientations)
    if mixed_orientation:
        distinct = {tuple(np.round(o, 3)) for o in orientations}
        problems.append(f"mixed orientations: {len(distinct)} different ImageOrientationPatient values")
    sizes = Counter((h.rows, h.columns) for h in readable)
    if len(sizes) > 1:
        problems.append(f"mixed sizes: {_size_text(sizes)}")
    spacings = {tuple(np.round(h.pixel_spacing, 4)) for h in placed if h.pixel_spacing is not None}
    if len(spacings) > 1:
        problems.append(f"mixed pixel spacing: {len(spacings)} different PixelSpacing values")
    no_geometry = _file_count([h for h in placed if h.position is None or h.orientation is None])
    no_spacing = _file_count([h for h in placed if h.pixel_spacing is None])
    missing = []
    if no_geometry:
        missing.append(f"{no_geometry} file(s) without a valid ImagePositionPatient/ImageOrientationPatient")
    if no_spacing:
        missing.append(f"{no_spacing} file(s) without a valid PixelSpacing")
    if missing:
        problems.append(f"missing geometry: {', '.join(missing)}")
    if unplaced:
        h = unplaced[0]
        more = f"; and {len(unplaced) - 1} more file(s)" if len(unplaced) > 1 else ""
        problems.append(f"multi-frame images: {h.path.name}: {h.unplaced}; its frames cannot be placed{more}")
    if any(h.samples != 1 for h in readable):
        problems.append("colour images: SamplesPerPixel is not 1 (not supported)")
    elif any(h.photometric not in _GREY for h in readable):
        kind = next(h.photometric for h in readable if h.photometric not in _GREY)
        problems.append(f"colour images: PhotometricInterpretation {kind[:16]} (not supported)")

    slice_spacing = None
    if placed and not mixed_orientation and not no_geometry:
        positions = np.array([h.position for h in placed], float)
        position_problems, slice_spacing = _position_problems(positions, normal)
        problems.extend(position_problems)
    if broken:
        shown = "; ".join(f"{h.path.name}: {h.error}" for h in broken[:2])
        more = f"; and {len(broken) - 2} more" if len(broken) > 2 else ""
        problems.append(f"unreadable files: {len(broken)} ({shown}{more})")

    rows, columns = sizes.most_common(1)[0][0] if sizes else (0, 0)
    pixel_spacing = next((h.pixel_spacing for h in placed if h.pixel_spacing is not None), None)
    description = first.description
    is_localizer = (
        any("LOCALIZER" in h.image_type for h in readable)
        or bool(_LOCALIZER_WORDS.search(description))
        or (mixed_orientation and len(readable) <= 5)
    )
    multiframe = any(h.frame is not None for h in readable)
    return SeriesInfo(
        series_uid=uid,
        study_uid=first.study_uid,
        description=description,
        modality=first.modality,
        series_number=first.series_number,
        files=[h.path for h in readable],
        rows=rows,
        columns=columns,
        pixel_spacing=tuple(pixel_spacing) if pixel_spacing is not None else None,  # type: ignore[arg-type]
        slice_spacing=slice_spacing,
        orientation=tuple(reference) if reference is not None else None,
        is_localizer=is_localizer,
        problems=problems,
        frame_numbers=[h.frame or 0 for h in readable] if multiframe else [],
    )


def _build_series_safely(uid: str, headers: list[_Header]) -> SeriesInfo:
    """`_build_series`; header values it did not foresee make a problem of that series, not a crash."""
    try:
        return _build_series(uid, headers)
    except Exception as err:  # one odd series must not stop the discovery of the others
        first = headers[0]
        return SeriesInfo(
            series_uid=uid,
            study_uid=first.study_uid,
            description=first.description,
            modality=first.modality,
            series_number=first.series_number,
            files=sorted({h.path for h in headers}),
            rows=first.rows,
            columns=first.columns,
            pixel_spacing=None,
            slice_spacing=None,
            orientation=None,
            problems=[f"unreadable headers: cannot order the slices ({_one_line(err)})"],
        )


def _one_line(err: BaseException) -> str:
    """An exception as one line: its type and every line of its message (decoder errors span several)."""
    return printable(error_summary(err, typed=True, joined=True, limit=300))


# ---------------------------------------------------------------------------------------------------------
# selection


@dataclass
class SeriesRule:
    """Which series to take from an export. All filters set must hold (AND).

    Localizers are never selected unless named by `series_uid`; `largest` then keeps the series with the most
    voxels among those left.
    """

    modality: str | None = None
    description: str | None = None  # regular expression, case-insensitive search
    min_slices: int | None = None
    largest: bool = False
    series_uid: str | None = None

    def __post_init__(self) -> None:
        self._pattern()  # an invalid regular expression is a user error: report it before any work

    def _pattern(self) -> re.Pattern | None:
        if self.description is None:
            return None
        try:
            return re.compile(self.description, re.IGNORECASE)
        except re.error as err:
            message = f"--description {self.description!r}: invalid regular expression ({err})"
            raise MedmtlError(message) from None

    def is_set(self) -> bool:
        """Whether any filter is set.

        Returns:
            True when the rule restricts the series in any way.
        """
        filters = (self.modality, self.description, self.min_slices, self.series_uid)
        return self.largest or any(v is not None for v in filters)

    def describe(self) -> str:
        """The rule in words, for messages.

        Returns:
            e.g. ``modality=MR, description~/t1/, min_slices=20, largest``.
        """
        parts = []
        if self.series_uid is not None:
            parts.append(f"series_uid={self.series_uid}")
        if self.modality is not None:
            parts.append(f"modality={self.modality}")
        if self.description is not None:
            parts.append(f"description~/{self.description}/")
        if self.min_slices is not None:
            parts.append(f"min_slices={self.min_slices}")
        if self.largest:
            parts.append("largest")
        return ", ".join(parts) or "any series"

    def matches(self, s: SeriesInfo) -> bool:
        """Whether one series passes the filters (`largest` is applied by `select_series`).

        Args:
            s: the series to test.

        Returns:
            True when every filter set holds for `s`.
        """
        if self.series_uid is not None:
            if s.series_uid != self.series_uid:
                return False
        elif s.is_localizer:
            return False
        if self.modality is not None and s.modality.upper() != self.modality.upper():
            return False
        pattern = self._pattern()
        if pattern is not None and not pattern.search(s.description):
            return False
        return self.min_slices is None or s.num_slices >= self.min_slices


def select_series(series: Sequence[SeriesInfo], rule: SeriesRule) -> list[SeriesInfo]:
    """The series that a rule selects.

    Args:
        series: candidates, e.g. from `discover_series`.
        rule: the filters.

    Returns:
        The matching series in their input order; at most one when `rule.largest` is set.

    Raises:
        MedmtlError: when the description is not a valid regular expression.
    """
    kept = [s for s in series if rule.matches(s)]
    if rule.largest and kept:
        kept = [max(kept, key=lambda s: s.num_voxels)]  # max keeps the first of equal sizes
    return kept


# ---------------------------------------------------------------------------------------------------------
# display


def orientation_label(orientation: Sequence[float] | None) -> str:
    """Name the plane of a slice orientation from its normal.

    Args:
        orientation: ImageOrientationPatient (6 values), or None.

    Returns:
        ``axial``, ``coronal`` or ``sagittal`` within 1 degree of the plane, ``oblique (ax 16°)`` style
        otherwise (closest plane and tilt), ``-`` when unknown.
    """
    if orientation is None:
        return "-"
    normal = np.abs(_slice_normal(orientation))
    axis = int(np.argmax(normal))
    name, short = (("sagittal", "sag"), ("coronal", "cor"), ("axial", "ax"))[axis]
    tilt = math.degrees(math.acos(min(1.0, float(normal[axis]))))
    return name if tilt <= 1.0 else f"oblique ({short} {tilt:.0f}°)"


def _flag_names(s: SeriesInfo) -> list[str]:
    # problems read "<kind>: <details>"; the table shows the kind, the details follow the table
    return (["localizer"] if s.is_localizer else []) + [p.split(":", 1)[0] for p in s.problems]


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "~"


def format_series_table(series: Sequence[SeriesInfo], selected: Sequence[SeriesInfo] = ()) -> str:
    """A table of series, one line each, followed by the full text of the problems found.

    Args:
        series: the series to show, e.g. from `discover_series`.
        selected: series to mark with ``*`` in the first column.

    Returns:
        The table text (no trailing newline); no patient identifiers. ``no DICOM series found`` when empty.
    """
    if not series:
        return "no DICOM series found"
    chosen = {s.series_uid for s in selected}
    header = f"  {'#':>5}  {'description':<24} {'mod':<4} {'slices':>6}  {'size':<13} {'spacing mm':<15} "
    header += f"{'orientation':<17} {'uid':<10}  flags"
    lines = [header]
    notes = []
    for s in series:
        spacing = "?"
        if s.pixel_spacing is not None:
            spacing = f"{_mm(s.pixel_spacing[1])}x{_mm(s.pixel_spacing[0])}"
            spacing += f"x{_mm(s.slice_spacing)}" if s.slice_spacing is not None else ""
        number = "-" if s.series_number is None else str(s.series_number)
        size = "x".join(str(n) for n in s.shape)
        mixed = any(p.startswith("mixed orientations") for p in s.problems)
        plane = "mixed" if mixed else orientation_label(s.orientation)
        flags = ", ".join(_flag_names(s))
        line = (
            f"{'*' if s.series_uid in chosen else ' '} {number:>5}  {_clip(s.description, 24):<24} "
            f"{_clip(s.modality, 4):<4} {s.num_slices:>6}  {size:<13} {spacing:<15} "
            f"{plane:<17} {short_uid(s.series_uid):<10}  {flags}"
        )
        lines.append(line.rstrip())
        notes.extend(f"  {number} {short_uid(s.series_uid)}: {p}" for p in s.problems)
    if notes:
        lines += ["problems:", *notes]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# loading


class DicomSeriesReader(PydicomReader):
    """A MONAI reader that reads a list of DICOM slices as one series, in the order given.

    `PydicomReader` sorts a folder by InstanceNumber and stacks a list of files as channels; this reader
    stacks the given slices (already ordered along the slice normal by `discover_series`) along the last
    axis and lets MONAI build the RAS affine from the first and last slice positions. A slice is a classic
    file, or one frame of a multi-frame file (`frames`, as `SeriesInfo.frame_numbers`), placed by its
    functional groups. Stored values are mapped through RescaleSlope/Intercept (per frame: the Pixel Value
    Transformation macro) or a Modality LUT. With `swap_ij` the array is (columns, rows, slices).

    Args:
        series_label: how error messages name the series.
        frames: for each file given to `read`, its 0-based frame; empty when all files are classic images.
    """

    def __init__(self, series_label: str = "series", frames: Sequence[int] = ()) -> None:
        super().__init__(channel_dim="no_channel", affine_lps_to_ras=True, swap_ij=True, prune_metadata=True)
        self.series_label = series_label
        self.frames = list(frames)

    def read(self, data: Sequence[os.PathLike | str] | os.PathLike | str, **kwargs) -> list[pydicom.Dataset]:
        """Read every file of the series with its pixel data (a multi-frame file once).

        Args:
            data: the files of one series, one per slice, in slice order.
            kwargs: additional arguments for `pydicom.dcmread`.

        Returns:
            One dataset per slice (the frames of one file share its dataset).
        """
        files = [str(f) for f in ensure_tuple(data)]
        if self.frames and len(self.frames) != len(files):
            raise MedmtlError(f"{self.series_label}: {len(files)} files but {len(self.frames)} frame numbers")
        read: dict[str, pydicom.Dataset] = {}
        with silenced("pydicom"):
            for name in files:
                if name in read:
                    continue
                try:
                    read[name] = _read_dataset(name, **{**self.kwargs, **kwargs})
                except Exception as err:  # corrupt files raise many types; all mean "unreadable"
                    raise MedmtlError(
                        f"{self.series_label}: {name}: not a readable DICOM file ({type(err).__name__})"
                    ) from None
        self.has_series = True  # makes `get_data` combine the datasets as one series
        self.filenames = [files]
        return [read[name] for name in files]

    def _combine_dicom_series(self, data, filenames):  # noqa: ANN001 - MONAI's signature
        """Stack the slices in the order given (MONAI's version re-sorts by InstanceNumber)."""
        datasets = list(data)
        frames = self.frames or [None] * len(datasets)
        decoded: dict[int, np.ndarray] = {}  # one decode per file, however many of its frames are slices
        arrays = []
        for ds, name, frame in zip(datasets, filenames, frames, strict=True):
            if id(ds) not in decoded:
                decoded[id(ds)] = self._stored_frames(ds, name)
            stored = decoded[id(ds)]
            if (frame or 0) >= len(stored):
                raise MedmtlError(f"{self.series_label}: {name}: has no frame {(frame or 0) + 1}")
            arrays.append(self._modality_values(stored[frame or 0], ds, frame, name))
        if len({a.shape for a in arrays}) > 1:
            raise MedmtlError(f"{self.series_label}: slices have different sizes")
        first, last = _plane(datasets[0], frames[0]), _plane(datasets[-1], frames[-1])
        if first[0] is None or first[1] is None or first[2] is None or last[0] is None:
            raise MedmtlError(
                f"{self.series_label}: {filenames[0]}: no valid ImagePositionPatient, ImageOrientationPatient "
                "or PixelSpacing (changed since discovery?)"
            )
        metadata: dict[str, Any] = {
            "00200032": {"vr": "DS", "Value": list(first[0])},
            "00200037": {"vr": "DS", "Value": list(first[1])},
            "00280030": {"vr": "DS", "Value": list(first[2])},
            "spacing": np.asarray(list(first[2]) + [_slice_thickness(datasets[0], frames[0])]),
        }
        if len(datasets) > 1:
            metadata["lastImagePositionPatient"] = np.asarray(last[0], float)
        metadata[MetaKeys.SPATIAL_SHAPE] = arrays[0].shape + (len(arrays),)
        return np.stack(arrays, axis=-1), metadata

    def _stored_frames(self, ds: pydicom.Dataset, filename: str) -> np.ndarray:
        """Decoded stored values, (frames, rows, columns); a decoding failure names the file."""
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if syntax == RLELossless:
            # pydicom's own RLE decoder: it raises on corrupt data where pylibjpeg-rle (Rust) panics and
            # prints a Rust backtrace on stderr; ~10 ms a 512x512 slice, little beside the inference
            ds.pixel_array_options(decoding_plugin="pydicom")
        try:
            with silenced("pydicom"):
                stored = np.asarray(ds.pixel_array)
        except BaseException as err:  # pixel decoders raise many types (truncated data, missing codec, panics)
            if isinstance(err, NOT_DATA_ERRORS):
                raise
            raise MedmtlError(
                f"{self.series_label}: {filename}: cannot read pixel data ({_one_line(err)})"
            ) from None
        if stored.ndim == 2:
            stored = stored[None]
        if stored.ndim != 3:
            shape = tuple(stored.shape)
            raise MedmtlError(f"{self.series_label}: {filename}: pixel data of shape {shape} is not grey")
        return stored

    def _modality_values(
        self, stored: np.ndarray, ds: pydicom.Dataset, frame: int | None, name: str
    ) -> np.ndarray:
        """One slice in modality units (e.g. Hounsfield), float32."""
        if frame is None and "ModalityLUTSequence" in ds and "RescaleSlope" not in ds:
            try:
                return np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)
            except Exception as err:  # a malformed lookup table
                raise MedmtlError(
                    f"{self.series_label}: {name}: invalid ModalityLUTSequence ({_one_line(err)})"
                ) from None
        rescale = _rescale(ds, frame)
        if isinstance(rescale, str):
            raise MedmtlError(f"{self.series_label}: {name}: {rescale}")
        slope, intercept = rescale
        values = stored.astype(np.float32)
        if (slope, intercept) != (1.0, 0.0):
            values = values * np.float32(slope) + np.float32(intercept)
        return values

    def _get_affine(self, metadata: dict, lps_to_ras: bool = True) -> np.ndarray:
        """MONAI's affine; for a single slice the third column is the normal times the slice thickness."""
        affine = super()._get_affine(metadata, lps_to_ras=False)
        shape = metadata.get(MetaKeys.SPATIAL_SHAPE, ())
        if len(shape) == 3 and shape[-1] == 1 and "00200037" in metadata:
            affine[:3, 2] = _slice_normal(metadata["00200037"]["Value"]) * metadata["spacing"][2]
        return orientation_ras_lps(affine) if lps_to_ras else affine


@functools.cache
def _loader() -> LoadImage:
    """One LoadImage for the process; building it instantiates MONAI's default readers."""
    # NvImgCodecPydicomReader warns and logs on every construction when nvImageCodec is absent (CPU setups)
    with silenced("pydicom", MONAI_READER_NOISE):
        return LoadImage(reader=DicomSeriesReader, image_only=True, dtype=np.float32)


def load_series(series: SeriesInfo, min_slices: int = 1) -> MetaTensor:
    """Load one series as a volume through MONAI's `LoadImage`.

    Args:
        series: a series from `discover_series` (its slices ordered along the slice normal).
        min_slices: fewest slices accepted (2 or more where a volume is required).

    Returns:
        A float32 MetaTensor of shape (columns, rows, slices): i along the rows of a slice, j down its
        columns, k along the slice normal, with the RAS affine in ``meta["affine"]``, ``original_channel_dim``
        ``"no_channel"`` and ``filename_or_obj`` the series folder. Values are stored values mapped through
        the rescale (or Modality LUT) of each slice.

    Raises:
        MedmtlError: naming the series (and the file at fault) when it cannot be one volume: problems found by
            discovery (gaps, duplicate positions, mixed sizes or orientations, unreadable files, colour,
            multi-frame files without frame positions, invalid geometry), too few slices, pixel data that
            cannot be decoded or invalid rescale values.
    """
    if series.problems:
        raise MedmtlError(f"{series.label}: cannot load as one volume: {'; '.join(series.problems)}")
    if series.num_slices < max(1, min_slices):
        raise MedmtlError(
            f"{series.label}: {series.num_slices} slice(s), at least {max(1, min_slices)} needed for a volume"
        )
    reader = DicomSeriesReader(series_label=series.label, frames=series.frame_numbers)
    try:
        # the reader given to the call is the only one tried: a MedmtlError reaches the caller unchanged
        # instead of LoadImage falling back to its other readers and raising its own RuntimeError
        with silenced("pydicom"):
            image = _loader()([str(f) for f in series.files], reader=reader)
    except MedmtlError:
        raise
    except Exception as err:  # MONAI's affine checks and header values discovery could not foresee
        raise MedmtlError(f"{series.label}: cannot load as one volume ({_one_line(err)})") from None
    image.meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = "no_channel"
    image.meta["filename_or_obj"] = str(series.folder)
    return image
