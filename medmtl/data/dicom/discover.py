"""Finding DICOM series: `discover_series` reads the headers of a tree of files with arbitrary names, groups
them by SeriesInstanceUID, orders each series along the normal of ImageOrientationPatient and records what
would stop it from being one regular volume (gaps, duplicate positions, mixed sizes, ...)."""

from __future__ import annotations

import logging
import math
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medmtl.data.dicom.headers import _GREY, _LOCALIZER_WORDS, _Header, _read_header, _slice_normal
from medmtl.data.dicom.info import SeriesInfo, _mm, _one_line
from medmtl.errors import MedmtlError
from medmtl.quiet import silenced

logger = logging.getLogger(__name__)


POSITION_TOL_MM = 0.01  # slice positions closer than this are the same position


ORIENTATION_TOL = 1e-3  # direction cosines closer than this are the same orientation


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


def _most_common(values: Sequence[Any]) -> Any:
    return Counter(values).most_common(1)[0][0] if values else None


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
